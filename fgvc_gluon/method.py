"""The interface between a fine-grained method and train_fgvc.py.

Each method module provides ``build_method(num_classes, **options)`` returning
an :class:`FGVCMethod`. The shared runtime builds one ``gluon.Trainer`` per
:class:`ParamGroup`, calls :meth:`FGVCMethod.training_loss` inside
``autograd.record()`` once per device slice, and :meth:`FGVCMethod.predict`
for evaluation.
"""
from training_runtime.loop import ParamGroup

__all__ = ["FGVCMethod", "ParamGroup"]


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
