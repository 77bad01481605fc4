# `make run` is the main job (the lab); `make test` runs the gates (`make lint`) and every test. Both set the machine up first.
PY := .venv/bin/python

.PHONY: setup run test lint bpf clean

setup:
	bash scripts/setup.sh

bpf:
	$(PY) hatch_build.py

run: setup
	.venv/bin/bpfnet doctor
	.venv/bin/bpfnet lab run

BPF_C := $(shell find src/bpfnet/bpf -name '*.[ch]' -not -path '*/build/*' | sort)

# The gates: style and types of the Python, the layers (import contract), the style of the BPF C.
lint: setup
	.venv/bin/ruff check src tests
	.venv/bin/mypy src
	.venv/bin/lint-imports
	clang-format-16 --dry-run --Werror $(BPF_C)

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf src/bpfnet/bpf/build .pytest_cache
