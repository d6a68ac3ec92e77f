"""The attribute task family: what train_attr.py trains (entry point ``attr`` of
``training_runtime.families``)."""
from training_runtime.registry import TaskFamily

from . import data, task  # noqa: F401  (they register the datasets and the method)
from .explain import EXPLAIN
from .registry import DATASETS, METHODS

FAMILY = TaskFamily("attr", "train_attr", METHODS, DATASETS, default_dataset="wider",
                    description="imbalanced human-attribute classification (ECCV 2018)",
                    actions=(EXPLAIN,))
