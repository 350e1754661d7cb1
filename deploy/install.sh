#!/bin/sh
# Installs voxflow into a virtual environment. `make setup` runs it (with the test extras) and
# so does the Dockerfile (without them): the image is built by the commands CI runs.
#
#   sh deploy/install.sh VENV PIP_ARGS...     e.g.  sh deploy/install.sh .venv -e '.[test]'
#
# PYTHON: the interpreter that makes the environment (default python3).
# TORCH_INDEX_URL: where pip finds torch (default: pip's own configuration); the Dockerfile gives
# PyTorch's CPU index, whose build is the one these machines resolve torch==2.13.0 to.
set -eu
venv=$1
shift
test -x "$venv/bin/python" || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first and pinned on its own: an unpinned resolve would pull a multi-GB CUDA build.
"$venv/bin/python" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
"$venv/bin/python" -m pip install -q "$@"
