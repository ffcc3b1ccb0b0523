# The README's two set-up commands are `make demo` and `make test`; both install first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export NNCF_CI := 1
export PYTHONUNBUFFERED := 1

.PHONY: test-emulator install demo test bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt tools/install.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# `pip install -c constraints.txt -e '.[dev]'`, done by uv with pip's own settings (seconds, not a minute); pip
	# when uv cannot (EDGERES_INSTALLER=pip asks for pip)
	$(PY) tools/install.py $(VENV)
	touch $@

demo: install
	$(BIN)/edgeres build --arch resnet18 --int8 --out runs/demo

test: install
	$(BIN)/python -m pytest -q

test-emulator: install   # the TensorRT path on the TensorRT emulator alone (also part of `make test`)
	$(BIN)/python -m pytest -q -m trt_emulator

bench: install
	$(BIN)/python benchmarks/run.py --out bench-results

lint: install
	$(BIN)/ruff check edgeres tests benchmarks

clean:
	rm -rf runs bench-results .pytest_cache
