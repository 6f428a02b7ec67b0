# mosaic-kd: `make demo` runs the built-in default job, `make test` runs the tests.
# Both create the virtual environment and install everything on first use
# (the [export] extra too, about 37 MB of wheels, so the ONNX export tests run in CI).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 are installed from the local disk on the project's machines;
# elsewhere pip downloads them (override TORCH_SPEC for another build, e.g. a CPU wheel index).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,export,tensorboard]"
	touch $@

demo: install
	$(PY) experiments/demo.py

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
