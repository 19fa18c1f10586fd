"""Launching the tools: the top room, above the trainers.

* :mod:`gradaug_det.launch.pipeline`: ``tools/quickstart.py`` and ``tools/compare.py`` run
  the documented tools as subprocesses and read their results;
* :mod:`gradaug_det.launch.slurm`: ``tools/submit.py``'s submitit job (detectron2,
  LazyConfig and MMDetection training tools; ranks from the job environment, requeue on
  preemption through :mod:`gradaug_det.engine.preemption`).
"""
