"""Build pruned models with plain mmdet (gradaug_det cannot be imported) and predict on one input.

Run by tests/mmdet_adapter/test_mmdet_prune.py in a fresh process::

    python plain_mmdet_predict.py INPUT.pt OUT.pt CONFIG CHECKPOINT [CONFIG CHECKPOINT ...]

Every ``CONFIG`` (a file ``tools/mmdet_prune.py`` wrote) is built by mmdet's ``init_detector``,
its ``CHECKPOINT`` loaded strictly by mmengine's ``load_checkpoint``; the model predicts on
``INPUT.pt`` (``{"image": (3, H, W) uint8}``). ``OUT.pt`` gets, per config, the predictions and
the parameter count. Importing gradaug_det at any point fails.
"""
import importlib.abc
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
from mmengine.runner import load_checkpoint  # noqa: E402


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
    for config, checkpoint in zip(argv[2::2], argv[3::2]):
        model = init_detector(config, checkpoint=None, device="cpu")
        load_checkpoint(model, checkpoint, map_location="cpu", strict=True)
        model.eval()
        results.append({"config": config, "type": type(model).__name__,
                        "backbone": type(model.backbone).__name__, "neck": type(model.neck).__name__,
                        "params": sum(p.numel() for p in model.parameters()), "pred": predict(model, image)})
    assert not [m for m in sys.modules if m.split(".")[0] == "gradaug_det"]
    torch.save(results, argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
