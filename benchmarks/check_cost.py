"""Cost of one privacy check on the demo model: the forward pass against everything else.

Run: python benchmarks/check_cost.py [--repeats 30]

Measures, in one process and interleaved, (a) the unavoidable floor — one side-effect-free
forward pass of the 128 canaries through the digits MLP — and (b) a whole check with the
default probe, for each learner. Reports medians and their ratio; absolute times depend on the
machine (shared, noisy), ratios much less.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import fesmia_hooks as fh
from fesmia_hooks.demos.digits import digits_mlp, load_noisy_digits
from fesmia_hooks.guard import untouched


def forward_only(model, canaries):
    x, _ = canaries.on("cpu")
    with untouched(model):
        model(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    task = load_noisy_digits()
    model = digits_mlp()
    probes = {m: fh.FeSMIA(m) for m in ("threshold", "simpleshot", "laplacianshot", "finetune")}
    times: dict[str, list[float]] = {"forward pass (floor)": []}
    parts: dict[str, list[tuple[float, float]]] = {m: [] for m in probes}
    for name in probes:
        times[f"check: {name}"] = []
    for probe in probes.values():  # warm-up: plans, caches
        probe.evaluate(model, task.canaries)
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward_only(model, task.canaries)
        times["forward pass (floor)"].append(time.perf_counter() - start)
        for m, probe in probes.items():
            if m in ("laplacianshot", "finetune") and len(parts[m]) >= 3:
                continue
            start = time.perf_counter()
            report = probe.evaluate(model, task.canaries)
            times[f"check: {m}"].append(time.perf_counter() - start)
            parts[m].append((report.seconds_forward, report.seconds_attack))
    floor = statistics.median(times["forward pass (floor)"])
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; defaults: {probes['simpleshot']!r}")
    print(f"{'what':<26}{'median ms':>10}{'x floor':>9}{'features ms':>13}{'attack ms':>11}")
    for name, values in times.items():
        med = statistics.median(values)
        m = name.removeprefix("check: ")
        feat = att = ""
        if m in parts:
            feat = f"{statistics.median(p[0] for p in parts[m]) * 1e3:.2f}"
            att = f"{statistics.median(p[1] for p in parts[m]) * 1e3:.1f}"
        print(f"{name:<26}{med * 1e3:>10.2f}{med / floor:>9.0f}{feat:>13}{att:>11}")


if __name__ == "__main__":
    main()
