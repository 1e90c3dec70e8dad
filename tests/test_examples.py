"""Every example runs (shortened) and writes what it promises."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["digits_torch", "digits_lightning", "digits_keras", "cnn_torch"])
def test_example_runs(name, tmp_path):
    monitor = load(name).main(epochs=2, log_dir=str(tmp_path))
    assert len(monitor.history) == 2
    assert list(tmp_path.rglob("privacy_history.jsonl"))
    assert list(tmp_path.rglob("events.out.tfevents.*"))
