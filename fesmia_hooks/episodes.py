"""Episodes and label permutations: which canaries play support and query, and the null.

An episode draws ``shots + queries`` members and as many non-members from the canary pool
without replacement. Draws are made once per probe (seeded) and reused at every check, so that
successive checks differ only through the model, and so that one fixed set of label
permutations gives the joint null distribution of all the checks of a run
(``docs/science.md#run-level-test``).
"""

from __future__ import annotations

import torch

__all__ = ["EpisodePlan"]


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
        mem = torch.rand(episodes, num_members, generator=g).argsort(1)[:, :per_side]
        non = torch.rand(episodes, num_non_members, generator=g).argsort(1)[:, :per_side]
        non = non + num_members
        self.slots = torch.cat([mem[:, :shots], non[:, :shots], mem[:, shots:], non[:, shots:]], 1)
        n = num_members + num_non_members
        self.perms = torch.rand(permutations, n, generator=g).argsort(1)
        self.shots = shots
        self.queries = queries
        self.num_members = num_members
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

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
