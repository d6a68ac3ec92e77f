"""The attribute demo's labels: clothing attributes derived from Fashion-MNIST classes.

The embedded demo data (``training_runtime.fashion_mnist``, real product
photos with real class labels) has no attributes of its own, so the
attribute demo learns attributes that are a fixed function of the product
class, e.g. ``footwear`` = sandal, sneaker or ankle boot. Positive rates are
10 % to 40 % (see README, "The embedded demo").
"""
import numpy as np

from training_runtime.fashion_mnist import CLASSES

# attribute name -> the classes that have it (indices into CLASSES)
ATTRIBUTES = (
    ("footwear", (5, 7, 9)),
    ("upper_body", (0, 2, 4, 6)),
    ("long_sleeves", (2, 4, 6)),
    ("legwear", (1,)),
    ("one_piece", (3,)),
    ("open_toe", (5,)),
    ("ankle_high", (9,)),
    ("carried", (8,)),
    ("outerwear", (4,)),
)
ATTRIBUTE_NAMES = tuple(name for name, _ in ATTRIBUTES)


def class_attributes():
    """(10, A) float32 0/1 matrix: which derived attribute each class has."""
    table = np.zeros((len(CLASSES), len(ATTRIBUTES)), np.float32)
    for a, (_, classes) in enumerate(ATTRIBUTES):
        table[list(classes), a] = 1
    return table


def attribute_labels(class_labels):
    """(N,) class indices -> (N, A) attribute labels in the WIDER convention (1 / -1)."""
    return class_attributes()[np.asarray(class_labels)] * 2 - 1
