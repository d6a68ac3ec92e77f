"""The fine-grained task family: what train_fgvc.py trains (entry point ``fgvc`` of
``training_runtime.families``).

Importing this module registers everything: the datasets (:mod:`fgvc_gluon.data`)
and the methods, in this order (the first is the default method): baseline,
mcloss, s3n, centerloss. Labels are int class indices; every method is an
:class:`fgvc_gluon.task.FGVCTask` whose metric is the top-1 accuracy.
"""
from training_runtime.registry import TaskFamily

from . import data  # noqa: F401  (registers the datasets)
from . import baseline, mcloss, s3n, center_loss  # noqa: F401  (register the methods, in this order)
from .registry import DATASETS, METHODS

FAMILY = TaskFamily("fgvc", "train_fgvc", METHODS, DATASETS, default_dataset="cub",
                    description="fine-grained classification: a fine-tuned baseline, MC-Loss (TIP 2020), "
                                "S3N (ICCV 2019), center loss (ECCV 2016)")
