# `make run` is the main job (the lab); `make test` runs every test. Both set the machine up first.
PY := .venv/bin/python

.PHONY: setup run test bpf clean

setup:
	bash scripts/setup.sh

bpf:
	$(PY) hatch_build.py

run: setup
	.venv/bin/bpfnet doctor
	.venv/bin/bpfnet lab run

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf src/bpfnet/bpf/build .pytest_cache
