"""The attribute family's registries: its method (the attention model) and its datasets.

Filled by ``imbalanced_attr.task`` (the method) and ``imbalanced_attr.data``
(the readers); ``imbalanced_attr.family.FAMILY`` is what train_attr.py and
``python -m training_runtime.records --task attr`` use.
"""
from training_runtime.registry import Registry

METHODS = Registry("attribute method")
DATASETS = Registry("attribute dataset")
