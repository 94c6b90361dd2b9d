"""Model selection on hand-made records (DomainBed's definitions and tie rules)."""

import pytest

from gaqat.selection import (
    SELECTION_METHODS,
    LeaveOneDomainOut,
    OracleSelection,
    TrainingDomainValidation,
)


def record(step, outs, ins, test_envs=(2,), hparams_seed=0):
    """A checkpoint record over len(outs) domains."""
    r = {"step": step, "args": {"test_envs": list(test_envs), "hparams_seed": hparams_seed}}
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


def test_ties_go_to_the_earliest_checkpoint_and_the_higher_hparams_seed():
    tied = [record(100, (0.5, 0.5, 0.0), (0, 0, 0.1)), record(200, (0.5, 0.5, 0.0), (0, 0, 0.2))]
    assert TrainingDomainValidation().run_acc(tied)[1] == 0.1
    # DomainBed sorts draws by hparams seed, then stably by validation, and takes the last.
    draws = [
        record(100, (0.5, 0.5, 0.0), (0, 0, acc), hparams_seed=seed)
        for seed, acc in ((2, 0.3), (0, 0.1), (1, 0.2))
    ]
    assert TrainingDomainValidation().sweep_acc(draws)[1] == 0.3
    # The oracle: the last record of the last step (two runs of one draw pooled).
    pooled = [record(300, (0, 0, 0.5), (0, 0, 0.6)), record(300, (0, 0, 0.5), (0, 0, 0.7))]
    assert OracleSelection().run_acc(pooled) == (0.5, 0.7)


def test_training_and_oracle_score_only_runs_with_one_test_domain():
    two = [record(100, outs=(0.8, 0.2, 0.4), ins=(0.9, 0.3, 0.5), test_envs=(1, 2))]
    assert TrainingDomainValidation().run_acc(two) is None
    assert OracleSelection().run_acc(two) is None
    assert TrainingDomainValidation().run_acc(two + RUN) == TrainingDomainValidation().run_acc(RUN)


def loo_draw(test_in, val_ins, steps=(100, 200)):
    """One draw over 4 domains holding out domain 3: the run holding out 3 alone (test-in
    accuracy ``test_in[k]`` at step k) and one run per other domain j holding out 3 and j
    (in accuracy ``val_ins[k][j]`` on j at step k)."""
    records = []
    for k, step in enumerate(steps):
        records.append(record(step, (0.0,) * 4, (0.9, 0.9, 0.9, test_in[k]), test_envs=(3,)))
        for j in range(3):
            ins = [0.0] * 4
            ins[j] = val_ins[k][j]
            records.append(record(step, (0.0,) * 4, ins, test_envs=(j, 3)))
    return records


def test_leave_one_domain_out_scores_each_step_by_the_runs_holding_out_two_domains():
    draw = loo_draw(test_in=(0.4, 0.5), val_ins=((0.25, 0.75, 0.5), (0.5, 0.5, 0.5)))
    # Step 100: (0.25 + 0.75 + 0.5) / 3 = 0.5; step 200: 0.5 too. The tie goes to step 100.
    assert LeaveOneDomainOut().run_acc(draw) == (0.5, 0.4)
    draw = loo_draw(test_in=(0.4, 0.5), val_ins=((0.25, 0.25, 0.25), (0.5, 0.5, 0.5)))
    assert LeaveOneDomainOut().run_acc(draw) == (0.5, 0.5)


def test_leave_one_domain_out_skips_steps_without_every_run():
    draw = loo_draw(test_in=(0.4, 0.5), val_ins=((0.75, 0.75, 0.75), (0.5, 0.5, 0.5)))
    gap = [r for r in draw if not (r["step"] == 100 and r["args"]["test_envs"] == [1, 3])]
    assert LeaveOneDomainOut().run_acc(gap) == (0.5, 0.5)
    alone = [r for r in draw if len(r["args"]["test_envs"]) == 1]
    assert LeaveOneDomainOut().run_acc(alone) is None
    twice = draw + [r for r in draw if r["args"]["test_envs"] == [3]]  # two runs hold out 3
    assert LeaveOneDomainOut().run_acc(twice) is None


@pytest.mark.parametrize("method", list(SELECTION_METHODS.values()))
def test_runs_without_test_domain_or_records_give_none(method):
    assert method.run_acc([]) is None
    assert method.run_acc([record(100, (0.5, 0.5), (0.5, 0.5), test_envs=())]) is None
    assert method.sweep_acc([]) is None


def test_sweep_picks_the_hyperparameter_draw_with_best_validation():
    worse = [record(100, outs=(0.5, 0.5, 0.9), ins=(0.9, 0.9, 0.99), hparams_seed=1)]
    method = TrainingDomainValidation()
    assert method.sweep_acc(worse + RUN)[1] == 0.55  # train-val 0.5 < 0.85
    # The oracle compares draws by the test domain's out accuracy: now `worse` wins.
    assert OracleSelection().sweep_acc(RUN + worse) == (0.9, 0.99)


def test_names_are_domainbeds():
    assert [m.name for m in SELECTION_METHODS.values()] == [
        "training-domain validation set",
        "leave-one-domain-out cross-validation",
        "test-domain validation set (oracle)",
    ]


def averaged(record_):
    """``record_`` as the flagged record of an averaging run's averaged network."""
    return {**record_, "averaged": True, "averaging": "swad"}


def test_every_method_reports_an_averaging_runs_averaged_record():
    """The averaged record (a poor one here: train-val 0.5) stands for its run, in place
    of the checkpoint training-domain validation would pick (0.85) and the last one."""
    run = [*RUN, averaged(record(300, outs=(0.5, 0.5, 0.35), ins=(0.9, 0.9, 0.33)))]
    assert TrainingDomainValidation().run_acc(run) == (0.5, 0.33)
    assert OracleSelection().run_acc(run) == (0.35, 0.33)
    draw = loo_draw(test_in=(0.4, 0.5), val_ins=((0.75, 0.75, 0.75), (0.5, 0.5, 0.5)))
    last = [averaged(r) for r in draw if r["step"] == 200]  # each run's average at its end
    assert LeaveOneDomainOut().run_acc(draw) == (0.75, 0.4)
    assert LeaveOneDomainOut().run_acc(draw + last) == (0.5, 0.5)
    worse = [record(100, outs=(0.6, 0.6, 0.9), ins=(0.9, 0.9, 0.99), hparams_seed=1)]
    assert TrainingDomainValidation().sweep_acc(run + worse) == (pytest.approx(0.6), 0.99)
