# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create (once) and reuse a virtual environment at $(VENV). The MMDetection adapter
# is optional: `make test-mmdet` adds mmengine/mmcv/mmdet to the same environment (mmcv
# 2.1.0 is built once, ~14 min on 2 cores, and cached under
# $GRADAUG_DET_CACHE, default ~/.cache/gradaug-det).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradaug-det-installed
MMDET_STAMP := $(VENV)/.gradaug-det-mmdet-installed
# Extra flags for `python -m venv`, e.g. VENV_FLAGS=--system-site-packages to reuse a
# cluster's official detectron2 (tools/install_detectron2.py then leaves it untouched).
VENV_FLAGS ?=
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install install-mmdet demo compare tradeoff test test-mmdet env clean-venv gpu-bundle gpu-bundle-check

install: $(STAMP)

$(STAMP): setup.py tools/install_detectron2.py
	@test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	@touch $@

install-mmdet: $(MMDET_STAMP)

$(MMDET_STAMP): $(STAMP) tools/install_mmdet.py
	$(PY) tools/install_mmdet.py
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,mmdet]"
	@touch $@

env: $(STAMP)
	$(PY) -m gradaug_det.env

# The paper's pipeline in miniature on generated data (tools/quickstart.py: GradAug
# pretraining -> convert -> GradAug Mask R-CNN -> AP at widths -> prune -> pictures).
# DEMO_ARGS / COMPARE_ARGS pass flags, e.g. DEMO_ARGS="--device cpu --seed 1".
DEMO_ARGS ?=
COMPARE_ARGS ?=
demo: $(STAMP)
	$(PY) -m gradaug_det.env
	$(PY) tools/quickstart.py $(DEMO_ARGS)

# Baseline vs GradAug, 3 seeds, equal iterations and equal training time (tools/compare.py).
# 400 iterations per equal-iteration run (the demo's schedule, shortened) so that the 9
# runs fit in about 30 minutes on 2 CPU cores; COMPARE_ITERS=850 for the demo's.
COMPARE_ITERS ?= 400
compare: $(STAMP)
	$(PY) -m gradaug_det.env
	$(PY) tools/compare.py --iters $(COMPARE_ITERS) $(COMPARE_ARGS)

# AP against cost of `make demo`'s model over widths and test sizes (tools/tradeoff.py):
# output/quickstart/tradeoff/tradeoff.{json,md,png}. TRADEOFF_ARGS adds flags, e.g.
# TRADEOFF_ARGS="--budget-gflops 0.5" to export the best configuration under a budget.
QUICKSTART_DIR ?= output/quickstart
TRADEOFF_ARGS ?=
tradeoff: $(STAMP)
	$(PY) tools/tradeoff.py --config-file $(QUICKSTART_DIR)/mask_rcnn/config.yaml \
		--widths 1.0 0.9 0.75 0.5 --sizes 128 112 96 --output $(QUICKSTART_DIR)/tradeoff $(TRADEOFF_ARGS) \
		MODEL.WEIGHTS $(QUICKSTART_DIR)/mask_rcnn/model_final.pth

# The detectron2 suite; the MMDetection adapter's tests run in `make test-mmdet`.
test: $(STAMP)
	$(PY) -m gradaug_det.env
	$(PY) -m pytest --ignore=tests/mmdet_adapter $(PYTEST_ARGS)

test-mmdet: $(MMDET_STAMP)
	$(PY) -m pytest tests/mmdet_adapter $(PYTEST_ARGS)

# The wheel bundle for a lent GPU machine that reaches no package index (docs/gpu.md):
# dist/gpu-bundle/ (<= 60 MiB) with gpu_run.sh, the one command to run there. Only needs a
# Python with pip (no torch). gpu-bundle-check proves it here: a Python 3.12 environment with
# the lent machine's torch 2.11 / torchvision 0.26 (cached under $GRADAUG_DET_CACHE), the
# bundle installed with no index, gpu_check --tiny and a short training run.
GPU_BUNDLE ?= dist/gpu-bundle
GPU_BUNDLE_PY ?= python3
gpu-bundle: $(GPU_BUNDLE)/gpu_run.sh

# rebuilt when gradaug-det's sources or the bundle's recipe change
$(GPU_BUNDLE)/gpu_run.sh: setup.py tools/gpu_bundle.py tools/gpu_run.sh tools/install_detectron2.py \
		$(shell find gradaug_det -name '*.py')
	$(GPU_BUNDLE_PY) tools/gpu_bundle.py build --out $(GPU_BUNDLE)

gpu-bundle-check: $(GPU_BUNDLE)/gpu_run.sh
	$(GPU_BUNDLE_PY) tools/gpu_bundle.py check --bundle $(GPU_BUNDLE)

clean-venv:
	rm -rf $(VENV)
