"""One learning-rate state shared by many ``gluon.Trainer`` objects.

The attribute model trains one Trainer per block (backbone, and fconv / fatt /
fsr of each stage) and the FGVC methods one per parameter group; all of them
follow one schedule, each with its own multiplier, and some groups (e.g. the
center-loss centers) keep a fixed learning rate.

Two rules:

- :class:`PlateauSchedule`, the attribute script's rule (SPEC §1.4): after each
  epoch, if the validation metric improved on the best so far (strictly, the
  best starting at 0 as in the original) remember it and reset the patience;
  otherwise patience += 1, and when patience > ``patience_limit`` (10) and
  fewer than ``max_drops`` (3) drops happened, divide the lr by 10 and reset
  the patience.
- :class:`StepSchedule`, the FGVC rule: the lr of epoch e (0-based) is
  ``base_lr * factor ** (number of steps s with s <= e)``.
- :class:`CosineSchedule`, upstream MC-Loss ResNet-50's ``cosine_anneal_schedule``:
  the lr of 0-based epoch e of E is ``base_lr / 2 * (cos(pi * ((e + 1) mod E) / E) + 1)``
  (upstream evaluates it at the 1-based epoch t = e + 1, so the last epoch,
  t = E, is back at ``base_lr``, as its log shows).

MXNet's ``lr_scheduler`` classes count optimizer updates inside each optimizer
(one counter per Trainer, lost unless the optimizer is pickled) and cannot
react to a validation metric, so they do not fit a state shared by many
Trainers; the rules here are epoch based and apply the lr with
``trainer.set_learning_rate``.
"""
import math

from .errors import UserError


class LRSchedule(object):
    """Base class: the current lr, the attached trainers and the state to save.

    Subclasses implement :meth:`lr_for_epoch` (lr at the start of an epoch)
    and/or :meth:`end_epoch` (react to the epoch's validation metric).
    """

    def __init__(self, base_lr):
        if not base_lr > 0:
            raise UserError("--lr: expected a positive learning rate, got %r" % (base_lr,))
        self.base_lr = float(base_lr)
        self.lr = float(base_lr)
        self._trainers = []  # (trainer, lr_mult, follows_schedule)

    def attach(self, trainer, lr_mult=1.0, follows_schedule=True):
        """Let ``trainer`` follow this schedule with lr = schedule lr × ``lr_mult``.

        ``follows_schedule=False`` keeps the trainer's own learning rate fixed
        (it is still listed, so the caller has one place holding every trainer).
        """
        self._trainers.append((trainer, float(lr_mult), bool(follows_schedule)))
        if follows_schedule:
            trainer.set_learning_rate(self.lr * lr_mult)
        return trainer

    def apply(self):
        """Push the current lr to every trainer that follows the schedule."""
        for trainer, lr_mult, follows in self._trainers:
            if follows:
                trainer.set_learning_rate(self.lr * lr_mult)

    def start_epoch(self, epoch):
        """Set the lr of ``epoch`` (0-based) before its first step."""
        self.lr = self.lr_for_epoch(epoch)
        self.apply()
        return self.lr

    def lr_for_epoch(self, epoch):
        return self.lr

    def end_epoch(self, epoch, metric):
        """React to the validation ``metric`` of ``epoch``; returns True if the lr changed."""
        return False

    def rebase(self, base_lr):
        """A new base lr (a resume with a changed --lr): the current lr is scaled
        by the same ratio, so drops already taken are kept; returns the new lr."""
        if not base_lr > 0:
            raise ValueError("base_lr: expected a positive learning rate, got %r" % (base_lr,))
        if float(base_lr) != self.base_lr:
            self.lr = self.lr * (float(base_lr) / self.base_lr)
            self.base_lr = float(base_lr)
            self.apply()
        return self.lr

    def state_dict(self):
        return {"lr": self.lr, "base_lr": self.base_lr}

    def load_state_dict(self, state):
        self.lr = float(state["lr"])
        self.base_lr = float(state.get("base_lr", self.base_lr))
        self.apply()


