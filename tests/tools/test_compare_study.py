"""tools/compare.py's study mode (issue 26): the --arms syntax, the --until-converged rule on
hand-made AP curves, the report's numbers (best AP, time to reach the baseline's best AP) on a
hand-made results set, one-line refusals, and one tiny end-to-end run through the command line."""
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest

from gradaug_det.utils.cli import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_gradaug.yaml")
TINY = ("MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.ROI_MASK_HEAD.NUM_CONV", "1", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MIN_SIZE_TEST", "64")


@pytest.fixture(scope="module")
def compare(load_tool):
    return load_tool("compare")


def test_arms_default_and_reference_recipe(compare):
    base, grad = compare.parse_arms(None, CONFIG)
    assert base == {"name": "baseline", "config": CONFIG, "opts": ["GRADAUG.ENABLED", "False"], "pretrain": "gradaug"}
    assert grad == {"name": "gradaug", "config": CONFIG, "opts": [], "pretrain": "gradaug"}
    ref = compare.parse_arm("gradaug_ref=:GRADAUG.NUM_SUBNETS=3,GRADAUG.SUBNET_LOSS=soft,GRADAUG.MIN_WIDTH=0.9,"
                            "GRADAUG.MAX_WIDTH=1.0", CONFIG)
    assert ref["opts"] == ["GRADAUG.NUM_SUBNETS", "3", "GRADAUG.SUBNET_LOSS", "soft", "GRADAUG.MIN_WIDTH", "0.9",
                           "GRADAUG.MAX_WIDTH", "1.0"] and ref["config"] == CONFIG
    # another config file, a list value with commas, the baseline-pretrained backbone
    other = compare.parse_arm("b2=other.yaml:GRADAUG.SCALES=[0.5, 1.0],pretrain=baseline", CONFIG)
    assert other == {"name": "b2", "config": "other.yaml", "opts": ["GRADAUG.SCALES", "[0.5, 1.0]"],
                     "pretrain": "baseline"}
    # the overrides merge into the config: the reference recipe's real keys
    from gradaug_det.config import merge_user_config
    from gradaug_det.engine.setup import get_gradaug_cfg

    cfg = merge_user_config(get_gradaug_cfg(), CONFIG, ref["opts"])
    assert (cfg.GRADAUG.NUM_SUBNETS, cfg.GRADAUG.SUBNET_LOSS, cfg.GRADAUG.MIN_WIDTH) == (3, "soft", 0.9)


@pytest.mark.parametrize("arms, message", [
    (["gradaug"], "expected NAME=CONFIG[:KEY=VALUE,...]"),
    (["a b=x.yaml"], "expected NAME=CONFIG"),
    (["g=:GRADAUG.NUM_SUBNETS"], "override 'GRADAUG.NUM_SUBNETS' is not KEY=VALUE"),
    (["g=:pretrain=imagenet"], "pretrain='imagenet'; allowed: gradaug, baseline"),
    (["a=", "a=:GRADAUG.ENABLED=False"], "the names must differ"),
    (["baseline_equal_time="], "reserved for the equal-time arm"),
])
def test_arms_refusals(compare, arms, message):
    with pytest.raises(UserError, match=None) as e:
        compare.parse_arms(arms, CONFIG)
    assert message in str(e.value)


def test_convergence_rule_on_hand_made_curves(compare):
    rule = compare.convergence
    # rises, then 3 evaluations without a gain > 0.5 after 20.0 (20.3 is not one): stops at 600
    curve = [(100, 5.0), (200, 12.0), (300, 20.0), (400, 20.3), (500, 19.0), (600, 20.4), (700, 25.0)]
    assert rule(curve, patience=3, min_delta=0.5) == {"converged": True, "stop_iter": 600,
                                                      "best_iter": 600, "best_AP": 20.4}
    # with patience 4 the gain at 700 counts: not converged within the cap, best at the end
    assert rule(curve, patience=4, min_delta=0.5) == {"converged": False, "stop_iter": 700,
                                                      "best_iter": 700, "best_AP": 25.0}
    # min_delta 0: 20.3 and then 20.4 are gains; a 3-evaluation plateau never happens
    assert rule(curve, patience=3, min_delta=0.0)["converged"] is False
    # the best AP may come before the stop; ties: the first iteration; NaN counts as no AP
    assert rule([(10, float("nan")), (20, 8.0), (30, 8.0), (40, 7.0)], patience=2, min_delta=0.1) == \
        {"converged": True, "stop_iter": 40, "best_iter": 20, "best_AP": 8.0}
    assert rule([(10, float("nan")), (20, float("nan"))], 1, 0.0) == {"converged": False, "stop_iter": 20,
                                                                     "best_iter": None, "best_AP": None}
    # evaluations before the first AP are not a plateau; after it, a NaN is no gain
    assert rule([(10, float("nan")), (20, float("nan")), (30, float("nan")), (40, 5.0)], 2, 0.5) == \
        {"converged": False, "stop_iter": 40, "best_iter": 40, "best_AP": 5.0}
    assert rule([(10, 5.0), (20, float("nan")), (30, 5.2)], 2, 0.5)["stop_iter"] == 30


def test_schedule_from_reads_only_an_until_converged_schedule(compare, tmp_path):
    schedule = {"rule": "until-converged", "iters": 1700, "eval_period": 100, "patience": 5, "min_delta": 0.5}
    good, fixed = tmp_path / "good.json", tmp_path / "fixed.json"
    good.write_text(json.dumps({"schedule": schedule, "runs": []}))
    fixed.write_text(json.dumps({"schedule": {"rule": "fixed", "iters": 400}}))
    assert compare._read_schedule(str(good)) == schedule
    with pytest.raises(UserError, match="holds no --until-converged schedule"):
        compare._read_schedule(str(fixed))


def _run(arm, seed, points, sec_per_iter, final_segm=None):
    curve = [{"iter": i, "time": i * sec_per_iter, "AP": ap} for i, ap in points]
    return {"arm": arm, "seed": seed, "iters": points[-1][0], "seconds": points[-1][0] * sec_per_iter,
            "bbox_AP": points[-1][1], "segm_AP": final_segm, "curves": {"bbox": curve, "segm": []}}


def test_report_numbers_by_hand(compare):
    runs = [
        _run("baseline", 0, [(100, 10.0), (200, 30.0), (300, 28.0)], 1.0),   # best 30
        _run("baseline", 1, [(100, 12.0), (200, 26.0), (300, 34.0)], 1.0),   # best 34
        _run("gradaug", 0, [(100, 20.0), (200, 33.0), (300, 31.0)], 2.0),    # reaches 32 at 200 -> 400 s
        _run("gradaug", 1, [(100, 25.0), (200, 32.0), (300, 36.0)], 2.0),    # reaches 32 at 200 -> 400 s
        _run("gradaug_ref", 0, [(100, 5.0), (200, 31.0), (300, 31.9)], 3.0),  # never reaches 32
    ]
    s = compare.summarize(runs, ["baseline", "gradaug", "gradaug_ref"])
    assert s["baseline"]["bbox_final"] == (31.0, pytest.approx(math.sqrt(18)))  # (28 + 34) / 2; std of 28, 34
    assert s["baseline"]["bbox_best"] == (32.0, pytest.approx(math.sqrt(8)))    # best 30, 34
    assert "bbox_reach" not in s["baseline"]
    assert s["gradaug"]["bbox_best"] == (34.5, pytest.approx(math.sqrt(4.5)))   # 33, 36
    reach = s["gradaug"]["bbox_reach"]
    assert reach["target_AP"] == 32.0 and reach["reached"] == 2 and reach["time"] == (400.0, 0.0)
    assert [r["iter"] for r in reach["runs"]] == [200, 200]
    ref = s["gradaug_ref"]["bbox_reach"]
    assert ref["reached"] == 0 and ref["time"] is None and ref["runs"] == [{"seed": 0, "iter": None, "time": None}]
    assert compare.time_to_reach(runs[2:3], 20.0) == [{"seed": 0, "iter": 100, "time": 200.0}]
    table = compare.results_table(runs, False, ["baseline", "gradaug", "gradaug_ref"])
    assert "| GradAug | 2 | 300 | 600 ± 0 | 33.5 ± 3.5 | 34.5 ± 2.1 | 400 ± 0 (2/2) |" in table
    assert "| gradaug_ref | 1 | 300 | 900 ± 0 | 31.9 ± 0.0 | 31.9 ± 0.0 | never (0/1) |" in table


def _compare(args, tmp_path, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", DETECTRON2_DATASETS=str(tmp_path / "datasets"),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "compare.py"), *args], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, **kw)


@pytest.mark.parametrize("args, message", [
    (["--arms", "gradaug"], "--arms 'gradaug': expected NAME=CONFIG"),
    (["--arms", "b=:GRADAUG.NUM_SUBNET=3"], "GRADAUG.NUM_SUBNETS"),  # the closest real key
    (["--train-fraction", "1.5"], "--train-fraction must be in (0, 1], got 1.5"),
    (["--until-converged"], "--until-converged needs --eval-period N"),
    (["--until-converged", "--eval-period", "10", "--iters", "50"], "--iters and --until-converged: pick one"),
    (["--schedule-from", "nope.json"], "--schedule-from 'nope.json': cannot read a results.json"),
    (["--arms", "b=:GRADAUG.ENABLED=False,pretrain=baseline"], "pretrain=baseline pretrains the quickstart"),
])
def test_compare_refuses_in_one_line_before_any_work(tmp_path, args, message):
    res = _compare([*args, "--dataset", "gradaug_quickstart_tiny_train", "--val-dataset",
                    "gradaug_quickstart_tiny_val", "--output-dir", str(tmp_path / "cmp")], tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().count("\n") == 0 and message in res.stderr, res.stderr
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "datasets").exists()


def test_compare_until_converged_two_arms_on_a_train_fraction(tmp_path):
    """The probe (constant LR, evaluated every 3 iterations, cap 600) is stopped by the rule
    (patience 1, min-delta 100: the evaluation after the first logged AP ends it) long before
    its cap (the rule is polled every 5 s: the cap is far enough that no machine reaches it
    within a few polls); then 2 arms x 1 seed for the probe's best iteration, on half of the tiny quickstart
    training images (3 iterations at least: detectron2 logs no training speed for fewer)."""
    out = tmp_path / "cmp"
    res = _compare(["--dataset", "gradaug_quickstart_tiny_train", "--val-dataset", "gradaug_quickstart_tiny_val",
                    "--arms", "baseline=:GRADAUG.ENABLED=False", "ref=:GRADAUG.NUM_SUBNETS=2,GRADAUG.SUBNET_LOSS=soft",
                    "--seeds", "3", "--until-converged", "--eval-period", "3", "--max-iters", "600",
                    "--patience", "1", "--min-delta", "100", "--train-fraction", "0.5", "--fraction-seed", "1",
                    "--device", "cpu", "--quiet", "--output-dir", str(out), "--opts", *TINY],
                   tmp_path, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    schedule = results["schedule"]
    probe = schedule["probe"]
    assert schedule["rule"] == "until-converged" and probe["constant_lr"] and schedule["max_iters"] == 600
    iters = [p["iter"] for p in probe["curve"]]
    assert iters == list(range(3, iters[-1] + 1, 3)) and iters[-1] < 600  # stopped early
    # the rule is checked every 5 s: the probe may run a few evaluations past the stop (unused)
    assert probe["converged"] and probe["stop_iter"] <= iters[-1]
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("compare_tool", os.path.join(REPO, "tools", "compare.py"))
    compare = module_from_spec(spec)
    spec.loader.exec_module(compare)
    rule = compare.convergence([(p["iter"], p["AP"]) for p in probe["curve"]], 1, 100.0)
    assert rule["converged"] and rule["stop_iter"] == probe["stop_iter"]
    assert schedule["iters"] == rule["best_iter"] == probe["best_iter"]
    # no equal-time arm in study mode; every arm trains the probe's schedule on the subset
    assert [(r["arm"], r["seed"], r["iters"]) for r in results["runs"]] == \
        [("baseline", 3, schedule["iters"]), ("ref", 3, schedule["iters"])]
    assert results["train_dataset"] == ["gradaug_quickstart_tiny_train_frac0.5_seed1"]
    assert results["equal_time"] is False and set(results["summary"]) == {"baseline", "ref"}
    assert "bbox_reach" in results["summary"]["ref"] or math.isnan(results["summary"]["baseline"]["bbox_best"][0])
    with open(out / "runs.log") as f:
        log = f.read()
    commands = [line for line in log.splitlines() if re.match(r"^\[(probe_baseline|baseline|ref) seed 3\] ", line)
                and " stopped after " not in line]
    assert len(commands) == 3  # probe + 2 arms
    assert "[probe_baseline seed 3] stopped after" in log
    for line in commands:  # each child registers the same subset before tools/train_net.py runs
        argv = shlex.split(line.split("] ", 1)[1])
        assert argv[1] == "-c" and "register_subset('gradaug_quickstart_tiny_train', 0.5, 1)" in argv[2]
        assert argv[argv.index("DATASETS.TRAIN") + 1] == "('gradaug_quickstart_tiny_train_frac0.5_seed1',)"
        assert argv.count("DATASETS.TRAIN") == 1
    with open(os.path.join(probe["dir"], "config.yaml")) as f:
        probe_cfg = f.read()
    assert "STEPS: []" in probe_cfg and "EVAL_PERIOD: 3" in probe_cfg
    with open(os.path.join(results["runs"][1]["dir"], "config.yaml")) as f:
        ref_cfg = f.read()
    assert "NUM_SUBNETS: 2" in ref_cfg and "SUBNET_LOSS: soft" in ref_cfg
    md = (out / "results.md").read_text()
    assert "until-converged schedule" in md and "gradaug_quickstart_tiny_train_frac0.5_seed1" in md
    assert "-core CPU" in results["machine"] and results["machine"] in md and results["commit"] in md
    assert (out / "ap_curves.png").stat().st_size > 10000

    # --- continuing the same call (a study stopped by a killed job): --resume ---
    argv = shlex.split(md.splitlines()[0])[2:]  # results.md starts with the command
    assert "--resume" not in argv

    def call(*flags, opts=()):  # flags before --opts (it takes the rest of the line)
        i = argv.index("--opts")
        return _compare([*argv[:i], *flags, *argv[i:], *opts], tmp_path, timeout=900)

    before = (out / "results.json").read_text()
    again = call()  # without --resume: refused, nothing touched
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0, again.stderr[-2000:]
    assert "already holds a run of an earlier call: add --resume" in again.stderr
    assert (out / "results.json").read_text() == before
    ref_dir = results["runs"][1]["dir"]
    with open(os.path.join(ref_dir, "compare_run.json")) as f:
        record = json.load(f)
    assert record["finished"] is True and record["args"][-len(TINY):] == list(TINY)
    record["finished"] = False  # as if the job had been killed while this run trained
    with open(os.path.join(ref_dir, "compare_run.json"), "w") as f:
        json.dump(record, f)
    resumed = call("--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[probe_baseline seed 3] reusing the finished run" in resumed.stdout
    assert "[baseline seed 3] reusing the finished run" in resumed.stdout
    assert f"[ref seed 3] redoing an unfinished run (its files: {ref_dir}.unfinished)" in resumed.stdout
    with open(out / "results.json") as f:
        redone = json.load(f)
    assert redone["schedule"] == schedule  # the probe was not run again
    assert redone["runs"][0] == results["runs"][0]  # reused as it was
    # the redone run is the same training (same seed, data and machine): the same numbers
    assert redone["runs"][1]["bbox_AP"] == results["runs"][1]["bbox_AP"]
    assert os.path.isfile(os.path.join(ref_dir + ".unfinished", "metrics.json"))
    with open(os.path.join(ref_dir, "metrics.json")) as f:  # one run's rows, not two runs' mixed
        assert sum('"bbox/AP"' in line for line in f) == len(redone["runs"][1]["curves"]["bbox"])
    changed = call("--resume", opts=("SOLVER.BASE_LR", "0.001"))  # not the call that made the runs
    assert changed.returncode == 2 and changed.stderr.strip().count("\n") == 0, changed.stderr[-2000:]
    assert "was made by another command" in changed.stderr
