"""Post-hoc BN calibration of an mmdet detector's sub-networks (``tools/mmdet_test.py``).

The estimator is the detectron2 side's, :func:`gradaug_det.slim.calibration.calibrated_bn`;
this module gives it what an mmdet model needs: the training batches of the config's
``train_dataloader`` (built by mmengine's ``Runner``, as training builds it) and the
training-mode forward that runs them.
"""
import itertools
from typing import Any, Iterator

from ..gradaug import unwrap_model

__all__ = ["calibration_forward", "train_batches"]


def calibration_forward(model, batch: dict) -> Any:
    """One training-mode forward of an mmdet detector on a data loader's batch, no backward.

    The data preprocessor runs in training mode, then the detector's ``loss`` (for a GradAug
    detector: the stock detector's ``loss``, no GradAug pass), so every BN layer normalises
    a training batch as in training.

    Args:
        model: an mmdet detector (a DDP wrapper is looked through).
        batch: the train loader's batch (``{"inputs": [...], "data_samples": [...]}``).

    Returns:
        The loss dict (unused by the calibration).
    """
    from .detector import GradAugDetectorMixin

    net = unwrap_model(model)
    data = net.data_preprocessor(batch, True)
    loss = super(GradAugDetectorMixin, net).loss if isinstance(net, GradAugDetectorMixin) else net.loss
    return loss(data["inputs"], data["data_samples"])


def train_batches(runner, dataloader_cfg) -> Iterator[dict]:
    """Batches of the config's training data loader, endlessly (epoch after epoch).

    The loader is built as mmengine's training loop builds it (``Runner.build_dataloader``
    with the runner's seed), so ``randomness.seed`` fixes its order; every call of
    ``next`` draws the next batch, so consecutive widths calibrate on consecutive batches.

    Args:
        runner: mmengine ``Runner`` (its seed and randomness settings are used).
        dataloader_cfg: the config's ``train_dataloader`` (a dict, or a built loader).
    """
    loader = runner.build_dataloader(dataloader_cfg, seed=runner.seed,
                                     diff_rank_seed=runner._randomness_cfg.get("diff_rank_seed", False))
    for epoch in itertools.count():
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
