"""Evaluation of a slimmable model at several widths (the full network and its sub-networks).

:func:`evaluate_at_widths` runs detectron2's ``inference_on_dataset`` once per width and
returns the evaluator's results per width. Two ways to present them:

* :func:`width_results_table`: one row per width with AP / AP50 / AP75 of every COCO task
  (``bbox``, ``segm``) and top-1 / top-5 of classification results, in the markdown
  ("pipe") style of detectron2's own evaluation logs.
* :func:`merge_width_results`: the single ``task -> {metric -> score}`` dict that
  detectron2's trainers, ``verify_results``, ``print_csv_format`` and the ``EvalHook``
  (EventStorage) expect. **Convention**: the results at width 1.0 keep the usual task
  keys (``"bbox"``, ``"segm"``), so everything written for stock detectron2 sees the full
  network unchanged; the results at another width ``w`` are stored under
  ``"<task>@w<w>"`` (``"bbox@w0.75"``, ``"segm@w0.9"``, see :func:`width_task_key`), so the
  EventStorage / ``metrics.json`` scalars read ``"bbox/AP"`` and ``"bbox@w0.75/AP"``.
  :func:`split_width_key` inverts the naming.

With post-hoc BN calibration (``TEST.BN_CALIBRATION_BATCHES`` > 0, see
:mod:`gradaug_det.slim.calibration`), every sub-width is evaluated twice: with the full
network's sliced BN statistics (the tasks above) and with statistics recomputed at that
width, under ``"<task>+bncal"`` (:func:`calibrated_task`): ``"bbox+bncal@w0.9/AP"``; the
table shows both side by side.
"""
import logging
import math
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

from tabulate import tabulate
from torch import nn

from detectron2.evaluation import inference_on_dataset

from ..slim import SlimmableModule, check_width, width
from ..slim.calibration import CALIBRATED_SUFFIX, batch_norm_layers, calibrated_bn, check_calibration_batches

__all__ = [
    "normalize_widths",
    "evaluate_at_widths",
    "run_at_widths",
    "BNCalibration",
    "bn_calibration_from_config",
    "make_bn_calibration",
    "calibrated_task",
    "CALIBRATED_SUFFIX",
    "width_task_key",
    "split_width_key",
    "merge_width_results",
    "split_width_results",
    "width_results_table",
    "log_width_results",
]

logger = logging.getLogger(__name__)

# Metrics of the table, in column order, per kind of results dict.
_TABLE_METRICS = ("AP", "AP50", "AP75", "top1", "top5")
_WIDTH_KEY_RE = re.compile(r"^(?P<task>.+)@w(?P<width>[0-9.]+(?:e-?[0-9]+)?)$")


def normalize_widths(widths: Optional[Iterable[float]], key: str = "TEST.SLIM_WIDTHS") -> List[float]:
    """Validate and order the widths to evaluate: 1.0 first, then the others widest first.

    Args:
        widths: widths in (0, 1]; ``None`` or empty means only the full network. 1.0 is
            always evaluated, whether listed or not; duplicates are dropped.
        key: config key (or flag) the widths come from, named in error messages.

    Returns:
        The widths as floats, ``[1.0, ...]`` in decreasing order, without duplicates.

    Raises:
        ValueError: if a width is not a number in (0, 1].
    """
    out = {1.0}
    for w in widths or ():
        try:
            out.add(check_width(w))
        except ValueError:
            raise ValueError(
                f"{key} holds width {w!r}; every width must be a number in (0, 1] "
                "(1.0 is always evaluated and need not be listed)"
            ) from None
    return sorted(out, reverse=True)


class BNCalibration(NamedTuple):
    """Post-hoc BN calibration of the sub-widths (:mod:`gradaug_det.slim.calibration`).

    Attributes:
        batches: training inputs as the model takes them in training mode (an iterator
            over a training loader: every width draws the next ``num_batches``; a list:
            every width uses its first ``num_batches``).
        num_batches: batches per width (``TEST.BN_CALIBRATION_BATCHES``).
    """

    batches: Iterable[Any]
    num_batches: int


def calibrated_task(task: str) -> str:
    """Name of ``task``'s results with calibrated BN statistics: ``"bbox" -> "bbox+bncal"``."""
    return task + CALIBRATED_SUFFIX


def make_bn_calibration(num_batches: int, model: nn.Module, build_train_loader: Callable[[], Iterable],
                        key: str = "TEST.BN_CALIBRATION_BATCHES") -> Optional[BNCalibration]:
    """The calibration of ``num_batches`` training batches per sub-width, or None.

    None when ``num_batches`` is 0 (off, the default) or when ``model`` has no BN layer
    with running statistics (FrozenBN / GN models need no calibration; one log line says
    so); only then is no training loader built.

    Args:
        num_batches: batches per width (the value of ``key``).
        model: the model to evaluate (DDP wrapper allowed).
        build_train_loader: ``() -> loader`` of training batches.
        key: the setting's name, for messages.

    Raises:
        ValueError: if ``num_batches`` is negative or not an int.
    """
    if check_calibration_batches(num_batches, key) == 0:
        return None
    if not batch_norm_layers(getattr(model, "module", model)):
        logger.info("%s=%d: the model has no BN layer with running statistics (FrozenBN / GN), so no "
                    "calibration is needed; skipped", key, num_batches)
        return None
    return BNCalibration(iter(build_train_loader()), num_batches)


