# Baseline for the side-by-side: MMDetection's own Mask R-CNN R50-FPN 1x on COCO 2017,
# unchanged (mmdet 3.3.0's configs/mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py).
#   mim train mmdet configs/mmdet/mask-rcnn_r50_fpn_1x_coco.py   (or mmdet's tools/train.py)
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
