# Mask R-CNN R50-FPN 1x on COCO 2017 fine-tuned with GradAug: the baseline next to this
# file plus a slimmable backbone and the GradAug iteration (gradaug_det.mmdet).
# The backbone starts from torchvision's ResNet-50 (the base config's init_cfg). For a
# GradAug-pretrained one (configs/imagenet/resnet50_gradaug.yaml), convert it with
#   python tools/convert_pretrained.py --source classifier --target torchvision \
#       output/imagenet_gradaug/model_final.pth r50_gradaug_tv.pth
# and set model.backbone.init_cfg=dict(type='Pretrained', checkpoint='r50_gradaug_tv.pth').
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['gradaug_det.mmdet'], allow_failed_imports=False)

model = dict(
    type='GradAugMaskRCNN',
    # mmdet's ResNet with switchable width and depth; same arguments and weights.
    backbone=dict(type='SlimmableResNet', channel_divisor=1),
    # mmdet's FPN whose convolutions follow the width too (every layer of a sub-network
    # is narrowed, as on the detectron2 side); type='FPN' slims the backbone only.
    neck=dict(type='SlimmableFPN', channel_divisor=1),
    # The GradAug iteration (keys and defaults: gradaug_det.gradaug.GradAugOptions, MMDET_KEYS).
    gradaug=dict(
        num_subnets=3,  # sub-networks per iteration
        min_width=0.9,  # always one sub-network at the smallest width ...
        max_width=1.0,  # ... the others uniform in [min_width, max_width]
        smallest_subnet=True,
        sampling='width',  # or 'depth': drop residual blocks instead
        transform='scale',  # sub-networks' input: 'scale', 'rotate' or 'scale_rotate'
        scales=(1.0, 0.857, 0.714, 0.571),  # each sub-network's random input rescale
        rotation=(-20.0, 20.0),  # degrees, for 'rotate' / 'scale_rotate'
        subnet_loss='soft',  # KL to the full network's RoI class distributions
        soft_weight=1.0,
        seed=0))

# Multi-GPU: run the GradAug iteration (the default DDP wrapper would skip it).
model_wrapper_cfg = dict(type='GradAugDistributedDataParallel')
# Checkpoints carry the sub-network sampler's state: --resume continues the same draws.
custom_hooks = [dict(type='GradAugSamplerStateHook')]
