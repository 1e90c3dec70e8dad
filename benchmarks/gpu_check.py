"""The check against the forward pass on a CUDA device: one short script for a GPU machine.

Measures, on the small CNN and the VGG-style CNN of the cost benchmark (fresh weights: the
cost does not depend on them), interleaved and with the device synchronised around each
timing: the floor (a side-effect-free forward pass of the 128 canaries), a synchronous
``FeSMIA().evaluate`` (features copied to the host once, the fused attack on the CPU), and
what the training thread waits for in an asynchronous check. Prints one JSON object (and
writes it to ``$OUT/gpu_check.json`` when ``OUT`` is set).

Run: ``python benchmarks/gpu_check.py`` (needs a CUDA device; exits 2 without one).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a script: the repository, not this folder (whose statistics.py is not the stdlib's).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fesmia_hooks as fh  # noqa: E402
from benchmarks.common import NUM_CLASSES, make_images, median, small_cnn, wide_cnn  # noqa: E402


def _timed(fn: Any, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(name: str, model: torch.nn.Module, canaries: fh.CanarySet, repeats: int) -> dict:
    device = next(model.parameters()).device
    x, _ = canaries.on(device)

    def floor() -> None:
        with fh.untouched(model):
            model(x)

    probe = fh.FeSMIA(seed=0)
    lazy = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(seed=0), budget=None, asynchronous=True)
    probe.evaluate(model, canaries)  # warm-up: plans, kernels, cuDNN
    lazy.check(model, epoch=0)
    lazy.flush()
    floors, checks, waits = [], [], []
    for r in range(repeats):
        floors.append(_timed(floor, device))
        checks.append(_timed(lambda: probe.evaluate(model, canaries), device))
        waits.append(_timed(lambda r=r: lazy.check(model, epoch=r + 1), device))
        lazy.flush()
    lazy.close()
    floor_s = median(floors)
    return {"workload": name, "floor_s": floor_s, "check_s": median(checks),
            "async_wait_s": median(waits),
            "ratio": median(checks) / floor_s,
            "async_ratio": median(waits) / floor_s, "repeats": repeats}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    images = make_images(128, seed=1)
    canaries = fh.CanarySet(members=(images[0][:64], images[1][:64]),
                            non_members=(images[0][64:], images[1][64:]),
                            num_classes=NUM_CLASSES)
    torch.manual_seed(0)
    out = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "results": [measure("small CNN", small_cnn().to(device), canaries, 15),
                    measure("VGG-style CNN", wide_cnn().to(device), canaries, 15)],
    }
    text = json.dumps(out, indent=1)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
