"""Benchmarks: the cost model of a GradAug iteration and the measurements built on it.

:mod:`.cost` (torch only) counts the training FLOPs and times the phases of every pass;
:mod:`.iteration` measures baseline and GradAug iterations of a detectron2 model and prices
them with the cost model; :mod:`.backbone` times slimmable against stock backbones;
:mod:`.loader` times the resumable training loader against detectron2's; :mod:`.report`
writes the Markdown tables. The tools ``tools/benchmark.py``, ``tools/benchmark_backbone.py``,
``tools/benchmark_loader.py`` and ``tools/gpu_check.py`` are thin command lines over these.
"""
from .cost import PHASES, PassProbe, PassRecord, cost_model, count_train_flops, peak_rss_mb, rss_mb

__all__ = ["PHASES", "PassProbe", "PassRecord", "cost_model", "count_train_flops", "peak_rss_mb", "rss_mb"]
