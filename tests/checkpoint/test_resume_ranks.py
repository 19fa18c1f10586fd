"""Every rank resumes its own data stream (issue 20, item 2): rank 0 saves every rank's stream
position, each rank continues from its own, and a checkpoint lacking a rank is refused.

With mixed orientations, aspect-ratio grouping makes the ranks read unequal parts of their
streams; before per-rank states, rank 1 resumed from rank 0's position."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from detectron2.utils import comm

from gradaug_det.checkpoint.checkpointer import GradAugCheckpointer
from gradaug_det.data.resumable import DataStreamStateError, ResumableDataHook, ResumableTrainLoader, check_rank_states

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
CONFIG = os.path.join(ROOT, "configs", "mask_rcnn_gradaug.yaml")

#: tools/train_net.py, recording every batch each rank's resumable loader yields: per image its
#: file name and a hash of the augmented image tensor (a replayed stream position of the same
#: file is flipped otherwise); one line per batch, in $GRADAUG_TEST_READS/rank<r>.txt.
RECORDING_TRAIN_NET = textwrap.dedent('''
    import hashlib, os, runpy
    from detectron2.utils import comm
    from gradaug_det.data import resumable

    _iter = resumable.ResumableTrainLoader.__iter__

    def _recording_iter(self):
        for batch in _iter(self):
            with open(os.path.join(os.environ["GRADAUG_TEST_READS"], f"rank{comm.get_rank()}.txt"), "a") as f:
                f.write(" ".join(os.path.basename(d["file_name"]) + ":" +
                                 hashlib.sha1(d["image"].numpy().tobytes()).hexdigest()[:10] for d in batch) + "\\n")
            yield batch

    resumable.ResumableTrainLoader.__iter__ = _recording_iter
    _tool = runpy.run_path(TOOL, run_name="train_net")

    def main(args):
        return _tool["main"](args)

    if __name__ == "__main__":
        from gradaug_det.engine.launch import launch_tool
        launch_tool(main, _tool["get_parser"]().parse_args())
''')

#: Small-model overrides (tests/conftest.py's TINY_RCNN_OPTS without its datasets): the
#: subprocesses read detectron2's coco_2017_train from $DETECTRON2_DATASETS.
_TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.BASE_LR", "0.002", "SOLVER.WARMUP_ITERS", "0",
    "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "()", "TEST.SLIM_WIDTHS", "[]",
]


def _train_net_two_ranks(tmp_path, data_root, out, *argv):
    """tools/train_net.py with --num-gpus 2 (two gloo processes): 2 images per rank, 4
    iterations, a checkpoint every 2. Returns each rank's batches (lists of "file:image hash")."""
    script = tmp_path / "recording_train_net.py"
    script.write_text(f"TOOL = {TRAIN_NET!r}\n" + RECORDING_TRAIN_NET)
    reads = out / "reads"
    os.makedirs(reads)
    env = dict(os.environ, DETECTRON2_DATASETS=data_root, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               GRADAUG_TEST_READS=str(reads), PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(script), "--config-file", CONFIG, "--num-gpus", "2", "--dist-url", "auto", *argv,
           *_TINY, "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
           "SEED", "3", "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [[line.split() for line in (reads / f"rank{r}.txt").read_text().splitlines()] for r in range(2)]


def test_two_rank_train_net_resumes_every_rank_exactly(tmp_path, tiny_coco_mixed):
    """Resumed from the iteration-1 checkpoint on 2 processes, each rank reads the batches it
    read in the uninterrupted run, and the final weights are those of that run, bit for bit."""
    ref = _train_net_two_ranks(tmp_path, tiny_coco_mixed, tmp_path / "ref")
    assert [len(r) for r in ref] == [4, 4] and ref[0] != ref[1]
    state = torch.load(tmp_path / "ref" / "model_0000001.pth", weights_only=True)
    entry = state["trainer"]["hooks"]["ResumableDataHook"]
    assert state["iteration"] == 1 and entry["world_size"] == 2 and [s["rank"] for s in entry["ranks"]] == [0, 1]
    # the ranks stand at different positions of their streams: rank 0's would not do for rank 1
    positions = [(s["next_position"], s["waiting"]) for s in entry["ranks"]]
    assert positions[0] != positions[1], positions
    for s, batches in zip(entry["ranks"], ref):  # 2 batches of 2 read, the rest of next_position waits
        assert s["next_position"] == 4 + sum(len(b) for b in s["waiting"])

    out = tmp_path / "resumed"
    os.makedirs(out)
    torch.save(state, out / "model_0000001.pth")
    (out / "last_checkpoint").write_text("model_0000001.pth")
    resumed = _train_net_two_ranks(tmp_path, tiny_coco_mixed, out, "--resume")
    assert resumed == [ref[0][2:], ref[1][2:]]  # every rank: its own remaining batches
    a = torch.load(tmp_path / "ref" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


#: Two gloo processes, each with the LazyConfig tool's loader (instantiate_lazy_train_loader of
#: build_detection_train_loader) and the classification loader (build_classification_train_loader)
#: over mixed-orientation dataset dicts, behind a ResumableDataHook: after 3 batches, rank 0's hook
#: state (what it would save) goes to fresh loaders on both ranks, which read 3 batches; the first
#: loaders read their next 3. Each rank writes what it read.
LOADER_WORKER = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as dist

    rank, init_file, out_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    from detectron2.config import LazyCall as L, get_cfg
    from detectron2.data import build_detection_train_loader
    from detectron2.data.samplers import TrainingSampler
    from detectron2.utils import comm
    from gradaug_det.data.classification import build_classification_train_loader
    from gradaug_det.data.resumable import ResumableDataHook, instantiate_lazy_train_loader

    DICTS = [{"file_name": str(i), "image_id": i, "width": 30 if i % 3 == 1 else 40,
              "height": 40 if i % 3 == 1 else 30} for i in range(11)]

    def dicts():
        return DICTS

    def lazy():
        return instantiate_lazy_train_loader(L(build_detection_train_loader)(
            dataset=L(dicts)(), mapper=None, sampler=L(TrainingSampler)(size=11, seed=5), total_batch_size=4,
            aspect_ratio_grouping=True, num_workers=0))

    def classification():
        cfg = get_cfg()
        cfg.DATALOADER.NUM_WORKERS, cfg.SOLVER.IMS_PER_BATCH = 0, 4
        cfg.DATALOADER.RESUMABLE = True
        return build_classification_train_loader(cfg, mapper=dict, dataset=DICTS)

    def read(it, n):
        return [[d["file_name"] for d in next(it)] for _ in range(n)]

    result = {}
    for name, build in (("lazy", lazy), ("classification", classification)):
        first = build()
        hook = ResumableDataHook(first)
        it = iter(first)
        before = read(it, 3)
        state = comm.all_gather(hook.state_dict())[0]  # rank 0's, as the checkpoint it writes
        after = read(it, 3)
        resumed = build()
        ResumableDataHook(resumed).load_state_dict(state)
        result[name] = {"before": before, "after": after, "resumed": read(iter(resumed), 3), "state": state}
    with open(out_file, "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
''')


def test_lazy_and_classification_loaders_resume_every_rank(tmp_path):
    """The LazyConfig tool's and the classification loader's hook state holds both ranks'
    positions (gathered to rank 0) and each rank continues its own stream from it."""
    (tmp_path / "worker.py").write_text(LOADER_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), str(tmp_path / "init"),
                               str(tmp_path / f"out{r}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    results = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    for name in ("lazy", "classification"):
        state = results[0][name]["state"]
        assert state["world_size"] == 2 and [s["rank"] for s in state["ranks"]] == [0, 1], name
        assert results[0][name]["after"] != results[1][name]["after"], name  # two different streams
        for r in range(2):
            assert results[r][name]["resumed"] == results[r][name]["after"], (name, r)
    # aspect-ratio grouping (the LazyConfig loader's): the ranks stand at different positions
    lazy = [(s["next_position"], s["waiting"]) for s in results[0]["lazy"]["state"]["ranks"]]
    assert lazy[0] != lazy[1], lazy


# ---- refusals --------------------------------------------------------------------------------

def _state(rank, next_position=4):
    return {"next_position": next_position, "waiting": [[], []], "seed": 7, "batch_size": 2, "rank": rank}


@pytest.mark.parametrize("entry, world, says", [
    ({"world_size": 2, "ranks": [_state(0), _state(1)]}, 1, "resume it with 2 process(es)"),
    ({"world_size": 1, "ranks": [_state(0)]}, 2, "resume it with 1 process(es)"),
    ({"world_size": 2, "ranks": [_state(0), None]}, 2, "positions of rank(s) [0] of a run of 2 process(es)"),
    (_state(0), 2, "only rank 0's data stream position (written before per-rank states"),
])
def test_a_checkpoint_lacking_a_rank_is_refused(entry, world, says):
    with pytest.raises(DataStreamStateError) as e:
        check_rank_states(entry, world)
    message = str(e.value)
    assert says in message and f"this run of {world} process(es) needs every rank's own" in message
    assert "without --resume" in message and "\n" not in message


def test_matching_entries_are_accepted():
    two = {"world_size": 2, "ranks": [_state(0), _state(1, 6)]}
    assert check_rank_states(two, 2) == two["ranks"]
    assert check_rank_states(_state(0), 1) == [_state(0)]  # an older checkpoint of one process


def test_resume_refuses_a_checkpoint_of_one_process_on_two(tmp_path, monkeypatch):
    """Through the checkpointer, as --resume loads: the one-line error names the file; the
    loader keeps its state."""
    from torch import nn

    from detectron2.data.samplers import TrainingSampler
    from detectron2.engine import SimpleTrainer

    dataset = [{"id": i, "width": 40, "height": 30} for i in range(6)]
    model = nn.Linear(1, 1)
    loader = ResumableTrainLoader(dataset, None, TrainingSampler(6, seed=7), batch_size=2)
    trainer = SimpleTrainer(model, loader, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.register_hooks([ResumableDataHook(loader)])
    checkpointer = GradAugCheckpointer(model, str(tmp_path), trainer=trainer)
    checkpointer.save("model_0000001", iteration=1)  # one process: {"world_size": 1, "ranks": [...]}
    path = str(tmp_path / "model_0000001.pth")
    before = loader.state_dict()
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    with pytest.raises(DataStreamStateError, match=r"^" + path.replace(".", r"\.") +
                       r": the checkpoint holds the data stream positions of rank\(s\) \[0\] of a run of 1 "
                       r"process\(es\), this run of 2 process\(es\) needs every rank's own: resume it with 1"):
        checkpointer.resume_or_load("", resume=True)
    assert loader.state_dict() == before


def test_two_process_resume_of_a_one_process_checkpoint_is_one_line(tmp_path, tiny_coco_mixed):
    """tools/train_net.py --num-gpus 2 --resume on a one-process run's checkpoint: the workers
    refuse it; the command prints one error line (no worker traceback) and exits 2."""
    out = tmp_path / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=tiny_coco_mixed, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("GRADAUG_DET_DEBUG", None)
    common = [*_TINY, "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1",
              "OUTPUT_DIR", str(out)]
    one = subprocess.run([sys.executable, TRAIN_NET, "--config-file", CONFIG, *common], env=env, cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, TRAIN_NET, "--config-file", CONFIG, "--num-gpus", "2", "--dist-url", "auto",
                          "--resume", *common[:-4], "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out)], env=env,
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert two.returncode == 2, two.stderr[-3000:]
    errors = [line for line in two.stderr.splitlines() if line.startswith("error")]
    assert errors and "this run of 2 process(es) needs every rank's own" in errors[0], two.stderr[-3000:]
    assert "Traceback" not in two.stderr
