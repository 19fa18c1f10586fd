"""``AtomicCOCOEvaluator``: detectron2's ``COCOEvaluator`` whose result files are never half-written."""
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from ..utils.io import atomic_files

__all__ = ["AtomicCOCOEvaluator"]


class AtomicCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` (same arguments and results) that writes ``instances_predictions.pth``
    and ``coco_instances_results.json`` into a temporary directory beside them and renames
    each complete file into ``output_dir``: a killed evaluation leaves the previous files
    or none, never a partial one."""

    def evaluate(self, img_ids=None):
        final = self._output_dir
        if not final or not comm.is_main_process():
            return super().evaluate(img_ids)
        with atomic_files(final) as tmp:  # each complete file renamed into `final` at the end
            self._output_dir = tmp
            try:
                return super().evaluate(img_ids)
            finally:
                self._output_dir = final
