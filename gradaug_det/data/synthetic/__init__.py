"""Self-generated datasets: deterministic, restartable, plain numpy / OpenCV.

* :mod:`.drawing`: the drawing kit (textured backgrounds, glyphs, shapes, their colours);
* :mod:`.coco_shapes`: the COCO-layout instance-segmentation shapes (:func:`generate_coco_shapes`);
* :mod:`.imagefolder`: the ImageNet-layout class folders (:func:`generate_imagefolder`);
* :mod:`.files` (atomic files, the ``DONE`` marker) and :mod:`.checks` (argument checks),
  shared by both generators.
"""
from .coco_shapes import COCO_SHAPES_CATEGORIES, QUICKSTART_SHAPES, coco_shapes_paths, generate_coco_shapes
from .drawing import DISTRACTOR_GLYPHS, draw_glyph
from .imagefolder import QUICKSTART_CLASSES, generate_imagefolder, imagefolder_wnids

__all__ = ["COCO_SHAPES_CATEGORIES", "DISTRACTOR_GLYPHS", "QUICKSTART_CLASSES", "QUICKSTART_SHAPES", "coco_shapes_paths",
           "draw_glyph", "generate_coco_shapes", "generate_imagefolder", "imagefolder_wnids"]
