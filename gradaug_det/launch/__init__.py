"""Launching the tools: the top room, above the trainers.

* :mod:`gradaug_det.launch.pipeline`: ``tools/quickstart.py`` and ``tools/compare.py`` run
  the documented tools as subprocesses and read their results (``tools/mmdet_quickstart.py``
  too);
* :mod:`gradaug_det.launch.pictures`: the quickstarts' picture grid of drawn predictions;
* :mod:`gradaug_det.launch.slurm`: ``tools/submit.py``'s submitit job (detectron2,
  LazyConfig and MMDetection training tools; ranks from the job environment, requeue on
  preemption through :mod:`gradaug_det.engine.preemption`).
"""
