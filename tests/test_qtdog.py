"""QT-DoG's recipe (``gaqat.qtdog``): float for the warm-up, exactly ERM; then weights-only
per-channel LSQ on every layer but the classifier, from the step ``quantize_at`` sets; a
run resumed on either side of the switch is bit-identical; names carry the bit width."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import tiny_run
from torch import nn

from gaqat import cli, train
from gaqat.algorithms import Algorithm
from gaqat.checkpoint import build_network, load_model
from gaqat.errors import UsageError
from gaqat.hparams import apply_overrides, default_hparams, random_hparams
from gaqat.models import ModelConfig, build_model
from gaqat.names import Recipe
from gaqat.prepare import QuantConfig, quantize_model
from gaqat.qtdog import switch_step
from gaqat.quant import QuantConv2d, quantizers, step_sizes
from gaqat.report import report
from gaqat.runfolder import CHECKPOINT, RESULTS
from gaqat.sweep import SweepConfig, plan
from gaqat.train import check_arguments, run

pytestmark = pytest.mark.usefixtures("one_thread")


def _hparams(**overrides):
    return {**default_hparams("qtdog", "digits"), **overrides}


def _algorithm(name="qtdog", total_steps=5, bits=4, seed=0, **overrides):
    torch.manual_seed(seed)
    return Algorithm(name, ModelConfig(), _hparams(**overrides), total_steps, bits)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))]
        for _ in range(n)
    ]


def _convs(network):
    return [m for m in network.modules() if isinstance(m, nn.Conv2d)]


def test_the_registry_declares_qtdogs_defaults_beside_their_ranges():
    hp = default_hparams("qtdog", "PACS")
    assert (hp["quantize_at"], hp["per_channel"], hp["first_last"]) == (0.4, True, "same")
    assert (hp["lr"], hp["steps"]) == (3e-5, 5000)  # the project's, as every method's
    assert not {"fold_batch_norm", "bn_freeze_at", "residual_bits", "rho"} & set(hp)
    draws = [random_hparams("qtdog", "PACS", seed)["quantize_at"] for seed in range(1, 30)]
    assert all(0.2 <= d <= 0.6 for d in draws) and len(set(draws)) == len(draws)
    with pytest.raises(ValueError, match=r"quantize_at must be a number in \[0, 1\)"):
        apply_overrides(hp, {"quantize_at": 1}, "qtdog", "PACS")


@pytest.mark.parametrize(
    "quantize_at, steps, switch", [(0.4, 5000, 2000), (0.4, 5, 2), (0.0, 4, 0), (0.9, 2, 1)]
)
def test_it_switches_after_quantize_at_of_the_steps(quantize_at, steps, switch):
    """``switch`` float steps, then quantized; a run always ends with a quantized step."""
    assert switch_step(quantize_at, steps) == switch
    if steps > 5:
        return
    algorithm = _algorithm(total_steps=steps, quantize_at=quantize_at)
    quantized = [not algorithm.warming_up]
    for batch in _batches(steps):
        algorithm.update(batch)
        quantized.append(not algorithm.warming_up)
    # after k steps done: float while k < switch
    assert quantized == [k >= switch for k in range(steps + 1)]


def test_the_warm_up_is_erm_bit_for_bit_and_the_switch_changes_no_weight():
    """Same seed, same batches, same hyperparameters: qtdog's first steps are erm's."""
    erm, qtdog = _algorithm("erm", bits=None), _algorithm()
    batches = _batches(3)
    for batch in batches[:2]:  # the warm-up: 2 of 5 steps
        assert torch.equal(erm.update(batch)["loss"], qtdog.update(batch)["loss"])
    assert not quantizers(erm.network) and quantizers(qtdog.network)  # switched after step 2
    quantized = qtdog.network.state_dict()
    for name, value in erm.network.state_dict().items():
        assert torch.equal(value, quantized[name]), name
    erm.update(batches[2]), qtdog.update(batches[2])
    assert not torch.equal(erm.network.featurizer[3].weight, qtdog.network.featurizer[3].weight)


@pytest.mark.parametrize("bits", [7, 5])
def test_weights_quantized_per_channel_inputs_and_classifier_float(bits):
    algorithm = _algorithm(bits=bits, quantize_at=0.0)
    network = algorithm.network
    convs = _convs(network)
    assert convs and all(type(c) is QuantConv2d for c in convs)  # the first one too
    assert type(network.classifier) is nn.Linear  # the classifier stays float
    for conv in convs:
        assert isinstance(conv.input_quantizer, nn.Identity)  # inputs stay float
        q = conv.weight_quantizer
        assert q.scale.shape == (conv.out_channels, 1, 1, 1)  # one per output channel
        assert (q.q_min, q.q_max) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        codes = q.codes(conv.weight)
        assert len(codes.unique()) > 2 and codes.abs().max() <= 2 ** (bits - 1)
    assert set(quantizers(network)) == {
        f"{n}.weight_quantizer" for n, m in network.named_modules() if m in convs
    }
    network.eval()
    conv, x = convs[1], torch.randn(2, convs[1].in_channels, 8, 8)
    with torch.no_grad():  # an input off any grid goes in as it is
        expected = F.conv2d(x, conv.weight_quantizer(conv.weight), conv.bias, conv.stride, 1)
        assert torch.equal(conv(x), expected)
    assert algorithm.predict(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_step_sizes_start_from_the_weights_at_the_switch_and_train():
    algorithm = _algorithm(step_size_lr_scale=0.5)
    batches = _batches(3)
    for batch in batches[:2]:
        algorithm.update(batch)
    weights, scales = algorithm.optimizer.param_groups
    held = {id(p) for p in scales["params"]}
    assert held == {id(p) for p in step_sizes(algorithm.network).values()}
    assert scales["weight_decay"] == 0.0 and math.isclose(scales["lr"] / weights["lr"], 0.5)
    conv = _convs(algorithm.network)[2]
    q_max = conv.weight_quantizer.q_max
    initial = 2 * conv.weight.detach().abs().mean((1, 2, 3)) / math.sqrt(q_max)
    assert torch.allclose(conv.weight_quantizer.scale.detach().flatten(), initial)
    algorithm.update(batches[2])
    assert not torch.equal(conv.weight_quantizer.scale.detach().flatten(), initial)


@pytest.mark.parametrize("stop", [1, 2, 3])  # switch after step 2: before, at, after it
def test_an_algorithm_resumed_across_the_switch_is_bit_identical(stop):
    batches = _batches(4)
    straight = _algorithm(total_steps=4, quantize_at=0.5)
    saved = None
    for step, batch in enumerate(batches):
        if step == stop:
            saved = copy.deepcopy(
                {"model": straight.network.state_dict(), "training": straight.optimizer_state()}
            )
        straight.update(batch)
    resumed = _algorithm(total_steps=4, quantize_at=0.5, seed=123)  # other initial weights
    resumed.resume_at(stop)
    resumed.network.load_state_dict(saved["model"])
    resumed.load_optimizer_state(saved["training"])
    for batch in batches[stop:]:
        resumed.update(batch)
    a = straight.network.state_dict()
    assert a.keys() == resumed.network.state_dict().keys()
    for name, value in resumed.network.state_dict().items():
        assert torch.equal(value, a[name]), name
    assert json.dumps(straight.optimizer_state()["scheduler"]) == json.dumps(
        resumed.optimizer_state()["scheduler"]
    )
    ours = resumed.optimizer_state()["optimizer"]["state"]
    for index, state in straight.optimizer_state()["optimizer"]["state"].items():
        assert all(torch.equal(v, ours[index][k]) for k, v in state.items()), index


def _quick_evaluation(algorithm, loaders, device, validation_envs=()):
    """Accuracies that follow the weights, in place of a full evaluation (seconds each)."""
    total = sum(p.detach().double().sum() for p in algorithm.network.parameters())
    value = float(torch.sigmoid(total / 1000))
    return {f"{name}_acc": value for name in loaders}


def _run(tmp_path, digits_dir, name, **kwargs):
    return run(
        tiny_run(
            tmp_path / name,
            digits_dir,
            "qtdog",
            bits=7,
            steps=6,
            checkpoint_freq=2,  # no --init: the warm-up is its float training
            hparams={"quantize_at": 0.5},  # 3 float steps, 3 quantized
            **kwargs,
        )
    )


def _lines(folder):
    return [json.loads(line) for line in (folder / RESULTS).read_text().splitlines()]


def _tensors(value, prefix=""):
    """Every tensor of a checkpoint's nested dicts and lists, by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if not isinstance(value, (dict, list, tuple)):
        return {}
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return {k: t for key, v in items for k, t in _tensors(v, f"{prefix}/{key}").items()}