def bn_calibration_from_config(cfg, model: nn.Module, build_train_loader: Callable[[Any], Iterable]
                               ) -> Optional[BNCalibration]:
    """:func:`make_bn_calibration` for ``TEST.BN_CALIBRATION_BATCHES`` of a yacs config.

    Args:
        cfg: the config.
        model: the model to evaluate (DDP wrapper allowed).
        build_train_loader: ``cfg -> loader`` of training batches (the trainer's).
    """
    return make_bn_calibration(cfg.TEST.get("BN_CALIBRATION_BATCHES", 0), model, lambda: build_train_loader(cfg))


def run_at_widths(
    model: nn.Module,
    widths: Optional[Iterable[float]],
    evaluate: Callable[[float], Optional[dict]],
    calibration: Optional[BNCalibration] = None,
) -> "OrderedDict[float, dict]":
    """Call ``evaluate(w)`` with ``model`` at every width (1.0 and ``widths``), optionally
    also with BN statistics calibrated at each sub-width.

    The sub-networks run first and the full network last, so that files an evaluator
    writes (``COCOEvaluator``'s ``coco_instances_results.json``) hold width 1.0's
    predictions. The widths the model had before, and its BN statistics, are restored
    afterwards, also when evaluation raises.

    Args:
        model: a model with slimmable layers (DDP wrapper allowed).
        widths: sub-network widths besides 1.0 (:func:`normalize_widths`).
        evaluate: ``w -> {task: metrics}`` (None on non-main processes).
        calibration: with it, every sub-width is evaluated a second time with BN
            statistics calibrated at that width; those results are added under
            :func:`calibrated_task` names. Width 1.0 is never calibrated.

    Returns:
        OrderedDict width -> results, 1.0 first, then decreasing.

    Raises:
        ValueError: if a width is invalid, or if widths below 1.0 are asked of a model
            without slimmable layers (they would silently evaluate the full network).
    """
    widths = normalize_widths(widths)
    if len(widths) > 1 and not any(isinstance(m, SlimmableModule) for m in model.modules()):
        raise ValueError(
            f"Cannot evaluate widths {widths[1:]}: the model has no slimmable layers. Build it "
            "with MODEL.BACKBONE.NAME 'build_slimmable_resnet_fpn_backbone' (or "
            "'build_slimmable_resnet_backbone'), or set TEST.SLIM_WIDTHS to []."
        )
    results: Dict[float, dict] = {}
    for w in widths[1:] + widths[:1]:
        logger.info(f"Evaluating at width {w:g} ...")
        with width(model, w):
            res = evaluate(w)
        results[w] = OrderedDict(res or {})
        if calibration is None or w == 1.0:
            continue
        with calibrated_bn(model, w, calibration.batches, calibration.num_batches) as calibrated:
            if not calibrated:
                continue
            logger.info(f"Evaluating at width {w:g} with BN statistics calibrated on "
                        f"{calibration.num_batches} training batches ...")
            with width(model, w):
                res = evaluate(w)
        for task, metrics in (res or {}).items():
            results[w][calibrated_task(task)] = metrics
    return OrderedDict((w, results[w]) for w in widths)


def evaluate_at_widths(
    model: nn.Module,
    data_loader,
    evaluator,
    widths: Optional[Iterable[float]] = None,
    calibration: Optional[BNCalibration] = None,
) -> "OrderedDict[float, dict]":
    """Run ``inference_on_dataset`` at width 1.0 and at every width of ``widths``.

    The model runs in eval mode (as ``inference_on_dataset`` sets it) with every slimmable
    layer at the given width (:func:`gradaug_det.width`); see :func:`run_at_widths` for
    the order, the restoring and ``calibration``. Without calibration, BN layers of a
    sub-network normalise with their sliced running statistics (see
    :func:`gradaug_det.slim.slim_norm`).

    Args:
        model: a model with slimmable layers (e.g. built with
            ``build_slimmable_resnet_fpn_backbone``); may be wrapped in
            ``DistributedDataParallel``.
        data_loader: the test loader, as for ``inference_on_dataset``.
        evaluator: a ``DatasetEvaluator`` or a list of them; it is reset before every width.
        widths: sub-network widths to evaluate besides 1.0 (``TEST.SLIM_WIDTHS``); see
            :func:`normalize_widths`.
        calibration: also evaluate every sub-width with calibrated BN statistics
            (``TEST.BN_CALIBRATION_BATCHES``, :func:`bn_calibration_from_config`).

    Returns:
        OrderedDict mapping each width (float, 1.0 first, then decreasing) to the results
        of ``evaluator.evaluate()`` at that width (``{}`` where it returned ``None``, e.g.
        on non-main processes), plus the calibrated results under ``"<task>+bncal"``.

    Raises:
        ValueError: as :func:`run_at_widths`.
    """
    return run_at_widths(model, widths, lambda w: inference_on_dataset(model, data_loader, evaluator), calibration)


