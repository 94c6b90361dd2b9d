"""Helpers shared by several test files: ``from helpers import tiny_run`` (tests/ is on
sys.path through pyproject's ``pythonpath``). The shared fixtures live in conftest.py."""

import copy
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TINY = {"batch_size": 8}  # hparams overrides that keep a DigitsDG run to a few seconds


def tiny_run(output, digits_dir, algorithm="erm", **kwargs):
    """A TrainConfig for a run of a few DigitsDG steps (mnist_m held out) into ``output``."""
    from gaqat.train import TrainConfig

    kwargs.setdefault("steps", 2)
    kwargs.setdefault("checkpoint_freq", 2)
    kwargs.setdefault("test_envs", (1,))
    hparams = {**TINY, **kwargs.pop("hparams", {})}
    return TrainConfig(
        dataset="digits",
        output=output,
        algorithm=algorithm,
        data_dir=digits_dir,
        hparams=hparams,
        progress=False,
        **kwargs,
    )


def train_argv(dataset, output, hparams, *extra):
    """``gaqat train`` arguments: ``dataset`` with domain 1 held out, into ``output``."""
    return [
        "train",
        "--dataset",
        str(dataset),
        "--test-envs",
        "1",
        "--output",
        str(output),
        "--hparams",
        json.dumps(hparams),
        *extra,
    ]


def tiny_argv(output, digits_dir, *extra):
    """``gaqat train`` arguments for the same tiny run as :func:`tiny_run`'s defaults."""
    return train_argv("digits", output, TINY, "--data-dir", str(digits_dir), *extra)


# Tiny float64 models and helpers for the optimizer tests (test_optim, test_freezing): their
# extra scalar and per-channel parameters play the role of LSQ step sizes, so SAM/SAGM/GAQAT
# are tested without gaqat.quant. Test files import them: ``from helpers import TinyMLP``.


class TinyMLP(nn.Module):
    """Linear-tanh-dropout-linear with a per-channel weight scale and a scalar activation scale."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        self.drop = nn.Dropout(dropout)
        self.w_scale = nn.Parameter(torch.full((6, 1), 0.9))
        self.a_scale = nn.Parameter(torch.tensor(1.1))

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.fc1.weight * self.w_scale, self.fc1.bias) * self.a_scale)
        return self.fc2(self.drop(h))

    def step_sizes(self):
        return {"w_scale": self.w_scale, "a_scale": self.a_scale}


class TinyDropout(TinyMLP):
    """TinyMLP with dropout 0.5: each pass draws its own mask unless the step replays it."""

    def __init__(self):
        super().__init__(dropout=0.5)


class TinyConvBN(nn.Module):
    """Conv-BN-ReLU-pool-linear with a scalar weight scale."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.w_scale = nn.Parameter(torch.tensor(0.8))

    def forward(self, x):
        h = F.conv2d(x, self.conv.weight * self.w_scale, padding=1)
        return self.fc(F.relu(self.bn(h)).mean(dim=(2, 3)))

    def step_sizes(self):
        return {"w_scale": self.w_scale}


def make(model_cls, seed=0):
    torch.manual_seed(seed)
    model = model_cls().double()
    shape = (8, 2, 5, 5) if model_cls is TinyConvBN else (8, 4)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    return model, x, y


def closure_for(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def capture_grads(base):
    """The gradients the base optimizer sees, copied at the start of its step."""
    seen = {}

    def hook(optimizer, args, kwargs):
        seen.clear()
        seen.update(
            {
                p: p.grad.clone()
                for g in optimizer.param_groups
                for p in g["params"]
                if p.grad is not None
            }
        )

    base.register_step_pre_hook(hook)
    return seen


def reference_grads(model, x, y, rho, alpha):
    """g at θ and g_p at θ + e, by hand on a copy of the model."""
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_((rho / (norm + 1e-12) - alpha) * t)
    g_p = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    return dict(zip(model.parameters(), g)), dict(zip(model.parameters(), g_p))


def pass_counter(model):
    """Counts of forward passes through ``model`` and of backward passes through its output."""
    counts = {"forward": 0, "backward": 0}

    def count(key):
        counts[key] += 1

    def on_forward(module, args, output):
        count("forward")
        output.register_hook(lambda grad: count("backward"))

    model.register_forward_hook(on_forward)
    return counts


def record_components(freezer):
    """The (g_task, g_smooth) dicts GAQAT hands ``freezer`` at each step, in a growing list."""
    handed = []
    observe = freezer.observe

    def spy(g_task, g_smooth):
        handed.append((dict(g_task), dict(g_smooth)))
        observe(g_task, g_smooth)

    freezer.observe = spy
    return handed


def save_failing_at_the_second_checkpoint(error):
    """``torch.save`` as a full disk leaves it: the second call raises ``error(path)``."""
    save, calls = torch.save, []

    def save_or_fail(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise error(path)
        return save(obj, path, *args, **kwargs)

    return save_or_fail


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module, imported as when it runs as a script (it
    imports its sibling scripts, and its dataclasses look their module up by name)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if str(script.parent) not in sys.path:
        sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