def test_a_run_records_only_its_quantized_network_and_reports_its_width(
    tmp_path, digits_dir, monkeypatch, capsys
):
    monkeypatch.setattr(train, "evaluate", _quick_evaluation)
    out = _run(tmp_path, digits_dir, "qtdog")
    records = _lines(out)
    assert [r["step"] for r in records] == [4, 6]  # step 2's checkpoint is float: no line
    assert {(r["args"]["algorithm"], r["bits"]) for r in records} == {("qtdog_w7", 7)}
    model, checkpoint = load_model(out / CHECKPOINT)
    assert checkpoint["quant_config"]["act_bits"] is None
    assert tuple(checkpoint["quant_config"]["skip"]) == ("classifier",)
    assert type(model.classifier) is nn.Linear and type(model.featurizer[0]) is QuantConv2d
    assert "| qtdog | 7 |" in report([tmp_path])
    # Its activations are float: the integer files refuse it with a message, not a traceback.
    argv = ["export", str(out / CHECKPOINT), "--format", "onnx", "--out", str(tmp_path / "m")]
    assert cli.main(argv) == 2 and "quantizes weights only" in capsys.readouterr().err


@pytest.mark.parametrize("crash_at", [3, 5])  # step 2's checkpoint (float) or step 4's
def test_a_run_killed_before_or_after_the_switch_resumes_bit_identical(
    tmp_path, digits_dir, monkeypatch, crash_at
):
    monkeypatch.setattr(train, "evaluate", _quick_evaluation)
    straight = _run(tmp_path, digits_dir, "straight")
    update, calls = Algorithm.update, {"n": 0}

    def crash(self, minibatches):
        calls["n"] += 1
        if calls["n"] == crash_at + 1:
            raise KeyboardInterrupt
        return update(self, minibatches)

    monkeypatch.setattr(Algorithm, "update", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, digits_dir, "killed")
    monkeypatch.setattr(Algorithm, "update", update)
    resumed = _run(tmp_path, digits_dir, "killed", resume=True)
    a = _tensors(torch.load(straight / CHECKPOINT, weights_only=True))
    b = _tensors(torch.load(resumed / CHECKPOINT, weights_only=True))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), crash_at

    def strip(records):
        return [
            {k: v for k, v in r.items() if k not in ("step_time", "mem_gb", "args")}
            for r in records
        ]

    assert strip(_lines(straight)) == strip(_lines(resumed))


