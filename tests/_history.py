"""Test helpers: a history file's run headers and check lines apart, a recording sink, and
processes spawned under a deadline."""

import json
import math
from pathlib import Path


def lines_of(path):
    """Every JSON line of a history file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def checks_in(path):
    """The lines of checks (and failed checks) of a history file, headers left out."""
    return [line for line in lines_of(path) if line.get("record") != "run"]


def headers_in(path):
    """The run headers of a history file."""
    return [line for line in lines_of(path) if line.get("record") == "run"]


class RecordingSink:
    """A user's sink: remembers every call."""

    def __init__(self):
        self.calls = []

    def start_run(self, header):
        self.calls.append(("start_run", header["run_id"]))

    def resume(self, run_id, check, errors=None, header=None):
        self.calls.append(("resume", run_id, check))

    def log(self, report, step):
        self.calls.append(("log", report.check, step))

    def close(self):
        self.calls.append(("close",))

    def logged(self):
        return [c[1:] for c in self.calls if c[0] == "log"]


def readings(report):
    """What a check measured and decided (its timings left out).

    NaN (a reading not taken, as the ε of canaries not drawn by coins) reads as the string
    "nan", so that two reports with the same readings compare equal.
    """
    return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
            for k, v in report.as_dict().items() if not k.startswith("seconds")}


def spawn_or_fail(worker, args, *, hang, nprocs=2, seconds=120):
    """Run ``worker`` on ``nprocs`` processes; kill them and fail with ``hang`` past a deadline."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=2):  # False while a process still runs
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(hang)


def artists(fig, panel=None):
    """The figure's artists by gid: on every axes, or on ``fig.axes[panel]`` only."""
    axes = fig.axes if panel is None else [fig.axes[panel]]
    found = [a for ax in axes for a in [*ax.lines, *ax.collections] if a.get_gid()]
    by_gid = {a.get_gid(): a for a in found}
    assert len(by_gid) == len(found)  # no gid drawn twice
    return by_gid
