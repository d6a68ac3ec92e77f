"""``--amp``: float16 mixed precision through ``mxnet.contrib.amp`` (GPUs only).

:func:`enable` calls ``amp.init()``, which must run before the model is
built (it wraps the operator functions: float16 for convolutions and matrix
products, float32 for reductions, softmax, BatchNorm statistics and losses;
parameters and optimizer states stay float32). The runtime calls it before
``TrainingTask`` construction (``app.build_task``), so any method gets it.

One dynamic loss scale for all the per-block trainers (:class:`LossScaling`).
``amp.init_trainer``/``amp.scale_loss`` are made for one Trainer: each
``init_trainer`` after the first gets its own ``LossScaler``, ``scale_loss``
rescales only the trainer it is given, and a Trainer with a scaler checks
only its own gradients for overflow, so with ten trainers one block could
skip a step the others take, and the scale would advance ten times per step.
Here the loss is multiplied by the shared scale, every trainer's gradient
rescale is divided by it (what ``scale_loss`` does to its trainer), and the
overflow check (``multi_all_finite`` over every trainer's gradients, one
host sync per step, inherent in dynamic scaling) decides for all trainers:
all update or all skip; the scale halves after an overflow and doubles
after 2000 clean steps (``LossScaler``'s rule, its one-step delay included:
the new scale applies from the second step after the one that decided it,
so the step right after an overflow still runs at the old scale). A skipped
step still ran its forward passes, so BatchNorm's running statistics have
moved (as with ``amp.init_trainer``).

Why the skip is decided on the host (docs/GPU.md "Stalls"): a device-side
skip must leave weights and momentum exactly unchanged, and MXNet's SGD
kernels take lr, wd and momentum as host scalars (zeroed gradients and lr
would still apply ``momentum·mom`` and the weight decay); a correct no-op
costs a saved copy of every weight and state restored with ``where`` (twice
the parameters' memory, about 12 more passes over them per step) or an
unfused update with device-side factors (about three times the fused
kernel's traffic): more than the one read, which only delays enqueueing the
update until the backward has finished.

What is float32 under ``--amp``: parameters, gradients as the trainers see
them, optimizer states, the losses (amp's float32 list: softmax,
log_softmax, sum, ...), BatchNorm statistics, and everything an evaluation
computes: amp keeps ``sigmoid``, ``argmax`` and additions in their input's
dtype, so the tasks cast the float16 network outputs to float32 before their
sigmoid / argmax (``imbalanced_attr.model.aggregate_prediction``,
``fgvc_gluon.task.top1_accuracies``; a no-op for float32 outputs). The
validation metric, the plateau rule, best.ckpt and the final test are thus
computed on float32 probabilities (no ties at 1.0: the largest float16
below 1 is 1 - 2⁻¹¹), and differ from a later float32 ``--test`` only through the
float16 network itself.

Losses whose gradient bypasses autograd's chain rule (``make_loss``, whose
backward passes ones whatever the head gradient, or a gradient written by
hand) do not see the scale the loss was multiplied by, while every trainer
still divides by it: such a loss must multiply its gradient by
``StepBatch.loss_scale`` (given to ``TrainingTask.begin_step``; 1.0 without
``--amp``). The centre loss's centre gradient (``make_loss``) is one.
"""
import mxnet as mx

from .errors import UserError


def check_contexts(ctx):
    """UserError unless every context is a GPU (float16 kernels are GPU kernels)."""
    if not ctx or any(c.device_type != "gpu" for c in ctx):
        raise UserError("--amp: float16 mixed precision needs GPUs (--gpus); this run is on %s"
                        % ", ".join(str(c) for c in ctx))


def enable(ctx):
    """``mxnet.contrib.amp.init()`` after :func:`check_contexts`; call before building the model."""
    check_contexts(ctx)
    from mxnet.contrib import amp
    amp.init()


class LossScaling(object):
    """One dynamic loss scale over ``trainers`` (a list of gluon.Trainer); see the module
    docstring. The rule is ``mxnet.contrib.amp.loss_scaler.LossScaler``'s (start 2¹⁶,
    at most 2²⁴, halve after an overflow, double after 2000 clean steps), with the check
    over the gradients of every device (LossScaler's looks at the first device only,
    before the trainers' own reduction)."""

    START, MAX, CLEAN_STEPS = 2.0 ** 16, 2.0 ** 24, 2000

    def __init__(self, trainers):
        self.trainers = list(trainers)
        self._unscaled = [t._scale for t in self.trainers]
        self._params = [p for t in self.trainers for p in t._params if p.grad_req != "null"]
        self.loss_scale = self._next = self.START
        self._clean = 0

    def state_dict(self):
        """The dynamic scale's state, JSON-able (saved in checkpoints: a resumed run continues
        with the scale and clean-step count of the uninterrupted one)."""
        return {"loss_scale": self.loss_scale, "next": self._next, "clean": self._clean}

    def load_state_dict(self, state):
        self.loss_scale, self._next = float(state["loss_scale"]), float(state["next"])
        self._clean = int(state["clean"])

    def scale(self, losses):
        """The losses times the current scale (inside ``autograd.record``); the trainers'
        gradient rescale divided by it."""
        for trainer, unscaled in zip(self.trainers, self._unscaled):
            trainer._scale = unscaled / self.loss_scale
        return [loss * self.loss_scale for loss in losses]

    def overflow(self):
        """After backward: True if any gradient on any device is not finite (then every
        trainer skips this update); sets the scale of the next step."""
        finite = []
        with mx.autograd.pause():
            by_device = {}
            for p in self._params:
                for grad in p.list_grad():
                    by_device.setdefault(grad.context, []).append(grad)
            for device, grads in by_device.items():
                flag = mx.nd.ones((1,), ctx=device)
                for i in range(0, len(grads), 200):  # multi_all_finite takes a bounded list
                    chunk = grads[i:i + 200]
                    mx.nd.multi_all_finite(*chunk, num_arrays=len(chunk), init_output=False, out=flag)
                finite.append(flag.as_in_context(mx.cpu()))
        overflow = not all(bool(f.asscalar()) for f in finite)  # the step's one host sync
        self.loss_scale = self._next
        if overflow:
            self._next, self._clean = self.loss_scale / 2.0, 0
        else:
            self._clean += 1
            if self._clean == self.CLEAN_STEPS:
                self._next, self._clean = min(self.MAX, self.loss_scale * 2.0), 0
        return overflow
