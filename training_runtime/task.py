"""The one contract between a model and the runtime: :class:`TrainingTask`.

A task is a model together with how it is trained, evaluated and applied.
:class:`training_runtime.loop.Runner` trains any task; the command line
(:mod:`training_runtime.app`) builds tasks from a run definition
(:mod:`training_runtime.config`) through a registry
(:mod:`training_runtime.registry`). The attribute model
(``imbalanced_attr.task.AttributeTask``) and every fine-grained method
(``fgvc_gluon.task.FGVCTask`` subclasses) are tasks; the runtime knows no
model beyond this contract.

What the runtime calls, in order:

1. ``blocks()`` -> ordered dict name -> Block: everything a checkpoint holds
   (declared by the task, never discovered);
2. ``param_groups()`` -> list of :class:`ParamGroup`: one ``gluon.Trainer``
   each, every parameter of them inside ``blocks()``;
3. ``transform(train)`` -> function image -> network input, applied with
   ``Dataset.transform_first`` (H×W×3 uint8 NDArray -> 3×S×S float32);
4. ``prepare_training(train_set)``: what training needs from the training
   split (class weights, per-sample state); not called for --test/--predict;
5. per step, before anything else: ``begin_step(batch)`` with a
   :class:`StepBatch` (the labels and dataset indices of the whole step, the
   loss scale, an all-gather over workers); then per device slice, inside
   ``autograd.record()``:
   ``training_loss(data, label, index, epoch)`` -> per-sample loss, shape (N,)
   exactly (the runtime checks it), N the slice's batch; the runtime calls
   ``backward()`` and ``trainer.step(batch_size)``, so the gradient is that of
   the sum over the whole batch divided by its size;
6. ``after_step(epoch)``: after every trainer stepped (the step's
   :class:`StepBatch` is still the one ``begin_step`` got);
7. ``evaluate(batches, epoch)`` -> dict of float metrics, the one named by
   ``metric_name`` drives the lr schedule and the ``best`` checkpoint;
   ``batches`` yields ``(data, label)`` device slices of the evaluation split;
8. ``extra_state()`` / ``load_extra_state(state)``: more state to checkpoint
   (numpy arrays and plain numbers);
9. inference: ``predict(data, epoch)`` -> ordered dict output name -> N×K
   (first entry the main prediction), and ``test_report(batches, epoch, out)``
   -> JSON-able dict of the final test, printed to ``out``;
10. export (``python -m training_runtime.export``): ``inference_block(epoch)``,
    ``inference_subnetwork(epoch)`` and ``export_info()``.
11. ``pictures(batches, directory, epoch)``: after every evaluation, on the
   first ``picture_images`` images of the evaluation split, write pictures of
   what the model learned into ``directory`` (optional; a failure is a
   warning, never the end of a run).
"""
import collections
import sys
from collections import namedtuple

import numpy as np

ParamGroup = namedtuple("ParamGroup", "name params lr_mult optimizer_params follows_schedule")
ParamGroup.__new__.__defaults__ = (1.0, None, True)
ParamGroup.__doc__ = """One Trainer's worth of parameters.

name: str, the trainer-state entry in checkpoints.
params: gluon ParameterDict (or list of Parameters).
lr_mult: learning rate = schedule lr * lr_mult (S3N's per-group multipliers).
optimizer_params: dict overriding the optimizer settings for this group
    (e.g. the center-loss centers: {'learning_rate': 0.5, 'momentum': 0, 'wd': 0}).
follows_schedule: False keeps this group's learning rate fixed.
"""


