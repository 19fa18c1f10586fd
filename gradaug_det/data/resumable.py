"""A training data loader whose position in the data stream is part of the checkpoint.

detectron2's training loader is an infinite, seeded stream (``TrainingSampler``), but
``--resume`` restarts it from its beginning, and its augmentations draw from each worker's
global random state, so a resumed run sees other images than an uninterrupted one.
:class:`ResumableTrainLoader` makes the stream resumable:

* Position ``p`` of this process's sampler stream (index ``sampler[p]``) is mapped with
  the random generators (``random``, ``numpy``, ``torch``) seeded from ``(sampler seed,
  rank, p)``, and restored afterwards: an item's augmentation depends only on its
  position, not on which worker maps it or on what was mapped before.
* Workers only map; batching and aspect-ratio grouping run in the main process on the
  items in stream order (worker ``w`` of ``n`` maps positions ``w, w + n, ...``; the
  DataLoader returns them in order), so prefetched but unused items never count.
* :meth:`ResumableTrainLoader.state_dict` is, at an iteration boundary, the next stream
  position and the positions waiting in the aspect-ratio buckets. Loading it makes the
  next iterator re-map the waiting positions first, then continue the stream: the same
  batches as without the interruption.

:class:`ResumableDataHook`, registered on the trainer (``GradAugTrainer`` and the LazyConfig
tool alike), saves this state of every rank in every checkpoint (gathered to rank 0 at each batch;
detectron2's hook state: checkpoint ``["trainer"]["hooks"]["ResumableDataHook"]``), restores each
rank's own on resume (refusing a checkpoint of another number of processes) and seeds the global generators the model's own
sampling uses (RPN / RoI subsampling) from (seed, rank, iteration) before every iteration, so a
run killed and resumed equals the uninterrupted run step for step, on every rank.
"""
import contextlib
import logging
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..utils.cli import UserError

__all__ = ["ResumableTrainLoader", "ResumableDataHook", "DataStreamStateError", "check_rank_states",
           "build_resumable_train_loader",
           "instantiate_lazy_train_loader", "resumable_data_hook", "upgrade_legacy_data_order", "seeded_rng",
           "seed_global_rng"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def seeded_rng(*key: int) -> Iterator[None]:
    """Seed ``random``, ``numpy`` and ``torch`` (CPU) from ``key`` inside the block and
    restore their previous states on exit.

    Args:
        key: integers (e.g. seed, rank, stream position); mixed by numpy's SeedSequence.
    """
    py, npy, tch = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed = _mix(key)
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # CPU only: CUDA's generators stay untouched
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(tch)


def seed_global_rng(*key: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (CPU and CUDA) from ``key`` (e.g. seed, rank,
    iteration), mixed by numpy's SeedSequence."""
    seed = _mix(key)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA generators too (lazily)


def _mix(key) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1)[0])


class _PositionedStream(torchdata.IterableDataset):
    """Yields ``(position, mapped item or None)`` in stream order, sharded over workers."""

    def __init__(self, dataset: Sequence, mapper: Optional[Callable], sampler, *, start: int,
                 replay: Sequence[int], seed: int, rank: int):
        self.dataset, self.mapper, self.sampler = dataset, mapper, sampler
        self.start, self.replay, self.seed, self.rank = start, list(replay), seed, rank

    def _indices(self) -> Iterator[Tuple[int, int]]:
        stream = enumerate(iter(self.sampler))
        waiting, wanted = {}, set(self.replay)
        if self.start > 0:
            for p, idx in stream:  # skip what completed iterations used; keep what waits in buckets
                if p in wanted:
                    waiting[p] = idx
                if p >= self.start - 1:
                    break
        for p in self.replay:
            yield p, waiting[p]
        yield from stream

    def __iter__(self):
        info = torchdata.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j, (p, idx) in enumerate(self._indices()):
            if j % workers != worker:
                continue
            with seeded_rng(self.seed, self.rank, p):
                item = self.dataset[idx]
                if self.mapper is not None:
                    item = self.mapper(item)
            yield p, item


def _first(batch):
    return batch


