"""Run the benchmarks and regenerate BENCHMARKS.md.

    python benchmarks/run.py            # full: tens of minutes on two CPU cores
    python benchmarks/run.py --quick    # a few minutes: smaller panel, fewer runs
    python benchmarks/run.py --only placebo      # one section, merged into results.json
    python benchmarks/run.py --report-only       # BENCHMARKS.md from results.json

Writes ``benchmarks/results.json`` (every figure, the configuration of each section, the
machine) and ``BENCHMARKS.md`` with its plots under ``benchmarks/plots/``. Each section keeps
the mode (full or quick) of the run that produced it, and BENCHMARKS.md says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, Python puts benchmarks/ first on the path, where statistics.py would
# shadow the standard library's `statistics`: drop it, and make `benchmarks` importable.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import (  # noqa: E402
    audit_bench,
    cost,
    dp_bench,
    overhead,
    panel,
    placebo,
    report,
    statistics,
    text_bench,
)
from benchmarks.common import machine  # noqa: E402
from benchmarks.panel import RunSpec  # noqa: E402

log = logging.getLogger("benchmarks")

SECTIONS = ("cost", "overhead", "panel", "placebo", "text", "statistics", "dp", "audit")
# Run only when named (--only): the panel with another alarm statistic (item 8).
EXTRA_SECTIONS = ("panel_centroid",)
RESULTS = ROOT / "benchmarks" / "results.json"
MARKDOWN = ROOT / "BENCHMARKS.md"
PLOTS = ROOT / "benchmarks" / "plots"

FULL_PANEL = (
    RunSpec("digits-clean", "digits", 0.0),
    RunSpec("digits-noise10", "digits", 0.1),
    RunSpec("digits-noise30", "digits", 0.3),
    RunSpec("digits-noise10-wd", "digits", 0.1, weight_decay=5e-3),
    RunSpec("digits-noise10-dropout", "digits", 0.1, dropout=0.5),
    RunSpec("cnn-noise20", "cnn", 0.2),
    RunSpec("digits-clean-crafted", "digits", 0.0, crafted=True),
    RunSpec("cnn-noise20-crafted", "cnn", 0.2, crafted=True),
)


@dataclass
class Config:
    """Sizes of one benchmark run. ``full()``, ``quick()`` and ``tiny()`` are the presets."""

    mode: str
    seed: int = 0
    # Overrides of the library's default probe; empty except in the smoke test.
    probe_kwargs: dict[str, Any] = field(default_factory=dict)
    # item 1
    cost_repeats: int = 15
    cost_rounds: int = 5
    cost_learner_repeats: int = 2
    cost_sweep_repeats: int = 5
    cost_wide_cnn: bool = True
    cost_lm: bool = True
    cost_sweeps: dict[str, list[int]] = field(default_factory=lambda: {
        "canaries": [32, 64, 128, 256],
        "shots": [1, 2, 5, 10, 20],
        "queries": [5, 10, 15, 30, 45],
        "episodes": [25, 50, 100, 200, 400],
        "permutations": [49, 99, 199, 499, 999, 1999],
    })
    cost_candidates: list[dict[str, int]] = field(default_factory=lambda: [
        {"episodes": 100, "permutations": 199},
        {"episodes": 50, "permutations": 199},
        {"episodes": 50, "permutations": 99},
        {"episodes": 20, "permutations": 19},
    ])
    # item 2 (and the cost half of item 3)
    overhead_digits_epochs: int = 100
    overhead_cnn_members: int = 10_000
    overhead_cnn_test: int = 2_000
    overhead_cnn_epochs: int = 3
    overhead_repeats: int = 4  # A/B medians of 4 alternating pairs: less exposed to noise
    # items 3-6: the panel
    panel: tuple[RunSpec, ...] = FULL_PANEL
    digits_epochs: int = 150
    cnn_members: int = 1_000
    cnn_epochs: int = 15
    lira_shadows: int = 16
    cnn_lira_shadows: int = 16
    population_episodes: int = 2_000
    alt_checks: int = 10
    # A cheaper probe watched alongside the default, every epoch (panel and placebo runs).
    candidate_probe_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"episodes": 50, "permutations": 199})
    alt_probe_kwargs: dict[str, Any] = field(default_factory=lambda: {"permutations": 99})
    # The panel's alarm statistic (None: the library's default); `panel_centroid` sets it.
    panel_statistic: str | None = None
    cost_only_runs: tuple[str, ...] = ("digits-clean", "cnn-noise20")
    # item 5 (and the honesty half of item 6)
    placebo_runs: int = 100
    placebo_epochs: int = 30
    placebo_alt_checks: int = 5
    placebo_runs_heavy: int = 8
    # language models (issue 5): the text demo's GRU, read every epoch
    text_epochs: int = 40
    text_repeats: int = 15
    text_cost_rounds: int = 5
    # the alarm statistic and the interval (benchmarks/statistics.py): synthetic 64 + 64 pools
    stat_pools: int = 300
    stat_permutations: int = 999
    stat_population: int = 4_000
    stat_pop_episodes: int = 2_000
    # differential privacy (benchmarks/dp_bench.py): DP-SGD at each target ε, and without DP
    dp_targets: tuple[float, ...] = (1.0, 4.0, 8.0)
    dp_canaries: int = 500
    dp_epochs: int = 60
    dp_seeds: int = 3
    # data audit after training (benchmarks/audit_bench.py): models trained with and without
    # the suspects, every suspect-set size audited against the same non-members
    audit_sizes: tuple[int, ...] = (10, 25, 50, 100)
    audit_non_members: int = 200
    audit_digits_seeds: int = 20
    audit_digits_base: int = 300
    audit_digits_epochs: int = 150
    audit_text_seeds: int = 8
    audit_text_base: int = 150
    audit_text_epochs: int = 15
    audit_placebo_draws: int = 3
    audit_permutations: int = 9999

    @classmethod
    def full(cls) -> Config:
        return cls(mode="full")

    @classmethod
    def quick(cls) -> Config:
        return cls(
            mode="quick",
            cost_repeats=5,
            cost_rounds=2,
            cost_learner_repeats=1,
            cost_sweep_repeats=2,
            cost_sweeps={
                "canaries": [32, 64, 128],
                "shots": [1, 5, 20],
                "queries": [5, 15, 30],
                "episodes": [25, 100, 400],
                "permutations": [99, 499, 1999],
            },
            cost_candidates=[{"episodes": 50, "permutations": 99},
                             {"episodes": 20, "permutations": 19}],
            overhead_digits_epochs=30,
            overhead_cnn_epochs=1,
            overhead_repeats=1,
            panel=(
                RunSpec("digits-clean", "digits", 0.0),
                RunSpec("digits-noise30", "digits", 0.3),
                RunSpec("cnn-noise20", "cnn", 0.2),
                RunSpec("digits-clean-crafted", "digits", 0.0, crafted=True),
            ),
            digits_epochs=40,
            cnn_members=500,
            cnn_epochs=6,
            lira_shadows=4,
            cnn_lira_shadows=4,
            population_episodes=1_000,
            alt_checks=4,
            cost_only_runs=(),
            placebo_runs=10,
            placebo_epochs=15,
            placebo_alt_checks=3,
            placebo_runs_heavy=2,
            text_epochs=20,
            text_repeats=5,
            text_cost_rounds=2,
            stat_pools=60,
            dp_canaries=300,
            dp_epochs=20,
            dp_seeds=1,
            audit_digits_seeds=6,
            audit_text_seeds=2,
            audit_placebo_draws=2,
        )

    @classmethod
    def tiny(cls) -> Config:
        """Seconds, for the smoke test: every code path, meaningless numbers."""
        small = {"episodes": 10, "permutations": 19}
        return cls(
            mode="tiny",
            probe_kwargs=dict(small),
            cost_repeats=1,
            cost_rounds=1,
            cost_learner_repeats=1,
            cost_sweep_repeats=1,
            cost_wide_cnn=False,
            cost_lm=False,
            cost_sweeps={"episodes": [10, 20], "permutations": [9, 19]},
            cost_candidates=[{"episodes": 10, "permutations": 9}],
            overhead_digits_epochs=2,
            overhead_cnn_members=300,
            overhead_cnn_test=100,
            overhead_cnn_epochs=1,
            overhead_repeats=1,
            panel=(
                RunSpec("digits-noise30", "digits", 0.3),
                RunSpec("cnn-noise20", "cnn", 0.2),
                RunSpec("digits-clean-crafted", "digits", 0.0, crafted=True),
            ),
            digits_epochs=3,
            cnn_members=200,
            cnn_epochs=2,
            lira_shadows=2,
            cnn_lira_shadows=2,
            population_episodes=50,
            alt_checks=2,
            alt_probe_kwargs=dict(small),
            candidate_probe_kwargs={"episodes": 10, "permutations": 9},
            cost_only_runs=("cnn-noise20",),
            placebo_runs=2,
            placebo_epochs=3,
            placebo_alt_checks=2,
            placebo_runs_heavy=1,
            text_epochs=2,
            text_repeats=1,
            text_cost_rounds=1,
            stat_pools=4,
            stat_permutations=19,
            stat_population=200,
            stat_pop_episodes=50,
            dp_targets=(8.0,),
            dp_canaries=100,
            dp_epochs=2,
            dp_seeds=1,
            audit_sizes=(10,),
            audit_non_members=50,
            audit_digits_seeds=1,
            audit_digits_base=60,
            audit_digits_epochs=2,
            audit_text_seeds=1,
            audit_text_base=20,
            audit_text_epochs=1,
            audit_placebo_draws=1,
            audit_permutations=99,
        )

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["panel"] = [dataclasses.asdict(s) for s in self.panel]
        return out


def _text(cfg: Config) -> dict[str, Any]:
    return text_bench.run_text_benchmark(
        epochs=cfg.text_epochs, seed=cfg.seed, repeats=cfg.text_repeats,
        population_episodes=cfg.population_episodes, cost_rounds=cfg.text_cost_rounds,
    )


def _dp(cfg: Config) -> dict[str, Any]:
    return dp_bench.run_dp_benchmark(
        targets=cfg.dp_targets, canaries=cfg.dp_canaries, epochs=cfg.dp_epochs,
        seeds=cfg.dp_seeds, seed=cfg.seed, probe_kwargs=cfg.probe_kwargs,
    )


def _audit(cfg: Config) -> dict[str, Any]:
    return audit_bench.run_audit_benchmark(
        sizes=cfg.audit_sizes, non_members=cfg.audit_non_members,
        digits_seeds=cfg.audit_digits_seeds, digits_base=cfg.audit_digits_base,
        digits_epochs=cfg.audit_digits_epochs, text_seeds=cfg.audit_text_seeds,
        text_base=cfg.audit_text_base, text_epochs=cfg.audit_text_epochs,
        placebo_draws=cfg.audit_placebo_draws, permutations=cfg.audit_permutations,
        seed=cfg.seed,
    )


def _panel_centroid(cfg: Config) -> dict[str, Any]:
    """The panel again with the whole pool's statistics as the alarm (item 8's runner-up)."""
    return panel.run(dataclasses.replace(cfg, panel_statistic="centroid_auc+centroid_strict"))


RUNNERS = {"cost": cost.run, "overhead": overhead.run, "panel": panel.run, "placebo": placebo.run,
           "text": _text, "statistics": statistics.run, "dp": _dp, "audit": _audit,
           "panel_centroid": _panel_centroid}


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null, floats keep 6 significant digits."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"schema": 1, "sections": {}}


def run_all(
    cfg: Config,
    *,
    sections: tuple[str, ...] = SECTIONS,
    results_path: Path = RESULTS,
    markdown_path: Path = MARKDOWN,
    plots_dir: Path = PLOTS,
) -> dict[str, Any]:
    """Run ``sections`` with ``cfg``, merge them into ``results_path``, write the markdown."""
    torch.set_num_threads(1)  # small tensors: one thread is faster here, and fair to neighbours
    results = load_results(results_path)
    results["schema"] = 1
    for name in sections:
        log.info("section %s (%s) ...", name, cfg.mode)
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        start = time.perf_counter()
        result = RUNNERS[name](cfg)
        results["sections"][name] = _clean({
            "mode": cfg.mode,
            "started": started,
            "seconds": time.perf_counter() - start,
            "machine": machine(),
            "config": cfg.as_dict(),
            "result": result,
        })
        results["generated"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, separators=(",", ":")), encoding="utf-8")
        log.info("section %s done in %.0f s", name, results["sections"][name]["seconds"])
    report.write_markdown(results, markdown_path, plots_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes instead of tens")
    parser.add_argument("--only", default="",
                        help=f"comma-separated subset of {SECTIONS + EXTRA_SECTIONS}")
    parser.add_argument("--report-only", action="store_true",
                        help="regenerate BENCHMARKS.md from results.json, run nothing")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, default=MARKDOWN)
    parser.add_argument("--plots", type=Path, default=PLOTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # One line per check and one warning per breach (thousands here): keep them out.
    logging.getLogger("fesmia_hooks").setLevel(logging.ERROR)
    if args.report_only:
        report.write_markdown(load_results(args.results), args.markdown, args.plots)
        return
    sections = tuple(s for s in args.only.split(",") if s) or SECTIONS
    unknown = [s for s in sections if s not in SECTIONS + EXTRA_SECTIONS]
    if unknown:
        parser.error(f"--only takes names from {SECTIONS + EXTRA_SECTIONS}, got {unknown}")
    cfg = Config.quick() if args.quick else Config.full()
    run_all(cfg, sections=sections, results_path=args.results, markdown_path=args.markdown,
            plots_dir=args.plots)


if __name__ == "__main__":
    main()
