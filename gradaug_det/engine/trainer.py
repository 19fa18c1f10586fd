"""``GradAugTrainer``: detectron2's ``DefaultTrainer`` with GradAug in every iteration.

Enable GradAug in your own project with one line — derive your trainer from
``GradAugTrainer`` instead of ``DefaultTrainer``::

    class Trainer(GradAugTrainer):   # was: class Trainer(DefaultTrainer)
        ...

With ``GRADAUG.ENABLED`` False it builds exactly what ``DefaultTrainer`` builds.
A detectron2 hook cannot see the current batch, so GradAug lives in the trainer's
``run_step`` (:mod:`gradaug_det.engine.runner`), not in a hook.
"""
import logging
import os
import weakref
from collections import OrderedDict
from typing import Optional

from torch.nn.parallel import DistributedDataParallel

from detectron2.data import MetadataCatalog
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.checkpointer import GradAugCheckpointer
from ..data.classification import build_classification_test_loader, build_classification_train_loader
from ..data.resumable import build_resumable_train_loader, resumable_data_hook
from ..evaluation.classification import build_classification_evaluator, evaluate_classifier
from ..evaluation.coco import AtomicCOCOEvaluator
from ..evaluation.widths import (
    bn_calibration_from_config, evaluate_at_widths, log_width_results, merge_width_results, normalize_widths, run_at_widths,
)
from ..gradaug import GradAugOptions, SubnetSampler, build_task
from ..slim import check_width, linear_keep_probs, residual_blocks
from ..slim.calibration import check_calibration_batches
from ..utils.cli import ConfigError
from .checks import check_gradaug_trainable
from .preemption import preemption_hook
from .runner import GradAugAMPTrainer, GradAugSimpleTrainer

__all__ = ["GradAugTrainer", "validate_config", "create_ddp_model", "apply_depth_eval_scale"]

logger = logging.getLogger(__name__)


def validate_config(cfg) -> None:
    """Check the GradAug keys before any work starts (``TEST.SLIM_WIDTHS``,
    ``TEST.BN_CALIBRATION_BATCHES``; ``GRADAUG.*``: with GradAug enabled,
    :meth:`GradAugOptions.validate <gradaug_det.gradaug.options.GradAugOptions.validate>`).

    Raises:
        ConfigError: (a ``ValueError``) naming the key, the bad value and what is allowed.
    """
    try:
        for w in cfg.TEST.SLIM_WIDTHS:
            try:
                check_width(w)
            except ValueError:
                raise ValueError(f"TEST.SLIM_WIDTHS contains {w!r}; every width must be in (0, 1]") from None
        check_calibration_batches(cfg.TEST.get("BN_CALIBRATION_BATCHES", 0))
        if cfg.GRADAUG.ENABLED:
            GradAugOptions.from_yacs(cfg)
    except ValueError as e:  # the checks name the key: a user's mistake, printed without a traceback
        raise ConfigError(str(e)) from None


def apply_depth_eval_scale(cfg, model) -> None:
    """With depth sampling and ``GRADAUG.DEPTH_EVAL_SCALE``, scale each residual branch at
    evaluation by its keep probability (the stochastic-depth rule of the reference)."""
    blocks = residual_blocks(model)
    use = cfg.GRADAUG.ENABLED and cfg.GRADAUG.SAMPLING == "depth" and cfg.GRADAUG.DEPTH_EVAL_SCALE
    probs = linear_keep_probs(len(blocks), cfg.GRADAUG.DEPTH_MIN_KEEP) if blocks else []
    for block, p in zip(blocks, probs):
        block.eval_scale = p if use else 1.0


def needs_unused_parameter_search(cfg) -> Optional[str]:
    """Why a yacs config's GradAug needs DDP's ``find_unused_parameters``
    (:meth:`GradAugOptions.unused_parameters_reason
    <gradaug_det.gradaug.options.GradAugOptions.unused_parameters_reason>`), or None (also
    when GradAug is off)."""
    return GradAugOptions.from_yacs(cfg).unused_parameters_reason() if cfg.GRADAUG.ENABLED else None


def create_ddp_model(model, *, fp16_compression: bool = False, find_unused_parameters: bool = False,
                     unused_parameters_reason: Optional[str] = None, **kwargs):
    """Wrap ``model`` in DistributedDataParallel when more than one process runs.

    detectron2's ``create_ddp_model`` (``detectron2.engine.defaults``) with the same
    arguments, so a LazyConfig's ``train.ddp`` node passes unchanged (``**cfg.train.ddp``),
    plus what GradAug and CPU training need. The one implementation used by
    :class:`GradAugTrainer` and ``tools/lazyconfig_train_net.py``.

    Args:
        model: the model, already on its device.
        fp16_compression: as in detectron2: register DDP's ``fp16_compress_hook`` (gradients
            all-reduced in float16). It saves NCCL bandwidth between GPUs; for a CPU model
            (gloo) it is skipped with a log line (it would only add two casts per bucket).
        find_unused_parameters: as DistributedDataParallel's.
        unused_parameters_reason: when not None (:meth:`GradAugOptions.unused_parameters_reason
            <gradaug_det.gradaug.options.GradAugOptions.unused_parameters_reason>`), GradAug
            needs ``find_unused_parameters=True``; it is set, with one log line saying why
            if ``False`` was asked.
        kwargs: other arguments of DistributedDataParallel (``broadcast_buffers`` ...);
            ``device_ids`` defaults to the local rank for a CUDA model, None for a CPU model.

    Returns:
        ``model`` itself in one process, else the DistributedDataParallel wrapper.
    """
    if comm.get_world_size() == 1:
        return model
    if unused_parameters_reason and not find_unused_parameters:
        logger.info(f"DDP: find_unused_parameters=True (instead of False) because GradAug's {unused_parameters_reason}")
        find_unused_parameters = True
    on_cuda = next(model.parameters()).is_cuda
    kwargs.setdefault("device_ids", [comm.get_local_rank()] if on_cuda else None)
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused_parameters, **kwargs)
    if fp16_compression:
        if on_cuda:
            from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

            ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
        else:
            logger.info("DDP: fp16_compression ignored for a CPU model (gloo); it compresses GPU (NCCL) "
                        "gradient traffic only")
    return ddp


