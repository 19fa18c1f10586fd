"""tools/compare.py (`make compare`) run as a user runs it on their own registered dataset
(--register MODULE --dataset NAME), at smoke size: the three arms train through
tools/train_net.py, the equal-time arm gets GradAug's time, the table and the PNG are written."""
import json
import math
import os
import re
import shlex
import subprocess
import sys

from gradaug_det.data import generate_coco_shapes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ("MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.ROI_MASK_HEAD.NUM_CONV", "1", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MIN_SIZE_TEST", "64")


def test_compare_on_a_user_registered_dataset(tmp_path):
    paths = generate_coco_shapes(str(tmp_path / "data"), num_train=4, num_val=2, image_size=64, progress=False)
    (tmp_path / "my_datasets.py").write_text(
        "from detectron2.data.datasets import register_coco_instances\n"
        f"register_coco_instances('my_shapes_train', {{}}, {paths['train']['json_file']!r}, "
        f"{paths['train']['image_root']!r})\n"
        f"register_coco_instances('my_shapes_val', {{}}, {paths['val']['json_file']!r}, "
        f"{paths['val']['image_root']!r})\n")
    config = tmp_path / "my_mask_rcnn_gradaug.yaml"
    config.write_text(f"_BASE_: {os.path.join(REPO, 'configs', 'quickstart', 'mask_rcnn_gradaug.yaml')!r}\n")
    out = tmp_path / "cmp"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    cmd = [sys.executable, os.path.join(REPO, "tools", "compare.py"), "--config-file", str(config),
           "--register", "my_datasets", "--dataset", "my_shapes_train", "--val-dataset", "my_shapes_val",
           "--seeds", "5", "--iters", "3", "--eval-points", "1", "--device", "cpu", "--quiet",
           "--output-dir", str(out), "--opts", *TINY]
    res = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    with open(out / "results.json") as f:
        runs = json.load(f)["runs"]
    assert [(r["arm"], r["seed"]) for r in runs] == [("baseline", 5), ("gradaug", 5), ("baseline_equal_time", 5)]
    base, grad, equal = runs
    assert base["iters"] == grad["iters"] == 3
    # equal time: the baseline gets iters x t_gradaug / t_baseline iterations (at least eval-points)
    assert equal["iters"] == max(1, round(3 * grad["seconds"] / base["seconds"]))
    for r in runs:
        assert r["curves"]["bbox"] and r["curves"]["bbox"][-1]["iter"] == r["iters"]
        # the table's AP is the run's last evaluation (NaN when a 3-iteration model detects nothing)
        # (detectron2's JSON writer leaves out a task whose every metric is NaN: no curve, no AP)
        for task in ("bbox", "segm"):
            final = r[f"{task}_AP"]
            last = r["curves"][task][-1]["AP"] if r["curves"][task] else None
            assert final == last or (math.isnan(final) and math.isnan(last))
    with open(out / "runs.log") as f:
        log = f.read()
    # each run is tools/train_net.py, seen through the --register bootstrap, on the user's data
    commands = [shlex.split(line.split("] ", 1)[1]) for line in log.splitlines()
                if re.match(r"^\[(baseline|gradaug|baseline_equal_time) seed 5\] ", line)]
    assert len(commands) == 3
    for argv in commands:
        assert argv[1] == "-c" and "importlib.import_module('my_datasets')" in argv[2]
        assert "tools/train_net.py" in argv[2]
        i = argv.index("DATASETS.TRAIN")
        assert argv[i + 1] == "('my_shapes_train',)"
    assert [argv.count("GRADAUG.ENABLED") for argv in commands] == [1, 0, 1]
    table = (out / "results.md").read_text()
    assert "| GradAug | 1 | 3 |" in table and "baseline, equal training time" in table
    assert (out / "ap_curves.png").stat().st_size > 10000
    assert res.stdout.rstrip().splitlines()[-1].endswith("runs.log")


def test_compare_refuses_an_unregistered_dataset_before_training(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(REPO, "tools", "compare.py"), "--dataset", "nope_train",
                          "--output-dir", str(tmp_path / "cmp")], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "--dataset 'nope_train' is not a registered dataset (pass --register MODULE" in res.stderr
    assert not (tmp_path / "cmp").exists()
