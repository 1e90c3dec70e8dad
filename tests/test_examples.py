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


#: Optional packages an example needs beyond the dev set's frameworks.
NEEDS = {"dp_opacus": "opacus"}


@pytest.mark.parametrize(
    "name", ["digits_torch", "digits_lightning", "digits_keras", "cnn_torch", "dp_opacus"]
)
def test_example_runs(name, tmp_path):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    monitor = load(name).main(epochs=2, log_dir=str(tmp_path))
    assert len(monitor.history) == 2
    assert list(tmp_path.rglob("privacy_history.jsonl"))
    assert list(tmp_path.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("name", ["audit_digits", "audit_text"])
def test_audit_example_runs(name, capsys):
    # shortened: a few epochs on small sets, the verdicts mean nothing here
    results = load(name).main(epochs=2, base=40, suspects=10, non_members=40, permutations=99)
    assert set(results) == {"with", "without"}
    for result in results.values():
        assert result.verdict in ("shown", "not shown")
        assert (result.suspects, result.non_members, result.permutations) == (10, 40, 99)
    out = capsys.readouterr().out
    assert "model trained with the suspects -> " in out
    assert "model trained without the suspects -> " in out
