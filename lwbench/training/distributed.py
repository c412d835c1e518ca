"""Data-parallel training under ``torchrun``: every process takes its slice of the same global batch, the gradients
are averaged, and rank 0 alone writes.

    torchrun --nproc-per-node 2 -m lwbench run --method full --task traffic_signs --regime finetuned

Why not ``DistributedDataParallel``'s wrapper: lwbench's loss functions reach into the model (the encoder, a
head, LookWhere's selector) instead of calling its ``forward``, and DDP only reduces gradients of parameters used
through the wrapped forward. Averaging the gradients after ``backward`` (one all-reduce of the flattened
gradients, DDP's arithmetic without its bucketing) works for every method unchanged.

Every rank draws the same global batch from the same seeded stream and keeps its equal, contiguous share, so the
averaged gradient is the one-process gradient of the whole batch up to the order of float sums: the same run at
the same global batch, to float tolerance. A method that draws random numbers per sample (``random``'s patches,
DynamicViT's Gumbel noise) draws the same distribution but not the same numbers as one process. The process
group is gloo on CPU and NCCL on GPU; nothing here starts unless ``WORLD_SIZE`` > 1.

Resumption: rank 0 decides when to checkpoint (:func:`agree`), every rank hands it its RNG and loss state
(:func:`gather`) and rank 0 writes them all, so a run killed and resumed with the same number of processes ends
with the weights of an uninterrupted one, as in one process (``lwbench.training.loop``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from lwbench.errors import TrainingError


def init_from_env(device: str = "cpu") -> int:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), once; returns the world size.

    On CUDA the rank's GPU (``LOCAL_RANK``) is made current *before* joining and named to NCCL as ``device_id``, so
    NCCL forms its communicator at once, on that GPU, and a bad setup fails here rather than at the first collective.
    (Setting the device only after joining worked only because NCCL starts lazily: anything that started it
    earlier would have put every rank on GPU 0.)"""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if str(device).startswith("cuda"):
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(local)
            dist.init_process_group(backend="nccl", device_id=local)
        else:
            dist.init_process_group(backend="gloo")
    return world_size()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _collective_int(value: int) -> torch.Tensor:
    """A one-element int64 tensor on the device the process group's backend communicates from."""
    return torch.tensor([int(value)], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. "this stage is already finished", decided under rank 0's lock)."""
    if world_size() == 1:
        return flag
    t = _collective_int(flag)
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable) in rank order on rank 0, None on the others; ``[obj]`` in one process.
    A collective: every rank calls it, at the same point."""
    world = world_size()
    if world == 1:
        return [obj]
    out: list[Any] | None = [None] * world if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def shard(batch: Any, what: str = "batch") -> Any:
    """This rank's equal, contiguous share of every tensor in ``batch`` (nested tuples, lists, dicts)."""
    world, r = world_size(), rank()
    if world == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % world:
            raise TrainingError(f"{what} of {batch.shape[0]} does not split into {world} equal shares: use a batch "
                                f"size divisible by --nproc-per-node {world}")
        n = batch.shape[0] // world
        return batch[r * n:(r + 1) * n]
    if isinstance(batch, dict):
        return {k: shard(v, what) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard(v, what) for v in batch)
    return batch


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (a NaN loss on one rank must stop all of them, or the others
    would wait in the next all-reduce forever)."""
    if world_size() == 1:
        return flag
    t = _collective_int(flag)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's share of the mean of ``values`` over every rank's ``values``, and the global count.

    A loss that averages over a data-dependent subset of the batch (object cells, images with objects) is not
    the mean of per-rank means when the ranks' subsets differ in size. Returned is ``sum(values) * world / N``
    with ``N`` the global number of values, so that the gradient average (:func:`average_gradients`) gives
    exactly the one-process mean. In one process: ``values.mean()`` (0 with a graph when empty). Every rank must
    call it, in the same order (it is a collective)."""
    n = values.numel()
    world = world_size()
    if world == 1:  # exactly the one-process arithmetic (the shipped teachers are reproduced bit for bit)
        return (values.mean() if n else values.sum() * 0), n
    t = _collective_int(n)
    dist.all_reduce(t)
    n = int(t.item())
    if n == 0:
        return values.sum() * 0, 0
    return values.sum() * (world / n), n


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the ranks (one all-reduce of the flattened gradients)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


__all__ = ["init_from_env", "world_size", "rank", "is_main", "barrier", "agree", "any_rank", "gather", "shard",
           "mean_over_ranks", "average_gradients"]
