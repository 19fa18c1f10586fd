"""The backbone of a pruned model: stock detectron2 ResNet-FPN with explicit channels per stage.

``tools/prune.py`` (:mod:`gradaug_det.checkpoint.prune`) cuts a slimmable detector's
width-``w`` sub-network out as a stock detectron2 model. Its per-stage channel counts
generally break the stock ResNet rule (``RES2_OUT_CHANNELS`` doubled per stage) after
rounding; then its config names :func:`build_pruned_resnet_fpn_backbone`, which reads the
counts from ``MODEL.PRUNED_RESNET.*`` (:func:`gradaug_det.config.add_pruned_config`).
The modules are stock detectron2 ones, laid out by the slimmable ResNet's stage loop
(:func:`gradaug_det.modeling.resnet.make_resnet_stages`), so the parameter names are
those of ``build_resnet_fpn_backbone``.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN
from detectron2.modeling.backbone.resnet import BasicStem, ResNet

from .fpn import fpn_config_kwargs
from .resnet import check_resnet_depth, make_resnet_stages

__all__ = ["build_pruned_resnet", "build_pruned_resnet_fpn_backbone"]


def build_pruned_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """Stock detectron2 ``ResNet`` with the per-stage channels of ``MODEL.PRUNED_RESNET``.

    Args:
        cfg: a config with ``MODEL.PRUNED_RESNET`` (``STEM_OUT_CHANNELS``, ``OUT_CHANNELS``,
            ``BOTTLENECK_CHANNELS``) and ``MODEL.RESNETS.{DEPTH, NORM, NUM_GROUPS,
            STRIDE_IN_1X1, RES5_DILATION, OUT_FEATURES}``, ``MODEL.BACKBONE.FREEZE_AT``.
        input_shape: the image's shape (channels).

    Raises:
        ValueError: naming the key, before anything is built: an unsupported depth,
            channel lists that are not 4 positive counts, deformable stages, bottleneck
            channels that are not multiples of ``NUM_GROUPS``.
    """
    r, p = cfg.MODEL.RESNETS, cfg.MODEL.PRUNED_RESNET
    check_resnet_depth(r.DEPTH)
    for key in ("OUT_CHANNELS", "BOTTLENECK_CHANNELS"):
        values = list(p[key])
        if len(values) != 4 or any(int(v) < 1 for v in values):
            raise ValueError(
                f"MODEL.PRUNED_RESNET.{key} must list 4 positive channel counts (res2..res5), got {values}"
            )
    if any(r.DEFORM_ON_PER_STAGE):
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE must be all False for a pruned ResNet")
    if r.DEPTH not in (18, 34) and any(c % r.NUM_GROUPS for c in p.BOTTLENECK_CHANNELS):
        raise ValueError(
            f"MODEL.PRUNED_RESNET.BOTTLENECK_CHANNELS={list(p.BOTTLENECK_CHANNELS)} must be "
            f"multiples of MODEL.RESNETS.NUM_GROUPS={r.NUM_GROUPS}"
        )
    stem = BasicStem(input_shape.channels, p.STEM_OUT_CHANNELS, r.NORM)
    stages = make_resnet_stages(r, p.STEM_OUT_CHANNELS, list(p.OUT_CHANNELS), list(p.BOTTLENECK_CHANNELS))
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_pruned_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Build a stock detectron2 ResNet-FPN with explicit per-stage channel counts.

    Reads ``MODEL.PRUNED_RESNET.*`` (per-stage channels, see
    :func:`gradaug_det.config.add_pruned_config`), the ``MODEL.RESNETS`` keys of
    :func:`build_pruned_resnet`, ``MODEL.BACKBONE.FREEZE_AT`` and ``MODEL.FPN.*``. Module and
    parameter names are those of ``build_resnet_fpn_backbone``.
    """
    return FPN(bottom_up=build_pruned_resnet(cfg, input_shape), **fpn_config_kwargs(cfg))