class StepBatch(object):
    """The step's batch as a task sees it, before its device slices' ``training_loss`` calls.

    The device-split contract (README "Devices and workers"): whatever depends
    on the whole batch (class counts, one random draw per step, per-sample
    state such as the prediction history) is computed from this object, never
    from a device slice, so the numbers do not depend on how the global batch
    is split over devices and workers.

    epoch, step: 0-based epoch and the 0-based number of the step in the run.
    label: this process's share of the step's labels, an NDArray on the CPU
        (n × ..., n = this process's samples; the whole batch in one process).
    index: the dataset indices of those samples, (n,) int64 NDArray on the CPU.
    global_size: samples of the step over every worker (N >= n).
    offset: where this process's share starts in the global batch.
    loss_scale: the factor the runtime multiplies the losses by before
        backward (``--amp``'s dynamic loss scale; 1.0 otherwise). A gradient
        that bypasses autograd's chain rule (``make_loss``) must be scaled by it.
    """

    def __init__(self, epoch, step, label, index, global_size=None, offset=0, loss_scale=1.0,
                 all_sum=None):
        self.epoch, self.step = int(epoch), int(step)
        self.label, self.index = label, index
        self.global_size = int(label.shape[0] if global_size is None else global_size)
        self.offset = int(offset)
        self.loss_scale = float(loss_scale)
        self._all_sum = all_sum  # (name, NDArray) -> the sum over the workers; None in one process
        self._global_label = self._global_index = None

    @property
    def local_size(self):
        return int(self.label.shape[0])

    def gather(self, name, rows):
        """The global batch's rows: ``rows`` (n × ..., this process's samples in the order of
        ``label`` / ``index``) of every worker, concatenated in the global batch's order
        (N × ...). One process: ``rows`` itself. Several workers: a collective (every worker
        calls it with the same ``name`` and trailing shape); exact (the other workers'
        rows are summed with zeros), float32 on the workers' wire, returned in ``rows``'
        dtype on its context."""
        if self._all_sum is None:
            return rows
        if rows.shape[0] != self.local_size:
            raise ValueError("StepBatch.gather(%r): expected %d rows (this worker's samples), got %s"
                             % (name, self.local_size, rows.shape))
        from mxnet import nd
        padded = nd.zeros((self.global_size,) + rows.shape[1:], ctx=rows.context, dtype="float32")
        padded[self.offset:self.offset + self.local_size] = rows.astype("float32", copy=False)
        return self._all_sum("gather/%s" % name, padded).astype(rows.dtype, copy=False)

    @property
    def global_label(self):
        """The labels of the whole global batch (N × ...), on the CPU."""
        if self._global_label is None:
            self._global_label = self.gather("label", self.label)
        return self._global_label

    @property
    def global_index(self):
        """The dataset indices of the whole global batch, (N,) int64 on the CPU (between
        workers they travel as float32: exact for datasets of fewer than 2**24 samples)."""
        if self._global_index is None:
            self._global_index = self.gather("index", self.index)
        return self._global_index


def class_counts(labels, num_classes):
    """(num_classes,) float32 numpy array: how many of ``labels`` (class indices, any
    float/int array-like, e.g. ``StepBatch.global_label``) fall in each class."""
    values = labels.asnumpy() if hasattr(labels, "asnumpy") else np.asarray(labels)
    return np.bincount(values.astype(np.int64).ravel(), minlength=num_classes)[:num_classes] \
        .astype(np.float32)


