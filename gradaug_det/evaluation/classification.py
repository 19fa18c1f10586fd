"""Classification evaluation: top-k accuracy and FGSM robustness.

* :class:`ClassificationEvaluator`: top-1 / top-5 (percent) of the ``"logits"`` a
  classifier returns, over the whole dataset and all processes:
  ``{"classification": {"top1": .., "top5": ..}}``.
* :class:`FGSMEvaluator`: top-1 under the fast gradient sign
  attack (Goodfellow et al., 2015), ``{"fgsm": {"eps=<eps>": top1}}``.
* :func:`evaluate_classifier`: both, as configured (``TEST.TOPK``,
  ``TEST.FGSM_EPSILONS``), in one pass over a dataset; what ``--eval-only`` and the
  trainer's ``test`` call for a classifier.

**FGSM convention.** ``eps`` is given in the [0, 1] pixel scale and applied to the
0-255 input image: ``x_adv = clamp(x + 255 * eps * sign(d CE / d x), 0, 255)``. So
``eps = 8/255`` moves every pixel by 8 intensity levels. The gradient is taken with
respect to the un-normalised input image (before ``MODEL.PIXEL_MEAN/STD``), with the
model in eval mode; ``x_adv`` is kept as floats (not re-quantised). ``eps = 0`` gives
the clean accuracy.
"""
import itertools
import logging
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators, inference_on_dataset
from detectron2.utils import comm

from ..slim import check_width, width as width_context

__all__ = [
    "ClassificationEvaluator",
    "FGSMEvaluator",
    "fgsm_key",
    "fgsm_correct",
    "build_classification_evaluator",
    "evaluate_classifier",
]

logger = logging.getLogger(__name__)


def _targets(inputs: List[Dict]) -> torch.Tensor:
    missing = [i for i, x in enumerate(inputs) if "class_id" not in x]
    if missing:
        raise ValueError(f"{len(missing)} evaluation inputs have no 'class_id' (the dataset must be labelled)")
    return torch.as_tensor([int(x["class_id"]) for x in inputs], dtype=torch.long)


