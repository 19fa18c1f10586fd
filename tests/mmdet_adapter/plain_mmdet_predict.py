"""Build pruned models with plain mmdet (gradaug_det cannot be imported) and predict on one input.

Run by tests/mmdet_adapter/test_mmdet_prune.py in a fresh process::

    python plain_mmdet_predict.py INPUT.pt OUT.pt WORK_DIR CONFIG CHECKPOINT [CONFIG CHECKPOINT ...]

Every ``CONFIG`` (a file ``tools/mmdet_prune.py`` wrote) is built by mmdet's ``init_detector``,
its ``CHECKPOINT`` loaded strictly by mmengine's ``load_checkpoint``; the model predicts on
``INPUT.pt`` (``{"image": (3, H, W) uint8}``). Then the config's test loop runs as mmdet's
``tools/test.py`` runs it (mmengine's ``Runner``, which loads the config's ``load_from``), under
``WORK_DIR``. ``OUT.pt`` gets, per config, the predictions, the parameter count and the test
loop's metrics. Importing gradaug_det at any point fails.
"""
import importlib.abc
import os
import sys


class _NoGradAugDet(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "gradaug_det":
            raise ImportError(f"plain mmdet must not import {name}")
        return None


sys.meta_path.insert(0, _NoGradAugDet())

import torch  # noqa: E402
from mmdet.apis import init_detector  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner, load_checkpoint  # noqa: E402


def predict(model, image):
    h, w = image.shape[1:]
    sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
    with torch.no_grad():
        out = model.test_step(dict(inputs=[image], data_samples=[sample]))[0].pred_instances
    return {"bboxes": out.bboxes, "scores": out.scores, "labels": out.labels,
            "masks": out.masks if "masks" in out else None}


def main(argv):
    image = torch.load(argv[0], weights_only=True)["image"]
    results = []
    for i, (config, checkpoint) in enumerate(zip(argv[3::2], argv[4::2])):
        model = init_detector(config, checkpoint=None, device="cpu")
        load_checkpoint(model, checkpoint, map_location="cpu", strict=True)
        model.eval()
        results.append({"config": config, "type": type(model).__name__,
                        "backbone": type(model.backbone).__name__, "neck": type(model.neck).__name__,
                        "params": sum(p.numel() for p in model.parameters()), "pred": predict(model, image)})
        cfg = Config.fromfile(config)
        cfg.work_dir, cfg.experiment_name = os.path.join(argv[2], str(i)), f"pruned_{i}"  # one visualizer each
        runner = Runner.from_cfg(cfg)
        results[-1]["metrics"] = runner.test()
        # the test loop ran with the checkpoint's weights (mmengine's load_from loads non-strictly)
        state, tested = torch.load(checkpoint, weights_only=True)["state_dict"], runner.model.state_dict()
        results[-1]["loaded"] = tested.keys() == state.keys() and all(torch.equal(v.cpu(), state[k])
                                                                      for k, v in tested.items())
    assert not [m for m in sys.modules if m.split(".")[0] == "gradaug_det"]
    torch.save(results, argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
