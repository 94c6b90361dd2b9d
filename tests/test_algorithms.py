"""The method registry: recipes, the shared Algorithm, the learning-rate schedule."""

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import record_components

from gaqat.algorithms import Algorithm, lr_lambda
from gaqat.hparams import default_hparams
from gaqat.models import ModelConfig
from gaqat.names import ALGORITHMS, Recipe, get_recipe
from gaqat.quant import lsq_quantize, quantizers, step_sizes


def test_unknown_algorithm_lists_the_choices():
    with pytest.raises(ValueError, match="choices: erm, sagm, lsq, lsq_sam, lsq_sagm, gaqat"):
        get_recipe("sam_qat")


def test_recipes_compose_the_four_choices():
    assert {n for n, r in ALGORITHMS.items() if r.quantized} == {
        "lsq",
        "lsq_sam",
        "lsq_sagm",
        "gaqat",
        "lsq_swa",
        "lsq_swad",
        "lsq_sam_swad",
        "lsq_sagm_swad",
        "gaqat_swad",
        "qtdog",
    }
    assert [n for n, r in ALGORITHMS.items() if r.freezing] == ["gaqat", "gaqat_swad"]
    assert get_recipe("lsq_sam").objective == "sam" and get_recipe("sagm").objective == "sagm"
    assert {n: r.averaging for n, r in ALGORITHMS.items() if r.averaging != "none"} == {
        "swa": "swa",
        "swad": "swad",
        "lsq_swa": "swa",
        "lsq_swad": "swad",
        "lsq_sam_swad": "swad",
        "lsq_sagm_swad": "swad",
        "gaqat_swad": "swad",
    }
    for name, recipe in ALGORITHMS.items():  # an averaged method is its base plus the average
        base = {"swa": "erm", "swad": "erm"}.get(name, name.removesuffix("_swad"))
        assert replace(recipe, averaging="none") == get_recipe(base.removesuffix("_swa")), name
    with pytest.raises(ValueError, match="Recipe.averaging: 'ema' is not one of none, swa, swad"):
        Recipe(quantized=False, objective="erm", averaging="ema")


def test_cosine_schedule_decays_to_zero_and_constant_stays():
    cosine = lr_lambda("cosine", 100)
    assert cosine(0) == 1.0 and math.isclose(cosine(50), 0.5) and cosine(100) == 0.0
    assert lr_lambda("constant", 100)(77) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_lambda("linear", 100)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_update_reports_the_loss_and_predict_gives_logits(name):
    torch.manual_seed(0)
    recipe = get_recipe(name)
    hp = {**default_hparams(name, "digits"), **({"window": 2} if recipe.freezing else {})}
    algorithm = Algorithm(
        name, ModelConfig(), hp, total_steps=4, bits=4 if recipe.quantized else None
    )
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    for _ in range(3):
        stats = algorithm.update(batches)
        assert stats["loss"].dim() == 0 and math.isfinite(stats["loss"])
    assert ("n_frozen" in stats) == recipe.freezing
    assert bool(quantizers(algorithm.network)) == recipe.quantized
    assert algorithm.predict(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert algorithm.scheduler.last_epoch == 3
    if recipe.freezing:
        assert {r["kind"] for r in algorithm.pop_gradient_records()} >= {"window"}


def test_an_averaging_algorithm_averages_its_steps_and_recomputes_batch_norm():
    """SWA over the last half of 4 steps: fed by update, kept in optimizer_state, put into
    the network (step sizes too) with batch norm recomputed on the batches given."""
    torch.manual_seed(0)
    hp = {**default_hparams("lsq_swa", "digits"), "swa_start": 0.5}
    algorithm = Algorithm("lsq_swa", ModelConfig(), hp, total_steps=4, bits=4)
    batch = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    seen = []
    for _ in range(4):
        algorithm.update(batch)
        seen.append(
            {n: p.detach().double().clone() for n, p in algorithm.network.named_parameters()}
        )
    algorithm.average.after_evaluation(4, loss=None)
    state = copy.deepcopy(algorithm.optimizer_state())
    assert state["average"]["total"]["count"] == 2
    window = algorithm.use_average([batch, batch, batch])
    assert (window.first, window.last) == (3, 4)
    params = dict(algorithm.network.named_parameters())
    assert any(".scale" in name for name in params)  # step sizes are averaged too
    for name, p in params.items():
        mean = (seen[2][name] + seen[3][name]) / 2
        assert torch.equal(p.detach(), mean.float()), name
    tracked = [
        m.num_batches_tracked
        for m in algorithm.network.modules()
        if hasattr(m, "num_batches_tracked")
    ]
    assert tracked and all(int(n) == 3 for n in tracked)
    algorithm.load_optimizer_state(state)  # the average comes back with the optimizer
    assert algorithm.average.result().count == 2


def test_step_sizes_train_at_their_own_learning_rate():
    hp = {**default_hparams("lsq_sagm", "digits"), "step_size_lr_scale": 0.1}
    algorithm = Algorithm("lsq_sagm", ModelConfig(), hp, total_steps=10, bits=4)
    weights, scales = algorithm.optimizer.param_groups
    assert {id(p) for p in scales["params"]} == {
        id(p) for p in step_sizes(algorithm.network).values()
    }
    assert scales["lr"] == hp["lr"] * 0.1 and weights["lr"] == hp["lr"]
    algorithm.update([(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))])
    assert math.isclose(scales["lr"] / weights["lr"], 0.1)  # the schedule scales both