class TrainingTask(object):
    """Base class with documented no-op defaults (see the module docstring).

    Subclasses implement ``blocks``, ``param_groups``, ``transform``,
    ``training_loss``, ``predict`` and ``evaluate``; the others are optional.
    """

    #: key of :meth:`evaluate`'s dict that drives the schedule and ``best``
    metric_name = None
    #: how many of the evaluation split's first images :meth:`pictures` gets
    picture_images = 8
    #: why ``--batchnorm sync`` cannot train this task (one phrase), None when it can:
    #: SyncBatchNorm pairs the devices' calls of a layer by arrival order, unsafe when
    #: a forward runs a BatchNorm layer several times
    sync_batchnorm_unsafe = None

    def blocks(self):
        """Ordered dict name -> Block of everything a checkpoint holds."""
        raise NotImplementedError

    def param_groups(self):
        """List of :class:`ParamGroup`, one Trainer each."""
        raise NotImplementedError

    def transform(self, train):
        """Function (H×W×3 uint8 image) -> network input of one sample."""
        raise NotImplementedError

    def prepare_training(self, train_set):
        """Set up what training needs from the (untransformed) training split."""

    def training_loss(self, data, label, index, epoch):
        """Per-sample loss (N,) of one device slice, inside ``autograd.record()``.

        data: N×3×S×S float32; label: the split's labels of the slice; index:
        (N,) dataset indices of the samples (or None outside the runner);
        epoch: 0-based.
        """
        raise NotImplementedError

    def begin_step(self, batch):
        """Called once per step before the first ``training_loss`` of its device slices,
        with the step's :class:`StepBatch` (default: nothing)."""

    def after_step(self, epoch):
        """Called after the trainers stepped."""

    def predict(self, data, epoch):
        """Ordered dict output name -> N×K of one device slice (main output first)."""
        raise NotImplementedError

    def evaluate(self, batches, epoch):
        """Dict of float metrics over ``batches`` ((data, label) device slices)."""
        raise NotImplementedError

    def test_report(self, batches, epoch, out=sys.stdout):
        """The final test: print it to ``out`` and return a JSON-able dict
        (by default :meth:`evaluate`'s metrics)."""
        metrics = self.evaluate(batches, epoch)
        print("test " + ", ".join("%s %.4f" % kv for kv in metrics.items()), file=out)
        return metrics

    def pictures(self, batches, directory, epoch):
        """Write pictures of what the model learned after ``epoch`` into ``directory``
        (an existing directory); ``batches`` yields ``(data, label)`` device slices of
        the first :attr:`picture_images` images of the evaluation split, always the
        same ones. Returns the paths written (default: nothing)."""
        return []

    def extra_state(self):
        """Dict of numpy arrays and plain numbers saved in checkpoints."""
        return {}

    def load_extra_state(self, state):
        """Restore what :meth:`extra_state` returned."""

    def check_evaluation_split(self, dataset):
        """ValueError when ``dataset`` (an untransformed evaluation split) cannot be
        evaluated (e.g. an attribute that is never specified); checked before training."""

    def load_foreign_weights(self, path):
        """Load another program's weight files from ``path`` (e.g. the original
        attribute code's .params files); False when the task cannot."""
        return False

    def inference_block(self, epoch):
        """Export hook: a HybridBlock mapping a normalised image batch N×3×S×S (what
        ``transform(False)`` makes) to the main output of :meth:`predict` at ``epoch``
        (N×K, the same numbers), built from the task's own (loaded) blocks; None when
        the task cannot be exported (``python -m training_runtime.export``)."""
        return None

    def inference_subnetwork(self, epoch):
        """Export hook for ONNX: (name, HybridBlock N×3×S×S -> N×K, one-line description)
        of a part of :meth:`inference_block` that ONNX can hold when the whole cannot;
        None when there is none."""
        return None

    def export_info(self):
        """Export hook: JSON-able dict for the exported model's sidecar: ``input``
        (size, channel_order, resize, normalisation with mean/std/scale and its formula)
        and ``output`` (name, activation: 'sigmoid' applied / 'logits', meaning)."""
        return {}

    def hybridize(self):
        """Hybridize the task's networks (after any BatchNorm change, before the first
        forward); by default every block of ``blocks()``."""
        for block in self.blocks().values():
            block.hybridize()  # recursive: a plain Block's HybridBlock children are hybridized

    # ---- helpers every task gets -------------------------------------------------------
    def trainable_groups(self):
        """The groups that have at least one parameter with a gradient."""
        groups = []
        for group in self.param_groups():
            params = group.params.values() if hasattr(group.params, "values") else group.params
            if any(p.grad_req != "null" for p in params):
                groups.append(group)
        return groups

    def check_declared(self):
        """ValueError when a parameter group holds a parameter outside ``blocks()``."""
        blocks = self.blocks()
        held = set(id(p) for block in blocks.values() for p in block.collect_params().values())
        for group in self.param_groups():
            params = group.params.values() if hasattr(group.params, "values") else group.params
            missing = [p.name for p in params if id(p) not in held]
            if missing:
                raise ValueError("%s: parameter group %s holds parameters outside blocks(): %s"
                                 % (type(self).__name__, group.name, ", ".join(missing[:3])))
        return blocks


def ordered(*pairs):
    """``collections.OrderedDict(pairs)``: the usual return value of ``blocks``/``predict``."""
    return collections.OrderedDict(pairs)
