# Fresh-machine entry points: `make run` and `make test` set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.voxflow-installed
PYTEST_ARGS ?=

.PHONY: setup run demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned on its own: an unpinned resolve would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: the server on the default voice (it prints its URL; Ctrl-C or SIGTERM stops it).
run: setup
	$(VENV)/bin/voxflow serve

# Speak demos/paragraph.txt through the streaming path into demo.wav, printing the latency.
demo: setup
	$(VENV)/bin/voxflow say --stream --tps 50 --file demos/paragraph.txt -o demo.wav

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/server.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis demo.wav