def test_weight_decay_spares_step_sizes_so_a_frozen_one_stays_put():
    """Freeze mode "task" steps a frozen step size with ½·g_smooth, which is 0 here (ρ = α = 0,
    no dropout): weight decay must not move it instead."""
    torch.manual_seed(0)
    hp = {
        **default_hparams("gaqat", "digits"),
        "weight_decay": 1e-2,
        "rho": 0.0,
        "alpha": 0.0,
        "freeze_mode": "task",
    }
    algorithm = Algorithm("gaqat", ModelConfig(), hp, total_steps=10, bits=4)
    weights, scales = algorithm.optimizer.param_groups
    assert (weights["weight_decay"], scales["weight_decay"]) == (1e-2, 0.0)
    sizes = step_sizes(algorithm.network)
    algorithm.freezer.frozen = set(sizes)  # from the first step: no Adam momentum
    handed = record_components(algorithm.freezer)
    batch = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    algorithm.update(batch)  # initialises the quantizers
    before = {name: s.detach().clone() for name, s in sizes.items()}
    for _ in range(2):
        algorithm.update(batch)
        assert not any(g.any() for g in handed[-1][1].values())
    assert all(torch.equal(sizes[name], value) for name, value in before.items())


@pytest.mark.parametrize("name", ["sagm", "lsq_sam", "lsq_sagm", "gaqat"])
def test_two_pass_objectives_take_the_perturbed_pass_rng_hparam(name):
    hp = {**default_hparams(name, "digits"), "perturbed_pass_rng": "fresh"}
    bits = 4 if get_recipe(name).quantized else None
    algorithm = Algorithm(name, ModelConfig(), hp, total_steps=1, bits=bits)
    assert algorithm.optimizer.perturbed_pass_rng == "fresh"


def test_qat_recipe_needs_a_bit_width():
    with pytest.raises(ValueError, match="--bits"):
        Algorithm("lsq", ModelConfig(), default_hparams("lsq", "digits"), total_steps=1)


