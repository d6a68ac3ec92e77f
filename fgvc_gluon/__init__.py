"""Gluon ports of fine-grained recognition methods published in PyTorch.

``mcloss`` (Mutual-Channel loss, TIP 2020), ``s3n`` (Selective Sparse Sampling,
ICCV 2019), ``center_loss`` (ECCV 2016), ``baseline`` (a plain fine-tuned
classifier); ``task`` (:class:`~fgvc_gluon.task.FGVCTask`, the base of every
method, a training_runtime task), ``zoo`` (model-zoo backbones), ``losses``
(S3N's smoothed cross entropy), ``data`` (CUB-200-2011, FGVC-Aircraft,
Stanford Cars, Flowers-102, folder-per-class, the Fashion-MNIST demo),
``registry`` (the method and dataset registries) and ``family`` (the
``fgvc`` task family of train_fgvc.py).

Importing any submodule imports :mod:`fgvc_gluon.family` first (below), so
the methods are always registered in the family's order (baseline first, the
default method) whatever is imported first.
"""
from . import family  # noqa: F401  (registration order: see the docstring)