def width_task_key(task: str, w: float) -> str:
    """Name of ``task``'s results at width ``w`` in a flat results dict.

    ``width_task_key("bbox", 1.0) == "bbox"``; ``width_task_key("bbox", 0.75) == "bbox@w0.75"``.
    """
    w = check_width(w)
    return task if w == 1.0 else f"{task}@w{w:g}"


def split_width_key(key: str) -> Tuple[str, float]:
    """Inverse of :func:`width_task_key`: ``"segm@w0.9" -> ("segm", 0.9)``, ``"bbox" -> ("bbox", 1.0)``.

    Also accepts EventStorage scalar names: ``"bbox@w0.9/AP" -> ("bbox/AP", 0.9)``.
    """
    head, sep, tail = key.partition("/")
    m = _WIDTH_KEY_RE.match(head)
    if m is None:
        return key, 1.0
    return m.group("task") + sep + tail, float(m.group("width"))


def merge_width_results(results: Mapping[float, Mapping]) -> "OrderedDict[str, dict]":
    """Merge per-width results into one ``task -> {metric -> score}`` dict.

    Width 1.0 keeps the usual task names; width ``w`` uses ``"<task>@w<w>"`` (module
    docstring). The result suits ``verify_results``, ``print_csv_format`` and the
    trainer's ``EvalHook``.

    Args:
        results: the output of :func:`evaluate_at_widths`.
    """
    flat: "OrderedDict[str, dict]" = OrderedDict()
    for w, res in results.items():
        for task, metrics in (res or {}).items():
            flat[width_task_key(task, w)] = metrics
    return flat


def split_width_results(flat: Mapping[str, Mapping]) -> "OrderedDict[float, OrderedDict]":
    """Inverse of :func:`merge_width_results` (widths ordered 1.0 first, then decreasing)."""
    per_width: Dict[float, OrderedDict] = {}
    for key, metrics in flat.items():
        task, w = split_width_key(key)
        per_width.setdefault(w, OrderedDict())[task] = metrics
    return OrderedDict((w, per_width[w]) for w in sorted(per_width, reverse=True))


def _fmt(value) -> str:
    if value is None:
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "nan" if math.isnan(v) else f"{v:.3f}"


def width_results_table(results: Mapping) -> str:
    """Format results per width as a markdown table, one row per width.

    Columns: ``width``, then for every task found (in order of first appearance) the
    metrics among AP, AP50, AP75 (COCO ``bbox`` / ``segm``) and top1, top5
    (classification) that it reports, e.g. ``bbox AP | bbox AP50 | ... | segm AP75``.
    A metric missing at some width is shown as ``-``.

    Args:
        results: the output of :func:`evaluate_at_widths` (``width -> task -> metrics``),
            or its flat form (:func:`merge_width_results`, e.g. a trainer's results).

    Returns:
        The table as a string (tabulate "pipe" format, like detectron2's AP logs);
        ``""`` if there are no results.
    """
    if results and all(isinstance(k, str) for k in results):
        results = split_width_results(results)
    columns: List[Tuple[str, str]] = []
    for res in results.values():
        for task, metrics in (res or {}).items():
            if not isinstance(metrics, Mapping):
                continue
            for metric in _TABLE_METRICS:
                if metric in metrics and (task, metric) not in columns:
                    columns.append((task, metric))
    if not results:
        return ""
    rows = []
    for w, res in results.items():
        row = [str(float(w))]
        for task, metric in columns:
            metrics = (res or {}).get(task)
            row.append(_fmt(metrics.get(metric) if isinstance(metrics, Mapping) else None))
        rows.append(row)
    headers = ["width"] + [f"{task} {metric}" for task, metric in columns]
    return tabulate(rows, headers=headers, tablefmt="pipe", stralign="center", disable_numparse=True)


def log_width_results(results: Mapping, name: str = "") -> str:
    """Log :func:`width_results_table` of ``results`` at INFO level and return it.

    Args:
        results: as for :func:`width_results_table`.
        name: dataset name, shown in the log line's heading.
    """
    table = width_results_table(results)
    heading = f"Evaluation results per width{' on ' + name if name else ''}:"
    logger.info(heading + "\n" + table)
    return table

