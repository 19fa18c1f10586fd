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

.PHONY: install install-mmdet demo demo-mmdet compare study tradeoff test test-mmdet env clean-venv gpu-bundle gpu-bundle-check

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

# The same pipeline for MMDetection users on the same data (tools/mmdet_quickstart.py: the
# detectron2 quickstart's GradAug pretraining -> convert to torchvision names -> GradAug Mask
# R-CNN through tools/mmdet_train.py -> CocoMetric at widths through tools/mmdet_test.py ->
# picture): output/quickstart_mmdet/. DEMO_MMDET_ARGS passes flags, e.g. "--seed 1".
DEMO_MMDET_ARGS ?=
demo-mmdet: $(MMDET_STAMP)
	$(PY) -m gradaug_det.env
	$(PY) tools/mmdet_quickstart.py $(DEMO_MMDET_ARGS)

# Baseline vs GradAug, 3 seeds, equal iterations and equal training time (tools/compare.py),
# the short version: 400 iterations per equal-iteration run (the demo's schedule, shortened)
# so that the 9 runs fit in about 30 minutes on 2 CPU cores; COMPARE_ITERS=850 for the demo's.
# Neither arm has converged at 400 iterations: it shows GradAug's cost per iteration and the
# early part of the AP curves, not whether GradAug gives a better detector trained to
# convergence (the paper's comparison); that is `make study` (docs/study.md).
COMPARE_ITERS ?= 400
compare: $(STAMP)
	$(PY) -m gradaug_det.env
	$(PY) tools/compare.py --iters $(COMPARE_ITERS) $(COMPARE_ARGS)

# The pre-registered study of docs/study.md (issue 26): baseline, GradAug with the demo's
# recipe and with the reference recipe, trained to convergence (the schedule found by one
# baseline probe, then fixed), 3 seeds, on the full training split and on a seeded 10 %,
# and the baseline from a baseline-pretrained backbone (full data). Hours on a CPU: see
# docs/study.md for the estimate. STUDY_ARGS adds flags to both runs, e.g. "--device cuda".
STUDY_DIR ?= output/study
STUDY_ARGS ?=
STUDY_SCHEDULE := --eval-period 100 --patience 5 --min-delta 0.5 --max-iters 3400
STUDY_ARMS := baseline=:GRADAUG.ENABLED=False gradaug_demo= \
	gradaug_ref=:GRADAUG.NUM_SUBNETS=3,GRADAUG.SUBNET_LOSS=soft,GRADAUG.MIN_WIDTH=0.9,GRADAUG.MAX_WIDTH=1.0
study: $(STAMP)
	$(PY) -m gradaug_det.env
	$(PY) tools/compare.py --until-converged $(STUDY_SCHEDULE) --seeds 0 1 2 \
		--arms $(STUDY_ARMS) baseline_pre_baseline=:GRADAUG.ENABLED=False,pretrain=baseline \
		--output-dir $(STUDY_DIR)/full --quiet --resume $(STUDY_ARGS)
	$(PY) tools/compare.py --schedule-from $(STUDY_DIR)/full/results.json --eval-period 100 --seeds 0 1 2 \
		--arms $(STUDY_ARMS) --train-fraction 0.1 --fraction-seed 0 --pretrain-dir $(STUDY_DIR)/full/pretrain \
		--output-dir $(STUDY_DIR)/scarce --quiet --resume $(STUDY_ARGS)

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
# TEST_WORKERS pytest-xdist processes (default 2, this project's 2-core CI machine), one torch
# thread each: two processes of 2 OpenMP threads on 2 cores slow each other down many times
# over. Most tests use one core, so 2 workers take about 60 % of the one-process time.
# TEST_WORKERS=0 runs in one process. The same for `make test-mmdet`.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m gradaug_det.env
	OMP_NUM_THREADS=1 $(PY) -m pytest --ignore=tests/mmdet_adapter -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-mmdet: $(MMDET_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/mmdet_adapter -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

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
