"""Model selection on hand-made records (DomainBed's definitions)."""

import pytest

from gaqat.selection import SELECTION_METHODS, OracleSelection, TrainingDomainValidation


def record(step, outs, ins, test_envs=(2,)):
    """A checkpoint record over len(outs) domains."""
    r = {"step": step, "args": {"test_envs": list(test_envs)}}
    for i, (o, n) in enumerate(zip(outs, ins)):
        r[f"env{i}_out_acc"], r[f"env{i}_in_acc"] = o, n
    return r


RUN = [  # domains 0, 1 train; 2 test
    record(100, outs=(0.6, 0.8, 0.30), ins=(0.9, 0.9, 0.40)),  # train-val 0.70
    record(200, outs=(0.8, 0.9, 0.20), ins=(0.9, 0.9, 0.55)),  # train-val 0.85 (best)
    record(300, outs=(0.7, 0.8, 0.50), ins=(0.9, 0.9, 0.45)),  # train-val 0.75, last
]


def test_training_domain_validation_picks_best_training_out_accuracy():
    val, test = TrainingDomainValidation().run_acc(RUN)
    assert val == pytest.approx(0.85) and test == 0.55


def test_oracle_takes_the_last_checkpoint_whatever_its_order_in_the_file():
    assert OracleSelection().run_acc(RUN) == (0.50, 0.45)
    assert OracleSelection().run_acc([RUN[2], RUN[0], RUN[1]]) == (0.50, 0.45)


def test_ties_go_to_the_earliest_checkpoint():
    tied = [record(100, (0.5, 0.5, 0.0), (0, 0, 0.1)), record(200, (0.5, 0.5, 0.0), (0, 0, 0.2))]
    assert TrainingDomainValidation().run_acc(tied)[1] == 0.1


def test_several_test_domains_are_averaged():
    run = [record(100, outs=(0.8, 0.2, 0.4), ins=(0.9, 0.3, 0.5), test_envs=(1, 2))]
    assert TrainingDomainValidation().run_acc(run) == pytest.approx((0.8, 0.4))
    assert OracleSelection().run_acc(run) == pytest.approx((0.3, 0.4))


@pytest.mark.parametrize("method", list(SELECTION_METHODS.values()))
def test_runs_without_test_domain_or_records_give_none(method):
    assert method.run_acc([]) is None
    assert method.run_acc([record(100, (0.5, 0.5), (0.5, 0.5), test_envs=())]) is None
    assert method.sweep_acc([[]]) is None


def test_sweep_picks_the_hyperparameter_draw_with_best_validation():
    worse = [record(100, outs=(0.5, 0.5, 0.9), ins=(0.9, 0.9, 0.99))]  # train-val 0.5
    method = TrainingDomainValidation()
    assert method.sweep_acc([worse, RUN, []])[1] == 0.55
    # The oracle compares draws by the test domain's out accuracy: now `worse` wins.
    assert OracleSelection().sweep_acc([worse, RUN]) == (0.9, 0.99)


def test_names_label_the_oracle():
    assert "oracle" in OracleSelection.name
    assert TrainingDomainValidation.name == "training-domain validation set"
