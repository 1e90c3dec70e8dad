"""The language-model demo: its data split, and a short run with TensorBoard decoded."""

import zlib

import pytest
import torch
from _history import checks_in  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fesmia_hooks.demos.text_demo import load_pydoc_passages, make_text_task, run_text_demo
from fesmia_hooks.sinks import HISTORY_FILE


def rows(ids):
    return {tuple(r[r != 0].tolist()) for r in ids}


def test_members_are_trained_on_and_non_members_are_not():
    task = make_text_task(members=128, held_out=96, canaries=32)
    c = task.canaries
    train, held_out = rows(task.train[0]), rows(task.held_out[0])
    assert len(train) == 128 and len(held_out) == 96 and not train & held_out
    members, non_members = rows(c.inputs[: c.num_members]), rows(c.inputs[c.num_members :])
    assert members <= train and non_members <= held_out
    # variable lengths, padded on the right and masked
    lengths = c.attention_mask.sum(1)
    assert lengths.min() >= 64 and lengths.max() <= 192 and lengths.min() < lengths.max()
    assert bool((c.labels[c.attention_mask == 0] == -100).all())
    # the zlib length is that of the passage's own text
    text = "".join(task.vocab[i] for i in c.inputs[0][c.attention_mask[0].bool()].tolist())

    assert c.zlib_bytes[0] == len(zlib.compress(text.encode()))
    assert all(sum(ch.isalpha() for ch in p) >= 0.7 * len(p) for p in load_pydoc_passages())


def test_a_short_run_logs_every_check_and_restores_the_thread_count(tmp_path):
    threads = torch.get_num_threads()
    lines = []
    monitor = run_text_demo(log_dir=tmp_path, epochs=2, out=lines.append)
    assert torch.get_num_threads() == threads
    assert monitor.checks == 2 and not monitor.should_stop
    assert lines[-2] == "finished 2 epochs within budget"
    assert sum(line.startswith("epoch") for line in lines) == 2
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    strict = events.Scalars("privacy/log_mia_strict")
    assert [e.step for e in strict] == [0, 1]
    assert [e.value for e in strict] == pytest.approx([r.strict for r in monitor.history])
    history = checks_in(tmp_path / HISTORY_FILE)
    assert [h["epoch"] for h in history] == [0, 1]
