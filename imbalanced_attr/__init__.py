"""Deep Imbalanced Attribute Classification using Visual Attention Aggregation
(ECCV 2018): a faithful Gluon port of cvcode18/imbalanced_learning.

Modules: ``backbones`` (tap backbones), ``model`` (attention heads and the
aggregated prediction), ``losses`` (weighted focal loss, history-weighted
attention loss, prediction history, class weights), ``metrics`` (test mAP,
average precision, PETA / PA-100K metrics), ``params_io`` (the original's
parameter files), ``data`` (WIDER-Attribute, PETA, PA-100K readers).
"""
