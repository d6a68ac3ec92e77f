"""Gluon ports of fine-grained recognition methods published in PyTorch.

``mcloss`` (Mutual-Channel loss, TIP 2020), ``s3n`` (Selective Sparse Sampling,
ICCV 2019), ``center_loss`` (ECCV 2016), ``baseline`` (a plain fine-tuned
classifier), ``method`` (the interface train_fgvc.py consumes), ``data``
(CUB-200-2011, FGVC-Aircraft, Stanford Cars, Flowers-102, folder-per-class).
"""
