"""Training-loader throughput: this project's resumable loader against detectron2's own.

``DATALOADER.RESUMABLE True`` (the default) trains with
:class:`gradaug_det.data.resumable.ResumableTrainLoader` instead of detectron2's
``build_detection_train_loader``. Both read the same dataset dicts through the same
``DatasetMapper`` in the same sampler order; the resumable one seeds the random generators
per stream position and batches in the main process. :func:`measure_loaders` builds both
from one config with one seeded ``TrainingSampler`` and times them alike, so what the
resumable stream costs is visible (``tools/benchmark_loader.py``).
"""
import statistics
import time
from typing import Dict, Iterator, List, Optional, Sequence

__all__ = ["LOADERS", "build_train_loader", "time_loader", "measure_loaders", "loader_markdown"]

#: The loaders compared: detectron2's ``build_detection_train_loader`` and ours.
LOADERS = ("detectron2", "resumable")


def build_train_loader(kind: str, cfg, dataset: Sequence[Dict], *, num_workers: int, seed: int):
    """One training loader of ``cfg`` (mapper, batch size, aspect-ratio grouping).

    Args:
        kind: ``"detectron2"`` or ``"resumable"`` (:data:`LOADERS`).
        cfg: a detectron2 config (``INPUT.*``, ``SOLVER.IMS_PER_BATCH``,
            ``DATALOADER.ASPECT_RATIO_GROUPING``).
        dataset: the dataset dicts both loaders read.
        num_workers: DataLoader worker processes (0: map in this process).
        seed: the ``TrainingSampler`` seed, the same for both kinds (same image order).

    Returns:
        an infinite iterable of batches (lists of mapped dataset dicts).

    Raises:
        ValueError: an unknown ``kind``.
    """
    from detectron2.data import DatasetMapper, build_detection_train_loader
    from detectron2.data.samplers import TrainingSampler

    from ..data.resumable import ResumableTrainLoader

    if kind not in LOADERS:
        raise ValueError(f"loader kind must be one of {LOADERS}, got {kind!r}")
    mapper = DatasetMapper(cfg, is_train=True)
    sampler = TrainingSampler(len(dataset), seed=seed)
    grouping = bool(cfg.DATALOADER.ASPECT_RATIO_GROUPING)
    if kind == "detectron2":
        return build_detection_train_loader(dataset=dataset, mapper=mapper, sampler=sampler,
                                            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
                                            aspect_ratio_grouping=grouping, num_workers=num_workers)
    return ResumableTrainLoader(dataset, mapper, sampler, batch_size=cfg.SOLVER.IMS_PER_BATCH,
                                aspect_ratio_grouping=grouping, num_workers=num_workers)


def time_loader(loader, *, batches: int, warmup: int) -> Dict:
    """Read ``warmup`` batches (worker start-up included), then time ``batches`` more.

    Args:
        loader: an iterable of batches (lists of dataset dicts with ``"file_name"``).
        batches: timed batches (>= 1).
        warmup: untimed batches first.

    Returns:
        ``{"images": n, "seconds": s, "images_per_s": n / s, "batch_s": [seconds per batch],
        "file_names": [file names of the timed images, in order]}``.
    """
    it: Iterator = iter(loader)
    for _ in range(warmup):
        next(it)
    times: List[float] = []
    names: List[str] = []
    t0 = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        batch = next(it)
        times.append(time.perf_counter() - t)
        names += [d.get("file_name", "") for d in batch]
    seconds = time.perf_counter() - t0
    return {"images": len(names), "seconds": seconds, "images_per_s": len(names) / seconds,
            "batch_s": times, "file_names": names}


def measure_loaders(cfg, dataset: Sequence[Dict], *, workers: Sequence[int], batches: int, warmup: int,
                    rounds: int = 1, seed: int = 0, progress=None) -> List[Dict]:
    """Throughput of both :data:`LOADERS` at each worker count, in interleaved rounds.

    Each round times every (worker count, loader) pair in turn, detectron2's first, so a
    drift of the machine weighs on both alike; a pair's images/s is the median over rounds.

    Args:
        cfg: the training config.
        dataset: dataset dicts (e.g. ``DatasetCatalog.get(cfg.DATASETS.TRAIN[0])``).
        workers: DataLoader worker counts to compare.
        batches, warmup: timed and untimed batches per measurement.
        rounds: measurements per pair.
        seed: sampler seed shared by both loaders.
        progress: a callable ``progress(label)`` called after each measurement, or None.

    Returns:
        one dict per (workers, loader): ``loader``, ``workers``, ``images_per_s`` (median),
        ``per_round`` (images/s of each round), ``median_batch_ms``, ``file_names`` (the
        first round's timed images) and, for ``resumable``, ``vs_detectron2`` (its
        images/s over detectron2's at the same worker count).

    Raises:
        ValueError: non-positive ``batches`` / ``rounds``, negative ``warmup`` or worker counts.
    """
    if not workers or batches < 1 or rounds < 1 or warmup < 0 or min(workers) < 0:
        raise ValueError(f"measure_loaders needs batches >= 1, rounds >= 1, warmup >= 0 and worker counts >= 0, "
                         f"got batches={batches}, rounds={rounds}, warmup={warmup}, workers={list(workers)}")
    runs: Dict[tuple, List[Dict]] = {}
    for r in range(rounds):
        for w in workers:
            for kind in LOADERS:
                loader = build_train_loader(kind, cfg, dataset, num_workers=w, seed=seed)
                runs.setdefault((w, kind), []).append(time_loader(loader, batches=batches, warmup=warmup))
                if progress is not None:
                    progress(f"round {r + 1}/{rounds}: {kind}, {w} workers")
    rows = []
    for (w, kind), rs in runs.items():
        per_round = [x["images_per_s"] for x in rs]
        rows.append({"loader": kind, "workers": w, "images_per_s": statistics.median(per_round),
                     "per_round": per_round,
                     "median_batch_ms": 1e3 * statistics.median([t for x in rs for t in x["batch_s"]]),
                     "file_names": rs[0]["file_names"]})
    for row in rows:
        if row["loader"] == "resumable":
            ref = next(x for x in rows if x["loader"] == "detectron2" and x["workers"] == row["workers"])
            row["vs_detectron2"] = row["images_per_s"] / ref["images_per_s"]
    return rows


def loader_markdown(rows: Sequence[Dict], header: Optional[str] = None) -> str:
    """The rows of :func:`measure_loaders` as a Markdown table (``header`` above it)."""
    from .report import markdown_table

    table = markdown_table(
        ["loader", "workers", "images/s (median)", "per round", "median ms/batch", "vs detectron2"],
        [[r["loader"], r["workers"], f"{r['images_per_s']:.1f}", " / ".join(f"{v:.1f}" for v in r["per_round"]),
          f"{r['median_batch_ms']:.1f}", f"{r['vs_detectron2']:.3f}" if "vs_detectron2" in r else "-"]
         for r in rows])
    return table if header is None else f"{header}\n\n{table}"
