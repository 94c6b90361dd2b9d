"""The compared methods as compositions of three independent choices.

A method is not a class: it is a :class:`gaqat.names.Recipe` (float or quantized model, which
objective, whether step sizes are frozen), and one :class:`Algorithm` runs any recipe.
A new method is a new row in ``gaqat.names.ALGORITHMS``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from gaqat.averaging import RunningSum, WeightAverage, recompute_batch_norm, weight_average
from gaqat.bn_folding import FoldedStatistics
from gaqat.distributed import data_parallel, synchronise_batch_norm
from gaqat.freezing import GAQAT, Freezer
from gaqat.models import ModelConfig, Network, build_model
from gaqat.names import FOLDED_BY_DEFAULT, LR_SCHEDULES, PRECISIONS, get_recipe
from gaqat.optim import SAGM, SAM, frozen_running_stats
from gaqat.prepare import quantize_model
from gaqat.qtdog import FloatWarmup, switch_step, weights_only_config
from gaqat.quant import QuantConfig, check_optimizer, quantizers, step_sizes


def quant_config_for(
    hparams: dict, bits: int, arch: str, weights_only: bool = False
) -> QuantConfig:
    if weights_only:  # QT-DoG's (gaqat.qtdog)
        return weights_only_config(hparams, bits)
    fold = hparams["fold_batch_norm"]
    return QuantConfig(
        weight_bits=bits,
        act_bits=bits,
        per_channel=hparams["per_channel"],
        first_last=hparams["first_last"],
        fold_batch_norm=fold == "on" or (fold == "auto" and arch in FOLDED_BY_DEFAULT),
        residual_bits=hparams["residual_bits"] or None,
    )


def lr_lambda(schedule: str, total_steps: int):
    """Multiplier of the base learning rate at a step: DomainBed's constant, or cosine decay."""
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    raise ValueError(f"hparams.lr_schedule: {schedule!r} is not one of {LR_SCHEDULES}")


