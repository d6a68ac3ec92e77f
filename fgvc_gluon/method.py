"""The interface between a fine-grained method and train_fgvc.py.

Each method module provides ``build_method(num_classes, **options)`` returning
an :class:`FGVCMethod`. The shared runtime builds one ``gluon.Trainer`` per
:class:`ParamGroup`, calls :meth:`FGVCMethod.training_loss` inside
``autograd.record()`` once per device slice, and :meth:`FGVCMethod.predict`
for evaluation.
"""
from collections import namedtuple

ParamGroup = namedtuple("ParamGroup", "name params lr_mult optimizer_params follows_schedule")
ParamGroup.__new__.__defaults__ = (1.0, None, True)
ParamGroup.__doc__ = """One Trainer's worth of parameters.

name: str, used for the trainer-state entry in checkpoints.
params: gluon ParameterDict (or list of Parameters).
lr_mult: learning rate = schedule lr * lr_mult (S3N's per-group multipliers).
optimizer_params: dict overriding the optimizer settings for this group
    (e.g. the center-loss centers: {'learning_rate': 0.5, 'momentum': 0, 'wd': 0}).
follows_schedule: False keeps this group's learning rate fixed.
"""


class FGVCMethod(object):
    """Base class: a network plus how it is trained and evaluated.

    Subclasses set ``name``, ``net`` and ``defaults`` and implement the three
    methods below.
    """

    name = None
    net = None
    #: upstream training settings: lr, momentum, wd, batch_size, epochs,
    #: lr_steps (epochs where lr is multiplied by lr_factor), lr_factor,
    #: image_size, normalisation
    defaults = {}

    def param_groups(self):
        """List of :class:`ParamGroup`, one Trainer each."""
        raise NotImplementedError

    def training_loss(self, data, label, epoch):
        """Loss of one device slice, called inside ``autograd.record()``.

        data: N×3×S×S float32; label: (N,) int class indices (float32 NDArray).
        Returns the per-sample loss, shape (N,); the runtime calls
        ``backward()`` on it and ``trainer.step(batch_size)``.
        """
        raise NotImplementedError

    def predict(self, data, epoch):
        """Evaluation logits: ordered dict branch name -> N×K (main branch first)."""
        raise NotImplementedError
