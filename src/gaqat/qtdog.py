"""QT-DoG's recipe: a float warm-up, then weights-only LSQ for the rest of the run.

QT-DoG (Javed et al., ICML 2025, "QT-DoG: Quantization-aware training for domain
generalization") reads weight quantization as an implicit flatness regulariser: it
trains the float network with ERM for the first 2,000 of DomainBed's 5,000 steps, then
quantizes the weights of every layer but the classifier with per-channel LSQ step sizes,
inputs left float, and trains on. The method is the row ``qtdog`` of
``gaqat.names.ALGORITHMS`` (``Recipe.weights_only`` and ``Recipe.float_warmup``), so its
runs carry their bit width in their names (``qtdog_w7``) as every QAT method's do.

The warm-up is the one thing no other recipe has: the network changes shape in the
middle of a run. :class:`FloatWarmup` holds when (``switch_step``, from the
hyperparameter ``quantize_at``) and how: ``gaqat.prepare.quantize_model`` swaps the
layers in place, each weight step size is initialised from the weights of that moment
(LSQ's 2·mean|w|/√q_max, per output channel), and the optimizer's step-size group,
empty until then, takes the new parameters. The rule is one predicate on the steps
done, the network is quantized once ``switch_step`` steps are done, which
``gaqat.algorithms.Algorithm`` applies after each step and before loading a checkpoint
(so a run resumed on either side of the switch continues bit for bit). While it is
float, a run's checkpoints hold the float network (``quant_config`` None) and
``gaqat.train`` writes no record for them: a quantized method's results are its
quantized network's, and model selection never picks a float warm-up checkpoint.

Example::

    >>> import torch
    >>> from gaqat.algorithms import Algorithm
    >>> from gaqat.hparams import default_hparams
    >>> from gaqat.models import ModelConfig
    >>> hparams = default_hparams("qtdog", "digits")  # quantize_at 0.4
    >>> algorithm = Algorithm("qtdog", ModelConfig(), hparams, total_steps=5, bits=7)
    >>> algorithm.warmup.step  # steps 0 and 1 in float, from step 2 on quantized
    2
    >>> batch = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    >>> _ = algorithm.update(batch)
    >>> algorithm.warming_up
    True
    >>> _ = algorithm.update(batch)
    >>> config = algorithm.quant_config
    >>> (config.weight_bits, config.act_bits, config.per_channel, config.skip)
    (7, None, True, ('classifier',))
"""

from __future__ import annotations

import torch
from torch import nn

from gaqat.prepare import quantize_model
from gaqat.quant import QuantConfig, QuantConv2d, QuantLinear, check_optimizer, step_sizes

# The float layer QT-DoG keeps: ``gaqat.models.Network``'s classifier.
CLASSIFIER = "classifier"


def weights_only_config(hparams: dict, bits: int) -> QuantConfig:
    """QT-DoG's quantizers at ``bits``: weights only, every layer but the classifier
    (``first_last`` then says what the first convolution gets)."""
    return QuantConfig(
        weight_bits=bits,
        act_bits=None,
        per_channel=hparams["per_channel"],
        first_last=hparams["first_last"],
        skip=(CLASSIFIER,),
    )


def switch_step(quantize_at: float, total_steps: int) -> int:
    """How many float steps come first: ``quantize_at`` of the run, rounded, and at most
    all but the last, so that a run always ends quantized and trains so at least once.

    >>> switch_step(0.4, 5000), switch_step(0.0, 10), switch_step(0.9, 2)
    (2000, 0, 1)
    """
    if not 0 <= quantize_at < 1:
        raise ValueError(f"hparams.quantize_at: expected a number in [0, 1), got {quantize_at!r}")
    return min(round(quantize_at * total_steps), max(total_steps - 1, 0))


class FloatWarmup:
    """When a QT-DoG run quantizes its float network (after ``step`` steps), and the
    switch itself (:meth:`switch`)."""

    def __init__(self, config: QuantConfig, step: int):
        self.config = config
        self.step = step

    def due(self, steps_done: int) -> bool:
        """Whether a network that has taken ``steps_done`` steps is quantized."""
        return steps_done >= self.step

    def switch(self, network: nn.Module, optimizer: torch.optim.Optimizer) -> QuantConfig:
        """Quantize ``network`` in place, its weight step sizes initialised from its weights
        now, and hand them to ``optimizer``'s step-size group (its last, empty until now);
        returns the config applied."""
        quantize_model(network, self.config)
        _initialise_from_weights(network)
        group = optimizer.param_groups[-1]
        held = {id(p) for p in group["params"]}
        group["params"].extend(p for p in step_sizes(network).values() if id(p) not in held)
        check_optimizer(optimizer, network)
        return self.config


@torch.no_grad()
def _initialise_from_weights(network: nn.Module) -> None:
    """Each weight quantizer's LSQ initialisation, on its layer's weight: what the first
    forward pass would do, done at the switch so no batch is involved."""
    for layer in network.modules():
        if isinstance(layer, (QuantConv2d, QuantLinear)):
            layer.weight_quantizer(layer.weight)
