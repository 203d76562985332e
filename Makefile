# Two commands from a fresh clone: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench embedded-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gru-engine demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/gru-engine bench

# The exported airline model on a Cortex-M4F under QEMU (installs the Debian cross tools when missing).
EMBEDDED_PACKAGES := gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
embedded-check: $(STAMP)
	@dpkg -s $(EMBEDDED_PACKAGES) >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(EMBEDDED_PACKAGES); }
	$(BIN)/python -m gru_engine.bench.embedded

clean:
	rm -rf $(VENV) build dist *.egg-info demo-out bench-out