class PlateauSchedule(LRSchedule):
    """The original attribute script's rule (see the module docstring).

    ``best`` starts at 0 like the original's ``best_mAP``; a NaN metric counts
    as "not improved".
    """

    def __init__(self, base_lr, patience_limit=10, max_drops=3, divisor=10.0):
        super(PlateauSchedule, self).__init__(base_lr)
        self.patience_limit = int(patience_limit)
        self.max_drops = int(max_drops)
        self.divisor = float(divisor)
        self.patience = 0
        self.drops = 0
        self.best = 0.0

    def end_epoch(self, epoch, metric):
        if metric > self.best:
            self.best = float(metric)
            self.patience = 0
            return False
        self.patience += 1
        if self.patience > self.patience_limit and self.drops < self.max_drops:
            self.drops += 1
            self.lr = self.lr / self.divisor  # a division like the original (x * 0.1 differs in the last bit)
            self.patience = 0
            self.apply()
            return True
        return False

    def state_dict(self):
        state = super(PlateauSchedule, self).state_dict()
        state.update(patience=self.patience, drops=self.drops, best=self.best)
        return state

    def load_state_dict(self, state):
        self.patience = int(state["patience"])
        self.drops = int(state["drops"])
        self.best = float(state["best"])
        super(PlateauSchedule, self).load_state_dict(state)


class StepSchedule(LRSchedule):
    """lr(epoch) = base_lr × factor ** #{s in steps : s <= epoch} (epochs 0-based)."""

    def __init__(self, base_lr, steps=(), factor=0.1):
        super(StepSchedule, self).__init__(base_lr)
        steps = [int(s) for s in steps]
        if any(s < 0 for s in steps):
            raise UserError("--lr-steps: expected non-negative epoch numbers, got %s" % steps)
        self.steps = sorted(steps)
        self.factor = float(factor)

    def lr_for_epoch(self, epoch):
        drops = sum(1 for s in self.steps if s <= epoch)
        return self.base_lr * self.factor ** drops


class CosineSchedule(LRSchedule):
    """lr(epoch) = base_lr / 2 × (cos(π · ((epoch + 1) mod period) / period) + 1), epochs 0-based.

    Upstream PRIS-CV/Mutual-Channel-Loss MC_ResNet50.py (commit 9e495cc):
    ``cosine_anneal_schedule(t)`` with ``nb_epoch`` = period, called with the
    1-based epoch t at the start of every epoch (no ``t - 1``, although its
    comment mentions it): t = 1 gives just below base_lr, t = period − 1 the
    smallest lr, t = period (``t % period == 0``) base_lr again. The period
    is the run's --epochs (a resume that changes --epochs re-times the curve);
    the state saved is the base class's (lr, base_lr), the lr being a function
    of the epoch.
    """

    def __init__(self, base_lr, period):
        super(CosineSchedule, self).__init__(base_lr)
        period = int(period)
        if period < 1:
            raise UserError("--epochs: the cosine schedule needs a positive number of epochs, got %r"
                            % (period,))
        self.period = period
        self.lr = self.lr_for_epoch(0)

    def lr_for_epoch(self, epoch):
        t = int(epoch) + 1   # upstream's 1-based epoch
        return float(self.base_lr / 2 * (math.cos(math.pi * (t % self.period) / self.period) + 1))


SCHEDULES = ("plateau", "step", "cosine")


def make_schedule(optim):
    """The schedule of an OptimConfig: 'plateau', 'step' (lr_steps, lr_factor) or 'cosine'
    (over ``epochs``)."""
    if optim.schedule == "plateau":
        return PlateauSchedule(optim.lr)
    if optim.schedule == "step":
        return StepSchedule(optim.lr, optim.lr_steps, optim.lr_factor)
    if optim.schedule == "cosine":
        return CosineSchedule(optim.lr, optim.epochs)
    raise ValueError("schedule: expected one of %s, got %r" % (", ".join(SCHEDULES), optim.schedule))