def test_sweep_folders_carry_the_bit_width(tmp_path, digits_dir):
    config = SweepConfig(
        "digits", tmp_path, ["qtdog"], test_envs=[1], bits=[7, 5], options={"data_dir": digits_dir}
    )
    names = sorted(job.folder.name.rsplit("_", 1)[0] for job in plan(config))
    assert names == ["erm_env1_seed0", "qtdog_w5_env1_seed0", "qtdog_w7_env1_seed0"]


def test_bit_widths_and_bad_input_get_clear_errors(tmp_path):
    for bits in (7, 5, 2, 8):
        check_arguments(tiny_run(tmp_path / "run", None, "qtdog", bits=bits))
    with pytest.raises(UsageError, match="--bits: expected an integer from 2 to 8, got 9"):
        check_arguments(tiny_run(tmp_path / "run", None, "qtdog", bits=9))
    with pytest.raises(UsageError, match="qtdog is a QAT method: give --bits"):
        check_arguments(tiny_run(tmp_path / "run", None, "qtdog"))
    with pytest.raises(ValueError, match="float_warmup: needs weights_only"):
        Recipe(quantized=True, objective="erm", float_warmup=True)
    with pytest.raises(ValueError, match="float_warmup: needs weights_only, without freezing"):
        Recipe(
            quantized=True, objective="sagm", freezing=True, weights_only=True, float_warmup=True
        )
    with pytest.raises(ValueError, match="are for quantized models"):
        Recipe(quantized=False, objective="erm", weights_only=True)
    with pytest.raises(ValueError, match="fold_batch_norm: .* act_bits None"):
        QuantConfig(4, None, fold_batch_norm=True)


def test_a_weights_only_config_round_trips_and_int8_first_layer_keeps_its_input_float():
    config = QuantConfig(4, None, first_last="int8", skip=("classifier",))
    torch.manual_seed(0)
    model = quantize_model(build_model(ModelConfig()), config)
    first = model.featurizer[0]
    assert first.weight_quantizer.bits == 8 and isinstance(first.input_quantizer, nn.Identity)
    model(torch.randn(2, 3, 32, 32))  # initialises the step sizes
    rebuilt = build_network(ModelConfig().to_dict(), json.loads(json.dumps(asdict(config))))
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), rebuilt(x))


def _train_sharded(rank=0, ranks=1):
    """6 float64 steps of 3 x 8 images, switching after 3, on ``ranks`` ranks (as gaqat.train
    drives them) or on one process."""
    algorithm = _algorithm(total_steps=6, quantize_at=0.5)
    algorithm.network.double()
    g = torch.Generator().manual_seed(1)
    batches = [
        [
            (torch.randn(8, 3, 12, 12, generator=g, dtype=torch.float64) + d, torch.arange(8) + d)
            for d in range(3)
        ]
        for _ in range(6)
    ]
    if ranks > 1:
        algorithm.distribute(torch.device("cpu"))
    shard = slice(rank * 8 // ranks, (rank + 1) * 8 // ranks)
    for minibatches in batches:
        algorithm.update([(x[shard], y[shard]) for x, y in minibatches])
    return algorithm


def _rank_main(rank, ranks, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    torch.set_num_threads(1)
    try:
        torch.save(_train_sharded(rank, ranks).network.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_across_the_switch(tmp_path):
    """The data-parallel wrapper is built anew at the switch, so the step sizes' gradients
    are averaged across ranks too."""
    mp.spawn(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    expected = _train_sharded().network.state_dict()
    assert any(name.endswith("weight_quantizer.scale") for name in expected)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in expected.items():
            if value.is_floating_point():
                assert (got[key] - value).abs().max().item() < 1e-9, (rank, key)
            else:
                assert torch.equal(got[key], value), (rank, key)
