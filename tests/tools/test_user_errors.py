"""A user's mistake, run as the user runs the tool: exit status 2, a few lines on stderr naming
the key / file / dataset and the fix, no traceback, and nothing written (no OUTPUT_DIR, no
./output). Each run stops before any model is built, so it costs the tool's import time."""
import os
import subprocess
import sys

import pytest

from gradaug_det.utils.cli import DEBUG_ENV, UserError, run_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
YACS = os.path.join(REPO, "configs", "mask_rcnn_gradaug.yaml")
LAZY = os.path.join(REPO, "configs", "lazy", "mask_rcnn_gradaug_R_50_FPN_1x.py")
R50 = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
MMDET = os.path.join(REPO, "configs", "mmdet", "quickstart", "mask-rcnn_r18_fpn_gradaug_shapes.py")

# (tool, arguments ({out} = OUTPUT_DIR), what stderr must say)
CASES = {
    "key_typo": ("train_net", ["--config-file", YACS, "GRADAUG.NUM_SUBNET", "2"],
                 ["unknown config key GRADAUG.NUM_SUBNET", "did you mean 'GRADAUG.NUM_SUBNETS'?"]),
    "config_file_typo": ("train_net", ["--config-file", YACS.replace(".yaml", ".yml")],
                         ["--config-file", "mask_rcnn_gradaug.yml': no such file", f"did you mean '{YACS}'?"]),
    "dataset": ("train_net", ["--config-file", YACS, "MODEL.WEIGHTS", "", "DATASETS.TRAIN", "('coco_2017_trian',)"],
                ["DATASETS.TRAIN: dataset 'coco_2017_trian' is not registered", "did you mean 'coco_2017_train'?",
                 "register_coco_instances", "docs/getting_started.md#datasets"]),
    "weights_file": ("train_net", ["--config-file", YACS, "MODEL.WEIGHTS", "{tmp}/r50.pkl"],
                     ["MODEL.WEIGHTS '{tmp}/r50.pkl': no such file", "set MODEL.WEIGHTS to an existing"]),
    "weights_url_offline": ("train_net", ["--config-file", YACS],  # the config's detectron2:// R-50 weights
                            [f"MODEL.WEIGHTS '{R50}': cannot download it: cannot reach dl.fbaipublicfiles.com",
                             "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl",
                             "set MODEL.WEIGHTS to the local file", "{tmp}/cache/detectron2/ImageNetPretrained/MSRA"]),
    "slim_widths": ("train_net", ["--config-file", YACS, "--eval-only", "MODEL.WEIGHTS", "", "TEST.SLIM_WIDTHS", "[1.5]"],
                    ["TEST.SLIM_WIDTHS contains 1.5; every width must be in (0, 1]"]),
    "lazy_test_typo": ("lazyconfig_train_net", ["--config-file", LAZY, "train.init_checkpoint=",
                                                "test.slim_width=[0.5]"],
                       ["test has unknown keys ['slim_width']", "did you mean 'test.slim_widths'?"]),
    "lazy_gradaug_typo": ("lazyconfig_train_net", ["--config-file", LAZY, "train.init_checkpoint=",
                                                   "gradaug.num_subnet=2"],
                          ["gradaug has unknown keys ['num_subnet']", "did you mean 'gradaug.num_subnets'?"]),
    "prune_weights": ("prune", ["--config-file", YACS, "--weights", "{tmp}/model_final.pth", "--width", "0.5",
                                "--output", "{out}"],
                      ["--weights '{tmp}/model_final.pth': no such file"]),
    # an mmdet config: mmdet's export path is mmdeploy; prune with the mmdet tool first
    "export_mmdet_config": ("export_model", ["--config-file", MMDET, "--output", "{out}", "--width", "0.75"],
                            [f"--config-file {MMDET} is an MMDetection config", "mmdet's own export path is mmdeploy",
                             "python tools/mmdet_prune.py CONFIG CHECKPOINT --width W --output DIR",
                             "mmdeploy's tools/deploy.py"]),
    "prune_mmdet_config": ("prune", ["--config-file", MMDET, "--weights", "{tmp}/x.pth", "--width", "0.5",
                                     "--output", "{out}"],
                           [f"--config-file {MMDET} is an MMDetection config", "use python tools/mmdet_prune.py"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mistake_is_one_short_message_and_nothing_is_written(tmp_path, case):
    tool, argv, expected = CASES[case]
    tmp, out = str(tmp_path), str(tmp_path / "out")
    argv = [a.format(tmp=tmp, out=out) for a in argv]
    if tool == "train_net":
        argv += ["OUTPUT_DIR", out]
    env = {**os.environ, "FVCORE_CACHE": os.path.join(tmp, "cache"),  # no weights cached from earlier runs
           # offline on any machine: every URL goes to a closed local port
           "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    env.pop(DEBUG_ENV, None)
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), *argv], cwd=str(work),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) <= 5 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("error: "), err
    for text in expected:
        assert text.format(tmp=tmp) in err, err
    assert not os.path.exists(out) and os.listdir(work) == [], os.listdir(work)  # no OUTPUT_DIR, no ./output
    assert not (tmp_path / "cache").exists()


def test_debug_switch_prints_the_traceback(monkeypatch, capsys):
    def refuse():
        raise UserError("MODEL.WEIGHTS 'x.pth': no such file")

    for debug, traceback in (("", False), ("1", True)):
        monkeypatch.setenv(DEBUG_ENV, debug)
        with pytest.raises(SystemExit) as e:
            run_tool(refuse)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == "error: MODEL.WEIGHTS 'x.pth': no such file"
        assert ("Traceback (most recent call last)" in err) == traceback, err
    # a tool's own SystemExit("message") is a refusal too; other exceptions keep their traceback
    monkeypatch.delenv(DEBUG_ENV)
    def tool_refuses():
        raise SystemExit("error: --width must be in (0, 1]")

    with pytest.raises(SystemExit) as e:
        run_tool(tool_refuses)
    assert e.value.code == 2 and capsys.readouterr().err == "error: --width must be in (0, 1]\n"
    with pytest.raises(ZeroDivisionError):
        run_tool(lambda: 1 / 0)


def test_config_file_key_typo_and_wrong_type(tmp_path):
    """In the file as on the command line: the closest real key; a wrong type names key, value, type."""
    from gradaug_det.config import merge_user_config
    from gradaug_det.engine.setup import get_gradaug_cfg
    from gradaug_det.utils.cli import ConfigError

    path = tmp_path / "my.yaml"
    path.write_text("GRADAUG:\n  MIN_WIDHT: 0.5\n")
    with pytest.raises(ConfigError, match=rf"^unknown config key GRADAUG.MIN_WIDHT \(in {path}\); "
                                          r"did you mean 'GRADAUG.MIN_WIDTH'\?$"):
        merge_user_config(get_gradaug_cfg(), str(path))
    with pytest.raises(ConfigError, match=r"^config override: GRADAUG.NUM_SUBNETS: got 'abc' \(str\), "
                                          r"expected int \(default 3\)$"):
        merge_user_config(get_gradaug_cfg(), None, ["GRADAUG.NUM_SUBNETS", "abc"])


def test_mmdet_configs_are_told_apart():
    """The yacs tools refuse an mmdet config by name; LazyConfig and yacs files are not mmdet's."""
    from gradaug_det.config import is_mmdet_config

    assert is_mmdet_config(MMDET)  # sets model = dict(...), inherits mmdet's runtime
    assert is_mmdet_config(os.path.join(REPO, "configs", "mmdet", "mask-rcnn_r50_fpn_gradaug_1x_coco.py"))
    assert not is_mmdet_config(LAZY) and not is_mmdet_config(YACS) and not is_mmdet_config(None)
    assert not is_mmdet_config(os.path.join(REPO, "configs", "mmdet", "no_such_config.py"))
