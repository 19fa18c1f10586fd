"""``AtomicCOCOEvaluator``: detectron2's ``COCOEvaluator`` whose result files are never half-written."""
import os
import shutil
import tempfile

from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

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
        os.makedirs(final, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-results-", dir=final)
        self._output_dir = tmp
        try:
            results = super().evaluate(img_ids)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(final, name))
            return results
        finally:
            self._output_dir = final
            shutil.rmtree(tmp, ignore_errors=True)
