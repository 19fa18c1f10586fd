# MMDetection quickstart: Mask R-CNN R18-FPN trained from scratch with GradAug on synthetic
# COCO-format shapes at data_root (datasets/gradaug_quickstart/), which --generate-shapes
# writes: generate_coco_shapes' defaults, 300 / 50 images of 256 px, 3 classes in random
# colours, no clutter. (Not the detectron2 quickstart's data: `make demo` writes 128 px
# images with category colours and clutter to datasets/gradaug_quickstart_shapes/.)
# Sized for a CPU; the tests build their models from this file (with smaller images).
#   python tools/mmdet_train.py configs/mmdet/quickstart/mask-rcnn_r18_fpn_gradaug_shapes.py --generate-shapes
_base_ = 'mmdet::_base_/default_runtime.py'

custom_imports = dict(imports=['gradaug_det.mmdet'], allow_failed_imports=False)

model = dict(
    type='GradAugMaskRCNN',
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_mask=True,
                           pad_size_divisor=32),
    backbone=dict(type='SlimmableResNet', depth=18, channel_divisor=1, num_stages=4, out_indices=(0, 1, 2, 3),
                  frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False,
                  style='pytorch', init_cfg=None),
    neck=dict(type='SlimmableFPN', channel_divisor=1, in_channels=[64, 128, 256, 512], out_channels=64, num_outs=5),
    rpn_head=dict(
        type='RPNHead', in_channels=64, feat_channels=64,
        anchor_generator=dict(type='AnchorGenerator', scales=[4], ratios=[0.5, 1.0, 2.0],
                              strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(type='SingleRoIExtractor',
                                roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
                                out_channels=64, featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(type='Shared2FCBBoxHead', in_channels=64, fc_out_channels=128, roi_feat_size=7,
                       num_classes=3,
                       bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4,
                                       target_stds=[0.1, 0.1, 0.2, 0.2]),
                       reg_class_agnostic=False,
                       loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                       loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        mask_roi_extractor=dict(type='SingleRoIExtractor',
                                roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0),
                                out_channels=64, featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(type='FCNMaskHead', num_convs=2, in_channels=64, conv_out_channels=64,
                       num_classes=3,
                       loss_mask=dict(type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
    train_cfg=dict(
        rpn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                               match_low_quality=True, ignore_iof_thr=-1),
                 sampler=dict(type='RandomSampler', num=64, pos_fraction=0.5, neg_pos_ub=-1,
                              add_gt_as_proposals=False),
                 allowed_border=-1, pos_weight=-1, debug=False),
        rpn_proposal=dict(nms_pre=500, max_per_img=200, nms=dict(type='nms', iou_threshold=0.7),
                          min_bbox_size=0),
        rcnn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                match_low_quality=True, ignore_iof_thr=-1),
                  sampler=dict(type='RandomSampler', num=32, pos_fraction=0.25, neg_pos_ub=-1,
                               add_gt_as_proposals=True),
                  mask_size=28, pos_weight=-1, debug=False)),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=50,
                  mask_thr_binary=0.5)),
    # GradAug (keys and defaults: gradaug_det.gradaug.GradAugOptions, MMDET_KEYS)
    gradaug=dict(num_subnets=3, min_width=0.9, max_width=1.0, scales=(1.0, 0.857, 0.714, 0.571),
                 subnet_loss='soft', seed=0),
)
model_wrapper_cfg = dict(type='GradAugDistributedDataParallel')
# Checkpoints carry the sub-network sampler's state: --resume continues the same draws.
custom_hooks = [dict(type='GradAugSamplerStateHook')]

dataset_type = 'CocoDataset'
data_root = 'datasets/gradaug_quickstart/'
metainfo = dict(classes=('circle', 'rectangle', 'triangle'))
backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomChoiceResize', scales=[(384, 224), (384, 256), (384, 288)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(384, 256), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
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
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'annotations/instances_val.json',
                     metric=['bbox', 'segm'], format_only=False)
test_evaluator = val_evaluator

# From scratch: lr 0.005 with warm-up and gradient clipping (total norm 5; the detectron2
# quickstart, configs/quickstart/mask_rcnn_gradaug.yaml, clips each parameter at 5).
# Last measured on the 2-core CPU (commit 01e5442, with --generate-shapes): 6 min 2 s for 300
# iterations + evaluation, bbox / segm AP 1.1 / 1.4 (AP50 4.1 / 4.1): a smoke test of the
# pipeline, far from converged (docs/mmdetection.md).
train_cfg = dict(type='IterBasedTrainLoop', max_iters=300, val_interval=300)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=300, milestones=[225, 280], gamma=0.1),
]
optim_wrapper = dict(type='OptimWrapper',
                     optimizer=dict(type='SGD', lr=0.005, momentum=0.9, weight_decay=0.0001),
                     clip_grad=dict(max_norm=5.0))
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=300),
                     logger=dict(type='LoggerHook', interval=20))
log_processor = dict(by_epoch=False)
randomness = dict(seed=42)
