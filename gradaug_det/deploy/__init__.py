"""Deployment of one width of a slimmable detector.

* :mod:`gradaug_det.deploy.export`: trace the model pruned to a width
  (:func:`gradaug_det.deploy.prune.pruned_from_config`) with detectron2's
  ``TracingAdapter`` into a TorchScript or ONNX file that runs without gradaug_det and
  detectron2, and check it against the slimmable model at that width (``tools/export_model.py``).
* :mod:`gradaug_det.deploy.tradeoff`: accuracy against cost over widths and test sizes, the
  Pareto front and the best configuration under a budget (``tools/tradeoff.py``).

See docs/deployment.md.
"""
