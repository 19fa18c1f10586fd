"""Soft labels for a detectron2 semantic-segmentation head (``SemanticSegmentor``).

GradAug's soft label carried to dense prediction: the full network's detached per-pixel
class distribution, resampled to the sub-network's input geometry, teaches the
sub-network's per-pixel distribution with the reference's KL loss
(``KL(softmax(full) || softmax(sub))``, averaged over pixels: the per-pixel form of
``reduction="batchmean"``).

Both distributions are compared on the sub-network head's own output grid (stride
``common_stride``, the grid the head predicts on before its loss upsamples): the centre of
student cell ``(i, j)`` is the point ``((j + 0.5) * s, (i + 0.5) * s)`` of the sub-network's
image; it is mapped back through the inverse of the sub-network's transform
(:meth:`.transforms.SubnetGeometry.inverse_points`) to the full network's image, where the
teacher's probabilities are sampled bilinearly from its stride-``s`` grid. Cells outside the
sub-network's image (padding) or whose source lies outside the full network's image (new
pixels of a rotation) have weight 0. Everything stays on the device.
"""
import contextlib
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.parallel import unwrap_model
from .losses import soft_target_kl
from .transforms import SubnetGeometry

__all__ = ["SemSegSoftLabels"]


class SemSegSoftLabels:
    """Soft labels for a semantic-segmentation head with ``layers(features)`` ending in a
    ``predictor`` (detectron2's ``SemSegFPNHead`` and its subclasses).

    Args:
        model: the (possibly DDP-wrapped) ``SemanticSegmentor``.

    Raises:
        ValueError: if the model has no such head.
    """

    def __init__(self, model: nn.Module):
        head = getattr(unwrap_model(model), "sem_seg_head", None)
        if head is None or not isinstance(getattr(head, "predictor", None), nn.Module) or not hasattr(head, "layers"):
            raise ValueError(
                f"GRADAUG.SUBNET_LOSS with 'soft' on a semantic-segmentation model needs a SemSegFPNHead-like head "
                f"(layers + predictor), got {type(head).__name__}; set GRADAUG.SUBNET_LOSS='gt'"
            )
        self.head = head
        self.stride = int(head.common_stride)

    @contextlib.contextmanager
    def record(self, batch: List[Dict]):
        """Record the full network's detached head logits during its pass.

        Yields:
            a dict that, after the block, holds "logits" (N, K, Hp/s, Wp/s) and "sizes" (the
            images' (h, w) in pixels).
        """
        outputs, teacher = [], {}
        handle = self.head.predictor.register_forward_hook(lambda m, a, o: outputs.append(o.detach()))
        try:
            yield teacher
        finally:
            handle.remove()
        if len(outputs) != 1:
            raise RuntimeError(f"expected one semantic-segmentation prediction in the full pass, saw {len(outputs)}")
        teacher["logits"] = outputs[0]
        teacher["sizes"] = [tuple(d["image"].shape[-2:]) for d in batch]

    def targets(self, teacher: Dict, geos: Sequence[SubnetGeometry], grid: Sequence[int]):
        """The teacher's probabilities on the student's output grid.

        Args:
            teacher: what :meth:`record` filled.
            geos: per image, the sub-network's geometry.
            grid: (Hs, Ws) of the student's output.

        Returns:
            ``(probs, weights)``: (N, K, Hs, Ws) float32 and (N, Hs, Ws) float32 0/1.
        """
        logits = teacher["logits"].float()
        device, s = logits.device, self.stride
        ht, wt = logits.shape[-2:]
        probs_t = F.softmax(logits, dim=1)
        ys = (torch.arange(grid[0], dtype=torch.float64, device=device)[:, None] + 0.5) * s
        xs = (torch.arange(grid[1], dtype=torch.float64, device=device)[None, :] + 0.5) * s
        xs, ys = xs.expand(grid[0], grid[1]), ys.expand(grid[0], grid[1])
        probs, weights = [], []
        for i, (geo, (h, w)) in enumerate(zip(geos, teacher["sizes"])):
            sx, sy = geo.inverse_points(xs, ys)  # continuous coordinates in the full network's image
            inside = (xs < geo.size[1]) & (ys < geo.size[0]) & (sx >= 0) & (sx <= w) & (sy >= 0) & (sy <= h)
            # teacher cell j holds the point (j + 0.5) * s: grid_sample with align_corners=False
            norm = torch.stack([2 * sx / (s * wt) - 1, 2 * sy / (s * ht) - 1], -1).to(probs_t.dtype)
            probs.append(F.grid_sample(probs_t[i:i + 1], norm[None], mode="bilinear", padding_mode="border",
                                       align_corners=False)[0])
            weights.append(inside.to(probs_t.dtype))
        return torch.stack(probs), torch.stack(weights)

    @contextlib.contextmanager
    def teach(self, teacher: Dict, geos: Sequence[SubnetGeometry], soft_only: bool, name: str = "loss_soft_sem_seg"):
        """While the block runs, the head's loss dict gains ``name``: the per-pixel soft-label KL.

        Args:
            teacher: what :meth:`record` filled.
            geos: per image, the sub-network's geometry (from the full network's image sizes).
            soft_only: the head computes no loss of its own (its targets are not needed).
        """
        head, student = self.head, []

        def on_predict(module, args, output):
            student.append(output)

        def on_head(module, args, kwargs, output):
            target, weight = self.targets(teacher, geos, student[-1].shape[-2:])
            output[1][name] = soft_target_kl(student[-1], target, weight)
            return output

        def layers_only(features, targets=None):
            head.layers(features)
            return None, {}

        handles = [head.predictor.register_forward_hook(on_predict),
                   head.register_forward_hook(on_head, with_kwargs=True)]
        if soft_only:
            head.forward = layers_only  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            if soft_only:
                del head.forward
