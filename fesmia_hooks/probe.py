"""FeS-MIA: membership inference as a few-shot task on a canary set, read as Log-MIA."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fesmia_hooks._validation import choice, positive_int, probability
from fesmia_hooks.canaries import CanarySet
from fesmia_hooks.distributed import agree_on_failure, gather_rows, is_distributed, shard
from fesmia_hooks.episodes import EpisodePlan
from fesmia_hooks.exceptions import ConfigurationError
from fesmia_hooks.features import FeatureKind, Features, compute_features
from fesmia_hooks.guard import model_device
from fesmia_hooks.learners import LEARNERS, get_learner
from fesmia_hooks.logmia import batched_auc, batched_log_mia, chance_log_mia
from fesmia_hooks.report import TPR_FPRS, LeakageReport, LevelBands, mean_interval
from fesmia_hooks.sequential import permutation_p_values
from fesmia_hooks.signals import CLASSIFICATION_SIGNALS, SignalFn
from fesmia_hooks.text import SEQUENCE_SIGNALS

__all__ = ["FeSMIA"]

Method = Literal["simpleshot", "laplacianshot", "finetune", "threshold"]

#: Every signal name: the classification signals, then those only token sequences have.
SIGNAL_NAMES: tuple[str, ...] = CLASSIFICATION_SIGNALS + tuple(
    s for s in SEQUENCE_SIGNALS if s not in CLASSIFICATION_SIGNALS
)

# Elements of one gathered feature block; keeps the probe's extra memory near 8 MB.
_BLOCK_ELEMENTS = 2_000_000


class FeSMIA:
    """The FeS-MIA probe.

    One call to :meth:`evaluate` forwards the canary pool through the model (once, on its
    device, without touching training), draws ``episodes`` few-shot episodes of ``shots``
    members + ``shots`` non-members as support and ``queries`` + ``queries`` as query, solves
    them all at once with the chosen learner, and reads each query ranking on the Log-MIA
    scale. The mean over episodes is tested against ``permutations`` relabelings of the pool.

    Args:
        method: The few-shot learner: ``"simpleshot"``, ``"laplacianshot"``, ``"finetune"``
            or ``"threshold"`` (one signal, no learning; a baseline).
        shots: Members (and non-members) in each support set.
        queries: Members (and non-members) in each query set (``N`` of Log-MIA).
        episodes: Episodes per check.
        permutations: Label permutations of the significance test. The smallest p-value is
            ``1 / (permutations + 1)``.
        features: What the learners read: ``"signals"`` (per-sample signals from the logits),
            ``"embeddings"`` (outputs of ``embedding_layer``) or ``"both"``.
        signals: Which built-in signals to compute. Token-sequence canaries read each
            classification signal per token, averaged, and also know ``min_k``, ``zlib``
            and ``positions`` (see :mod:`fesmia_hooks.text`; ``positions`` is several
            columns, so list it last when ``method="threshold"`` picks a signal by name).
        embedding_layer: Name of the submodule (as in ``model.named_modules()``) to read.
        signal_fn: ``signal_fn(model, inputs, targets) -> Tensor[B, F]`` to replace the
            built-in signals, for models that are not classifiers.
        threshold_signal: For ``method="threshold"``: which signal ranks the canaries.
        learner_options: Extra keyword options of the learner (see
            :mod:`fesmia_hooks.learners`).
        alpha: Significance level of a single check (a monitor recalibrates it per run).
        bands: Where the qualitative levels start.
        batch_size: Canaries per forward pass.
        seed: Seed of the episode draws and permutations; same seed, same device, same
            inputs give the same report.

    Raises:
        ConfigurationError: On any argument outside its allowed range.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(8, 3)
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        >>> canaries = CanarySet(members=(x[:32], y[:32]), non_members=(x[32:], y[32:]))
        >>> probe = FeSMIA(shots=5, queries=15, episodes=50, permutations=99, seed=0)
        >>> report = probe.evaluate(model, canaries)
        >>> report.level.value, round(report.chance_strict, 3)
        ('none', 0.178)
    """

    def __init__(
        self,
        method: Method = "simpleshot",
        *,
        shots: int = 5,
        queries: int = 15,
        episodes: int = 100,
        permutations: int = 499,
        features: FeatureKind = "signals",
        signals: Sequence[str] = ("phi", "log_prob", "margin", "neg_entropy"),
        embedding_layer: str | None = None,
        signal_fn: SignalFn | None = None,
        threshold_signal: str = "phi",
        learner_options: Mapping[str, Any] | None = None,
        alpha: float = 0.05,
        bands: LevelBands | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        self.method = choice("method", method, LEARNERS)
        self.shots = positive_int("shots", shots)
        self.queries = positive_int("queries", queries)
        self.episodes = positive_int("episodes", episodes, minimum=2)
        self.permutations = positive_int("permutations", permutations)
        self.features: FeatureKind = choice(  # type: ignore[assignment]
            "features", features, ("signals", "embeddings", "both")
        )
        if isinstance(signals, str) or not signals:
            raise ConfigurationError(
                f"`signals` must be a non-empty sequence of signal names, got {signals!r}"
            )
        for name in signals:
            choice("signals", name, SIGNAL_NAMES)
        self.signals = tuple(signals)
        if features != "signals" and embedding_layer is None:
            raise ConfigurationError(
                f"features={features!r} needs `embedding_layer`, the name of the layer to read"
            )
        if signal_fn is not None and not callable(signal_fn):
            raise ConfigurationError(
                f"`signal_fn` must be callable, got {type(signal_fn).__name__}"
            )
        self.embedding_layer = embedding_layer
        self.signal_fn = signal_fn
        options = dict(learner_options or {})
        if self.method == "threshold":
            if signal_fn is None:
                choice("threshold_signal", threshold_signal, self.signals)
                options.setdefault("signal_index", self.signals.index(threshold_signal))
            if features != "signals":
                raise ConfigurationError(
                    f"method='threshold' reads one signal; features must be 'signals', "
                    f"got {features!r}"
                )
        self.threshold_signal = threshold_signal
        self._learner = get_learner(self.method, options)
        self.learner_options = options
        self.alpha = probability("alpha", alpha)
        self.bands = bands if bands is not None else LevelBands()
        self.batch_size = positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigurationError(f"`seed` must be an int, got {seed!r}")
        self.seed = seed
        self._plans: dict[tuple[int, int], EpisodePlan] = {}
        chance = chance_log_mia(self.queries)
        self.chance_strict, self.chance_relaxed = chance.strict, chance.relaxed

    def __repr__(self) -> str:
        return (
            f"FeSMIA(method={self.method!r}, shots={self.shots}, queries={self.queries}, "
            f"episodes={self.episodes}, permutations={self.permutations}, "
            f"features={self.features!r}, seed={self.seed})"
        )

    # ------------------------------------------------------------------ public
    def check_canaries(self, canaries: CanarySet) -> None:
        """Raise :class:`~fesmia_hooks.CanaryError` if ``canaries`` is too small for this probe."""
        canaries.require(self.shots + self.queries, who=f"FeSMIA(shots={self.shots}, "
                         f"queries={self.queries})")

    def features_of(self, model: nn.Module, canaries: CanarySet) -> Features:
        """Forward the canary pool and return its features (side-effect free).

        Inside a ``torch.distributed`` process group of several processes, each rank
        forwards its share of the pool and the features are gathered, so every rank holds
        them all (see :mod:`fesmia_hooks.distributed`).
        """
        options: dict[str, Any] = {
            "kind": self.features,
            "signals": self.signals,
            "embedding_layer": self.embedding_layer,
            "signal_fn": self.signal_fn,
            "batch_size": self.batch_size,
        }
        if not is_distributed():
            return compute_features(model, canaries, **options)
        n = len(canaries)
        rows = shard(n, dist.get_rank(), dist.get_world_size())
        local, error = None, None
        try:
            local = compute_features(model, canaries, rows=rows, **options)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it before gathering
            error = exc
        agree_on_failure(error, model_device(model))
        assert local is not None
        return Features(
            signals=None if local.signals is None else gather_rows(local.signals, n),
            embeddings=None if local.embeddings is None else gather_rows(local.embeddings, n),
        )

    def evaluate(
        self,
        model: nn.Module,
        canaries: CanarySet,
        *,
        step: int | None = None,
        epoch: int | None = None,
        check: int = 0,
    ) -> LeakageReport:
        """Run one privacy check of ``model`` on ``canaries``.

        Returns:
            The :class:`~fesmia_hooks.LeakageReport`; ``significant`` uses ``alpha``.
        """
        self.check_canaries(canaries)
        start = time.perf_counter()
        feats = self.features_of(model, canaries)
        matrix = feats.matrix()
        _sync(matrix)
        forward = time.perf_counter() - start
        report = self.attack(matrix, canaries.num_members, step=step, epoch=epoch, check=check)
        return report.with_updates(seconds_forward=forward)

    def attack(
        self,
        features: torch.Tensor,
        num_members: int,
        *,
        step: int | None = None,
        epoch: int | None = None,
        check: int = 0,
    ) -> LeakageReport:
        """The attack alone, on a ready ``[n, F]`` feature matrix (members first).

        Useful to test learners on synthetic features, or to attack features computed
        elsewhere (another process, a cached forward pass).
        """
        start = time.perf_counter()
        n = features.shape[0]
        plan = self._plan(num_members, n - num_members)
        slots, perms = plan.on(features.device)
        is_query_member = plan.query_is_member.to(features.device)
        s2 = 2 * self.shots

        scores = self._scores(features[slots], s2)  # [E, 2q]
        strict, relaxed = batched_log_mia(scores, is_query_member)
        auc = batched_auc(scores, is_query_member)
        null = self._null_statistic(features, slots, perms, is_query_member)
        pooled = _pooled_scores(scores, slots[:, s2:], n)

        strict_np, relaxed_np, auc_np = (t.double().cpu().numpy() for t in (strict, relaxed, auc))
        pooled_np = pooled.double().cpu().numpy()
        stat = float(relaxed_np.mean())
        obs_rank, _ = permutation_p_values(stat, null)
        p_value = obs_rank / (self.permutations + 1)
        significant = p_value <= self.alpha
        s_mean, s_lo, s_hi = mean_interval(strict_np)
        r_mean, r_lo, r_hi = mean_interval(relaxed_np)
        a_mean, a_lo, a_hi = mean_interval(auc_np)
        reading = s_mean if self.bands.on == "strict" else r_mean
        members = pooled_np[:num_members]
        non_members = pooled_np[num_members:]
        return LeakageReport(
            strict=s_mean, strict_low=s_lo, strict_high=s_hi,
            relaxed=r_mean, relaxed_low=r_lo, relaxed_high=r_hi,
            chance_strict=self.chance_strict, chance_relaxed=self.chance_relaxed,
            auc=a_mean, auc_low=a_lo, auc_high=a_hi,
            tpr_at_fpr=_tpr_at_fpr(members, non_members),
            p_value=p_value, p_threshold=self.alpha, significant=significant,
            level=self.bands.classify(reading, significant=significant),
            method=self.method, shots=self.shots, queries=self.queries,
            episodes=self.episodes, permutations=self.permutations,
            seconds_forward=0.0, seconds_attack=time.perf_counter() - start,
            check=check, step=step, epoch=epoch,
            member_scores=members[np.isfinite(members)],
            non_member_scores=non_members[np.isfinite(non_members)],
            null_statistics=null.cpu(),
        )  # fmt: skip

    # ------------------------------------------------------------------ internals
    def _plan(self, num_members: int, num_non_members: int) -> EpisodePlan:
        key = (num_members, num_non_members)
        if key not in self._plans:
            self._plans[key] = EpisodePlan(
                num_members,
                num_non_members,
                shots=self.shots,
                queries=self.queries,
                episodes=self.episodes,
                permutations=self.permutations,
                seed=self.seed,
            )
        return self._plans[key]

    def _scores(self, gathered: torch.Tensor, s2: int) -> torch.Tensor:
        """Learner scores of episodes ``gathered`` = ``[G, 2s + 2q, F]``."""
        return self._learner(gathered[:, :s2], gathered[:, s2:], self.shots)

    def _null_statistic(
        self,
        features: torch.Tensor,
        slots: torch.Tensor,
        perms: torch.Tensor,
        is_query_member: torch.Tensor,
    ) -> torch.Tensor:
        """Mean relaxed Log-MIA over episodes under each label permutation, ``[B]``."""
        per_perm = slots.numel() * features.shape[1]
        chunk = max(1, _BLOCK_ELEMENTS // max(per_perm, 1))
        out = []
        s2 = 2 * self.shots
        e, width = slots.shape
        for start in range(0, perms.shape[0], chunk):
            block = perms[start : start + chunk]  # [b, n]
            pool_idx = block[:, slots]  # [b, E, width]
            gathered = features[pool_idx.reshape(-1, width)]  # [b*E, width, F]
            scores = self._scores(gathered, s2)
            _, relaxed = batched_log_mia(scores, is_query_member)
            out.append(relaxed.reshape(block.shape[0], e).mean(1))
        return torch.cat(out)


def _pooled_scores(scores: torch.Tensor, query_slots: torch.Tensor, n: int) -> torch.Tensor:
    """Mean score of each canary over the episodes where it was a query (NaN if never)."""
    total = torch.zeros(n, dtype=torch.float64, device=scores.device)
    count = torch.zeros(n, dtype=torch.float64, device=scores.device)
    flat = query_slots.reshape(-1)
    total.index_add_(0, flat, scores.reshape(-1).double())
    count.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    return total / count.where(count > 0, torch.full_like(count, float("nan")))


def _tpr_at_fpr(members: np.ndarray, non_members: np.ndarray) -> dict[float, float]:
    """TPR of the pooled scores at each of :data:`TPR_FPRS` (ties resolved as sklearn does)."""
    m = members[np.isfinite(members)]
    nm = non_members[np.isfinite(non_members)]
    if len(m) == 0 or len(nm) == 0:
        return {f: math.nan for f in TPR_FPRS}
    thresholds = np.unique(np.concatenate([m, nm]))[::-1]
    tpr = np.array([(m >= t).mean() for t in thresholds])
    fpr = np.array([(nm >= t).mean() for t in thresholds])
    out = {}
    for f in TPR_FPRS:
        ok = fpr <= f + 1e-12
        out[f] = float(tpr[ok].max()) if ok.any() else 0.0
    return out


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
