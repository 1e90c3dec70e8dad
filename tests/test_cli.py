"""The command line (`demo`, `report`) and the history reader/plotter behind `report`."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import types

import pytest
from _history import artists, checks_in  # noqa: E402

from fesmia_hooks.cli import main
from fesmia_hooks.exceptions import FesmiaError
from fesmia_hooks.history import (
    HistoryError,
    format_table,
    leakage_figure,
    load_runs,
    plot_leakage,
    read_history,
)
from fesmia_hooks.report import Level, LevelBands, _example_report
from fesmia_hooks.sinks import HISTORY_FILE, JsonlSink

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["check", "epoch", "strict [95% interval]", "relaxed [95% interval]", "chance s/r",
           "named (chance)", "share", "p / threshold", "level", "action"]
#: What a history written before the share beyond chance lacks (see ``write_history(old=)``).
NEW_KEYS = ("members_named", "chance_members_named", "members_named_relaxed",
            "chance_members_named_relaxed", "share_beyond_chance", "can_alarm", "statistic")


def history_lines(path):
    return checks_in(path)


def table_rows(text: str) -> list[list[str]]:
    """Rows of a printed table: lines that start with a check number."""
    return [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]


def write_history(folder, specs, *, errors=(), old=False):
    """A history file written by the real sink from example reports.

    ``specs``: ``(check, epoch, strict, level, breached)`` tuples, optionally with a sixth item,
    the share beyond chance (the example report's 0.154 otherwise); ``errors``:
    ``(check, epoch)``. ``old``: leave out what histories written before the chance-corrected
    share lack (:data:`NEW_KEYS`).
    """
    sink = JsonlSink(folder / HISTORY_FILE)
    pending = {check: epoch for check, epoch in errors}
    for check, epoch, strict, level, breached, *share in specs:
        if check in pending:
            sink.write({"check": check, "epoch": pending.pop(check), "step": None,
                        "error": "ProbeError: the model returned no logits"})
        report = _example_report().with_updates(
            check=check, epoch=epoch, strict=strict, strict_low=strict - 0.05,
            strict_high=strict + 0.05, level=Level(level), significant=level != "none",
            breached=breached, action="stop" if breached else "none",
            **({"share_beyond_chance": share[0]} if share else {}),
        )
        if old:
            record = {k: v for k, v in report.as_dict().items() if k not in NEW_KEYS}
            sink.write({**record, "global_step": epoch})
        else:
            sink.log(report, step=epoch)
    return folder / HISTORY_FILE


# ---------------------------------------------------------------------------- demo + report
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    pytest.importorskip("sklearn")
    folder = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["demo", "--epochs", "3", "--log-dir", str(folder)])
    return folder, status, out.getvalue()


def test_demo_runs_and_prints_a_row_per_check(demo_run):
    folder, status, printed = demo_run
    assert status == 0
    records = history_lines(folder / HISTORY_FILE)
    assert 1 <= len(records) <= 3 and [r["epoch"] for r in records] == list(
        range(len(records))
    )
    rows = [line for line in printed.splitlines() if line.startswith("epoch")]
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        assert f"strict {record['log_mia_strict']:.2f}" in row
        assert f"(chance {record['chance_strict']:.2f})" in row
        assert record["level"] in row


def test_report_prints_the_table_and_writes_a_valid_png(demo_run, capsys):
    import matplotlib.image

    folder, _, _ = demo_run
    png = folder / "leakage.png"
    png.unlink(missing_ok=True)
    assert main(["report", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("check"))
    positions = [header.index(column) for column in COLUMNS]
    assert positions == sorted(positions)  # every column, in this order
    records = history_lines(folder / HISTORY_FILE)
    rows = table_rows(out)
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        assert row[0] == str(record["check"]) and row[1] == str(record["epoch"])
        assert row[2] == f"{record['log_mia_strict']:.2f}"
        assert row[5] == f"{record['log_mia_relaxed']:.2f}"
        assert row[8] == f"{record['chance_strict']:.2f}/{record['chance_relaxed']:.2f}"
        assert row[9] == f"{record['members_named']:.1f}"
        assert row[10] == f"({record['chance_members_named']:.2f})"
        assert row[11] == f"{record['share_beyond_chance']:.2f}"
        assert row[12] == f"{record['p_value']:.3f}" and row[14] == f"{record['p_threshold']:.3f}"
        assert row[15] == record["level"]
        assert row[16] == ("-" if record["action"] == "none" else record["action"])
    assert f"wrote {png}" in out
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    image = matplotlib.image.imread(png)
    assert image.shape == (700, 1000, 4)  # two panels: figsize (10, 7) at 100 dpi, RGBA
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_report_out_mirrors_run_folders_and_no_plot_writes_nothing(tmp_path, capsys):
    write_history(tmp_path / "runs" / "a", [(1, 0, 0.2, "none", False)])
    write_history(tmp_path / "runs" / "b" / "deep", [(1, 0, 0.3, "moderate", True)])
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "pics")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "pics" / "a" / "leakage.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "pics" / "b" / "deep" / "leakage.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not list((tmp_path / "runs").rglob("*.png"))
    assert out.count("1 check") == 2 and "budget breached at check 1 (epoch 0)" in out
    assert main(["report", str(tmp_path / "runs"), "--no-plot"]) == 0
    assert "wrote" not in capsys.readouterr().out
    assert not list((tmp_path / "runs").rglob("*.png"))


def test_report_on_a_missing_folder_prints_one_line_and_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"fesmia-hooks: error: {tmp_path / 'nope'}: no such file or folder"]


def test_report_on_a_folder_without_history_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"fesmia-hooks: error: {tmp_path / 'empty'}: no {HISTORY_FILE} found in this folder or "
        "below it"
    ]


def test_report_on_a_corrupt_file_prints_one_line_and_exits_2(tmp_path, capsys):
    path = write_history(tmp_path, [(1, 0, 0.2, "none", False), (2, 1, 0.3, "none", False)])
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    assert main(["report", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"fesmia-hooks: error: {path}: line 2 is not valid JSON")
    assert not (tmp_path / "leakage.png").exists()


def test_report_without_matplotlib_prints_the_table_and_a_note(tmp_path, capsys, monkeypatch):
    write_history(tmp_path, [(1, 0, 0.2, "none", False)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert len(table_rows(out)) == 1
    assert err.strip() == ("fesmia-hooks: note: no leakage.png without matplotlib: "
                           "pip install 'fesmia-hooks[plot]'")
    assert not (tmp_path / "leakage.png").exists()


# ---------------------------------------------------------------------------- demo dispatch
def test_unknown_framework_is_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--framework", "bogus"])
    assert info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_epochs_must_be_positive(capsys):
    assert main(["demo", "--epochs", "0"]) == 2
    assert capsys.readouterr().err == (
        "fesmia-hooks: error: --epochs must be a positive int, got 0\n"
    )


def fake_demo(monkeypatch, module: str, function: str, behaviour=None):
    calls = []

    def run(**kwargs):
        calls.append(kwargs)
        if behaviour is not None:
            behaviour()

    fake = types.ModuleType(module)
    setattr(fake, function, run)
    monkeypatch.setitem(sys.modules, module, fake)
    return calls


@pytest.mark.parametrize(
    ("framework", "module", "function", "default_dir"),
    [
        ("torch", "fesmia_hooks.demos.digits", "run_torch_demo", "runs/fesmia-demo"),
        ("lightning", "fesmia_hooks.demos.lightning_demo", "run_lightning_demo",
         "runs/fesmia-demo-lightning"),
        ("keras", "fesmia_hooks.demos.keras_demo", "run_keras_demo", "runs/fesmia-demo-keras"),
    ],
)
def test_demo_dispatches_to_the_framework_lazily(monkeypatch, framework, module, function,
                                                 default_dir):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    calls = fake_demo(monkeypatch, module, function)
    args = ["demo", "--epochs", "2", "--seed", "7"]
    assert main(args if framework == "torch" else [*args, "--framework", framework]) == 0
    assert calls == [{"log_dir": default_dir, "epochs": 2, "seed": 7}]
    assert main([*args, "--framework", framework, "--log-dir", "x/y"]) == 0
    assert calls[-1]["log_dir"] == "x/y"
    assert os.environ.get("KERAS_BACKEND") == ("torch" if framework == "keras" else None)


def test_importing_the_cli_imports_no_framework():
    # nor any loader of `fesmia-hooks audit` (transformers, Pillow)
    code = ("import sys, fesmia_hooks.cli; print(sorted(m for m in ('lightning', 'keras', "
            "'matplotlib', 'opacus', 'transformers', 'PIL') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_demo_dp_dispatches_lazily_with_its_own_folder_and_epochs(monkeypatch):
    calls = fake_demo(monkeypatch, "fesmia_hooks.demos.dp_demo", "run_dp_demo")
    assert main(["demo", "--dp", "--seed", "7"]) == 0
    assert calls == [{"log_dir": "runs/fesmia-demo-dp", "epochs": 15, "seed": 7}]
    assert main(["demo", "--dp", "--epochs", "2", "--log-dir", "x/y"]) == 0
    assert calls[-1] == {"log_dir": "x/y", "epochs": 2, "seed": 0}


@pytest.mark.parametrize(("args", "message"), [
    (["--framework", "lightning"],
     "--dp runs with --framework torch, got lightning (see examples/dp_opacus.py for Lightning)"),
    (["--task", "text"], "--dp trains the digits task, got --task text"),
    (["--epochs", "0"], "--epochs must be a positive int, got 0"),
])
def test_demo_dp_refuses_what_it_cannot_run(monkeypatch, capsys, args, message):
    calls = fake_demo(monkeypatch, "fesmia_hooks.demos.dp_demo", "run_dp_demo")
    assert main(["demo", "--dp", *args]) == 2
    assert capsys.readouterr().err == f"fesmia-hooks: error: {message}\n"
    assert calls == []


def test_demo_dp_without_opacus_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "opacus", None)  # `import opacus` fails as if missing
    assert main(["demo", "--dp", "--epochs", "1", "--log-dir", "never/written"]) == 2
    assert capsys.readouterr().err == (
        "fesmia-hooks: error: the DP demo needs opacus: pip install 'fesmia-hooks[dp]'\n"
    )
    assert not os.path.exists("never")


def test_a_missing_framework_gives_one_line_and_exit_2(monkeypatch, capsys):
    def missing():
        raise ModuleNotFoundError("No module named 'lightning'", name="lightning")

    fake_demo(monkeypatch, "fesmia_hooks.demos.lightning_demo", "run_lightning_demo", missing)
    assert main(["demo", "--framework", "lightning", "--epochs", "1"]) == 2
    assert capsys.readouterr().err == (
        "fesmia-hooks: error: the lightning demo needs lightning: "
        "pip install 'fesmia-hooks[lightning,examples]'\n"
    )


def test_a_missing_demo_module_gives_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fesmia_hooks.demos.keras_demo", None)
    assert main(["demo", "--framework", "keras", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "fesmia-hooks: error: the keras demo is not part of this installation "
        "(no module fesmia_hooks.demos.keras_demo)"
    ]


def test_an_import_error_with_its_own_message_is_shown_as_one_line(monkeypatch, capsys):
    def no_sklearn():
        raise ImportError("the digits demo needs scikit-learn: pip install "
                          "'fesmia-hooks[examples]'")

    fake_demo(monkeypatch, "fesmia_hooks.demos.digits", "run_torch_demo", no_sklearn)
    assert main(["demo", "--epochs", "1"]) == 2
    assert capsys.readouterr().err == (
        "fesmia-hooks: error: the digits demo needs scikit-learn: pip install "
        "'fesmia-hooks[examples]'\n"
    )


# ---------------------------------------------------------------------------- history reader
def test_failed_checks_and_appended_runs(tmp_path):
    write_history(tmp_path, [(1, 0, 0.2, "none", False), (2, 2, 0.3, "moderate", True)],
                  errors=[(2, 1)])
    write_history(tmp_path, [(1, 0, 0.1, "none", False)])  # a second run, same log_dir
    first, second = read_history(tmp_path / HISTORY_FILE)
    assert (first.run, first.runs, second.run) == (1, 2, 2)
    assert [r["check"] for r in first.records] == [1, 2] and len(first.errors) == 1
    assert [r["check"] for r in second.records] == [1] and not second.errors
    text = format_table(first, name="run")
    assert text.splitlines()[0].startswith("run (run 1 of 2 in privacy_history.jsonl): 2 checks, "
                                           "1 failed")
    rows = table_rows(text)
    assert [row[:2] for row in rows] == [["1", "0"], ["2", "1"], ["2", "2"]]
    assert rows[1][2:] == ["check", "failed:", "ProbeError:", "the", "model", "returned", "no",
                           "logits"]
    assert rows[2][-2:] == ["moderate", "stop"]
    assert text.splitlines()[-1] == "budget breached at check 2 (epoch 2); action taken: stop"


def test_the_table_shows_members_named_and_the_share_or_a_dash_when_unrecorded(tmp_path):
    write_history(tmp_path / "new", [(1, 0, 0.2, "none", False, -0.02),
                                     (2, 1, 0.5, "moderate", False, 0.154)])
    write_history(tmp_path / "old", [(1, 0, 0.2, "none", False)], old=True)
    [new] = read_history(tmp_path / "new" / HISTORY_FILE)
    [old] = read_history(tmp_path / "old" / HISTORY_FILE)
    for run in (new, old):
        header = format_table(run).splitlines()[1]
        positions = [header.index(column) for column in COLUMNS]
        assert positions == sorted(positions)
    # columns 9-11: members named (chance), then the share beyond chance
    assert [row[9:12] for row in table_rows(format_table(new))] == [
        ["3.1", "(0.94)", "-0.02"], ["3.1", "(0.94)", "0.15"]]
    assert [row[9:12] for row in table_rows(format_table(old))] == [["-", "(-)", "-"]]


def test_an_unfinished_last_line_is_skipped(tmp_path, caplog):
    path = write_history(tmp_path, [(1, 0, 0.2, "none", False), (2, 1, 0.3, "none", False)])
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # cut inside the last record, no newline
    caplog.set_level(logging.WARNING, logger="fesmia_hooks")  # whatever other tests set
    [run] = read_history(path)
    assert [r["check"] for r in run.records] == [1]
    assert "skipped the unfinished last line 2" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"holds no checks \(the file is empty\)"),
        ("[1, 2]\n", r"line 1 is not a JSON object, got list"),
        ('{"check": "one"}\n', r"line 1 has no integer 'check' field, got 'one'"),
        ('{"check": 1, "log_mia_strict": 0.2}\n', r"line 1 is not a privacy check: missing "
         r"log_mia_relaxed, chance_strict"),
        ("{oops\n{}\n", r"line 1 is not valid JSON"),
        (None, r"not a JSON-lines history \(not UTF-8 text\)"),
    ],
)
def test_corrupt_histories_name_the_file_and_the_fault(tmp_path, content, message):
    path = tmp_path / HISTORY_FILE
    if content is None:
        path.write_bytes(b"\xff\xfe\x00binary")
    else:
        path.write_text(content)
    with pytest.raises(HistoryError, match=f"^{tmp_path / HISTORY_FILE}: " + message) as info:
        load_runs(tmp_path)
    assert isinstance(info.value, FesmiaError) and "\n" not in str(info.value)


def test_wrong_field_values_are_reported(tmp_path):
    record = {**_example_report().as_dict(), "check": 1}
    path = tmp_path / HISTORY_FILE
    path.write_text(json.dumps({**record, "p_value": "low"}) + "\n")
    with pytest.raises(HistoryError, match=r"line 1: p_value must be a number, got 'low'"):
        read_history(path)
    path.write_text(json.dumps({**record, "level": "huge"}) + "\n")
    with pytest.raises(HistoryError, match=r"line 1: level must be one of none, low, moderate, "
                       r"high, critical, got 'huge'"):
        read_history(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(HistoryError, match=r": no such file$"):
        read_history(tmp_path / "x.jsonl")
    with pytest.raises(HistoryError, match=r": not a file$"):
        read_history(tmp_path)


# ---------------------------------------------------------------------------- the picture
CURVES = {"log_mia_strict", "log_mia_relaxed", "band_strict", "band_relaxed", "chance_strict",
          "chance_relaxed"}
SHARE = {"share", "chance_share", "band_moderate", "band_high", "band_critical"}


def test_leakage_figure_draws_curves_bands_chance_budget_and_breaches(tmp_path):
    path = write_history(tmp_path, [(1, 0, 0.2, "none", False, 0.01),
                                    (2, 1, 0.3, "low", False, 0.08),
                                    (3, 2, 0.6, "high", True, 0.45)])
    [run] = read_history(path)
    fig = leakage_figure(run)
    assert len(fig.axes) == 2
    top, bottom = artists(fig, 0), artists(fig, 1)
    assert CURVES <= set(top) and not (SHARE | {"budget", "breaches"}) & set(top)
    assert SHARE | {"budget", "breaches"} <= set(bottom) and not CURVES & set(bottom)
    records = history_lines(path)
    assert list(top["log_mia_strict"].get_xdata()) == [0, 1, 2]
    assert list(top["log_mia_strict"].get_ydata()) == pytest.approx([0.2, 0.3, 0.6])
    assert list(top["log_mia_relaxed"].get_ydata()) == pytest.approx(
        [r["log_mia_relaxed"] for r in records])
    assert list(top["chance_strict"].get_ydata()) == pytest.approx([0.178] * 3)
    assert top["chance_strict"].get_linestyle() == "--"
    band = top["band_strict"].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.15) and band.max() == pytest.approx(0.65)
    # the share panel: chance at 0, the default bands, the budget where "moderate" starts
    assert list(bottom["chance_share"].get_ydata()) == [0, 0]
    assert [bottom[f"band_{lv}"].get_ydata()[0] for lv in ("moderate", "high", "critical")] == [
        0.1, 0.3, 0.6]
    assert list(bottom["budget"].get_ydata()) == [0.1, 0.1]  # LevelBands(): "moderate" at 0.1
    assert list(bottom["breaches"].get_xdata()) == [2]
    assert list(bottom["breaches"].get_ydata()) == pytest.approx([0.45])  # on the share
    assert fig.axes[-1].get_xlabel() == "epoch" and fig.axes[0].get_xlabel() == ""
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "budget: share >= 0.1 (level above 'low')" in labels
    assert "share beyond chance (strict): the level's reading" in labels
    assert "chance strict (0.18)" in labels and "budget breached (stop)" in labels


def test_the_share_panel_draws_the_recorded_share(tmp_path):
    shares = [-0.03, 0.12, 0.35, 0.7]
    path = write_history(tmp_path, [(i + 1, i, 0.2 + 0.1 * i, "low", False, share)
                                    for i, share in enumerate(shares)])
    [run] = read_history(path)
    assert [r["share_beyond_chance"] for r in history_lines(path)] == shares
    fig = leakage_figure(run)
    share = artists(fig, 1)["share"]
    assert list(share.get_xdata()) == [0, 1, 2, 3]
    assert list(share.get_ydata()) == pytest.approx(shares)
    low, high = fig.axes[1].get_ylim()
    assert low <= -0.03 - 0.05 + 1e-9 and high >= 1.0  # a share below chance stays in view
    assert fig.axes[0].get_ylim() == (0, 1.05)


def test_budget_line_follows_bands_and_max_level(tmp_path):
    [run] = read_history(write_history(tmp_path, [(1, 0, 0.2, "none", False)]))
    fig = leakage_figure(run, bands=LevelBands(0.3, 0.6, 0.9), max_level="moderate")
    assert list(artists(fig, 1)["budget"].get_ydata()) == [0.6, 0.6]  # where "high" starts
    assert "budget" not in artists(fig, 0)
    high = leakage_figure(run, max_level="high")  # the recorded (default) bands: critical 0.6
    assert list(artists(high, 1)["budget"].get_ydata()) == [0.6, 0.6]
    assert "budget" not in artists(leakage_figure(run, max_level="critical"))  # nothing above
    assert "budget" not in artists(leakage_figure(run, max_level=None))
    assert "breaches" not in artists(leakage_figure(run))


def test_an_older_history_draws_one_panel_without_a_budget_line(tmp_path):
    path = write_history(tmp_path, [(1, 0, 0.2, "none", False), (2, 1, 0.6, "high", True)],
                         old=True)
    assert all("share_beyond_chance" not in r for r in history_lines(path))
    [run] = read_history(path)
    for kwargs in ({}, {"max_level": "moderate", "bands": LevelBands(0.3, 0.6, 0.9)}):
        fig = leakage_figure(run, **kwargs)
        assert len(fig.axes) == 1
        found = artists(fig)
        assert CURVES | {"breaches"} <= set(found)
        assert not (SHARE | {"budget"}) & set(found)  # a budget on levels has no place here
        assert list(found["breaches"].get_xdata()) == [1]
        assert list(found["breaches"].get_ydata()) == pytest.approx([0.6])  # on the strict curve
        assert fig.axes[-1].get_xlabel() == "epoch"
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert not any(label.startswith("budget: share") for label in labels)
    image = plot_leakage(run)
    assert image.read_bytes()[:8] == PNG_SIGNATURE


def test_every_breach_is_counted_in_the_table(tmp_path):
    [run] = read_history(write_history(tmp_path, [(1, 0, 0.3, "moderate", True),
                                                  (2, 1, 0.3, "moderate", True),
                                                  (3, 2, 0.4, "moderate", True)]))
    assert format_table(run).splitlines()[-1] == (
        "budget breached at check 1 (epoch 0) and at 2 later checks; action taken: stop"
    )


def test_step_driven_runs_are_plotted_by_optimizer_step(tmp_path):
    sink = JsonlSink(tmp_path / HISTORY_FILE)
    for check in (1, 2):
        sink.log(_example_report().with_updates(check=check, step=50 * check), step=50 * check)
    [run] = load_runs(tmp_path / HISTORY_FILE)
    assert run.x_label == "step"
    fig = leakage_figure(run)
    assert list(artists(fig)["log_mia_strict"].get_xdata()) == [50, 100]
    assert list(artists(fig)["share"].get_xdata()) == [50, 100]
    assert fig.axes[-1].get_xlabel() == "optimizer step"
    header = format_table(run).splitlines()[1].split()
    assert header[:3] == ["check", "epoch", "step"]


def test_plot_leakage_writes_into_the_run_folder_by_default(tmp_path):
    [run] = read_history(write_history(tmp_path, [(1, 0, 0.2, "none", False)]))
    written = plot_leakage(run)
    assert written == tmp_path / "leakage.png" and written.read_bytes()[:8] == PNG_SIGNATURE
    assert plot_leakage(run, tmp_path / "sub") == tmp_path / "sub" / "leakage.png"


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    [run] = read_history(write_history(tmp_path, [(1, 0, 0.2, "none", False)]))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'fesmia-hooks\[plot\]'"):
        leakage_figure(run)


def test_a_run_of_failed_checks_only_cannot_be_plotted(tmp_path):
    JsonlSink(tmp_path / HISTORY_FILE).write({"check": 1, "epoch": 0, "step": None,
                                              "error": "ProbeError: boom"})
    [run] = read_history(tmp_path / HISTORY_FILE)
    assert "check failed: ProbeError: boom" in format_table(run)
    with pytest.raises(HistoryError, match=r"no successful check to plot"):
        leakage_figure(run)
