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
    #: upstream training settings, keys:
    #:   lr, momentum, wd, batch_size, epochs,
    #:   lr_steps (list of epochs where the lr is multiplied by lr_factor), lr_factor,
    #:   image_size (int: side of the network input, train and eval),
    #:   resize (int or None: eval resizes the short side to this, then center-crops
    #:           image_size; None resizes straight to image_size),
    #:   train_crop ('random_resized' | 'pad_random' | 'resize'),
    #:   crop_scale ((lo, hi) area fraction for 'random_resized'),
    #:   pad (int, zero padding for 'pad_random'; the image is first resized to image_size),
    #:   flip (bool, random horizontal flip in training),
    #:   mean, std (3-tuples on 0-1 pixels).
    #: fgvc_gluon.data.make_transform(defaults, train) turns these into gluon transforms.
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
