"""TensorBoard events and the JSON-lines history, decoded and checked."""

import json
import math
import struct

import pytest
import torch
from _history import checks_in  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import fesmia_hooks as fh
from fesmia_hooks.sinks import custom_scalar_layout, scalar_metrics

MARKER = 1234.5678


def canaries():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    x[:, 0] = MARKER + torch.arange(64)  # distinctive canary values to search the outputs for
    return fh.CanarySet(members=(x[:32], y[:32]), non_members=(x[32:], y[32:]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("run")
    monitor = fh.PrivacyMonitor(canaries(), probe=fh.FeSMIA(episodes=20, permutations=49),
                                budget=fh.LeakageBudget(action="alert"), log_dir=log_dir)
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    for epoch in range(3):
        monitor.step(model, epoch=epoch)
    monitor.close()
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                        "tensors": 0})
    acc.Reload()
    return log_dir, monitor, acc


def test_scalars_hold_every_metric_at_every_check(run):
    _, monitor, acc = run
    tags = acc.Tags()["scalars"]
    for report in monitor.history:
        for tag, value in scalar_metrics(report).items():
            if not math.isfinite(value):  # a reading not taken (the ε of this run) is left out
                assert tag not in tags
                continue
            assert tag in tags
            events = {e.step: e.value for e in acc.Scalars(tag)}
            assert events[report.epoch] == pytest.approx(value, rel=1e-6, abs=1e-6)
    for key in ("log_mia_strict", "log_mia_strict_low", "log_mia_strict_high", "chance_strict",
                "log_mia_relaxed", "chance_relaxed", "auc", "p_value", "p_threshold",
                "level_index", "tpr_at_fpr_0.05", "members_named", "share_beyond_chance"):
        assert f"privacy/{key}" in tags
        assert len(acc.Scalars(f"privacy/{key}")) == 3


def test_histograms_pr_curve_text_and_layout(run):
    _, monitor, acc = run
    assert {"privacy/scores/members", "privacy/scores/non_members"} <= set(acc.Tags()["histograms"])
    hist = acc.Histograms("privacy/scores/members")
    assert [h.step for h in hist] == [0, 1, 2]
    assert hist[-1].histogram_value.num == len(monitor.history[-1].member_scores)
    tensors = set(acc.Tags()["tensors"])
    assert {"privacy/pr_curve", "privacy/summary/text_summary"} <= tensors
    text = acc.Tensors("privacy/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "Log-MIA strict" in text and "chance" in text
    layout_tags = [t for t in tensors if "custom_scalars" in t]
    assert layout_tags, tensors
    layout = custom_scalar_layout()["Privacy leakage (FeS-MIA)"]
    assert layout["Log-MIA strict (95% interval over canary draws)"][1] == [
        "privacy/log_mia_strict", "privacy/log_mia_strict_low", "privacy/log_mia_strict_high"]


def test_history_file_has_one_flushed_line_per_check(run):
    log_dir, monitor, _ = run
    lines = checks_in(log_dir / "privacy_history.jsonl")
    assert [d["check"] for d in lines] == [1, 2, 3]
    for line, report in zip(lines, monitor.history, strict=True):
        assert line["log_mia_strict"] == report.strict and line["level"] == report.level.value
        assert line["chance_strict"] == pytest.approx(0.178, abs=1e-3)
        rebuilt = fh.LeakageReport.from_dict(line)
        assert rebuilt.strict == report.strict and rebuilt.tpr_at_fpr == report.tpr_at_fpr


def test_no_canary_value_in_any_output(run):
    log_dir, monitor, _ = run
    payloads = [p.read_bytes() for p in log_dir.rglob("*") if p.is_file()]
    payloads.append(json.dumps(monitor.state_dict()).encode())
    payloads += [r.summary().encode() for r in monitor.history]
    needles = [str(MARKER).encode(), struct.pack("<f", MARKER), struct.pack("<f", MARKER + 1)]
    for payload in payloads:
        for needle in needles:
            assert needle not in payload


def test_no_log_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monitor = fh.PrivacyMonitor(canaries(), probe=fh.FeSMIA(episodes=5, permutations=9))
    monitor.step(nn.Linear(6, 3), epoch=0)
    monitor.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_sink_opens_lazily_and_accepts_a_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    lazy = fh.TensorBoardSink(tmp_path / "lazy")
    assert not (tmp_path / "lazy").exists()
    lazy.close()
    writer = SummaryWriter(str(tmp_path / "shared"))
    sink = fh.TensorBoardSink(writer=writer)
    report = fh.FeSMIA(episodes=5, permutations=9).evaluate(nn.Linear(6, 3), canaries())
    sink.log(report, 7)
    sink.close()  # does not close a writer it did not open
    writer.add_scalar("other", 1.0, 0)
    writer.close()
    acc = EventAccumulator(str(tmp_path / "shared"))
    acc.Reload()
    assert "privacy/log_mia_strict" in acc.Tags()["scalars"] and "other" in acc.Tags()["scalars"]
    with pytest.raises(ValueError, match="needs `log_dir` or `writer`, got neither"):
        fh.TensorBoardSink()


def test_multiline_charts_match_exactly_their_tags(run):
    import re

    _, _, acc = run
    tags = acc.Tags()["scalars"]
    for title, (kind, patterns) in custom_scalar_layout()["Privacy leakage (FeS-MIA)"].items():
        if kind != "Multiline" or title.startswith("DP"):  # no DP readings in this run
            continue
        matched = {t for t in tags for pat in patterns if re.search(pat, t)}
        assert len(matched) == len(patterns), (title, sorted(matched))
