"""One run on several processes: ``torchrun`` + DistributedDataParallel, batch norm in sync.

``torchrun --standalone --nproc-per-node N -m gaqat train ...`` starts N copies of the
command, one per rank (one per GPU on a GPU machine; ``gloo`` on CPU). The run is the
single-process run on the same global batch, split N ways:

- Data: each rank draws its 1/N of every domain's minibatch, the same images and
  augmentations a single process draws at that step (``DomainLoaders.train_batches``'s
  ``shard``); the batch size must divide by N.
- Gradients: forward and backward run through :class:`DistributedDataParallel`, which
  averages every gradient across ranks during backward. SAM/SAGM/GAQAT's two passes thus
  see the global g and g_p: the perturbation's norm is the global norm, and GAQAT's
  disorder and freeze decisions come from the same averaged gradients on every rank
  (:func:`agree` checks that at every checkpoint).
- LSQ step sizes are initialised on the whole first batch by every rank before training
  (``Algorithm.prime``), and batch norm normalises with the global batch's statistics
  (:class:`SyncBatchNorm2d`), so the small CNN's training-mode batch norm matches too.
- Randomness: rank 0 keeps the single-process random stream, the other ranks get their
  own (dropout masks differ per shard, as a single process's differ per image);
  checkpoints keep every rank's random state, so a resumed run continues exactly.
- Files: rank 0 alone takes the run folder's lock, evaluates, and writes records and
  checkpoints; the other ranks wait for it at each checkpoint.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run; a plain process is a world of one."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0, the one that owns the run folder."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.size


def world_from_environment() -> World:
    """The ranks ``torchrun`` describes in RANK, WORLD_SIZE and LOCAL_RANK."""
    try:
        world = World(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError:
        raise ValueError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them), got "
            + ", ".join(f"{k}={os.environ.get(k)!r}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        ) from None
    if not 0 <= world.rank < world.size:
        raise ValueError(f"RANK={world.rank} is not below WORLD_SIZE={world.size}")
    return world


def start(world: World, device: torch.device) -> None:
    """Join the process group (``nccl`` on GPUs, ``gloo`` on CPU); nothing for one process."""
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def stop(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def device_for(world: World, device: torch.device) -> torch.device:
    """On a GPU machine each rank takes the GPU of its local rank."""
    if world.size > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


def active() -> bool:
    """Whether this process is one of several ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduce(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the output's gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of an NCHW batch, and the number of values
    behind each: the global batch's across ranks when several train together
    (differentiable through one all-reduce of sum, sum of squares and count), the local
    batch's otherwise. Computed in at least fp32, even under bf16 autocast."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if not active():
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        return mean, var, x.new_tensor(x.numel() / x.shape[1])
    count = x.new_full((x.shape[1],), x.numel() / x.shape[1])
    local = torch.stack([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count])
    total, total_sq, count = _AllReduce.apply(local)
    mean = total / count
    return mean, total_sq / count - mean * mean, count[0]


def normalise(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, bn: nn.BatchNorm2d
) -> torch.Tensor:
    """Batch norm's training-mode output for the given statistics, in ``x``'s dtype."""
    shape = (1, -1, 1, 1)
    y = (x.to(mean.dtype) - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training-mode statistics are the global batch's across ranks.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this one is a handful of tensor ops and
    one differentiable all-reduce (:func:`batch_statistics`), so it runs wherever the
    process group does. In eval mode, or with one rank, it is plain batch norm. Its state
    dict is BatchNorm2d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        mean, var, count = batch_statistics(x)
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        return normalise(x, mean, var, self)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """As F.batch_norm: the unbiased variance, momentum or (momentum None) the mean."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.detach(), factor)
        self.running_var.lerp_(var.detach() * n / (n - 1), factor)


def synchronise_batch_norm(model: nn.Module) -> nn.Module:
    """Make every BatchNorm2d of ``model`` a :class:`SyncBatchNorm2d`, in place.

    The layers keep their parameters and buffers (the subclass adds no state, only its
    forward), so an optimizer built before still holds them.
    """
    if type(model) is nn.BatchNorm2d:
        model.__class__ = SyncBatchNorm2d  # same fields, same parameters, new forward
        return model
    for child in model.children():
        synchronise_batch_norm(child)
    return model


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped so that backward averages gradients across ranks.

    Buffers are not re-broadcast at each forward: the ranks keep equal ones by construction
    (synchronised batch norm), and the perturbed pass must not see rank 0's overwrite them.
    """
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **_NO_BUFFER_SYNC)


# The option's name changed in torch 2.14; either keeps buffers out of each forward.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def mean(value: float, world: World) -> float:
    """The mean of ``value`` over the ranks (for logging: one collective per checkpoint)."""
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / world.size


def gather(value: Any, world: World) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if world.size == 1:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(value: Any, world: World, what: str) -> None:
    """Stop the run if the ranks hold different ``value``s: they would silently diverge."""
    values = gather(value, world)
    if any(v != values[0] for v in values[1:]):
        raise RuntimeError(
            f"the ranks disagree on {what}: "
            + "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        )


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
