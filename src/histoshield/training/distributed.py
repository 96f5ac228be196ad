"""Process-group plumbing for `torchrun ... -m histoshield CMD`: one rank per process.

Training shards its samples (DDP); evaluation (`attack`, `evaluate`, `certify`) shards images by
whole batches (`batch_shard`), so each batch is exactly the batch a one-process run makes, and
gathers per-image results back in index order (`gather_rows`, `gather_json`: plain tensors and
JSON, never pickle). Outside torchrun (no WORLD_SIZE > 1 in the environment) everything here is
a no-op, so callers have a single code path. Collectives time out after
`$HISTOSHIELD_DIST_TIMEOUT` seconds (default 1800): a rank that dies or hangs stops the job.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from histoshield.errors import HistoshieldError
from histoshield.runtime import pick_device

DEFAULT_TIMEOUT_S = 1800.0


def timeout_seconds() -> float:
    """Collective timeout: `$HISTOSHIELD_DIST_TIMEOUT` seconds (default 1800)."""
    raw = os.environ.get("HISTOSHIELD_DIST_TIMEOUT", "")
    if not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise HistoshieldError(f"HISTOSHIELD_DIST_TIMEOUT must be seconds > 0, got {raw!r}")
    return value


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
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_seconds()),
        )
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


# ---- sharded evaluation ----------------------------------------------------------------------


def batch_shard(n: int, batch_size: int, ctx: DistContext) -> torch.Tensor:
    """Indices of this rank's images: whole batches of `batch_size`, batch b to rank b % world.

    Every image lands on exactly one rank, for any world size (also one that does not divide
    the number of batches or images), and each batch holds exactly the images the one-process
    run puts together, so batch-level computations agree bit for bit.
    """
    if batch_size < 1:
        raise HistoshieldError(f"batch size must be >= 1, got {batch_size}")
    starts = range(ctx.rank * batch_size, n, ctx.world * batch_size)
    parts = [torch.arange(s, min(s + batch_size, n)) for s in starts]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")


def _all_gather_padded(t: torch.Tensor, ctx: DistContext) -> list[torch.Tensor]:
    """Every rank's tensor (variable first dimension), in rank order, on every rank."""
    dev = _comm_device(ctx)
    n = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world)]
    dist.all_gather(sizes, n)
    longest = max(int(s) for s in sizes)
    pad = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(pad) for _ in range(ctx.world)]
    dist.all_gather(parts, pad)
    return [p[: int(s)].cpu() for p, s in zip(parts, sizes, strict=True)]


def gather_rows(t: torch.Tensor, mine: torch.Tensor, n: int, ctx: DistContext) -> torch.Tensor:
    """The full (n, ...) tensor, in global index order, from each rank's rows `t` of images
    `mine` (from `batch_shard`); on every rank. Alone: `t` itself."""
    if not ctx.distributed:
        return t
    is_bool = t.dtype == torch.bool
    t = t.detach().to(torch.uint8) if is_bool else t.detach()
    rows = _all_gather_padded(t, ctx)
    idx = _all_gather_padded(mine.long(), ctx)
    order = torch.cat(idx)
    if len(order) != n or not torch.equal(torch.sort(order).values, torch.arange(n)):
        raise HistoshieldError(f"ranks returned {len(order)} rows for {n} images: shards disagree")
    full = torch.empty((n, *t.shape[1:]), dtype=t.dtype)
    full[order] = torch.cat(rows)
    return full.bool() if is_bool else full


def gather_json(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's JSON-serialisable `obj`, in rank order, on every rank (alone: [obj])."""
    if not ctx.distributed:
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
    return [json.loads(bytes(p.tolist()).decode()) for p in _all_gather_padded(data, ctx)]


def max_over_ranks(value: float, ctx: DistContext) -> float:
    """The largest of every rank's `value` (e.g. wall seconds of a sharded stage)."""
    return max(gather_json(float(value), ctx))


def sum_over_ranks(values: dict[str, int], ctx: DistContext) -> dict[str, int]:
    """Key-wise sum of every rank's integer counters."""
    out: dict[str, int] = {}
    for part in gather_json(values, ctx):
        for k, v in part.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def shares(n: int, batch_size: int, world: int) -> list[int]:
    """How many of `n` images each rank evaluates (for env.json)."""
    return [len(batch_shard(n, batch_size, DistContext(rank=r, world=world))) for r in range(world)]