@pytest.mark.parametrize("name", ["erm", "lsq_sagm"])
def test_every_update_starts_from_zero_gradients(name):
    """The base optimizer sees this step's gradient alone, not the last step's added to it."""
    torch.manual_seed(0)
    recipe = get_recipe(name)
    hp = {**default_hparams(name, "digits"), "rho": 0.0, "alpha": 0.0}
    algorithm = Algorithm(
        name, ModelConfig(), hp, total_steps=4, bits=4 if recipe.quantized else None
    )
    batch = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    algorithm.update(batch)
    seen = {}
    base = getattr(algorithm.optimizer, "base_optimizer", algorithm.optimizer)
    base.register_step_post_hook(  # after the step: Adam calls an ERM closure inside its step
        lambda optimizer, args, kwargs: seen.update(
            {p: p.grad.clone() for p in algorithm.network.parameters()}
        )
    )
    twin = copy.deepcopy(algorithm.network)
    grads = torch.autograd.grad(
        F.cross_entropy(twin(batch[0][0]), batch[0][1]), list(twin.parameters())
    )
    algorithm.update(batch)
    for p, g in zip(algorithm.network.parameters(), grads):
        torch.testing.assert_close(seen[p], g, rtol=0, atol=1e-6)


def test_bf16_autocast_trains_with_fp32_weights_and_fp32_quantizer_grids():
    torch.manual_seed(0)
    hp = {**default_hparams("gaqat", "digits"), "window": 2}
    algorithm = Algorithm("gaqat", ModelConfig(), hp, total_steps=4, bits=4, precision="bf16")
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(3)]
    for _ in range(4):
        assert math.isfinite(algorithm.update(batches)["loss"])
    assert all(p.dtype == torch.float32 for p in algorithm.network.parameters())
    assert all(p.grad.dtype == torch.float32 for p in algorithm.network.parameters())
    assert algorithm.predict(torch.zeros(2, 3, 16, 16)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        Algorithm("erm", ModelConfig(), default_hparams("erm", "digits"), 1, precision="fp16")


def test_bf16_activations_are_quantized_on_the_fp32_grid():
    x = torch.randn(64).to(torch.bfloat16).requires_grad_()
    scale = torch.tensor(0.3, requires_grad=True)
    out = lsq_quantize(x, scale, -8, 7, 1.0)
    assert out.dtype == torch.float32
    assert torch.equal(out, lsq_quantize(x.detach().float(), scale, -8, 7, 1.0))
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and scale.grad.dtype == torch.float32


def test_channels_last_changes_the_layout_not_the_gradient():
    """Float model: the gradients agree to rounding. (Not compared on weights, where Adam's
    first step turns the sign of a gradient that is zero up to rounding into a full
    learning-rate step, nor on a quantized model, where rounding can move a value across
    a quantization threshold.)"""
    hp = default_hparams("sagm", "digits")
    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(3)]
    grads = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        algorithm = Algorithm("sagm", ModelConfig(), hp, 2, channels_last=channels_last)
        algorithm.update(batches)
        grads.append({n: p.grad for n, p in algorithm.network.named_parameters()})
    assert algorithm.network.featurizer[0].weight.is_contiguous(memory_format=torch.channels_last)
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-6), name
    quantized = Algorithm(
        "gaqat",
        ModelConfig(),
        {**hp, **default_hparams("gaqat", "digits")},
        2,
        bits=4,
        channels_last=True,
    )
    assert math.isfinite(quantized.update(batches)["loss"])


def test_compiled_training_passes_give_the_eager_gradients(monkeypatch):
    """``compile=True`` traces GAQAT's two passes without a graph break, the quantizers as
    plain ops, and computes eager mode's gradients up to rounding. The aot_eager backend
    runs dynamo and AOTAutograd, everything but inductor's C++ build (slow, and the same
    graphs)."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    hp = {**default_hparams("gaqat", "digits"), "window": 2}
    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(3)]
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        algorithm = Algorithm("gaqat", ModelConfig(), hp, 2, bits=4, compile=compiled)
        algorithm.update(batches)
        grads.append({n: p.grad for n, p in algorithm.network.named_parameters()})
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-6), name
    torch._dynamo.reset()
