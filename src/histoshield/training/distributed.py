"""Process-group plumbing for `torchrun ... -m histoshield train`: one rank per process.

Outside torchrun (no WORLD_SIZE > 1 in the environment) everything here is a no-op, so the
training loop has a single code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from histoshield.runtime import pick_device


@dataclass
class DistContext:
    """This process's place in the job: rank, world size, device, who owns the process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 is the only one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains together."""
        return self.world > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op when alone)."""
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (in place; returned for chaining)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        """Tear down the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup(device: str = "auto") -> DistContext:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK and join the group (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world <= 1:
        return DistContext(device=dev)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if dev.type == "cuda":
        dev = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank=rank, world=world, local_rank=local, device=dev, owns_group=owns)


def shard(indices: torch.Tensor, ctx: DistContext, *, pad: bool) -> torch.Tensor:
    """This rank's share of an (already shuffled, identical on all ranks) index list.

    With `pad` the list is padded by wrapping around so every rank gets the same number of
    samples (as DistributedSampler does; needed so all ranks take the same number of steps).
    Without it each sample lands on exactly one rank, so summed metrics are exact.
    """
    if ctx.world <= 1:
        return indices
    if pad and indices.numel() % ctx.world:
        extra = ctx.world - indices.numel() % ctx.world
        reps = indices.repeat(extra // max(1, indices.numel()) + 1)[:extra]
        indices = torch.cat([indices, reps])
    return indices[ctx.rank :: ctx.world]


def sync_gradients(model: torch.nn.Module, ctx: DistContext) -> None:
    """Average gradients over ranks by hand (used when a defense calls the model many times
    per step, which DistributedDataParallel's one-forward-one-backward bookkeeping forbids)."""
    if not ctx.distributed:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def broadcast_parameters(model: torch.nn.Module, ctx: DistContext) -> None:
    """Start every rank from rank 0's weights and buffers."""
    if not ctx.distributed:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def broadcast_buffers(model: torch.nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats drift apart per shard)."""
    if not ctx.distributed:
        return
    for t in model.buffers():
        dist.broadcast(t.data, src=0)
