# LazyConfig: detectron2's Mask R-CNN R50-FPN 1x with a slimmable backbone and GradAug.
#   python tools/lazyconfig_train_net.py --config-file configs/lazy/mask_rcnn_gradaug_R_50_FPN_1x.py
from detectron2.model_zoo import get_config

from gradaug_det.modeling.lazy import make_lazy_model_slimmable

_base = get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
dataloader = _base.dataloader
optimizer = _base.optimizer
lr_multiplier = _base.lr_multiplier
train = _base.train
model = make_lazy_model_slimmable(_base.model, divisor=1)

# GradAug: the yacs GRADAUG keys in lower case, same defaults and checks
# (gradaug_det.gradaug.GradAugOptions; gradaug.depth_eval_scale is yacs-only).
gradaug = dict(
    enabled=True,
    # Reference defaults: 3 sub-networks, smallest width always, widths in [0.9, 1.0],
    # inputs rescaled by one of 224/192/160/128 relative to 224.
    num_subnets=3,
    min_width=0.9,
    max_width=1.0,
    smallest_subnet=True,
    sampling="width",
    transform="scale",
    scales=(1.0, 0.857, 0.714, 0.571),
    seed=0,  # the sub-network sampler's own RNG, identical on every worker (-1: train.seed, else 0)
    subnet_loss="soft",
    soft_weight=1.0,
    gt_weight=1.0,
)

# Widths evaluated besides 1.0 (TEST.SLIM_WIDTHS of the yacs configs), e.g. test.slim_widths=[0.75,0.5]
test = dict(slim_widths=[])
