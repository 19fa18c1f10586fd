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
import warnings
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
from ..slim.calibration import check_calibration_batches
from ..utils.cli import ConfigError, MissingFileError, did_you_mean
from .runner import GradAugAMPTrainer, GradAugSimpleTrainer

__all__ = ["lazy_gradaug_options", "gradaug_enabled", "needs_unused_parameter_search_lazy",
           "build_lazy_step_trainer", "lazy_test_widths", "check_lazy_paths", "lazy_test", "load_lazy_config",
           "LAZY_TEST_KEYS"]

#: The keys of a LazyConfig's ``test`` node (``TEST.SLIM_WIDTHS``, ``TEST.BN_CALIBRATION_BATCHES``).
LAZY_TEST_KEYS = ("slim_widths", "bn_calibration_batches")


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
    """Refuse a ``train.init_checkpoint`` that cannot be read, before any work: a local file
    that does not exist, a ``detectron2://`` / ``https://`` address neither cached nor
    reachable (:func:`~gradaug_det.checkpoint.io.check_weights_available`).

    Checked where the file will be read: ``--eval-only``, and training without ``--resume``.
    ``--eval-only`` with no ``train.init_checkpoint`` is refused too: it would evaluate random
    weights.

    Raises:
        MissingFileError: (a ``FileNotFoundError``) naming ``train.init_checkpoint`` and what to set.
    """
    from ..checkpoint.io import check_weights_available

    path = cfg.train.get("init_checkpoint", "") or ""
    if eval_only and not path:
        raise MissingFileError("--eval-only with train.init_checkpoint='' would evaluate random weights; set "
                               "train.init_checkpoint=<the .pth to evaluate> (after any other override of it)")
    if eval_only or not resume:
        check_weights_available(path, "train.init_checkpoint")


def _check_test_keys(cfg) -> None:
    """Refuse an unknown key of the ``test`` node (the ``gradaug`` node's are refused by
    :meth:`GradAugOptions.from_dict <gradaug_det.gradaug.options.GradAugOptions.from_dict>`)."""
    node = cfg.get("test", None)
    unknown = sorted(set(node.keys()) - set(LAZY_TEST_KEYS)) if node is not None else []
    if unknown:
        hint = did_you_mean(f"test.{unknown[0]}", [f"test.{k}" for k in LAZY_TEST_KEYS])
        raise ConfigError(f"test has unknown keys {unknown}; allowed: {sorted(LAZY_TEST_KEYS)}{hint}")


def load_lazy_config(config_file: str, overrides: List[str], *, eval_only: bool = False, resume: bool = False):
    """A LazyConfig file with ``key=value`` overrides, every user mistake refused before any
    work (nothing written, no ``train.output_dir``): a missing or misspelt config file, an
    unknown key under ``gradaug.`` or ``test.`` (with the closest real key), a bad value
    there, an unregistered dataset, a missing or unreachable ``train.init_checkpoint``.

    Args:
        config_file: the ``.py`` (or ``.yaml``) LazyConfig.
        overrides: the tool's trailing ``key=value`` arguments.
        eval_only, resume: the tool's flags (which datasets and weights will be read).

    Returns:
        The config.

    Raises:
        UserError: (``ConfigError``, ``MissingFileError``) naming the file / key and the fix.
    """
    from detectron2.config import LazyConfig

    from ..data.datasets import check_datasets_registered
    from ..utils.io import check_input_file

    check_input_file(config_file, "--config-file", extensions=(".py", ".yaml"),
                     fix="pass a LazyConfig .py (the shipped one is under configs/lazy/)")
    with warnings.catch_warnings():
        # detectron2's model_zoo (which LazyConfigs import) uses pkg_resources; the notice is not the user's
        warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*", category=UserWarning)
        cfg = LazyConfig.load(config_file)
    try:
        cfg = LazyConfig.apply_overrides(cfg, overrides)
    except KeyError as e:
        raise ConfigError(f"config override: {str(e).strip(chr(34) + chr(39))}") from None
    _check_test_keys(cfg)
    try:
        lazy_test_widths(cfg)
        calibration = cfg.get("test", {}).get("bn_calibration_batches", 0)
        check_calibration_batches(calibration, key="test.bn_calibration_batches")
        lazy_gradaug_options(cfg)
    except ValueError as e:  # the checks name the key: a user's mistake
        raise ConfigError(str(e)) from None
    loaders = [("test", "dataloader.test.dataset.names")]
    if not eval_only or calibration:
        loaders.insert(0, ("train", "dataloader.train.dataset.names"))
    for split, key in loaders:
        names = cfg.get("dataloader", {}).get(split, {}).get("dataset", {}).get("names", None)
        if names is not None:
            check_datasets_registered(list(names) if not isinstance(names, str) else names, key)
    check_lazy_paths(cfg, eval_only, resume)
    return cfg


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
