# RetinaNet R18-FPN trained from scratch with GradAug and the dense soft label
# (subnet_loss='gt+soft': every sub-network anchor learns the rescaled annotations' focal loss
# and the full network's per-class probabilities of the anchor it corresponds to), on the
# generated shapes that --generate-shapes writes at data_root if they are not there (the data of
# `make demo` and of the Mask R-CNN quickstart config beside this one: 800 / 100 images of 128 px,
# 3 classes in their own colours, clutter), resized to 256 px. Sized for a CPU. Measured on the
# data --generate-shapes wrote before (commit 855305e: 300 / 50 images of 256 px, 3 classes in
# random colours; 2-core CPU, 400 iterations from scratch, 2 seeds; not rerun on this data):
# it trains but does not detect yet (bbox mAP 0.000 'gt+soft', 0.002 'gt' at score_thr 0), and
# 'gt+soft' was less stable than 'gt' (a large gradient spike in both seeds, recovered) with no
# benefit (final focal loss 0.93 vs 0.84); docs/mmdetection.md has the numbers.
#   python tools/mmdet_train.py configs/mmdet/quickstart/retinanet_r18_fpn_gradaug_shapes.py --generate-shapes
_base_ = 'mmdet::_base_/default_runtime.py'

custom_imports = dict(imports=['gradaug_det.mmdet'], allow_failed_imports=False)

model = dict(
    type='GradAugRetinaNet',
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32),
    backbone=dict(type='SlimmableResNet', depth=18, channel_divisor=1, num_stages=4, out_indices=(0, 1, 2, 3),
                  frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False,
                  style='pytorch', init_cfg=None),
    neck=dict(type='SlimmableFPN', channel_divisor=1, in_channels=[64, 128, 256, 512], out_channels=64,
              start_level=1, add_extra_convs='on_input', num_outs=5),
    bbox_head=dict(
        type='RetinaHead', num_classes=3, in_channels=64, stacked_convs=4, feat_channels=64,
        # mmdet's RetinaNet anchors one octave smaller (16 px at stride 8): the shapes are 12-170 px
        anchor_generator=dict(type='AnchorGenerator', octave_base_scale=2, scales_per_octave=3,
                              ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    train_cfg=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                                 ignore_iof_thr=-1),
                   sampler=dict(type='PseudoSampler'), allowed_border=-1, pos_weight=-1, debug=False),
    test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5),
                  max_per_img=100),
    # GradAug (keys and defaults: gradaug_det.gradaug.GradAugOptions, MMDET_KEYS)
    gradaug=dict(num_subnets=3, min_width=0.9, max_width=1.0, scales=(1.0, 0.857, 0.714, 0.571),
                 subnet_loss='gt+soft', seed=0),
)
model_wrapper_cfg = dict(type='GradAugDistributedDataParallel')
# Checkpoints carry the sub-network sampler's state: --resume continues the same draws.
custom_hooks = [dict(type='GradAugSamplerStateHook')]

dataset_type = 'CocoDataset'
data_root = 'datasets/gradaug_quickstart_shapes/'
metainfo = dict(classes=('circle', 'rectangle', 'triangle'))
backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomChoiceResize', scales=[(384, 224), (384, 256), (384, 288)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(384, 256), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=2, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(type=dataset_type, data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                 filter_cfg=dict(filter_empty_gt=True, min_size=8), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=True, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                 test_mode=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'annotations/instances_val.json', metric='bbox',
                     format_only=False)
test_evaluator = val_evaluator

# From scratch: lr 0.01 with warm-up, the total gradient norm clipped at 35 (mmdet 2.x's RetinaNet).
train_cfg = dict(type='IterBasedTrainLoop', max_iters=400, val_interval=400)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=400, milestones=[300, 370], gamma=0.1),
]
optim_wrapper = dict(type='OptimWrapper',
                     optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001),
                     clip_grad=dict(max_norm=35.0))
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=400),
                     logger=dict(type='LoggerHook', interval=20))
log_processor = dict(by_epoch=False)
randomness = dict(seed=42)