def _stack_logits(outputs: List[Dict]) -> torch.Tensor:
    try:
        return torch.stack([o["logits"] for o in outputs])
    except (KeyError, TypeError):
        raise ValueError("classification evaluation needs model outputs of the form "
                         "[{'logits': Tensor(K)}, ...] (MODEL.META_ARCHITECTURE='SlimmableClassifier')") from None


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy of a classifier over a dataset.

    ``process`` records, per image, the rank of its true class among the logits (capped
    at ``max(topk)``); ``evaluate`` gathers them from all processes and returns
    ``{"classification": {"top1": %, "top5": %}}`` on the main process (``{}`` on the
    others). ``k`` larger than the number of classes counts every image as correct.
    """

    def __init__(self, dataset_name: Optional[str] = None, topk: Sequence[int] = (1, 5),
                 distributed: bool = True, output_dir: Optional[str] = None):
        """
        Args:
            dataset_name: name of the evaluated dataset (for logging only).
            topk: the k of the reported top-k accuracies (``TEST.TOPK``).
            distributed: gather the results of all processes.
            output_dir: if given, per-image ranks are saved there
                (``classification_ranks.pth``).
        """
        topk = tuple(int(k) for k in topk)
        if not topk or min(topk) < 1:
            raise ValueError(f"TEST.TOPK must be a non-empty list of integers >= 1, got {list(topk)}")
        self._dataset_name = dataset_name
        self._topk = topk
        self._distributed = distributed
        self._output_dir = output_dir
        self.reset()

    def reset(self):
        self._ranks: List[int] = []

    def process(self, inputs, outputs):
        logits = _stack_logits(outputs)
        targets = _targets(inputs).to(logits.device)
        maxk = min(max(self._topk), logits.shape[1])
        top = logits.topk(maxk, dim=1).indices
        hit = top == targets.view(-1, 1)
        # rank of the true class (0 = top-1), or maxk if it is not among the top maxk
        rank = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(targets, maxk))
        self._ranks.extend(rank.tolist())

    def evaluate(self):
        ranks = self._ranks
        if self._distributed:
            comm.synchronize()
            ranks = list(itertools.chain(*comm.gather(ranks, dst=0)))
            if not comm.is_main_process():
                return {}
        if not ranks:
            logger.warning("[ClassificationEvaluator] did not receive valid predictions.")
            return {}
        if self._output_dir:
            from ..utils.io import atomic_torch_save

            atomic_torch_save(torch.tensor(ranks), os.path.join(self._output_dir, "classification_ranks.pth"))
        ranks_t = torch.tensor(ranks)
        results = OrderedDict(
            (f"top{k}", 100.0 * (ranks_t < k).float().mean().item()) for k in self._topk
        )
        logger.info("Classification on %s (%d images): %s", self._dataset_name or "dataset", len(ranks),
                    ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
        return OrderedDict(classification=results)


def fgsm_key(eps: float) -> str:
    """Result key of one FGSM epsilon, e.g. ``"eps=0.0313725"``."""
    return f"eps={float(eps):g}"


def _check_epsilons(epsilons: Iterable[float]) -> List[float]:
    eps = [float(e) for e in epsilons]
    bad = [e for e in eps if not 0.0 <= e <= 1.0]
    if bad:
        raise ValueError(f"TEST.FGSM_EPSILONS holds {bad}; epsilons are in the [0, 1] pixel scale "
                         "(8/255 = 0.0314 moves a 0-255 pixel by 8)")
    return eps


def _unwrap(model: nn.Module) -> nn.Module:
    # Autograd through DDP in eval would make its reducer expect a synchronised backward.
    return model.module if isinstance(model, DistributedDataParallel) else model


def _model_device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def fgsm_correct(model: nn.Module, inputs: List[Dict], epsilons: Sequence[float]) -> torch.Tensor:
    """Which images of one batch the model still classifies correctly under FGSM.

    The model is called as is (set eval mode and the width beforehand); see the module
    docstring for the perturbation. Parameter gradients are neither computed into
    ``.grad`` nor changed.

    Args:
        model: a classifier returning ``[{"logits": ...}]`` in eval mode.
        inputs: mapped dicts with ``"image"`` (0-255) and ``"class_id"``.
        epsilons: perturbation sizes in the [0, 1] pixel scale.

    Returns:
        Bool tensor (len(epsilons), N): top-1 correct per epsilon and image.
    """
    model = _unwrap(model)
    device = _model_device(model)
    targets = _targets(inputs).to(device)
    with torch.enable_grad():
        images = [x["image"].to(device=device, dtype=torch.float32).requires_grad_(True) for x in inputs]
        logits = _stack_logits(model([{**x, "image": im} for x, im in zip(inputs, images)]))
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        grads = torch.autograd.grad(loss, images)
    correct = []
    with torch.no_grad():
        for eps in epsilons:
            adv = [(im.detach() + 255.0 * eps * g.sign()).clamp_(0.0, 255.0) for im, g in zip(images, grads)]
            adv_logits = _stack_logits(model([{**x, "image": a} for x, a in zip(inputs, adv)]))
            correct.append(adv_logits.argmax(1) == targets)
    if not correct:
        return torch.zeros(0, len(inputs), dtype=torch.bool)
    return torch.stack(correct).cpu()


class FGSMEvaluator(DatasetEvaluator):
    """Top-1 accuracy under FGSM, as a detectron2 ``DatasetEvaluator``.

    It attacks the inputs of every ``process`` call itself (re-enabling autograd inside
    ``inference_on_dataset``), so it needs the model. Results on the main process:
    ``{"fgsm": {"eps=<eps>": top1 %}}``.
    """

    def __init__(self, model: nn.Module, epsilons: Sequence[float], width: Optional[float] = None,
                 distributed: bool = True):
        """
        Args:
            model: the evaluated classifier.
            epsilons: perturbation sizes, [0, 1] pixel scale (``TEST.FGSM_EPSILONS``).
            width: width of the attacked network; ``None`` = the width the model is
                evaluated at (e.g. inside :func:`gradaug_det.evaluation.evaluate_at_widths`).
            distributed: sum the counts of all processes.
        """
        self._model = model
        self._epsilons = _check_epsilons(epsilons)
        self._width = None if width is None else check_width(width)
        self._distributed = distributed
        self.reset()

    def reset(self):
        self._correct = torch.zeros(len(self._epsilons), dtype=torch.long)
        self._count = 0

    def process(self, inputs, outputs):
        if self._width is None:
            correct = fgsm_correct(self._model, inputs, self._epsilons)
        else:
            with width_context(self._model, self._width):
                correct = fgsm_correct(self._model, inputs, self._epsilons)
        self._correct += correct.sum(1)
        self._count += len(inputs)

    def evaluate(self):
        correct, count = self._correct, self._count
        if self._distributed:
            comm.synchronize()
            parts = comm.gather((correct, count), dst=0)
            if not comm.is_main_process():
                return {}
            correct = sum(p[0] for p in parts)
            count = sum(p[1] for p in parts)
        if count == 0:
            logger.warning("[FGSMEvaluator] did not receive any image.")
            return {}
        results = OrderedDict(
            (fgsm_key(e), 100.0 * c / count) for e, c in zip(self._epsilons, correct.tolist())
        )
        logger.info("FGSM top-1 (%d images): %s", count, ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
        return OrderedDict(fgsm=results)


def build_classification_evaluator(cfg, dataset_name: str, model: Optional[nn.Module] = None,
                                   output_dir: Optional[str] = None) -> DatasetEvaluator:
    """The evaluator of a classifier: top-k, plus FGSM when ``TEST.FGSM_EPSILONS`` is set.

    Args:
        cfg: the config (``TEST.TOPK``, ``TEST.FGSM_EPSILONS``).
        dataset_name: the evaluated dataset.
        model: the classifier; required when ``TEST.FGSM_EPSILONS`` is not empty. The
            FGSM attack runs at the width the model is evaluated at.
        output_dir: where the evaluator may save per-image results.

    Returns:
        A ``ClassificationEvaluator`` or ``DatasetEvaluators([top-k, FGSM])``.
    """
    topk = ClassificationEvaluator(dataset_name, topk=cfg.TEST.TOPK, output_dir=output_dir)
    if not cfg.TEST.FGSM_EPSILONS:
        return topk
    if model is None:
        raise ValueError("TEST.FGSM_EPSILONS is set, so build_classification_evaluator needs the model")
    return DatasetEvaluators([topk, FGSMEvaluator(model, cfg.TEST.FGSM_EPSILONS)])


def evaluate_classifier(cfg, model: nn.Module, dataset_name: str, data_loader=None,
                        width: float = 1.0) -> "OrderedDict[str, Dict[str, float]]":
    """Evaluate a classifier on one dataset, as ``--eval-only`` does.

    One pass over the data gives top-k (``TEST.TOPK``) and, if ``TEST.FGSM_EPSILONS``
    is not empty, FGSM top-1 at each epsilon, all at ``width``.

    Args:
        cfg: the config.
        model: the classifier (any checkpoint, GradAug or baseline).
        dataset_name: a registered dataset, e.g. ``"imagenet_val"``.
        data_loader: defaults to ``build_classification_test_loader(cfg, dataset_name)``.
        width: network width evaluated (default 1.0).

    Returns:
        ``{"classification": {"top1", "top5"}, "fgsm": {"eps=...": top1}}`` on the main
        process (``{}`` on the others).
    """
    if data_loader is None:
        from ..data.classification import build_classification_test_loader

        data_loader = build_classification_test_loader(cfg, dataset_name)
    evaluator = build_classification_evaluator(cfg, dataset_name, model)
    with width_context(model, width):
        results = inference_on_dataset(model, data_loader, evaluator)
    return results if results is not None else OrderedDict()
