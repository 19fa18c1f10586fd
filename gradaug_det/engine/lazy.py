"""GradAug for detectron2's LazyConfig training (``tools/lazyconfig_train_net.py``).

A LazyConfig enables GradAug with a ``gradaug`` node, whose keys are the yacs ``GRADAUG``
keys in lower case (but ``depth_eval_scale``), with the same defaults
(:class:`~gradaug_det.gradaug.options.GradAugOptions`, :data:`~gradaug_det.gradaug.options.LAZY_KEYS`)::

    gradaug = dict(
        enabled=True,
        num_subnets=3, min_width=0.9, max_width=1.0, seed=0,
        subnet_loss="soft", soft_weight=1.0, gt_weight=1.0,
    )

and evaluates at extra widths (``TEST.SLIM_WIDTHS`` of the yacs configs) with a ``test`` node::

    test = dict(slim_widths=[0.75, 0.5])   # or on the command line: test.slim_widths=[0.5]
"""
import os
from typing import List, Optional

from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..evaluation.widths import (
    evaluate_at_widths,
    log_width_results,
    make_bn_calibration,
    merge_width_results,
    normalize_widths,
)
from ..gradaug import ClassificationTask, DetectionTask, GradAugOptions, SubnetSampler
from ..gradaug.options import LAZY_KEYS
from .runner import GradAugAMPTrainer, GradAugSimpleTrainer

__all__ = ["lazy_gradaug_options", "gradaug_enabled", "needs_unused_parameter_search_lazy",
           "build_lazy_step_trainer", "lazy_test_widths", "check_lazy_paths", "lazy_test"]


def lazy_gradaug_options(cfg) -> GradAugOptions:
    """The LazyConfig's ``gradaug`` node as GradAug's options (all defaults without one).

    Raises:
        ValueError: naming ``gradaug.<key>`` for an unknown key or a bad value
            (:meth:`GradAugOptions.validate <gradaug_det.gradaug.options.GradAugOptions.validate>`).
    """
    node = cfg.get("gradaug", None)
    if node is not None and not isinstance(node, dict):
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(node, resolve=True)
    return GradAugOptions.from_dict(node, "gradaug.", LAZY_KEYS)


def gradaug_enabled(cfg) -> bool:
    """Whether the LazyConfig has ``gradaug.enabled`` set (its ``gradaug`` node validated)."""
    return lazy_gradaug_options(cfg).enabled


def needs_unused_parameter_search_lazy(cfg) -> Optional[str]:
    """Why a LazyConfig's GradAug needs DDP's ``find_unused_parameters``
    (:meth:`GradAugOptions.unused_parameters_reason
    <gradaug_det.gradaug.options.GradAugOptions.unused_parameters_reason>`), or None (also
    when GradAug is off)."""
    options = lazy_gradaug_options(cfg)
    return options.unused_parameters_reason() if options.enabled else None


def build_lazy_step_trainer(cfg, model, data_loader, optimizer):
    """detectron2's SimpleTrainer/AMPTrainer, or their GradAug versions if ``gradaug.enabled``."""
    amp = cfg.train.amp.enabled
    options = lazy_gradaug_options(cfg)
    if not options.enabled:
        return (AMPTrainer if amp else SimpleTrainer)(model, data_loader, optimizer)
    # seed -1: train.seed if set (the same on every worker), else 0
    sampler = SubnetSampler(options, seed=options.sampler_seed(cfg.train.get("seed", -1)))
    task_cls = ClassificationTask if hasattr(getattr(model, "module", model), "head") else DetectionTask
    task = task_cls(model, options)
    cls = GradAugAMPTrainer if amp else GradAugSimpleTrainer
    return cls(model, data_loader, optimizer, sampler=sampler, task=task)


def lazy_test_widths(cfg) -> List[float]:
    """The widths to evaluate: 1.0 and ``test.slim_widths`` (TEST.SLIM_WIDTHS semantics,
    :func:`gradaug_det.evaluation.widths.normalize_widths`).

    Raises:
        ValueError: naming ``test.slim_widths`` if a width is outside (0, 1].
    """
    return normalize_widths(cfg.get("test", {}).get("slim_widths", []), key="test.slim_widths")


def check_lazy_paths(cfg, eval_only: bool, resume: bool) -> None:
    """Refuse a local ``train.init_checkpoint`` that does not exist, before any work.

    Checked where the file will be read: ``--eval-only``, and training without ``--resume``.
    URLs (``detectron2://``, ``https://`` ...) are left to the checkpointer. ``--eval-only``
    with no ``train.init_checkpoint`` is refused too: it would evaluate random weights.

    Raises:
        FileNotFoundError: naming ``train.init_checkpoint`` and what to set.
    """
    path = cfg.train.get("init_checkpoint", "")
    if eval_only and not path:
        raise FileNotFoundError("--eval-only with train.init_checkpoint='' would evaluate random weights; set "
                                "train.init_checkpoint=<the .pth to evaluate> (after any other override of it)")
    if path and "://" not in path and (eval_only or not resume) and not os.path.isfile(path):
        raise FileNotFoundError(f"train.init_checkpoint={path!r} is not a file; set train.init_checkpoint=<a .pth "
                                "or .pkl file> (or train.init_checkpoint= to start from random weights)")


def lazy_test(cfg, model):
    """detectron2's LazyConfig ``do_test``, at every width of :func:`lazy_test_widths`.

    Evaluates ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator`` (nothing, returning
    None, if the config has no evaluator). Results at width 1.0 keep detectron2's keys
    ("bbox", "segm"); other widths are added as "bbox@w0.5" etc. and a table of all widths
    is logged, as ``GradAugTrainer.test`` does for yacs configs.

    Args:
        cfg: the LazyConfig.
        model: the model (may be wrapped in DistributedDataParallel).

    Returns:
        The results dict (empty on non-main processes), or None without an evaluator.
    """
    if "evaluator" not in cfg.dataloader:
        return None
    widths = lazy_test_widths(cfg)
    loader, evaluator = instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    if widths == [1.0]:
        ret = inference_on_dataset(model, loader, evaluator)
    else:
        # test.bn_calibration_batches (TEST.BN_CALIBRATION_BATCHES): also with BN calibrated per width
        calibration = make_bn_calibration(cfg.get("test", {}).get("bn_calibration_batches", 0), model,
                                          lambda: instantiate(cfg.dataloader.train), "test.bn_calibration_batches")
        per_width = evaluate_at_widths(model, loader, evaluator, widths, calibration)
        if comm.is_main_process():
            log_width_results(per_width, str(cfg.dataloader.test.get("dataset", {}).get("names", "")))
        ret = merge_width_results(per_width)
    print_csv_format(ret)
    return ret
