# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, from local disk; everything after it keeps that build.
	$(PIP) install -q "torch==2.13.0"
	# llama-cpp-python builds from source (~5 min on 2 cores, then cached by pip): a portable build.
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF" $(PIP) install -q -e ".[llama,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fabrika run examples/tiny-cpu.yaml

# The report test renders the run report in Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } || \
	  echo "warning: could not install Debian's chromium; the report test will say so"

test: $(STAMP) browser
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) runs