class ResumableTrainLoader:
    """Infinite iterable of training batches with a checkpointable stream position.

    Args:
        dataset: a list (or map-style dataset) of dataset dicts.
        mapper: callable mapping a dataset dict to the model's input (None: identity); a
            None result drops that position.
        sampler: an infinite, seeded index stream (detectron2's ``TrainingSampler``,
            ``RepeatFactorTrainingSampler`` ...): the same sequence every time it is
            iterated (its ``_seed`` is checkpointed).
        batch_size: images per batch in this process.
        aspect_ratio_grouping: batch landscape and portrait images separately (detectron2's
            ``AspectRatioGroupedDataset`` rule: ``width > height``).
        num_workers: DataLoader worker processes (0: map in the main process).
        collate_fn: applied to each batch (a list of mapped dicts); None keeps the list.
    """

    def __init__(self, dataset: Sequence, mapper: Optional[Callable], sampler, *, batch_size: int,
                 aspect_ratio_grouping: bool = True, num_workers: int = 0, collate_fn: Optional[Callable] = None):
        if isinstance(dataset, list):  # serialized, as detectron2 does, so workers do not copy it on read
            from detectron2.data.common import DatasetFromList

            dataset = DatasetFromList(dataset, copy=False)
        self.dataset, self.mapper, self.sampler = dataset, mapper, sampler
        self.batch_size, self.aspect_ratio_grouping = int(batch_size), bool(aspect_ratio_grouping)
        self.num_workers, self.collate_fn = int(num_workers), collate_fn
        self.rank = comm.get_rank()
        self._next = 0  # stream positions < _next were read ...
        self._buckets: List[List[Tuple[int, Any]]] = [[], []]  # ... and these still wait for a batch
        self._replay: List[int] = []
        #: Gather every process's :meth:`state_dict` to rank 0 at each batch boundary (one
        #: ``comm.gather`` per batch, so every process must draw its batches in step, as a
        #: trainer does); :class:`ResumableDataHook` sets it. Read by :meth:`rank_states`.
        self.gather_ranks = False
        self._rank_states: Optional[List[Optional[Dict[str, Any]]]] = None

    @property
    def seed(self) -> int:
        return int(getattr(self.sampler, "_seed", 0))

    def state_dict(self) -> Dict[str, Any]:
        """The stream position: next position, positions waiting in the buckets, the
        sampler's seed, the batch size and this process's rank (plain ints)."""
        return {"next_position": self._next, "waiting": [[p for p, _ in b] for b in self._buckets],
                "seed": self.seed, "batch_size": self.batch_size, "rank": self.rank}

    def rank_states(self) -> List[Optional[Dict[str, Any]]]:
        """Every process's :meth:`state_dict` at the last batch boundary, indexed by rank.

        On rank 0 with :attr:`gather_ranks`, the states gathered when the last batch was
        drawn (or those :meth:`load_rank_states` restored, before the first batch); on one
        process, ``[state_dict()]``. Entries this process does not know are None (other
        ranks' entries on rank > 0, or all but its own before any batch was gathered).
        """
        world = comm.get_world_size()
        if world == 1:
            return [self.state_dict()]
        if self._rank_states is not None and len(self._rank_states) == world and self.rank == 0:
            return list(self._rank_states)
        states: List[Optional[Dict[str, Any]]] = [None] * world
        states[self.rank] = self.state_dict()
        return states

    def load_rank_states(self, states: Sequence[Dict[str, Any]]) -> None:
        """:meth:`load_state_dict` this process's entry of ``states`` (one state per rank of
        this run, as :func:`check_rank_states` returns them) and keep them all, so a checkpoint
        written before the next batch still holds every rank's position.

        Raises:
            ValueError: as :meth:`load_state_dict`.
        """
        self.load_state_dict(states[self.rank])
        self._rank_states = list(states)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue the stream where ``state`` was taken (takes effect at the next ``iter``).

        Raises:
            ValueError: the batch size differs (the stream would be cut into other batches).
            DataStreamStateError: ``state`` is another rank's position.
        """
        if int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"the checkpoint's data stream was batched by {state['batch_size']} images per "
                             f"process, this run by {self.batch_size}; resume with the same SOLVER.IMS_PER_BATCH "
                             "and number of processes")
        if int(state.get("rank", self.rank)) != self.rank:
            raise DataStreamStateError(f"the data stream state is rank {state.get('rank')}'s, this process is rank "
                                       f"{self.rank}: load each rank's own state (ResumableDataHook)")
        if hasattr(self.sampler, "_seed") and int(state["seed"]) != self.seed:
            logger.info("Data order: the sampler seed %d of the checkpoint replaces %d", state["seed"], self.seed)
            self.sampler._seed = int(state["seed"])
        self._next = int(state["next_position"])
        self._replay = sorted(p for bucket in state["waiting"] for p in bucket)
        self._buckets = [[], []]

    def __iter__(self):
        stream = _PositionedStream(self.dataset, self.mapper, self.sampler, start=self._next,
                                   replay=self._replay, seed=self.seed, rank=self.rank)
        self._replay, self._buckets = [], [[], []]
        # its own generator: creating the iterator must not draw from the global torch RNG, which
        # the model's sampling uses (a resumed run creates it at another point of that stream)
        loader = torchdata.DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_first,
                                      generator=torch.Generator().manual_seed(self.seed))
        for p, item in loader:
            self._next = max(self._next, p + 1)
            if item is None:
                continue
            bucket = self._buckets[0 if not self.aspect_ratio_grouping or item["width"] > item["height"] else 1]
            bucket.append((p, item))
            if len(bucket) == self.batch_size:
                batch = [d for _, d in bucket]
                del bucket[:]  # before yielding: the state at the boundary excludes this batch
                if self.gather_ranks and comm.get_world_size() > 1:
                    gathered = comm.gather(self.state_dict(), dst=0)  # every rank, at the same batch
                    self._rank_states = gathered if gathered else None
                yield self.collate_fn(batch) if self.collate_fn is not None else batch


def build_resumable_train_loader(cfg, mapper=None, *, dataset=None,
                                 aspect_ratio_grouping: Optional[bool] = None) -> ResumableTrainLoader:
    """:class:`ResumableTrainLoader` from a config, with the dataset, sampler, mapper and
    batch size detectron2's ``build_detection_train_loader(cfg, mapper, dataset=dataset)``
    would use (the detection loader and the classification loader both build it here).

    Args:
        cfg: the config (``DATASETS.TRAIN``, ``DATALOADER.*``, ``SOLVER.IMS_PER_BATCH``).
        mapper: the dataset mapper; None: detectron2's ``DatasetMapper(cfg, True)``.
        dataset: list of dataset dicts; None: those of ``DATASETS.TRAIN``.
        aspect_ratio_grouping: None: ``DATALOADER.ASPECT_RATIO_GROUPING``.

    Raises:
        ValueError: an iterable dataset, or a total batch size that is not a positive
            multiple of the number of processes.
    """
    from detectron2.data.build import _train_loader_from_config

    kw = _train_loader_from_config(cfg, mapper, dataset=dataset)
    if aspect_ratio_grouping is not None:
        kw["aspect_ratio_grouping"] = aspect_ratio_grouping
    if isinstance(kw["dataset"], torchdata.IterableDataset):
        raise ValueError("DATALOADER.RESUMABLE needs a map-style training dataset (a list of dicts); set "
                         "DATALOADER.RESUMABLE False for an iterable dataset")
    world = comm.get_world_size()
    total = kw["total_batch_size"]
    if total <= 0 or total % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={total} must be a positive multiple of the number of processes "
                         f"({world})")
    return ResumableTrainLoader(kw["dataset"], kw["mapper"], kw["sampler"], batch_size=total // world,
                                aspect_ratio_grouping=kw["aspect_ratio_grouping"], num_workers=kw["num_workers"])


def instantiate_lazy_train_loader(loader_cfg):
    """Instantiate a LazyConfig's ``dataloader.train``; detectron2's
    ``build_detection_train_loader`` over a list of dataset dicts becomes a
    :class:`ResumableTrainLoader` with the same dataset, mapper, sampler, batch size,
    aspect-ratio grouping, workers and collate function (any other loader is instantiated
    as it is, and a resumed run restarts its stream).

    Args:
        loader_cfg: the ``LazyCall`` node (``cfg.dataloader.train``).

    Returns:
        The loader; a :class:`ResumableTrainLoader` when it could be made resumable.

    Raises:
        ValueError: ``total_batch_size`` not a positive multiple of the number of processes.
    """
    from detectron2.config import instantiate
    from detectron2.data import build_detection_train_loader
    from detectron2.data.samplers import TrainingSampler

    target = loader_cfg.get("_target_") if hasattr(loader_cfg, "get") else None
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        target = locate(target)
    if target is not build_detection_train_loader:
        return instantiate(loader_cfg)
    kw = {k: v for k, v in loader_cfg.items() if k != "_target_"}
    dataset = instantiate(kw["dataset"])
    if isinstance(dataset, torchdata.IterableDataset):
        return instantiate(loader_cfg)
    mapper = instantiate(kw.get("mapper"))
    sampler = instantiate(kw["sampler"]) if kw.get("sampler") is not None else TrainingSampler(len(dataset))
    world, total = comm.get_world_size(), int(kw["total_batch_size"])
    if total <= 0 or total % world:
        raise ValueError(f"dataloader.train.total_batch_size={total} must be a positive multiple of the number of "
                         f"processes ({world})")
    return ResumableTrainLoader(dataset, mapper, sampler, batch_size=total // world,
                                aspect_ratio_grouping=kw.get("aspect_ratio_grouping", True),
                                num_workers=kw.get("num_workers", 0), collate_fn=instantiate(kw.get("collate_fn")))


class DataStreamStateError(UserError, ValueError):
    """A checkpoint's data stream state does not hold this run's ranks' own positions (a
    :class:`~gradaug_det.utils.cli.UserError`: tools print it without a traceback)."""


def check_rank_states(state: Dict[str, Any], world_size: int) -> List[Dict[str, Any]]:
    """The per-rank stream states of a checkpoint's ``ResumableDataHook`` entry, checked
    against a run of ``world_size`` processes.

    Args:
        state: the entry: ``{"world_size": W, "ranks": [state of rank 0, ..., rank W-1]}``
            (an entry of rank ``r`` unknown to the saving process is None), or, as written
            before per-rank states, one process's :meth:`ResumableTrainLoader.state_dict`.
        world_size: the processes of the run that resumes.

    Returns:
        ``world_size`` states, the one of rank ``r`` at index ``r``.

    Raises:
        DataStreamStateError: the entry was written by a run of another number of processes,
            or lacks a rank's state (an entry of one process resumed by several): resuming would
            give a rank another rank's position, so it would replay images it has seen.
    """
    if "ranks" in state:
        saved, ranks = int(state["world_size"]), list(state["ranks"])
    else:  # before per-rank states: one process's state, its run's number of processes not recorded
        own = int(state.get("rank", 0))
        saved, ranks = None, [None] * own + [state]
    held = [r for r, s in enumerate(ranks) if s is not None]
    if held == list(range(world_size)) and saved in (world_size, None):
        return ranks
    holds = (f"the data stream positions of rank(s) {held} of a run of {saved} process(es)" if saved is not None
             else f"only rank {held[0]}'s data stream position (written before per-rank states; its run's number "
                  "of processes is not recorded)")
    fix = (f"resume it with {saved} process(es)" if saved is not None and saved != world_size
           else f"resume from a checkpoint written by a run of {world_size} process(es)")
    raise DataStreamStateError(
        f"the checkpoint holds {holds}, this run of {world_size} process(es) needs every rank's own: {fix}, or start "
        "a new run from its weights without --resume (MODEL.WEIGHTS / train.init_checkpoint; the data stream then "
        "starts from its beginning)")


class ResumableDataHook(HookBase):
    """Makes a :class:`ResumableTrainLoader`'s stream part of the trainer's checkpoint.

    * ``before_step``: seeds ``random``, ``numpy`` and ``torch`` from (sampler seed, rank,
      iteration), so what the model's own sampling draws (RPN / RoI label subsampling) does
      not depend on where the run started. Register it last: it runs after the other hooks'
      ``before_step``, right before the step.
    * ``state_dict`` / ``load_state_dict``: every rank's stream position
      (``{"world_size": W, "ranks": [...]}``, gathered to rank 0 at each batch: the hook sets
      the loader's :attr:`~ResumableTrainLoader.gather_ranks`), saved by detectron2's
      ``TrainerBase.state_dict`` under ``["hooks"]["ResumableDataHook"]`` of the trainer state
      (checkpointable ``"trainer"``) and restored by ``--resume``, each rank its own; a
      checkpoint of another number of processes is refused (:func:`check_rank_states`).
    * ``before_train``: warns when a resumed run (start iteration > 0) found no position in its
      checkpoint (written without a resumable loader): the stream starts from its beginning.

    Args:
        loader: the training loader; its step trainer must iterate this object.
    """

    def __init__(self, loader: ResumableTrainLoader):
        self.loader = loader
        loader.gather_ranks = True  # rank 0 saves every rank's position
        self._restored = False

    def before_train(self):
        if self.trainer.iter > 0 and not self._restored:
            logger.warning("The checkpoint has no data order (written without a resumable training loader, e.g. "
                           "DATALOADER.RESUMABLE False); the data stream starts from its beginning")

    def before_step(self):
        seed_global_rng(self.loader.seed, comm.get_rank(), self.trainer.iter)

    def state_dict(self) -> Dict[str, Any]:
        """Every rank's :meth:`ResumableTrainLoader.state_dict` at the last iteration boundary
        (:meth:`ResumableTrainLoader.rank_states`): ``{"world_size": W, "ranks": [...]}``."""
        return {"world_size": comm.get_world_size(), "ranks": self.loader.rank_states()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue the loader's stream at this rank's position in ``state``; an iterator the
        step trainer already holds is dropped, so the next batch comes from the restored position.

        Raises:
            DataStreamStateError: ``state`` lacks a rank of this run (:func:`check_rank_states`).
            ValueError: as :meth:`ResumableTrainLoader.load_state_dict` (other batch size).
        """
        self.loader.load_rank_states(check_rank_states(state, comm.get_world_size()))
        self._restored = True
        step_trainer = getattr(self.trainer, "_trainer", self.trainer)  # DefaultTrainer wraps its step trainer
        if getattr(step_trainer, "data_loader", None) is self.loader:
            step_trainer._data_loader_iter_obj = None


def resumable_data_hook(loader) -> Optional[ResumableDataHook]:
    """:class:`ResumableDataHook` for ``loader`` when it is a :class:`ResumableTrainLoader`,
    else None (``register_hooks`` skips None): any other loader restarts its stream on resume."""
    return ResumableDataHook(loader) if isinstance(loader, ResumableTrainLoader) else None


#: Where checkpoints written before :class:`ResumableDataHook` kept the data order:
#: ``GradAugTrainer`` in its trainer state, the LazyConfig tool as a top-level checkpointable.
_LEGACY_KEY = "data_order"


def upgrade_legacy_data_order(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """Move a data order of an older checkpoint (``checkpoint["trainer"]["data_order"]`` or
    ``checkpoint["data_order"]``) to where :class:`ResumableDataHook` reads it, in place; a
    position already stored there is kept. Other checkpoints are returned unchanged.

    Args:
        checkpoint: a loaded checkpoint dict (``"model"``, ``"trainer"``, ...).

    Returns:
        ``checkpoint``.
    """
    trainer = checkpoint.get("trainer")
    if not isinstance(trainer, dict):
        return checkpoint
    old = checkpoint.pop(_LEGACY_KEY, None)
    old = trainer.pop(_LEGACY_KEY, old)
    if old is not None:
        trainer.setdefault("hooks", {}).setdefault(ResumableDataHook.__qualname__, old)
    return checkpoint
