"""GradAug's soft labels: the full network's detached predictions teach the sub-networks.

Classification (reference): ``KL(softmax(full) || softmax(sub))`` with log-softmax input,
``reduction="batchmean"``. Detection carries this to the box classifier (the detectron2
side in :mod:`.roi_soft_labels`, the MMDetection side in :mod:`gradaug_det.mmdet`), with
the same KL loss. This module depends on torch only.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["soft_label_kl", "OutputRecorder", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if hasattr(model, "module") and isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """GradAug's soft-label loss, the reference code's exact form.

    Args:
        student_logits: (N, K) logits of the sub-network.
        teacher_logits: (N, K) logits of the full network (detached here).

    Returns:
        ``F.kl_div(log_softmax(student), softmax(teacher), reduction="batchmean")``, in float32.
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    target = F.softmax(teacher_logits.detach().float(), dim=1)
    return F.kl_div(F.log_softmax(student_logits.float(), dim=1), target, reduction="batchmean")


class OutputRecorder:
    """Record the (detached) outputs of a module while a ``with`` block runs.

    Example::

        with OutputRecorder(model.head) as rec:
            losses = model(batch)
        teacher_logits = rec.outputs[0]
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.outputs: List[torch.Tensor] = []
        self._handle = None

    def __enter__(self):
        self.outputs = []
        self._handle = self.module.register_forward_hook(lambda m, i, o: self.outputs.append(o.detach()))
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False
