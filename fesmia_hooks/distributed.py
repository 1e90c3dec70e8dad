"""Several processes, one report: shard the canary forward pass, gather the features.

Under ``torch.distributed`` (DDP through Lightning or torchrun) every rank holds the same
model replica. Rank ``r`` of ``W`` forwards only its share of the canary pool; the features
are then gathered with ``all_gather`` so that every rank holds the whole pool and computes
the same report with the same seed. The stop decision is therefore identical on all ranks
without a second round trip (Lightning still reduces it through its strategy).

Shards are padded to one size, so every rank runs the same number of forward batches: a
sharded model (FSDP), whose forward needs every rank, never waits on a rank that has
finished early.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

__all__ = [
    "agree_across_ranks",
    "agree_on_failure",
    "any_rank",
    "gather_rows",
    "is_distributed",
    "shard",
]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(n: int, rank: int, world: int) -> torch.Tensor:
    """Row indices of rank ``rank``'s share of ``n`` rows, padded to ``ceil(n / world)``.

    Padding repeats the last row; :func:`gather_rows` drops it again.

    Example:
        >>> shard(5, 0, 2).tolist(), shard(5, 1, 2).tolist()
        ([0, 1, 2], [3, 4, 4])
    """
    size = -(-n // world)
    rows = torch.arange(rank * size, (rank + 1) * size)
    return rows.clamp(max=n - 1)


def agree_on_failure(error: BaseException | None, device: torch.device) -> None:
    """Raise on every rank if the local work failed on any rank; return otherwise.

    A rank whose share of the forward pass failed must not leave the others waiting in the
    gather that follows: all ranks first agree, with one small ``all_reduce``, on whether
    anyone failed, and then all raise (the failing rank its own error, the others a
    :class:`~fesmia_hooks.ProbeError` naming no data).
    """
    from fesmia_hooks.exceptions import ProbeError

    flag = torch.tensor([0 if error is None else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(flag.item()):
        raise ProbeError("the check failed on another process; see that process's warning")


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """All ranks' padded shards (see :func:`shard`), concatenated in rank order, cut to ``n``."""
    world = dist.get_world_size()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)[:n]


def any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` OR-reduced over the processes of a distributed run (itself otherwise).

    Example:
        >>> any_rank(True, torch.device("cpu"))
        True
    """
    if not is_distributed():
        return flag
    if dist.get_backend() == "nccl" and device.type != "cuda":  # pragma: no cover
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def rank_zero_value(value: float, device: torch.device) -> float:
    """Rank zero's ``value`` on every rank (itself outside a distributed run).

    For readings that each rank takes on its own but that decisions read (an accountant's
    ε): every rank then decides on the same number. NaN travels as NaN.

    Example:
        >>> rank_zero_value(2.5, torch.device("cpu"))
        2.5
    """
    if not is_distributed():
        return value
    if dist.get_backend() == "nccl" and device.type != "cuda":  # pragma: no cover
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def agree_across_ranks(what: str, value: str, device: torch.device) -> None:
    """Raise on every rank, with one clear message, unless every rank holds the same ``value``.

    Ranks that probe different canary sets (or with different probe settings) would either
    abort inside a collective or compute different reports and decide differently. A hash
    of ``value`` is compared with two small ``all_reduce`` calls (its minimum and maximum),
    so every rank learns the outcome at once; no value leaves any rank.
    """
    from fesmia_hooks.exceptions import ConfigurationError

    digest = int.from_bytes(hashlib.blake2b(value.encode(), digest_size=7).digest(), "big")
    if dist.get_backend() == "nccl" and device.type != "cuda":  # pragma: no cover
        device = torch.device("cuda", torch.cuda.current_device())
    low = torch.tensor([digest], dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if int(low.item()) != int(high.item()):
        raise ConfigurationError(
            f"the processes of this run disagree on the {what} (rank {dist.get_rank()} of "
            f"{dist.get_world_size()}): give every rank the same canaries and probe"
        )
