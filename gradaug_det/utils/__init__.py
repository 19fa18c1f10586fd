"""Ground-floor helpers every layer may use (they import nothing from gradaug_det):

* :mod:`gradaug_det.utils.io`: files written atomically with the user's umask, output-path checks;
* :mod:`gradaug_det.utils.cli`: :class:`~gradaug_det.utils.cli.UserError` and the one wrapper every
  tool's ``__main__`` runs through (one short message and exit status 2 for a user's mistake);
* :mod:`gradaug_det.utils.analysis`: FLOP and parameter counts (``FlopCounterMode``);
* :mod:`gradaug_det.utils.parallel`: the module inside a DDP / DataParallel wrapper.
"""
