# Fresh-machine entry points: `make run` and `make test` set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.voxflow-installed
PYTEST_ARGS ?=
# Debian packages the tests drive for real: Chromium (browser end-to-end), mosquitto (MQTT),
# HAProxy (replicas behind a load balancer, deploy/haproxy.cfg).
SYSTEM_PACKAGES := chromium mosquitto mosquitto-clients haproxy
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-packages run demo test bench clean

$(STAMP): pyproject.toml deploy/install.sh
	# torch pinned, first and on its own, then the project: the Dockerfile runs the same script.
	PYTHON=$(PYTHON) sh deploy/install.sh $(VENV) -e '.[test]'
	# resemblyzer (GE2E, the independent speaker encoder the voice tests and benchmark judge
	# with) without its declared dependencies: they name the `webrtcvad` sdist (a compiler) and
	# the `typing` backport; webrtcvad-wheels, librosa and torch, already here, are what it uses.
	$(PY) -m pip install -q --no-deps resemblyzer==0.1.4
	# Bytecode for the project's own modules, as a wheel install has (the editable install has
	# none): where PYTHONDONTWRITEBYTECODE is set (containers, CI) every start would compile
	# them again, ~0.25 s of `voxflow serve` and `voxflow say`. Stale files are recompiled.
	$(PY) -m compileall -q voxflow
	touch $(STAMP)

setup: $(STAMP)

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing $$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The main job: the server on the default voice (it prints its URL; Ctrl-C or SIGTERM stops it).
run: setup
	$(VENV)/bin/voxflow serve

# Speak demos/paragraph.txt through the streaming path into demo.wav, printing the latency.
demo: setup
	$(VENV)/bin/voxflow say --stream --tps 50 --file demos/paragraph.txt -o demo.wav

test: setup system-packages
	# Real speech for the voice-matching tests: Debian's Asterisk prompts, cached in ~/.cache.
	$(PY) tests/recordings.py fetch
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m pip install -q -e '.[test,bench]'
	# Every benchmark runs with --check; the target fails at the end if any missed a target.
	status=0; for b in engine server fidelity throughput; do $(PY) benchmarks/$$b.py --check || status=1; done; exit $$status

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis demo.wav
