"""FeS-MIA: membership inference as a few-shot task on a canary set, read as Log-MIA.

The probe *measures*: :meth:`FeSMIA.measure` returns a
:class:`~fesmia_hooks.measurement.Measurement` (readings, intervals, pooled scores and the
permutation null). Significance and levels are the run's
:class:`~fesmia_hooks.Calibration`'s business. Anything with the three methods of
:class:`Probe` can stand in for :class:`FeSMIA` in a monitor. See ``docs/science.md#fes-mia``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fesmia_hooks._validation import choice, positive_int
from fesmia_hooks.calibration import DEFAULT_STATISTIC, EPISODE_STATISTIC, alarm_components
from fesmia_hooks.canaries import Canaries
from fesmia_hooks.distributed import agree_on_failure, gather_rows, is_distributed, shard
from fesmia_hooks.episodes import EpisodePlan, HalfPlan
from fesmia_hooks.exceptions import ConfigurationError
from fesmia_hooks.features import FeatureKind, Features, FeatureSpec, compute_features
from fesmia_hooks.fused import (
    EpisodeReadings,
    centroid_readings,
    host_features,
    signal_mean_differences,
    simpleshot_readings,
)
from fesmia_hooks.guard import model_device, random_streams_forked
from fesmia_hooks.learners import Learner, get_learner, learner_name, simpleshot
from fesmia_hooks.logmia import chance_counts, chance_log_mia, relaxed_false_positives
from fesmia_hooks.measurement import (
    CENTROID_STATISTICS,
    EPISODE_STATISTICS,
    POOL_STATISTICS,
    STATISTICS,
    Measurement,
    canary_intervals,
    episode_statistics,
    mean_interval,
    pooled_scores,
    statistics_of,
    tpr_at_fpr,
)
from fesmia_hooks.report import LeakageReport, LevelBands
from fesmia_hooks.signals import CLASSIFICATION_SIGNALS, SignalFn
from fesmia_hooks.text import SEQUENCE_SIGNALS, SequenceSignals

__all__ = ["AUTO_PERMUTATIONS", "FeSMIA", "Probe"]

Method = Literal["simpleshot", "laplacianshot", "finetune", "threshold"]

#: Every signal name: the classification signals, then those only token sequences have.
SIGNAL_NAMES: tuple[str, ...] = CLASSIFICATION_SIGNALS + tuple(
    s for s in SEQUENCE_SIGNALS if s not in CLASSIFICATION_SIGNALS
)



@runtime_checkable
class Probe(Protocol):
    """What a monitor needs of a probe; :class:`FeSMIA` is one.

    ``measure`` must be side-effect free on the model (see ``docs/science.md#side-effects``)
    and return the statistic of the run-level test with its values under permutations that
    are the same at every check of a run.
    """

    def check_canaries(self, canaries: Canaries) -> None:
        """Raise a :class:`~fesmia_hooks.CanaryError` if the canaries cannot be probed."""

    def measure(self, model: nn.Module, canaries: Canaries) -> Measurement:
        """Measure ``model``'s leakage on ``canaries``."""

    def settings(self) -> dict[str, Any]:
        """The probe's configuration as plain values (written to a run's history)."""


# Elements of one gathered feature block; keeps the probe's extra memory near 8 MB.
_BLOCK_ELEMENTS = 2_000_000
#: Fewest and most label permutations ``permutations="auto"`` draws.
AUTO_PERMUTATIONS = (999, 4999)
# Half-pools, and episodes in each, of the interval over canary draws.
_HALVES, _HALF_EPISODES = 200, 20


class FeSMIA:
    """The FeS-MIA probe.

    One call to :meth:`evaluate` forwards the canary pool through the model (once, on its
    device, without touching training), draws ``episodes`` few-shot episodes of ``shots``
    members + ``shots`` non-members as support and ``queries`` + ``queries`` as query, solves
    them all at once with the chosen learner, and reads each query ranking on the Log-MIA
    scale. The mean over episodes is tested against ``permutations`` relabelings of the pool.

    Args:
        method: The few-shot learner: ``"simpleshot"``, ``"laplacianshot"``, ``"finetune"``,
            ``"threshold"`` (one signal, no learning; a baseline), a name registered with
            :func:`~fesmia_hooks.learners.register_learner`, or a learner function.
        shots: Members (and non-members) in each support set.
        queries: Members (and non-members) in each query set (``N`` of Log-MIA).
        episodes: Episodes per check.
        permutations: Label permutations of the significance test, or ``"auto"``: as many
            as give every expected check of the run its own chance to alarm (``horizon /
            alpha``, between :data:`AUTO_PERMUTATIONS` bounds; a monitor sets them when a run
            starts, 999 until then). The smallest p-value is ``1 / (permutations + 1)``.
        features: What the learners read: ``"signals"`` (per-sample signals from the logits),
            ``"embeddings"`` (outputs of ``embedding_layer``) or ``"both"``.
        signals: Which built-in signals to compute. Token-sequence canaries read each
            classification signal per token, averaged, and also know ``min_k``, ``zlib``
            and ``positions`` (see :mod:`fesmia_hooks.text`; ``positions`` is several
            columns, so list it last when ``method="threshold"`` picks a signal by name).
        embedding_layer: Name of the submodule (as in ``model.named_modules()``) to read.
        signal_fn: ``signal_fn(model, inputs, targets) -> Tensor[B, F]`` to replace the
            built-in signals, for models that are not classifiers.
        threshold_signal: For ``method="threshold"``: which signal ranks the canaries. It
            is also the label-free score of the DP audit's ε lower bound, for canaries
            included by independent coins (:meth:`~fesmia_hooks.CanarySet.for_audit`).
        learner_options: Extra keyword options of the learner (see
            :mod:`fesmia_hooks.learners`).
        batch_size: Canaries per forward pass.
        seed: Seed of the episode draws and permutations; same seed, same device, same
            inputs give the same report.
        trajectory: Also give the learners each canary's change in features since each of
            the last ``trajectory`` checks of the run (0: the current check only). A
            training-time monitor sees every check: members' signals may move differently
            over training than non-members'. The features stay label-free, so the
            permutation test is unchanged. Off by default: see BENCHMARKS.md.

    Raises:
        ConfigurationError: On any argument outside its allowed range.

    Example:
        >>> import torch
        >>> from fesmia_hooks import CanarySet
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(8, 3)
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        >>> canaries = CanarySet(members=(x[:32], y[:32]), non_members=(x[32:], y[32:]))
        >>> probe = FeSMIA(shots=5, queries=15, episodes=50, permutations=99, seed=0)
        >>> m = probe.measure(model, canaries)
        >>> round(m.chance_strict, 3), m.null.shape  # 99 permutations x 7 statistics
        (0.178, torch.Size([99, 7]))
        >>> probe.evaluate(model, canaries).level.value  # one check read on its own
        'none'

    """

    def __init__(
        self,
        method: Method | str | Learner = "simpleshot",
        *,
        shots: int = 5,
        queries: int = 15,
        episodes: int = 100,
        permutations: int | Literal["auto"] = "auto",
        features: FeatureKind = "signals",
        signals: Sequence[str] = ("phi", "log_prob", "margin", "neg_entropy"),
        embedding_layer: str | None = None,
        signal_fn: SignalFn | None = None,
        threshold_signal: str = "phi",
        learner_options: Mapping[str, Any] | None = None,
        batch_size: int = 256,
        seed: int = 0,
        trajectory: int = 0,
    ) -> None:
        self._learner_fn = method
        self.method = learner_name(method)
        self.shots = positive_int("shots", shots)
        self.queries = positive_int("queries", queries)
        self.episodes = positive_int("episodes", episodes, minimum=2)
        self.auto_permutations = permutations == "auto"
        self.permutations = (
            AUTO_PERMUTATIONS[0] if self.auto_permutations
            else positive_int("permutations", permutations)
        )
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
        self.threshold_signal = threshold_signal
        if self.method == "threshold":
            column = self._threshold_column()
            if column is not None:
                options.setdefault("signal_index", column)
            if features != "signals":
                raise ConfigurationError(
                    f"method='threshold' reads one signal; features must be 'signals', "
                    f"got {features!r}"
                )
        self._learner = get_learner(method, options)
        # The default learner runs through the fused loop (fesmia_hooks.fused).
        self._fused = self._learner.func is simpleshot and not self._learner.keywords
        self.null_statistics: frozenset[str] = frozenset()
        self.use_statistics(alarm_components(self.default_statistic))
        self.learner_options = options
        self.batch_size = positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigurationError(f"`seed` must be an int, got {seed!r}")
        self.seed = seed
        self.trajectory = positive_int("trajectory", trajectory, minimum=0)
        self._past: list[torch.Tensor] = []  # the last `trajectory` checks' raw features
        self._plans: dict[tuple[int, int], EpisodePlan] = {}
        self._half_plans: dict[tuple[int, int], HalfPlan] = {}
        chance = chance_log_mia(self.queries)
        self.chance_strict, self.chance_relaxed = chance.strict, chance.relaxed
        self.chance_counts = chance_counts(self.queries)

    def __repr__(self) -> str:
        return (
            f"FeSMIA(method={self.method!r}, shots={self.shots}, queries={self.queries}, "
            f"episodes={self.episodes}, permutations={self.permutations}, "
            f"features={self.features!r}, seed={self.seed})"
        )

    def settings(self) -> dict[str, Any]:
        """The probe's configuration as plain values (written at the top of a history).

        Example:
            >>> FeSMIA().settings()["permutations"], FeSMIA(permutations=99).settings()["auto"]
            (999, False)
        """
        return {
            "method": self.method,
            "shots": self.shots,
            "queries": self.queries,
            "episodes": self.episodes,
            "permutations": self.permutations,
            "auto": self.auto_permutations,
            "features": self.features,
            "signals": list(self.signals),
            "embedding_layer": self.embedding_layer,
            "custom_signal_fn": self.signal_fn is not None,
            "signal_fn": _signal_fn_settings(self.signal_fn),
            "seed": self.seed,
            "trajectory": self.trajectory,
        }

    def set_permutations(self, permutations: int) -> None:
        """Use ``permutations`` label permutations from now on (a new set is drawn).

        A monitor calls it when a run starts, for a probe built with
        ``permutations="auto"``; never in the middle of a run, whose test needs the same
        permutations at every check.
        """
        permutations = positive_int("permutations", permutations)
        if permutations != self.permutations:
            self.permutations = permutations
            self._plans.clear()

    @property
    def default_statistic(self) -> str:
        """The alarm statistic this probe's checks are tested on unless told otherwise.

        :data:`~fesmia_hooks.calibration.DEFAULT_STATISTIC` when the probe reads signals
        (they give the label-free ``signal_mean`` score); the episodes'
        :data:`~fesmia_hooks.calibration.EPISODE_STATISTIC` for embeddings alone.

        Example:
            >>> embeddings = FeSMIA(features="embeddings", embedding_layer="fc")
            >>> FeSMIA().default_statistic, embeddings.default_statistic
            ('signal_mean+centroid_strict', 'auc+strict')
        """
        return EPISODE_STATISTIC if self.features == "embeddings" else DEFAULT_STATISTIC

    def use_statistics(self, names: Sequence[str]) -> None:
        """Compute only the statistics ``names`` under the permutations (others read NaN).

        By default a probe computes those of its :attr:`default_statistic`; testing another
        on its measurements needs this call first (the test refuses columns it was not
        given).

        ``names`` are of :data:`~fesmia_hooks.measurement.STATISTICS`; the columns of
        :attr:`Measurement.null` of the others read NaN.

        A monitor calls it when a run starts, with the statistics its alarm reads: the
        episodes' statistics cost ``B`` times the episodes of a check under the
        permutations, the whole pool's (the default alarm's) a small fraction of that.

        Example:
            >>> probe = FeSMIA(permutations=9)
            >>> probe.use_statistics(["auc", "strict"])
            >>> sorted(probe.null_statistics)
            ['auc', 'relaxed', 'strict']
            >>> probe.use_statistics(["centroid_auc", "signal_mean"])
            >>> sorted(probe.null_statistics)
            ['centroid_auc', 'centroid_strict', 'signal_mean']
        """
        self.null_statistics = _computed_together(names)

    # ------------------------------------------------------------------ public
    def check_canaries(self, canaries: Canaries) -> None:
        """Raise :class:`~fesmia_hooks.CanaryError` if ``canaries`` is too small for this probe."""
        canaries.require(self.shots + self.queries, who=f"FeSMIA(shots={self.shots}, "
                         f"queries={self.queries})")

    def features_of(self, model: nn.Module, canaries: Canaries) -> Features:
        """Forward the canary pool and return its features (side-effect free).

        Inside a ``torch.distributed`` process group of several processes, each rank
        forwards its share of the pool and the features are gathered, so every rank holds
        them all (see :mod:`fesmia_hooks.distributed`).
        """
        spec = FeatureSpec(
            kind=self.features,
            signals=self.signals,
            embedding_layer=self.embedding_layer,
            signal_fn=self.signal_fn,
            batch_size=self.batch_size,
        )
        if not is_distributed():
            return compute_features(model, canaries, spec)
        n = len(canaries)
        rows = shard(n, dist.get_rank(), dist.get_world_size())
        local, error = None, None
        try:
            local = compute_features(model, canaries, spec, rows=rows)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it before gathering
            error = exc
        agree_on_failure(error, model_device(model))
        assert local is not None
        return Features(
            signals=None if local.signals is None else gather_rows(local.signals, n),
            embeddings=None if local.embeddings is None else gather_rows(local.embeddings, n),
        )

    def measure(
        self, model: nn.Module, canaries: Canaries, *, statistics: Sequence[str] | None = None
    ) -> Measurement:
        """Run one privacy check of ``model`` on ``canaries``: what the attack finds.

        Args:
            model: The model to check (left untouched).
            canaries: The canary pool.
            statistics: The statistics to compute under the permutations (see
                :meth:`use_statistics`); ``None``: the probe's :attr:`null_statistics`.

        Returns:
            The :class:`~fesmia_hooks.measurement.Measurement`; a monitor's
            :class:`~fesmia_hooks.Calibration` reads it into a report.
        """
        return self.prepare(model, canaries, statistics=statistics)()

    def prepare(
        self, model: nn.Module, canaries: Canaries, *, statistics: Sequence[str] | None = None
    ) -> Callable[[], Measurement]:
        """The part of a check that needs the model, now; the attack, as a function for later.

        Forwards the canaries (on the model's device) and, for the default learner, copies
        the features to the host: the one device sync of a check. The returned function
        runs the attack on those features only, so it may run on another thread while
        training goes on (``PrivacyMonitor(asynchronous=True)``); :meth:`measure` calls it
        at once.

        Raises:
            CanaryError: When ``canaries`` is too small for this probe.
        """
        self.check_canaries(canaries)
        # Fixed now: a later use_statistics (another monitor, a pre-flight check) cannot
        # change what an attack running on another thread computes.
        wanted = self.null_statistics if statistics is None else _computed_together(statistics)
        start = time.perf_counter()
        features = self.features_of(model, canaries)
        audit = self._audit_scores(features) if canaries.random_inclusion else np.empty(0)
        oriented = self._with_trajectory(features)
        matrix = oriented.matrix()
        signal_columns = 0 if oriented.signals is None else int(oriented.signals.shape[1])
        if self._fused:  # the attack reads host memory: one copy, one sync
            matrix = matrix.detach().to(device="cpu", dtype=torch.float64)
        else:
            _sync(matrix)
        forward = time.perf_counter() - start
        num_members = canaries.num_members

        def attack() -> Measurement:
            if self._fused:  # draws no random numbers (its plans have their own generators)
                return replace(self.attack(matrix, num_members, signal_columns=signal_columns,
                                           statistics=wanted),
                               seconds_forward=forward, audit_scores=audit)
            # A learner of the user's may draw random numbers: training's streams stay its own.
            with random_streams_forked(_cuda_indices(matrix)):
                measured = self.attack(matrix, num_members, signal_columns=signal_columns,
                                       statistics=wanted)
            return replace(measured, seconds_forward=forward, audit_scores=audit)

        return attack

    @property
    def runs_off_thread(self) -> bool:
        """Whether :meth:`prepare`'s attack may run beside training.

        True for the fused default learner, which draws no random numbers and runs no code
        of the user's.
        """
        return self._fused

    def evaluate(
        self,
        model: nn.Module,
        canaries: Canaries,
        *,
        alpha: float = 0.05,
        bands: LevelBands | None = None,
    ) -> LeakageReport:
        """One check read on its own: significant when its p-value is at most ``alpha``.

        For a check that is one of many in a training run, use a
        :class:`~fesmia_hooks.PrivacyMonitor`: it keeps the false-alarm rate per *run*.
        """
        from fesmia_hooks.calibration import Calibration

        statistic = self.default_statistic
        measured = self.measure(model, canaries, statistics=alarm_components(statistic))
        return Calibration(alpha, bands=bands, statistic=statistic).single_check(measured)

    def attack(
        self,
        features: torch.Tensor,
        num_members: int,
        *,
        signal_columns: int | None = None,
        statistics: Sequence[str] | None = None,
    ) -> Measurement:
        """The attack alone, on a ready ``[n, F]`` feature matrix (members first).

        Useful to test learners on synthetic features, or to attack features computed
        elsewhere (another process, a cached forward pass).

        Args:
            features: ``[n, F]`` label-free features, members first.
            num_members: Members among the ``n`` rows.
            signal_columns: How many leading columns are signals oriented "higher = more
                member-like" (the ``signal_mean`` statistic averages them). ``None``: all
                of them for a probe that reads signals only (``features="signals"``), none
                otherwise.
            statistics: The statistics to compute under the permutations; ``None``: the
                probe's :attr:`null_statistics`.
        """
        start = time.perf_counter()
        wanted = self.null_statistics if statistics is None else _computed_together(statistics)
        n = features.shape[0]
        plan = self._plan(num_members, n - num_members)
        halves = self._halves(num_members, n - num_members)
        if self._fused:
            observed, null, in_halves, scores = self._attack_fused(features, plan, halves,
                                                                   wanted)
        else:
            observed, null, in_halves, scores = self._attack_batched(features, plan, halves,
                                                                     wanted)
        if signal_columns is None:
            signal_columns = features.shape[1] if self.features == "signals" else 0
        pool_observed, pool_null = self._pool_statistics(features, plan, signal_columns,
                                                         wanted)
        null = torch.cat([null, pool_null], dim=1)
        s2 = 2 * self.shots
        pooled = pooled_scores(scores, plan.slots[:, s2:], n)[0].cpu().numpy()

        def episodes_of(stats: dict[str, torch.Tensor], key: str) -> np.ndarray:
            if key not in stats:
                return np.empty((0, 0))
            return stats[key].double().cpu().numpy()

        # The three readings, each in [0, 1]: their intervals in one pass.
        keys = {"strict": "strict_episodes", "relaxed": "relaxed_episodes",
                "auc": "auc_episodes"}
        full = np.stack([episodes_of(observed, key)[0] for key in keys.values()])
        halves_of = [episodes_of(in_halves, key) for key in keys.values()]
        means = [mean_interval(row) for row in full]
        intervals = canary_intervals(
            np.array([m[0] for m in means]), full,
            np.stack(halves_of) if all(h.size for h in halves_of) else np.empty(0),
            halves.scale)
        readings: dict[str, Any] = {}
        for name, (mean, ep_low, ep_high), (low, high) in zip(keys, means, intervals,
                                                              strict=True):
            readings.update({name: mean, f"{name}_low": low, f"{name}_high": high,
                             f"{name}_episode_low": ep_low, f"{name}_episode_high": ep_high})
        members, non_members = pooled[:num_members], pooled[num_members:]
        return Measurement(
            **readings,
            chance_strict=self.chance_strict, chance_relaxed=self.chance_relaxed,
            tpr_at_fpr=tpr_at_fpr(members, non_members),
            members_named=float(observed["tp_strict"].double().mean()),
            chance_members_named=self.chance_counts[0],
            members_named_relaxed=float(observed["tp_relaxed"].double().mean()),
            chance_members_named_relaxed=self.chance_counts[1],
            statistics={**{k: float(observed[k][0]) for k in EPISODE_STATISTICS},
                        **pool_observed},
            null=null.cpu(),
            method=self.method, shots=self.shots, queries=self.queries,
            episodes=self.episodes, permutations=self.permutations,
            seconds_attack=time.perf_counter() - start,
            member_scores=members[np.isfinite(members)],
            non_member_scores=non_members[np.isfinite(non_members)],
        )  # fmt: skip

    def _audit_scores(self, features: Features) -> np.ndarray:
        """``[n]`` the label-free score of the DP audit: the ``threshold_signal`` column.

        One signal of the model's output per canary, as it is (no learner, no labels); the
        first column of a custom ``signal_fn``. Empty without signals.
        """
        if features.signals is None:
            return np.empty(0)
        column = 0
        if self.signal_fn is None and self.threshold_signal in self.signals:
            column = self.signals.index(self.threshold_signal)
        elif isinstance(self.signal_fn, SequenceSignals):
            column = self._threshold_column() or 0
        return features.signals[:, column].detach().to("cpu", torch.float64).numpy()

    def _threshold_column(self) -> int | None:
        """The column of :attr:`threshold_signal`; ``None`` for a custom ``signal_fn``.

        With :class:`~fesmia_hooks.text.SequenceSignals` it is the column of that signal,
        or the first when the default (``"phi"``, not a sequence signal) is left as it is.

        Raises:
            ConfigurationError: On a signal the probe does not compute.
        """
        if self.signal_fn is None:
            choice("threshold_signal", self.threshold_signal, self.signals)
            return self.signals.index(self.threshold_signal)
        if not isinstance(self.signal_fn, SequenceSignals):
            return None
        if self.threshold_signal == "phi" and "phi" not in self.signal_fn.names:
            return 0
        return self.signal_fn.column_of(self.threshold_signal)

    def start_run(self) -> None:
        """Forget the features of earlier checks (a monitor calls it when a run starts)."""
        self._past = []

    # ------------------------------------------------------------------ internals
    def _attack_fused(
        self, features: torch.Tensor, plan: EpisodePlan, halves: HalfPlan,
        wanted: frozenset[str],
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """SimpleShot through one fused loop for the true labels, permutations and halves.

        The features are copied to the host once (a single device sync on CUDA).
        """
        x = host_features(features)
        slots, perms, identity = plan.host()
        flags = plan.query_is_member.numpy()
        common = {"shots": self.shots, "relaxed_fp": relaxed_false_positives(len(flags)),
                  "num_members": plan.num_members}
        seen = simpleshot_readings(x, slots, identity, flags, keep_scores=True, **common)
        observed = _statistics(seen, len(flags) // 2)
        if wanted & set(EPISODE_STATISTICS):
            null_readings = simpleshot_readings(
                x, slots, perms, flags, pooled="pooled_auc" in wanted, **common)
            null = _stack(_statistics(null_readings, len(flags) // 2))
        else:  # the alarm reads none of them: no episode is solved under the permutations
            null = _unused(perms.shape[0])
        in_halves: dict[str, torch.Tensor] = {}
        if halves.fits:
            half = simpleshot_readings(x, halves.slots.numpy(), identity, flags, pooled=False,
                                       **common)
            shape = (halves.halves, halves.episodes)
            in_halves = statistics_of(*(torch.from_numpy(a).reshape(shape) for a in
                                        (half.tp_strict, half.tp_relaxed, half.auc)),
                                      len(flags) // 2)
        assert seen.scores is not None
        return observed, null, in_halves, torch.from_numpy(seen.scores[0])

    def _attack_batched(
        self, features: torch.Tensor, plan: EpisodePlan, halves: HalfPlan,
        wanted: frozenset[str],
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Any learner: episodes scored in batches on the features' device, then read."""
        n = features.shape[0]
        slots, perms = plan.on(features.device)
        is_query_member = plan.query_is_member.to(features.device)
        s2 = 2 * self.shots
        scores = self._scores(features[slots], s2)  # [E, 2q]
        observed = episode_statistics(scores[None], is_query_member, slots[:, s2:],
                                      plan.num_members, n)
        if wanted & set(EPISODE_STATISTICS):
            null = self._null_statistics(features, slots, perms, is_query_member,
                                         plan.num_members)
        else:
            null = _unused(perms.shape[0])
        in_halves: dict[str, torch.Tensor] = {}
        if halves.fits:
            half_slots = halves.on(features.device)
            half_scores = self._scores(features[half_slots], s2)
            in_halves = episode_statistics(
                half_scores.reshape(halves.halves, halves.episodes, -1), is_query_member,
                half_slots[: halves.episodes, s2:], plan.num_members, n, pooled=False,
            )
        return observed, null, in_halves, scores

    def _pool_statistics(
        self, features: torch.Tensor, plan: EpisodePlan, signal_columns: int,
        wanted: frozenset[str],
    ) -> tuple[dict[str, float], torch.Tensor]:
        """The whole pool's statistics: observed, and ``[B, 3]`` under the permutations.

        Columns the alarm does not read are NaN under the permutations; ``signal_mean`` is
        NaN throughout without oriented signal columns.
        """
        x = host_features(features)
        _, perms, identity = plan.host()
        m = plan.num_members
        denom = math.log1p(m)

        def centroid(rows: np.ndarray, with_auc: bool = True) -> np.ndarray:
            r = centroid_readings(x, rows, num_members=m, relaxed_fp=0, with_auc=with_auc)
            return np.stack([np.log1p(r.tp_strict.astype(np.float64)) / denom, r.auc], axis=1)

        def signal(rows: np.ndarray) -> np.ndarray:
            if signal_columns <= 0:
                return np.full((rows.shape[0], 1), np.nan)
            return signal_mean_differences(x[:, :signal_columns], rows, m)[:, None]

        observed_row = np.concatenate([centroid(identity), signal(identity)], axis=1)[0]
        observed = dict(zip(POOL_STATISTICS, (float(v) for v in observed_row), strict=True))
        nan = np.full((perms.shape[0], 1), np.nan)
        null = np.concatenate([
            centroid(perms, "centroid_auc" in wanted) if wanted & set(CENTROID_STATISTICS)
            else np.hstack([nan, nan]),
            signal(perms) if "signal_mean" in wanted else nan,
        ], axis=1)
        return observed, torch.from_numpy(np.ascontiguousarray(null))

    # ------------------------------------------------------------------ internals
    def _with_trajectory(self, features: Features) -> Features:
        """``features`` with their changes since each of the last ``trajectory`` checks."""
        if not self.trajectory or features.signals is None:
            return features
        now = features.signals
        past = [p for p in self._past if p.shape == now.shape and p.device == now.device]
        changes = [now - p for p in past] + [torch.zeros_like(now)] * (
            self.trajectory - len(past)
        )
        self._past = [now.detach().clone(), *past][: self.trajectory]
        return Features(signals=torch.cat([now, *changes], dim=1),
                        embeddings=features.embeddings)

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

    def _halves(self, num_members: int, num_non_members: int) -> HalfPlan:
        key = (num_members, num_non_members)
        if key not in self._half_plans:
            self._half_plans[key] = HalfPlan(
                num_members,
                num_non_members,
                shots=self.shots,
                queries=self.queries,
                halves=_HALVES,
                episodes=_HALF_EPISODES,
                seed=self.seed,
            )
        return self._half_plans[key]

    def _scores(self, gathered: torch.Tensor, s2: int) -> torch.Tensor:
        """Learner scores of episodes ``gathered`` = ``[G, 2s + 2q, F]``."""
        return self._learner(gathered[:, :s2], gathered[:, s2:], self.shots)

    def _null_statistics(
        self,
        features: torch.Tensor,
        slots: torch.Tensor,
        perms: torch.Tensor,
        is_query_member: torch.Tensor,
        num_members: int,
    ) -> torch.Tensor:
        """The statistics of :data:`EPISODE_STATISTICS` under each label permutation, ``[B, K]``."""
        per_perm = slots.numel() * features.shape[1]
        chunk = max(1, _BLOCK_ELEMENTS // max(per_perm, 1))
        out = []
        s2 = 2 * self.shots
        e, width = slots.shape
        n = features.shape[0]
        for start in range(0, perms.shape[0], chunk):
            block = perms[start : start + chunk]  # [b, n]
            pool_idx = block[:, slots]  # [b, E, width]
            gathered = features[pool_idx.reshape(-1, width)]  # [b*E, width, F]
            scores = self._scores(gathered, s2).reshape(block.shape[0], e, -1)
            stats = episode_statistics(scores, is_query_member, slots[:, s2:], num_members, n)
            out.append(_stack(stats))
        return torch.cat(out)


def _computed_together(names: Sequence[str]) -> frozenset[str]:
    """``names`` with the statistics that come from the same pass (each name checked).

    Names are of :data:`~fesmia_hooks.measurement.STATISTICS`. Relaxed, strict and the
    episode AUC come together (the pooled AUC is extra); the AUC of the pool's centroid
    ranking brings its strict count along, not the other way round (the count alone costs
    ``O(n)`` per permutation, the AUC ``O(m (n - m))``).
    """
    for name in names:
        choice("statistic", name, STATISTICS)
    wanted = frozenset(names)
    if wanted & {"relaxed", "strict", "auc"}:
        wanted |= {"relaxed", "strict", "auc"}
    if "centroid_auc" in wanted:
        wanted |= {"centroid_strict"}
    return wanted


def _signal_fn_settings(signal_fn: Any) -> Any:
    """A ``signal_fn`` as plain values: its signals, or a custom function's name."""
    if signal_fn is None:
        return None
    if isinstance(signal_fn, SequenceSignals):
        return signal_fn.settings()
    return getattr(signal_fn, "__qualname__", type(signal_fn).__qualname__)


def _statistics(readings: EpisodeReadings, query_members: int) -> dict[str, torch.Tensor]:
    """:func:`statistics_of` the fused loop's readings."""
    return statistics_of(torch.from_numpy(readings.tp_strict),
                         torch.from_numpy(readings.tp_relaxed), torch.from_numpy(readings.auc),
                         query_members, torch.from_numpy(readings.pooled_auc))


def _stack(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[G, K]``: the statistics of :data:`EPISODE_STATISTICS`, in order, as float64."""
    return torch.stack([stats[k].double() for k in EPISODE_STATISTICS], dim=1)


def _unused(permutations: int) -> torch.Tensor:
    """``[B, K]`` NaN: the episodes' statistics, not computed under the permutations."""
    return torch.full((permutations, len(EPISODE_STATISTICS)), float("nan"), dtype=torch.float64)


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def _cuda_indices(t: torch.Tensor) -> list[int]:
    return [t.device.index or 0] if t.device.type == "cuda" else []
