"""The shared learning-rate state: plateau rule, step rule, trainers, state_dict."""
import pytest
from mxnet import gluon

from training_runtime.errors import UserError
from training_runtime.schedule import PlateauSchedule, StepSchedule


def _trainer(lr=1.0):
    dense = gluon.nn.Dense(2, in_units=3)
    dense.initialize()
    return gluon.Trainer(dense.collect_params(), "sgd", {"learning_rate": lr, "momentum": 0.9})


def test_plateau_improvement_resets_patience_and_keeps_lr():
    s = PlateauSchedule(1e-4)
    assert not s.end_epoch(0, 0.5)
    assert (s.best, s.patience, s.lr) == (0.5, 0, 1e-4)
    s.end_epoch(1, 0.5)  # equal is not an improvement (strict > as in the original)
    assert s.patience == 1
    s.end_epoch(2, 0.6)
    assert (s.best, s.patience) == (0.6, 0)


def test_plateau_first_metric_zero_is_not_an_improvement():
    s = PlateauSchedule(1.0)  # best starts at 0 like the original's best_mAP
    s.end_epoch(0, 0.0)
    assert s.patience == 1


def test_plateau_drops_only_when_patience_exceeds_ten():
    s = PlateauSchedule(1e-4)
    s.end_epoch(0, 0.9)
    for epoch in range(1, 11):  # patience 1..10: not yet
        assert not s.end_epoch(epoch, 0.1)
    assert (s.patience, s.lr, s.drops) == (10, 1e-4, 0)
    assert s.end_epoch(11, 0.1)  # patience 11 > 10: drop
    assert s.lr == 1e-4 / 10.0
    assert (s.patience, s.drops) == (0, 1)


def test_plateau_at_most_three_drops():
    s = PlateauSchedule(1.0)
    s.end_epoch(0, 0.9)
    lrs = []
    for epoch in range(1, 60):
        s.end_epoch(epoch, 0.1)
        lrs.append(s.lr)
    assert s.drops == 3
    assert lrs[10] == 0.1 and lrs[21] == 0.1 / 10 and lrs[32] == 0.1 / 10 / 10
    assert lrs[-1] == 1.0 / 10 / 10 / 10
    assert s.patience > 10  # patience keeps growing once the drops are used up


def test_plateau_nan_metric_counts_as_no_improvement():
    s = PlateauSchedule(1.0)
    s.end_epoch(0, float("nan"))
    assert s.patience == 1 and s.best == 0.0


def test_step_rule_both_sides_of_each_step():
    s = StepSchedule(0.1, steps=[150, 225], factor=0.1)
    assert s.lr_for_epoch(0) == 0.1
    assert s.lr_for_epoch(149) == 0.1
    assert s.lr_for_epoch(150) == pytest.approx(0.01, rel=1e-12)
    assert s.lr_for_epoch(224) == pytest.approx(0.01, rel=1e-12)
    assert s.lr_for_epoch(225) == pytest.approx(0.001, rel=1e-12)
    every40 = StepSchedule(1e-3, steps=range(40, 60, 40))
    assert every40.lr_for_epoch(39) == 1e-3 and every40.lr_for_epoch(40) == pytest.approx(1e-4)


def test_trainers_follow_with_multipliers_and_fixed_groups():
    s = StepSchedule(0.1, steps=[2], factor=0.1)
    base, head, fixed = _trainer(), _trainer(), _trainer(lr=0.5)
    s.attach(base)
    s.attach(head, lr_mult=10.0)
    s.attach(fixed, follows_schedule=False)
    s.start_epoch(0)
    assert (base.learning_rate, head.learning_rate, fixed.learning_rate) == (0.1, 1.0, 0.5)
    s.start_epoch(2)
    assert base.learning_rate == pytest.approx(0.01)
    assert head.learning_rate == pytest.approx(0.1)
    assert fixed.learning_rate == 0.5


def test_plateau_drop_reaches_every_trainer():
    s = PlateauSchedule(1.0, patience_limit=0)
    t1, t2 = s.attach(_trainer()), s.attach(_trainer(), lr_mult=2.0)
    s.end_epoch(0, 0.5)
    s.end_epoch(1, 0.4)  # patience 1 > 0: drop
    assert (t1.learning_rate, t2.learning_rate) == (0.1, 0.2)


def test_state_dict_round_trip_restores_lr_patience_drops_best():
    s = PlateauSchedule(1.0)
    s.end_epoch(0, 0.7)
    for epoch in range(1, 15):
        s.end_epoch(epoch, 0.1)
    state = s.state_dict()
    restored = PlateauSchedule(1.0)
    trainer = restored.attach(_trainer())
    restored.load_state_dict(state)
    assert (restored.lr, restored.patience, restored.drops, restored.best) == (0.1, 3, 1, 0.7)
    assert trainer.learning_rate == 0.1
    for epoch in range(15, 40):  # continues exactly like the original object
        assert s.end_epoch(epoch, 0.1) == restored.end_epoch(epoch, 0.1)
    assert s.state_dict() == restored.state_dict()


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="--lr"):
        PlateauSchedule(0.0)
    with pytest.raises(UserError, match="--lr-steps"):
        StepSchedule(0.1, steps=[-1])
