"""Old import path of the fine-grained method interface.

The interface is :class:`fgvc_gluon.task.FGVCTask` (a
:class:`training_runtime.task.TrainingTask`); ``FGVCMethod`` is the same
class under its former name, ``ParamGroup`` the runtime's
:class:`training_runtime.task.ParamGroup`.
"""
from .task import FGVCTask, ParamGroup

FGVCMethod = FGVCTask

__all__ = ["FGVCMethod", "FGVCTask", "ParamGroup"]
