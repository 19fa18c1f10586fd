# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create (once) and reuse a virtual environment at $(VENV).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradaug-det-installed
# Extra flags for `python -m venv`, e.g. VENV_FLAGS=--system-site-packages to reuse a
# cluster's official detectron2 (tools/install_detectron2.py then leaves it untouched).
VENV_FLAGS ?=
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install demo test env clean-venv

install: $(STAMP)

$(STAMP): setup.py tools/install_detectron2.py
	@test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	@touch $@

env: $(STAMP)
	$(PY) -m gradaug_det.env

demo: $(STAMP)
	$(PY) -m gradaug_det.env
	$(PY) tools/quickstart.py

test: $(STAMP)
	$(PY) -m gradaug_det.env
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
