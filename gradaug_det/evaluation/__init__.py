"""Evaluation: COCO AP at several widths; classification top-1/top-5."""
from .widths import (  # noqa: F401
    evaluate_at_widths,
    merge_width_results,
    log_width_results,
    normalize_widths,
    split_width_key,
    split_width_results,
    width_results_table,
    width_task_key,
)
from .classification import (ClassificationEvaluator, FGSMEvaluator, build_classification_evaluator, evaluate_classifier, fgsm_correct, fgsm_key)  # noqa: F401,E501
