"""Episodes and label permutations: which canaries play support and query, and the null.

An episode draws ``shots + queries`` members and as many non-members from the canary pool
without replacement. Draws are made once per probe (seeded) and reused at every check, so that
successive checks differ only through the model, and so that one fixed set of label
permutations gives the joint null distribution of all the checks of a run
(``docs/science.md#run-level-test``).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["EpisodePlan", "HalfPlan"]


class EpisodePlan:
    """Index tensors of a probe's episodes and of its label permutations.

    Pool positions ``0 .. num_members - 1`` are the members' *slots* and the rest the
    non-members'. Under the real labels slot ``i`` holds canary ``i``; under permutation ``b``
    it holds canary ``perms[b, i]``.

    Attributes:
        slots: ``[E, 2 * shots + 2 * queries]`` slot positions per episode, laid out as
            support members, support non-members, query members, query non-members.
        perms: ``[B, n]`` label permutations of the pool.

    Example:
        >>> plan = EpisodePlan(20, 20, shots=5, queries=10, episodes=4, permutations=9, seed=0)
        >>> plan.slots.shape, plan.perms.shape
        (torch.Size([4, 30]), torch.Size([9, 40]))
    """

    def __init__(
        self,
        num_members: int,
        num_non_members: int,
        *,
        shots: int,
        queries: int,
        episodes: int,
        permutations: int,
        seed: int,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        per_side = shots + queries
        mem = _draw(episodes, num_members, per_side, g)
        non = _draw(episodes, num_non_members, per_side, g) + num_members
        self.slots = _layout(mem, non, shots)
        n = num_members + num_non_members
        self.perms = torch.rand(permutations, n, generator=g).argsort(1)
        self.shots = shots
        self.queries = queries
        self.num_members = num_members
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._host: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def host(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(slots, perms, identity)`` as contiguous int64 host arrays, built once.

        ``identity`` is the ``[1, n]`` permutation that keeps the true labels.
        """
        if self._host is None:
            n = self.perms.shape[1]
            self._host = (np.ascontiguousarray(self.slots.numpy()),
                          np.ascontiguousarray(self.perms.numpy()),
                          np.arange(n, dtype=np.int64)[None])
        return self._host

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots, perms)`` on ``device``, moved once and cached."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (self.slots.to(device), self.perms.to(device))
        return self._cache[key]

    @property
    def query_is_member(self) -> torch.Tensor:
        """``[2 * queries]`` booleans: the query members come first."""
        flags = torch.zeros(2 * self.queries, dtype=torch.bool)
        flags[: self.queries] = True
        return flags


class HalfPlan:
    """Episodes drawn inside random half-pools of the canaries, for an interval over pools.

    How much would a check's reading move with *another* canary pool of the same data? Each
    of ``halves`` half-pools holds ``m`` members and ``m'`` non-members drawn without
    replacement (half of each side, at least ``shots + queries``), and ``episodes`` episodes
    are drawn inside it. For a mean over episodes, the variance of a half-pool's reading
    around the full pool's is ``sigma^2 (1/m - 1/n)``, which at ``m = n / 2`` is the
    variance ``sigma^2 / n`` of the full pool's reading across pools: the spread of the
    half-pools estimates the uncertainty a single pool leaves (``docs/science.md#intervals``).

    Attributes:
        slots: ``[halves * episodes, 2 * shots + 2 * queries]`` pool positions, laid out as
            :attr:`EpisodePlan.slots` (the first ``episodes`` rows are the first half-pool).
        scale: ``m / (n - m)`` of the members' side: the factor that turns the half-pools'
            variance into the full pool's (1 at exact halves; ``nan`` if no half fits).

    Example:
        >>> plan = HalfPlan(64, 64, shots=5, queries=15, halves=10, episodes=4, seed=0)
        >>> plan.slots.shape, plan.scale
        (torch.Size([40, 40]), 1.0)
    """

    def __init__(
        self,
        num_members: int,
        num_non_members: int,
        *,
        shots: int,
        queries: int,
        halves: int,
        episodes: int,
        seed: int,
    ) -> None:
        per_side = shots + queries
        self.halves, self.episodes = halves, episodes
        sizes = [max(per_side, n // 2) for n in (num_members, num_non_members)]
        self.fits = sizes[0] < num_members and sizes[1] < num_non_members
        self.scale = sizes[0] / (num_members - sizes[0]) if self.fits else float("nan")
        g = torch.Generator().manual_seed(seed + 7919)
        rows = []
        for _ in range(halves if self.fits else 0):
            mem = torch.randperm(num_members, generator=g)[: sizes[0]]
            non = torch.randperm(num_non_members, generator=g)[: sizes[1]] + num_members
            pick_m = _draw(episodes, sizes[0], per_side, g)
            pick_n = _draw(episodes, sizes[1], per_side, g)
            rows.append(_layout(mem[pick_m], non[pick_n], shots))
        width = 2 * per_side
        self.slots = torch.cat(rows) if rows else torch.empty(0, width, dtype=torch.long)
        self._cache: dict[str, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        """:attr:`slots` on ``device``, moved once and cached."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = self.slots.to(device)
        return self._cache[key]


def _draw(episodes: int, pool: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``[episodes, size]`` draws without replacement from ``range(pool)``."""
    return torch.rand(episodes, pool, generator=g).argsort(1)[:, :size]


def _layout(members: torch.Tensor, non_members: torch.Tensor, shots: int) -> torch.Tensor:
    """Rows of support members, support non-members, query members, query non-members."""
    return torch.cat(
        [members[:, :shots], non_members[:, :shots], members[:, shots:], non_members[:, shots:]],
        1,
    )
