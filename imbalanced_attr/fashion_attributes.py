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


# The strongly imbalanced variant (dataset ``fashion-mnist-rare``): target training positive
# rate of each attribute that belongs to one class only; the four classes behind no such
# attribute (T-shirt/top, pullover, shirt, sneaker) are kept whole.
RARE_RATES = dict([("legwear", 0.01), ("one_piece", 0.015), ("open_toe", 0.02),
                   ("ankle_high", 0.025), ("carried", 0.03), ("outerwear", 0.02)])


def rare_subsample(class_labels):
    """(N,) class indices -> (N,) bool mask keeping the rare variant's images.

    Class c behind a RARE_RATES attribute keeps the fraction f_c of its images
    that puts the attribute at its target rate (assuming the classes equally
    frequent, as Fashion-MNIST's are), spread evenly over the file order (the
    r-th image of the class is kept when floor((r + 1) f) > floor(r f)), so any
    prefix (``limit``) has about the same rates. Deterministic.
    """
    classes = np.asarray(class_labels)
    rates = dict((dict(ATTRIBUTES)[name][0], rate) for name, rate in RARE_RATES.items())
    kept_whole = len(CLASSES) - len(rates)
    total = kept_whole / (1.0 - sum(rates.values()))  # in units of one class's size
    keep = np.ones(len(classes), bool)
    for c, rate in rates.items():
        where = np.flatnonzero(classes == c)
        rank = np.arange(len(where))
        fraction = rate * total
        keep[where] = np.floor((rank + 1) * fraction) > np.floor(rank * fraction)
    return keep