class Algorithm:
    """Runs one recipe: ``update(minibatches)`` is one training step, ``predict(x)`` logits.

    ``precision="bf16"``: the forward passes (both of a two-pass step, and prediction) run
    under bfloat16 autocast; weights, gradients, optimizer state and the quantizers' grids
    stay float32. ``channels_last``: images and convolutions in NHWC memory layout, which
    GPU convolution kernels prefer. ``compile``: the training passes run through
    ``torch.compile``, traced on the first step after the quantizers are initialised (so
    the graph holds no initialisation branch); the quantizers then trace as plain tensor
    ops that the compiler fuses (``gaqat.quant.lsq_quantize``). A network quantized with
    batch norm folded (``hparams["fold_batch_norm"]``) trains its folded layers on live
    statistics for the first ``bn_freeze_at`` of the steps, on the running ones after
    (``gaqat.bn_folding.FoldedStatistics``); while they are live, their running statistics
    move after each step, not inside its passes. A recipe with a float warm-up (QT-DoG's,
    ``gaqat.qtdog``) trains the float network for ``warmup.step`` steps, then quantizes
    it; ``warming_up`` says which side of the switch it is on.

    What carries from one ``update`` to the next, besides the network, ``optimizer`` (with
    ``freezer``) and ``scheduler``, is set in ``__init__`` and nowhere else but:

    - ``training_module``: the module the training passes call; ``network`` itself, its
      data-parallel wrapper after ``distribute``, and, with ``compile``, either one
      compiled by the first ``update`` (``compile_pending`` until then, and again after
      QT-DoG's switch). Checkpoints and ``predict`` use ``network``.
    - ``quant_config``: what the network's quantizers are; None for a float network,
      QT-DoG's during its warm-up included, set when it switches (``resume_at`` before
      loading a checkpoint of a later step).
    - ``folded_statistics``: when the folded layers switch to their running statistics;
      None without folded layers.
    - ``average``: the weights averaged over steps (``gaqat.averaging``: SWA, SWAD), fed
      after every step; None for a recipe without averaging. ``use_average`` puts the
      average into ``network`` at the end of the run.

    Example::

        >>> import torch
        >>> from gaqat.algorithms import Algorithm
        >>> from gaqat.hparams import default_hparams
        >>> from gaqat.models import ModelConfig
        >>> hparams = default_hparams("lsq_sagm", "digits")
        >>> algorithm = Algorithm("lsq_sagm", ModelConfig(), hparams, total_steps=2, bits=4)
        >>> batch = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
        >>> stats = algorithm.update(batch)  # one two-pass step, then the schedule's
        >>> sorted(stats), algorithm.scheduler.last_epoch
        (['loss'], 1)
        >>> algorithm.predict(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        name: str,
        model_config: ModelConfig,
        hparams: dict,
        total_steps: int,
        bits: int | None = None,
        init_state: dict | None = None,
        *,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"Algorithm.precision: {precision!r} is not one of {PRECISIONS}")
        self.name = name
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.recipe = get_recipe(name)
        self.network: Network = build_model(model_config)
        if init_state is not None:
            self.network.load_state_dict(init_state)
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        self.quant_config: QuantConfig | None = None
        self.warmup: FloatWarmup | None = None
        if self.recipe.quantized:
            if bits is None:
                raise ValueError(
                    f"algorithm {name!r} quantizes the model: give the bit width (--bits)"
                )
            config = quant_config_for(hparams, bits, model_config.arch, self.recipe.weights_only)
            if self.recipe.float_warmup:  # quantized later, by _follow_warmup
                self.warmup = FloatWarmup(config, switch_step(hparams["quantize_at"], total_steps))
            else:
                self.quant_config = config
                quantize_model(self.network, config)
        # The optimizer is built after quantize_model so that it holds every step size.
        base = torch.optim.Adam(
            self._param_groups(hparams), lr=hparams["lr"], weight_decay=hparams["weight_decay"]
        )
        if self.recipe.quantized:
            check_optimizer(base, self.network)
        self.freezer: Freezer | None = None
        if self.recipe.freezing:
            self.freezer = Freezer(
                step_sizes(self.network),
                tau=hparams["tau"],
                window=hparams["window"],
                mode=hparams["freeze_mode"],
                unfreeze=hparams["unfreeze"],
                metric=hparams["disorder_metric"],
                scope=hparams["freeze_scope"],
            )
        self.optimizer = self._objective(base, hparams)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            base, lr_lambda(hparams["lr_schedule"], total_steps)
        )
        self.training_module: nn.Module = self.network
        self.compiles = compile
        self.compile_pending = compile
        self.data_parallel_device: torch.device | None = None  # set by distribute
        self.folded_statistics: FoldedStatistics | None = None
        if self.quant_config is not None and self.quant_config.fold_batch_norm:
            freeze_step = round(hparams["bn_freeze_at"] * total_steps)
            self.folded_statistics = FoldedStatistics(self.network, freeze_step)
        self.average: WeightAverage | None = weight_average(
            self.network, self.recipe.averaging, hparams, total_steps
        )
        self._follow_warmup(0)  # quantize_at 0: quantized from the start

    @property
    def warming_up(self) -> bool:
        """Whether a quantized recipe's network is still float (QT-DoG's warm-up)."""
        return self.recipe.quantized and self.quant_config is None

    def _follow_warmup(self, steps_done: int) -> None:
        """Quantize a warming-up network once it has taken ``warmup.step`` steps; the
        optimizer takes the step sizes, and the training passes are wrapped anew (the
        data-parallel wrapper knows its parameters when built; a compiled graph is of the
        float network)."""
        if not (self.warming_up and self.warmup is not None and self.warmup.due(steps_done)):
            return
        self.quant_config = self.warmup.switch(self.network, self.scheduler.optimizer)
        self.training_module = self.network
        if self.data_parallel_device is not None:
            self.training_module = data_parallel(self.network, self.data_parallel_device)
        self.compile_pending = self.compiles

    def resume_at(self, step: int) -> None:
        """Call before loading the weights and optimizer state of a checkpoint of ``step``:
        a QT-DoG network quantized by then is quantized here too, so that they fit."""
        self._follow_warmup(step)

    def _param_groups(self, hparams: dict) -> list[dict]:
        """One group, or two when quantized: the step sizes at ``lr * step_size_lr_scale``
        and without weight decay, which would pull a quantizer's range towards zero (and,
        through Adam, move a frozen step size by about lr per step)."""
        if not self.recipe.quantized:
            return [{"params": list(self.network.parameters())}]
        scales = {id(p) for p in step_sizes(self.network).values()}
        params = list(self.network.parameters())
        return [
            {"params": [p for p in params if id(p) not in scales]},
            {
                "params": [p for p in params if id(p) in scales],
                "lr": hparams["lr"] * hparams["step_size_lr_scale"],
                "weight_decay": 0.0,
            },
        ]

    def _objective(self, base: torch.optim.Optimizer, hparams: dict) -> torch.optim.Optimizer:
        if self.recipe.objective == "erm":
            return base
        rho, rng = hparams["rho"], hparams["perturbed_pass_rng"]
        if self.freezer is not None:
            return GAQAT(
                base,
                self.network,
                self.freezer,
                rho,
                hparams["alpha"],
                perturbed_pass_rng=rng,
                reset_momentum=hparams["freeze_resets_momentum"],
            )
        if self.recipe.objective == "sagm":
            return SAGM(base, self.network, rho, hparams["alpha"], perturbed_pass_rng=rng)
        return SAM(base, self.network, rho, perturbed_pass_rng=rng)

    def to(self, device: torch.device) -> Algorithm:
        self.network.to(device)
        return self

    @torch.no_grad()
    def prime(self, minibatches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Initialise the quantizers' step sizes on these minibatches exactly as the first
        training step's forward pass would, and change nothing else (batch-norm running
        statistics and random state stay as they were). Ranks that will each see a shard
        of the first batch call it with the whole batch, so their step sizes are the
        single-process ones without any communication."""
        if not self.recipe.quantized or all(
            q.initialized for q in quantizers(self.network).values()
        ):
            return
        x = torch.cat([x for x, _ in minibatches])
        self.network.train()
        with torch.random.fork_rng(), frozen_running_stats(self.network):
            self.network(x)

    def distribute(self, device: torch.device) -> Algorithm:
        """Train as one of several ranks (``gaqat.distributed``): batch norm on the global
        batch, gradients averaged across ranks in every backward pass. Call it on every
        rank after ``to`` and after loading a checkpoint; ``network`` stays the plain model
        (checkpoints, evaluation), only the training passes go through the wrapper."""
        synchronise_batch_norm(self.network)
        self.data_parallel_device = device
        self.training_module = data_parallel(self.network, device)
        return self

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, torch.bfloat16, enabled=self.precision == "bf16")

    def update(self, minibatches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """One training step on the minibatches (one per training domain), concatenated."""
        if self.folded_statistics is not None:
            self.folded_statistics.before_step(self.scheduler.last_epoch)
        if self.compile_pending:
            self.prime(minibatches)
            self.training_module = torch.compile(self.training_module)
            self.compile_pending = False
        x = torch.cat([x for x, _ in minibatches]).contiguous(memory_format=self.memory_format)
        y = torch.cat([y for _, y in minibatches])
        self.network.train()

        def closure() -> torch.Tensor:
            with self._autocast(x.device):
                logits = self.training_module(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            return loss

        # A plain optimizer steps on whatever .grad holds; SAM, SAGM and GAQAT zero it
        # before each of their passes themselves (gaqat.optim).
        if self.recipe.objective == "erm":
            self.optimizer.zero_grad(set_to_none=True)
        loss = self.optimizer.step(closure)
        if self.folded_statistics is not None:
            self.folded_statistics.after_step()
        self.scheduler.step()
        if self.average is not None:
            self.average.after_step(self.scheduler.last_epoch)
        self._follow_warmup(self.scheduler.last_epoch)
        stats = {"loss": loss.detach()}  # on the device: reading it would wait for the step
        if self.freezer is not None:
            stats["n_frozen"] = len(self.freezer.frozen)
        return stats

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.network.eval()
        with self._autocast(x.device):
            return self.network(x.contiguous(memory_format=self.memory_format)).float()

    def pop_gradient_records(self) -> list[dict]:
        """GAQAT's window summaries and freeze decisions since the last call."""
        return self.freezer.pop_records() if self.freezer is not None else []

    def use_average(self, batches: Iterable[list[tuple[torch.Tensor, torch.Tensor]]]) -> RunningSum:
        """Replace the network's weights by their average and recompute its batch-norm
        statistics on ``batches`` (each one minibatch per training domain, as ``update``
        takes them), under the training passes' precision and memory layout; returns the
        averaged window (its first and last step, how many)."""
        if self.average is None:
            raise ValueError(f"algorithm {self.name!r} averages no weights (Recipe.averaging)")
        window = self.average.apply()
        device = next(self.network.parameters()).device
        inputs = (
            torch.cat([x for x, _ in minibatches])
            .to(device, non_blocking=True)
            .contiguous(memory_format=self.memory_format)
            for minibatches in batches
        )
        with self._autocast(device):
            recompute_batch_norm(self.network, inputs)
        return window

    def optimizer_state(self) -> dict:
        """Everything but the network's weights (which checkpoints store once, as "model"):
        optimizer moments, freezer and tracker, learning-rate schedule, weight average."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.average is not None:
            state["average"] = self.average.state_dict()
        return state

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