class GradAugTrainer(DefaultTrainer):
    """``DefaultTrainer`` whose step is a GradAug iteration when ``GRADAUG.ENABLED``.

    Also builds the ImageNet classifier's loader and evaluator, and evaluates at the
    extra widths of ``TEST.SLIM_WIDTHS``.
    """

    def __init__(self, cfg):
        # Mirrors DefaultTrainer.__init__; only the DDP wrapper and the step trainer differ.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        validate_config(cfg)
        if not logging.getLogger("gradaug_det").isEnabledFor(logging.INFO):
            # a script of its own (not tools/train_net.py's setup()) set up detectron2's logger only:
            # gradaug-det's messages (the per-width AP table) go to the console and OUTPUT_DIR/log.txt too
            setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gradaug_det", abbrev_name="ga")
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        check_gradaug_trainable(cfg, model)  # model x GradAug refusals, before any data is read
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False,
                                 unused_parameters_reason=needs_unused_parameter_search(cfg))
        self._trainer = self.build_step_trainer(cfg, model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # safe loading, atomic saving, resume fallback, backbone-shape refusal (gradaug_det.checkpoint)
        self.checkpointer = GradAugCheckpointer.from_config(cfg, model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """detectron2's hooks, plus, in a Slurm job of ``tools/submit.py``, the hook that saves
        a checkpoint and stops after the step in which the preemption signal came, and, with
        ``DATALOADER.RESUMABLE``, the data-order hook (last: it seeds the global generators right
        before each step; :class:`~gradaug_det.data.resumable.ResumableDataHook`)."""
        return super().build_hooks() + [preemption_hook(self.checkpointer),
                                         resumable_data_hook(self._trainer.data_loader)]

    @classmethod
    def build_step_trainer(cls, cfg, model, data_loader, optimizer):
        """The object whose ``run_step`` trains: detectron2's, or its GradAug version."""
        amp = cfg.SOLVER.AMP.ENABLED
        if not cfg.GRADAUG.ENABLED:
            return (AMPTrainer if amp else SimpleTrainer)(model, data_loader, optimizer)
        kwargs = dict(sampler=SubnetSampler.from_config(cfg), task=build_task(cfg, model))
        if amp:
            return GradAugAMPTrainer(model, data_loader, optimizer, **kwargs)
        return GradAugSimpleTrainer(model, data_loader, optimizer, **kwargs)

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        apply_depth_eval_scale(cfg, model)
        return model

    @staticmethod
    def is_classifier(cfg) -> bool:
        return cfg.MODEL.META_ARCHITECTURE == "SlimmableClassifier"

    @classmethod
    def build_train_loader(cls, cfg):
        if cls.is_classifier(cfg):
            return build_classification_train_loader(cfg)
        if cfg.DATALOADER.get("RESUMABLE", False):
            return build_resumable_train_loader(cfg)
        return super().build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if cls.is_classifier(cfg):
            return build_classification_test_loader(cfg, dataset_name)
        return super().build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "coco":
            return AtomicCOCOEvaluator(dataset_name,
                                       output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
        if evaluator_type == "classification":
            return build_classification_evaluator(cfg, dataset_name, output_dir=output_folder)
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}); "
            "override GradAugTrainer.build_evaluator"
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate at width 1.0 and at every width of ``TEST.SLIM_WIDTHS``.

        Results at width 1.0 keep detectron2's keys ("bbox", "segm", "classification");
        other widths are added as "bbox@w0.75" etc., and a table of all widths is logged.
        Classifiers are evaluated with top-k and, with ``TEST.FGSM_EPSILONS``, FGSM.
        """
        widths = normalize_widths(cfg.TEST.SLIM_WIDTHS)
        if widths == [1.0] and not cls.is_classifier(cfg):
            return super().test(cfg, model, evaluators)
        results = OrderedDict()
        # TEST.BN_CALIBRATION_BATCHES: sub-widths also with BN statistics calibrated there
        calibration = bn_calibration_from_config(cfg, model, cls.build_train_loader) if len(widths) > 1 else None
        for idx, dataset_name in enumerate(cfg.DATASETS.TEST):
            data_loader = cls.build_test_loader(cfg, dataset_name)
            if cls.is_classifier(cfg) and evaluators is None:
                per_width = run_at_widths(
                    model, widths, lambda w: evaluate_classifier(cfg, model, dataset_name, data_loader, width=w),
                    calibration)
            else:
                evaluator = evaluators[idx] if evaluators is not None else cls.build_evaluator(cfg, dataset_name)
                per_width = evaluate_at_widths(model, data_loader, evaluator, widths, calibration)
            if comm.is_main_process():
                log_width_results(per_width, dataset_name)
            results[dataset_name] = merge_width_results(per_width)
        if len(results) == 1:
            results = list(results.values())[0]
        return results
