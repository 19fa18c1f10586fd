#!/usr/bin/env bash
# The whole GPU run on a lent machine with no package index, within ~9 minutes (docs/gpu.md).
# `make gpu-bundle` copies this script into dist/gpu-bundle/ beside the wheels; run it there:
#
#   bash dist/gpu-bundle/gpu_run.sh OUTDIR            # on the GPU machine
#   bash dist/gpu-bundle/gpu_run.sh --smoke OUTDIR    # CPU smoke run (make gpu-bundle-check)
#
# Parts, in order of value, each under its own time limit (seconds):
#   1. install  (<= 120): the bundle's wheels with pip --no-index --no-deps --target $GRADAUG_SITE,
#      on top of the machine's own torch / torchvision / numpy (never replaced: checked);
#   2. gpu_check (budget GPU_CHECK_BUDGET_MIN, default 6 min; killed at +60 s): every section of
#      tools/gpu_check.py (--smoke: --tiny on the CPU);
#   3. quickstart (what is left of GPU_RUN_BUDGET_S, default 510 s; skipped under 100 s, shortened
#      under 300 s): tools/quickstart.py --device cuda, i.e. `make demo` on the GPU
#      (--smoke: tools/train_net.py for 4 iterations on the tiny generated data, then its evaluation).
# Writes into OUTDIR (at most 8 files): gpu_run.log (this script's log, environment, a summary
# line per part), gpu_check.json, gpu_check.md, gpu_check.log, and quickstart.log,
# quickstart_predictions.png, quickstart_metrics.json (--smoke: train_net.log,
# train_net_metrics.json). Exit status: 0 when every part that ran passed.
# Environment: PYTHON (default python3), GRADAUG_SITE (default /tmp/gradaug-site),
# GPU_RUN_BUDGET_S, GPU_CHECK_BUDGET_MIN, GPU_CHECK_ARGS (more gpu_check arguments, e.g.
# "--sections iteration backbone" for a rerun).
set -u -o pipefail

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
if [ $# -ne 1 ]; then
    echo "usage: bash gpu_run.sh [--smoke] OUTDIR" >&2
    exit 2
fi
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${GRADAUG_REPO:-$(cd "$HERE/../.." && pwd)}
PY=${PYTHON:-python3}
SITE=${GRADAUG_SITE:-/tmp/gradaug-site}
WORK=${GRADAUG_WORK:-/tmp/gradaug-gpu-run}
TOTAL=${GPU_RUN_BUDGET_S:-510}
CHECK_MIN=${GPU_CHECK_BUDGET_MIN:-6}
GPU_CHECK_ARGS=${GPU_CHECK_ARGS:-}  # e.g. "--skip backbone" for a rerun
if [ ! -f "$REPO/tools/gpu_check.py" ] || ! ls "$HERE"/wheels/*.whl >/dev/null 2>&1; then
    echo "gpu_run.sh: expected the bundle at REPO/dist/gpu-bundle with wheels/ (REPO=$REPO, bundle=$HERE): " \
         "run 'make gpu-bundle' in the checkout and carry dist/gpu-bundle" >&2
    exit 2
fi
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_run.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
export DETECTRON2_DATASETS="$WORK/datasets"
FAILED=0
STOPPED=0

log() { echo "[gpu_run $(printf '%4d' "$SECONDS") s] $*" | tee -a "$LOG"; }

# part NAME LIMIT_S LOGFILE CMD...: runs CMD under `timeout`, its output in LOGFILE, its tail in LOG
part() {
    local name=$1 limit=$2 out=$3 t0=$SECONDS rc
    shift 3
    local cmd="$*"
    cmd=${cmd//$'\n'/ }
    log "$name: start (limit ${limit} s): ${cmd:0:160}$([ ${#cmd} -gt 160 ] && echo ...)"
    timeout -k 15 "$limit" "$@" > "$out" 2>&1
    rc=$?
    tail -n 15 "$out" | sed 's/^/    /' >> "$LOG"
    if [ $rc -eq 0 ]; then
        log "$name: ok ($((SECONDS - t0)) s)"
    else
        if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
            log "$name: TIMED OUT after ${limit} s"
        else
            log "$name: FAILED (exit $rc, $((SECONDS - t0)) s)"
        fi
        FAILED=1
    fi
    return $rc
}

cd "$REPO" || exit 2
log "repo $REPO, bundle $HERE, python $(command -v "$PY"), smoke=$SMOKE, budget ${TOTAL} s"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import sys, torch, torchvision, numpy; print('python', sys.version.split()[0], '| torch', torch.__version__,
'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| torchvision', torchvision.__version__, '| numpy', numpy.__version__)"
} 2>&1 | sed 's/^/    /' >> "$LOG"

# 1. install the bundle beside (not over) the machine's packages
rm -rf "$SITE"
if part install 120 "$WORK/install.log" "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$SITE" "$HERE"/wheels/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    part imports 60 "$WORK/imports.log" "$PY" -P -c "
import os, sys
site = os.path.realpath(sys.argv[1])
import torch, torchvision, numpy
for m in (torch, torchvision, numpy):
    assert not os.path.realpath(m.__file__).startswith(site), f'{m.__name__} was shadowed by the bundle: {m.__file__}'
import detectron2, fvcore, iopath, pycocotools.mask, omegaconf, hydra, gradaug_det
from detectron2.engine import DefaultTrainer
for m in (detectron2, gradaug_det, fvcore, pycocotools):
    assert os.path.realpath(m.__file__).startswith(site), f'{m.__name__} not from the bundle: {m.__file__}'
print('imports ok: torch', torch.__version__, 'from', os.path.dirname(torch.__file__), '| detectron2', detectron2.__version__)
" "$SITE" || STOPPED=1
else
    STOPPED=1
fi

if [ $STOPPED -eq 0 ]; then
    # 2. tools/gpu_check.py: every section; its own budget skips what no longer fits
    if [ $SMOKE -eq 1 ]; then
        part gpu_check 600 "$OUT/gpu_check.log" "$PY" tools/gpu_check.py --tiny --output-dir "$OUT" --budget-min 10
    else
        part gpu_check $((CHECK_MIN * 60 + 60)) "$OUT/gpu_check.log" \
            "$PY" tools/gpu_check.py --output-dir "$OUT" --budget-min "$CHECK_MIN" $GPU_CHECK_ARGS
    fi

    # 3. the quickstart on the GPU (smoke: a short training run on the tiny data)
    LEFT=$((TOTAL - SECONDS))
    if [ $SMOKE -eq 1 ]; then
        rm -rf "$WORK/train_net"
        part train_net 600 "$OUT/train_net.log" "$PY" tools/train_net.py \
            --config-file configs/quickstart/mask_rcnn_gradaug.yaml MODEL.DEVICE cpu SOLVER.MAX_ITER 4 \
            SOLVER.WARMUP_ITERS 0 DATALOADER.NUM_WORKERS 0 OUTPUT_DIR "$WORK/train_net" \
            DATASETS.TRAIN "('gradaug_quickstart_tiny_train',)" DATASETS.TEST "('gradaug_quickstart_tiny_val',)" \
        && cp "$WORK/train_net/metrics.json" "$OUT/train_net_metrics.json" \
        && part train_net_metrics 30 "$WORK/metrics_check.log" "$PY" -P -c "
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
losses = [r['total_loss'] for r in rows if 'total_loss' in r]
assert losses and all(math.isfinite(v) for v in losses), losses
assert any(k.startswith('gradaug/') for r in rows for k in r), 'no sub-network losses logged'
assert 'bbox/AP' in rows[-1] and 'segm/AP' in rows[-1], sorted(rows[-1])
print('train_net: iterations', [r['iteration'] for r in rows if 'total_loss' in r], 'total_loss', losses,
      'bbox AP', rows[-1]['bbox/AP'], 'segm AP', rows[-1]['segm/AP'])
" "$OUT/train_net_metrics.json"
    elif [ $LEFT -lt 100 ]; then
        log "quickstart: skipped (${LEFT} s left of ${TOTAL} s)"
    else
        QS_ARGS=()
        [ $LEFT -lt 300 ] && QS_ARGS=(--pretrain-iters 100 --iters 300)
        rm -rf "$WORK/quickstart"
        part quickstart $((LEFT - 10)) "$OUT/quickstart.log" "$PY" tools/quickstart.py --device cuda \
            --output-dir "$WORK/quickstart" ${QS_ARGS[@]+"${QS_ARGS[@]}"}
        cp "$WORK/quickstart/predictions.png" "$OUT/quickstart_predictions.png" 2>/dev/null
        cp "$WORK/quickstart/mask_rcnn/metrics.json" "$OUT/quickstart_metrics.json" 2>/dev/null
    fi
fi

log "done in ${SECONDS} s: $([ $FAILED -eq 0 ] && [ $STOPPED -eq 0 ] && echo 'all parts passed' || echo 'SOME PART FAILED (see above)'); outputs: $(ls "$OUT" | tr '\n' ' ')"
[ $FAILED -eq 0 ] && [ $STOPPED -eq 0 ]
