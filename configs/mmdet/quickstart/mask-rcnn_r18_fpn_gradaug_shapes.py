# MMDetection quickstart (`make demo-mmdet`, tools/mmdet_quickstart.py): GradAug fine-tuning of
# Mask R-CNN R18-FPN, the detectron2 quickstart's recipe (configs/quickstart/mask_rcnn_gradaug.yaml)
# in mmdet terms, on the same data: gradaug_quickstart_{train,val} (gradaug_det.data.QUICKSTART_SHAPES:
# 800 / 100 images of 128 px, 3 classes each in its own colours, occlusion, unannotated clutter)
# at datasets/gradaug_quickstart_shapes/ ($DETECTRON2_DATASETS/gradaug_quickstart_shapes/, which
# tools/mmdet_quickstart.py reads; here the default, relative to the working directory).
# tools/mmdet_quickstart.py starts the backbone from the quickstart's GradAug-pretrained R18
# (configs/quickstart/pretrain_r18_gradaug.yaml, converted by tools/convert_pretrained.py
# --target torchvision) through a config that inherits this one; run alone, this file trains
# from scratch (init_cfg None, as the tests build it). `make demo-mmdet` measured (commit f8732dc,
# the project's 2-core Intel Xeon, 2 threads; docs/mmdetection.md, "Measured"): bbox / segm mAP
# 0.495 / 0.585 at width 1.0 (mean of seeds 42 / 1 / 2; range 0.485-0.502 / 0.578-0.588), 0.462 /
# 0.530 at 0.75; 8 min 28 s from the command to the last line, alone on the machine (seed 42).
#   python tools/mmdet_quickstart.py                      # what `make demo-mmdet` runs
#   python tools/mmdet_train.py configs/mmdet/quickstart/mask-rcnn_r18_fpn_gradaug_shapes.py --generate-shapes
_base_ = 'mmdet::_base_/default_runtime.py'

custom_imports = dict(imports=['gradaug_det.mmdet'], allow_failed_imports=False)

model = dict(
    type='GradAugMaskRCNN',
    # torchvision's RGB mean / std: the pretrained classifier's (configs/imagenet/Base-ImageNet.yaml)
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_mask=True,
                           pad_size_divisor=32),
    # detectron2's FrozenBN (the pretrained statistics and affine parameters, frozen) is
    # requires_grad=False + norm_eval=True; every stage is trained (FREEZE_AT 0: frozen_stages=-1).
    backbone=dict(type='SlimmableResNet', depth=18, channel_divisor=1, num_stages=4, out_indices=(0, 1, 2, 3),
                  frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True,
                  style='pytorch', init_cfg=None),
    neck=dict(type='SlimmableFPN', channel_divisor=1, in_channels=[64, 128, 256, 512], out_channels=64, num_outs=5),
    rpn_head=dict(
        type='RPNHead', in_channels=64, feat_channels=64,
        # objects are 15-77 px in 128 px images: anchors 16-256 px (scale 4 x stride), one octave
        # smaller than COCO's (ANCHOR_GENERATOR.SIZES [[16], [32], [64], [128], [256]])
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
        bbox_head=dict(type='Shared2FCBBoxHead', in_channels=64, fc_out_channels=256, roi_feat_size=7,
                       num_classes=3,
                       bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4,
                                       target_stds=[0.1, 0.1, 0.2, 0.2]),
                       reg_class_agnostic=False,
                       loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                       loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        mask_roi_extractor=dict(type='SingleRoIExtractor',
                                roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0),
                                out_channels=64, featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(type='FCNMaskHead', num_convs=4, in_channels=64, conv_out_channels=64,
                       num_classes=3,
                       loss_mask=dict(type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
    train_cfg=dict(
        rpn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                               match_low_quality=True, ignore_iof_thr=-1),
                 sampler=dict(type='RandomSampler', num=128, pos_fraction=0.5, neg_pos_ub=-1,
                              add_gt_as_proposals=False),
                 allowed_border=-1, pos_weight=-1, debug=False),
        # RPN.PRE_NMS_TOPK_TRAIN 600 per level, POST_NMS_TOPK_TRAIN 300 per image
        rpn_proposal=dict(nms_pre=600, max_per_img=300, nms=dict(type='nms', iou_threshold=0.7),
                          min_bbox_size=0),
        # ROI_HEADS.BATCH_SIZE_PER_IMAGE 64, a quarter positive; detectron2's RoI matcher takes
        # no low-quality matches
        rcnn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                match_low_quality=False, ignore_iof_thr=-1),
                  sampler=dict(type='RandomSampler', num=64, pos_fraction=0.25, neg_pos_ub=-1,
                               add_gt_as_proposals=True),
                  mask_size=28, pos_weight=-1, debug=False)),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=50,
                  mask_thr_binary=0.5)),
    # GradAug (keys and defaults: gradaug_det.gradaug.GradAugOptions, MMDET_KEYS): one sub-network
    # per iteration, the smallest (width 0.75, the width the pretraining also trained), on a
    # rescaled copy of the batch, learning from the ground truth and from the full network's
    # soft labels -- the detectron2 quickstart's GRADAUG settings (whose comment has the
    # measurements that chose them); seed: the sub-network sampler's (--seed sets it too).
    gradaug=dict(num_subnets=1, min_width=0.75, max_width=1.0, scales=(1.0, 0.857, 0.714, 0.571),
                 subnet_loss='gt+soft', seed=42),
)
model_wrapper_cfg = dict(type='GradAugDistributedDataParallel')
# Checkpoints carry the sub-network sampler's state: --resume continues the same draws.
custom_hooks = [dict(type='GradAugSamplerStateHook')]

dataset_type = 'CocoDataset'
data_root = 'datasets/gradaug_quickstart_shapes/'
metainfo = dict(classes=('circle', 'rectangle', 'triangle'))
backend_args = None
# INPUT.MIN_SIZE_TRAIN (112, 128, 144), MAX_SIZE_TRAIN 256, horizontal flips; test at 128
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomChoiceResize', scales=[(256, 112), (256, 128), (256, 144)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(256, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=2, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(type=dataset_type, data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                 filter_cfg=dict(filter_empty_gt=True), pipeline=train_pipeline))
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

# SOLVER: batch 2, lr 0.01 after a linear warm-up of 50 iterations from 1 %, x 0.1 at 680 of 850
# iterations, momentum 0.9, weight decay 1e-4, each parameter's gradient norm clipped at 5
# (CLIP_TYPE "norm": gradaug_det.mmdet's PerParameterClipOptimWrapper; mmengine's own
# clip_grad clips the norm of all gradients together). Evaluated once, at the end.
train_cfg = dict(type='IterBasedTrainLoop', max_iters=850, val_interval=850)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=850, milestones=[680], gamma=0.1),
]
optim_wrapper = dict(type='PerParameterClipOptimWrapper',
                     optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001),
                     clip_grad=dict(max_norm=5.0))
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=850),
                     logger=dict(type='LoggerHook', interval=20))
log_processor = dict(by_epoch=False)
randomness = dict(seed=42)
