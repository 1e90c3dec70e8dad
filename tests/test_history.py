"""History format 2: run headers with the settings, lines tagged by run id, and redrawing a run
from its history alone (``fesmia_hooks.history`` reads, ``fesmia_hooks.plots`` draws)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from _history import artists

from fesmia_hooks import history, plots
from fesmia_hooks.cli import main
from fesmia_hooks.history import HistoryError, format_table, load_runs, read_history
from fesmia_hooks.plots import FROM_HISTORY, leakage_figure, plot_leakage
from fesmia_hooks.report import Level, LevelBands
from fesmia_hooks.sinks import HISTORY_FILE

SETTINGS = {
    "probe": {"method": "simpleshot", "shots": 5, "queries": 15, "episodes": 100,
              "permutations": 499, "features": "signals", "signals": ["phi"], "seed": 0},
    "calibration": {"alpha": 0.05, "horizon": 30,
                    "bands": {"moderate": 0.3, "high": 0.6, "critical": 0.9, "on": "strict"}},
    "budget": {"max_level": "moderate", "max_values": {"log_mia_strict": 0.4, "auc": 0.7},
               "patience": 1, "min_checks": 1, "action": "stop"},
    "canaries": {"kind": "labelled", "members": 64, "non_members": 64, "fingerprint": "ab12"},
    "cadence": {"every_n_epochs": 1, "every_n_steps": None},
}


def header(run_id: str | None, settings=SETTINGS, **extra) -> dict:
    line = {"record": "run", "format": 2, "started": "2025-01-01T00:00:00Z",
            "settings": settings, **extra}
    if run_id is not None:
        line["run_id"] = run_id
    return line


def check(n: int, run_id: str | None = None, *, strict: float = 0.2, level: str = "low",
          breached: bool = False, epoch: int | None = None,
          share: float | None = None) -> dict:
    """A check line as the monitor writes it, spelled out (independent of the monitor).

    Without ``share``, a line of a history written before the share beyond chance was
    recorded; with it, the line carries ``share_beyond_chance`` and the members named.
    """
    line = {
        "check": n, "epoch": n - 1 if epoch is None else epoch, "step": None,
        "global_step": 10 * n, "method": "simpleshot", "shots": 5, "queries": 15,
        "episodes": 100, "permutations": 499,
        "log_mia_strict": strict, "log_mia_strict_low": strict - 0.05,
        "log_mia_strict_high": strict + 0.05, "log_mia_relaxed": 0.7,
        "log_mia_relaxed_low": 0.65, "log_mia_relaxed_high": 0.75,
        "chance_strict": 0.18, "chance_relaxed": 0.59, "p_value": 0.001, "p_threshold": 0.004,
        "significant": True, "level": level, "breached": breached,
        "action": "stop" if breached else "none",
    }
    if share is not None:
        line.update(members_named=3.0, chance_members_named=0.94, members_named_relaxed=9.0,
                    chance_members_named_relaxed=4.69, share_beyond_chance=share,
                    can_alarm=True, statistic="relaxed")
    if run_id is not None:
        line["run_id"] = run_id
    return line


def failed(n: int, run_id: str | None = None) -> dict:
    line = {"check": n, "epoch": n - 1, "step": None, "error": "ProbeError: no logits"}
    if run_id is not None:
        line["run_id"] = run_id
    return line


def write(folder, lines) -> object:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / HISTORY_FILE
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def budget_at(fig) -> float:
    """The share where the budget line is drawn, checked to be flat and on the share panel."""
    assert len(fig.axes) == 2 and "budget" not in artists(fig, 0)
    [y, same] = artists(fig, 1)["budget"].get_ydata()
    assert y == same
    return y


# ---------------------------------------------------------------------------- reading
def test_two_tagged_runs_read_as_two_runs_even_interleaved(tmp_path):
    other = {**SETTINGS, "budget": None, "calibration": {"alpha": 0.01}}
    path = write(tmp_path, [
        header("aa"), check(1, "aa"),
        header("bb", other), check(1, "bb"),
        failed(2, "aa"), check(2, "bb"), check(2, "aa", strict=0.5, level="moderate",
                                               breached=True),
    ])
    first, second = read_history(path)
    assert (first.run_id, second.run_id) == ("aa", "bb")
    assert (first.run, first.runs, second.run, second.runs) == (1, 2, 2, 2)
    assert [r["check"] for r in first.records] == [1, 2] and len(first.errors) == 1
    assert [(r["check"], "error" in r) for r in first.rows()] == [(1, False), (2, True),
                                                                    (2, False)]
    assert [r["check"] for r in second.records] == [1, 2] and not second.errors
    assert first.settings == SETTINGS and second.settings == other
    assert first.bands == LevelBands(0.3, 0.6, 0.9, "strict")
    assert first.max_level is Level.MODERATE
    assert first.max_values == {"log_mia_strict": 0.4, "auc": 0.7}
    assert first.budget is not None and first.budget["action"] == "stop"
    assert second.bands == LevelBands() and second.budget is None
    assert second.max_level is None and second.max_values == {}


def test_runs_come_in_order_of_first_appearance_header_or_not(tmp_path):
    # "cc" lost its header (e.g. written by hand); "dd" repeats its header (a resumed run)
    path = write(tmp_path, [check(1, "cc"), header("dd"), check(1, "dd"), check(2, "cc"),
                            header("dd", {"budget": None}), check(2, "dd")])
    cc, dd = read_history(path)
    assert (cc.run_id, cc.settings, len(cc.records)) == ("cc", {}, 2)
    assert (dd.run_id, dd.settings, len(dd.records)) == ("dd", SETTINGS, 2)  # the first header


def test_old_lines_and_tagged_runs_in_one_file(tmp_path):
    path = write(tmp_path, [check(1), check(2), header("ee"), check(1, "ee"), check(1),
                            check(2), check(3)])
    old, new, again = read_history(path)
    assert [(r.run_id, r.settings, len(r.records)) for r in (old, new, again)] == [
        (None, {}, 2), ("ee", SETTINGS, 1), (None, {}, 3)]
    assert [r.run for r in (old, new, again)] == [1, 2, 3]


def test_an_old_file_reads_as_before(tmp_path):
    path = write(tmp_path, [check(1), failed(2), check(2), check(1)])
    first, second = read_history(path)
    assert (first.run_id, first.settings, first.runs) == (None, {}, 2)
    assert [r["check"] for r in first.records] == [1, 2] and len(first.errors) == 1
    assert [r["check"] for r in second.records] == [1]
    assert first.bands == LevelBands() and first.max_level is Level.LOW
    assert first.budget is None and first.max_values == {}
    heading = format_table(first, name="run").splitlines()[0]
    assert heading == ("run (run 1 of 2 in privacy_history.jsonl): 2 checks, 1 failed "
                       "(simpleshot, 5 shots, 15 queries, 100 episodes, 499 permutations)")
    fig = leakage_figure(first)  # no share recorded: the Log-MIA panel only, no budget line
    assert len(fig.axes) == 1 and "log_mia_strict" in artists(fig)
    assert "budget" not in artists(fig) and "share" not in artists(fig)


def test_a_headerless_file_with_shares_puts_the_budget_at_the_defaults(tmp_path):
    [run] = read_history(write(tmp_path, [check(1, share=0.05), check(2, share=0.12)]))
    assert run.bands == LevelBands() and run.max_level is Level.LOW
    fig = leakage_figure(run)
    assert budget_at(fig) == 0.1  # where "moderate" starts on LevelBands()
    assert list(artists(fig, 1)["share"].get_ydata()) == pytest.approx([0.05, 0.12])


def test_a_header_without_run_id_starts_an_untagged_run(tmp_path):
    path = write(tmp_path, [check(1), check(2), header(None), check(1), check(2)])
    old, new = read_history(path)
    assert old.settings == {} and new.settings == SETTINGS and new.run_id is None
    assert len(new.records) == 2 and new.max_level is Level.MODERATE


def test_lenient_header_missing_and_unknown_keys(tmp_path, caplog):
    path = write(tmp_path, [
        header("a1", {"calibration": {"bands": {"high": 0.5}}, "future": {"x": 1}},
               format=3, extra="ignored"),
        check(1, "a1"),
        {"record": "run", "run_id": "b2"}, check(1, "b2"),
        header("c3", {"budget": {"action": "alert"}}), check(1, "c3"),
    ])
    caplog.set_level(logging.WARNING, logger="fesmia_hooks")
    a, b, c = read_history(path)
    assert "newer than this version reads" in caplog.text
    assert a.bands == LevelBands(high=0.5) and a.max_level is Level.LOW  # budget unsaid
    assert b.settings == {} and b.bands == LevelBands() and b.max_level is Level.LOW
    assert c.max_level is Level.LOW  # LeakageBudget's default max_level
    assert "; budget" not in format_table(a) and "; budget" not in format_table(b)
    assert format_table(c).splitlines()[0].endswith("; budget: max_level low, action alert")


def test_headers_of_runs_that_made_no_check_give_no_run(tmp_path):
    path = write(tmp_path, [header("x1"), header("x2"), check(1, "x2")])
    [run] = read_history(path)
    assert (run.run_id, run.run, run.runs) == ("x2", 1, 1)
    write(tmp_path, [header("x1")])
    with pytest.raises(HistoryError, match=r"holds no checks \(only the header of a run"):
        read_history(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"record": "rnu", "run_id": "a"}, r"unknown record 'rnu'"),
        (header(""), r"run_id must be a non-empty string, got ''"),
        (header(7), r"run_id must be a non-empty string, got 7"),
        (header("a", ["probe"]), r"the run header's settings must be a JSON object, got list"),
        (header("a", {"budget": "stop"}), r"settings.budget must be a JSON object or null"),
        (header("a", {"calibration": {"bands": [0.25]}}),
         r"settings.calibration.bands must be a JSON object, got list"),
        (header("a", {"calibration": {"bands": {"moderate": 0.8, "high": 0.5}}}),
         r"settings.calibration.bands are not valid: LevelBands needs"),
        (header("a", {"calibration": {"bands": {"on": "loose"}}}),
         r"settings.calibration.bands are not valid: `on` must be one of"),
        (header("a", {"budget": {"max_level": "huge"}}),
         r"settings.budget.max_level must be one of none, low, .* or null, got 'huge'"),
        (header("a", {"budget": {"max_values": {"log_mia_strict": "high"}}}),
         r"settings.budget.max_values must map readings to numbers"),
        ({**check(1), "run_id": 3}, r"run_id must be a non-empty string, got 3"),
    ],
)
def test_a_bad_header_names_the_file_and_the_line(tmp_path, line, message):
    path = write(tmp_path, [check(1, "ok"), line, check(2, "ok")])
    with pytest.raises(HistoryError, match=f"^{path}: line 2: " + message) as info:
        load_runs(tmp_path)
    assert "\n" not in str(info.value)


def test_a_bad_header_makes_report_exit_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, [header("a", {"settings": 1, "budget": 5}), check(1, "a")])
    assert main(["report", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        f"fesmia-hooks: error: {path}: line 1: settings.budget must be a JSON object or null, "
        "got int"]


# ---------------------------------------------------------------------------- table
def test_the_table_heading_names_the_recorded_budget(tmp_path):
    path = write(tmp_path, [header("aa"), header("bb", {**SETTINGS, "budget": None}),
                            check(1, "aa", strict=0.5, level="moderate", breached=True),
                            check(1, "bb")])
    aa, bb = read_history(path)
    assert format_table(aa, name="r").splitlines()[0] == (
        "r (run 1 of 2 in privacy_history.jsonl, id aa): 1 check (simpleshot, 5 shots, "
        "15 queries, 100 episodes, 499 permutations); budget: max_level moderate, "
        "log_mia_strict > 0.4, auc > 0.7, action stop")
    assert format_table(bb, name="r").splitlines()[0].endswith("permutations); no budget")
    unbounded = {**SETTINGS, "budget": {"max_level": None, "max_values": {"auc": 0.6},
                                        "patience": 2, "action": "alert"}}
    [run] = read_history(write(tmp_path / "u", [header("u", unbounded), failed(1, "u")]))
    assert format_table(run, name="u").splitlines()[0] == (
        "u: 0 checks, 1 failed (simpleshot, 5 shots, 15 queries, 100 episodes, "
        "499 permutations); budget: no max_level, auc > 0.6, patience 2, action alert")


# ---------------------------------------------------------------------------- picture
def test_the_plot_reads_bands_max_level_and_ceilings_from_the_header(tmp_path):
    [run] = read_history(write(tmp_path, [header("aa"), check(1, "aa", share=0.1),
                                          check(2, "aa", strict=0.7, level="high",
                                                breached=True, share=0.65)]))
    fig = leakage_figure(run)
    assert budget_at(fig) == 0.6  # where "high" starts on 0.3/0.6/0.9
    top, bottom = artists(fig, 0), artists(fig, 1)
    assert list(top["ceiling_strict"].get_ydata()) == [0.4, 0.4]  # a Log-MIA ceiling: on top
    assert "ceiling_relaxed" not in top and not {"ceiling_strict", "ceiling_relaxed"} & set(bottom)
    assert [bottom[f"band_{lv}"].get_ydata()[0] for lv in ("moderate", "high", "critical")] == [
        0.3, 0.6, 0.9]  # the recorded bands
    assert list(bottom["breaches"].get_xdata()) == [1]
    assert list(bottom["breaches"].get_ydata()) == pytest.approx([0.65])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "budget: share >= 0.6 (level above 'moderate')" in labels
    assert "budget: log_mia_strict > 0.4" in labels
    # the arguments still override the history, one at a time
    assert budget_at(leakage_figure(run, max_level="high")) == 0.9
    assert budget_at(leakage_figure(run, bands=LevelBands())) == 0.3  # "high" on the defaults
    found = artists(leakage_figure(run, max_level=None))
    assert "budget" not in found and "ceiling_strict" in found
    assert budget_at(leakage_figure(run, max_level=FROM_HISTORY)) == 0.6


def test_the_plot_of_a_run_without_a_budget_has_no_budget_line(tmp_path):
    settings = {**SETTINGS, "budget": None}
    [run] = read_history(write(tmp_path, [header("aa", settings), check(1, "aa", share=0.2)]))
    fig = leakage_figure(run)
    found = artists(fig)
    assert len(fig.axes) == 2 and "share" in found  # the share panel, without a budget on it
    assert not {"budget", "ceiling_strict", "ceiling_relaxed"} & set(found)
    relaxed = {**SETTINGS, "budget": {"max_level": None,
                                      "max_values": {"log_mia_relaxed": 0.8}}}
    [run] = read_history(write(tmp_path, [header("aa", relaxed), check(1, "aa", share=0.2)]))
    found = artists(leakage_figure(run))
    assert "budget" not in found
    assert list(artists(leakage_figure(run), 0)["ceiling_relaxed"].get_ydata()) == [0.8, 0.8]


def test_an_old_record_keeps_its_ceilings_but_gets_no_budget_line(tmp_path):
    [run] = read_history(write(tmp_path, [header("aa"), check(1, "aa"),
                                          check(2, "aa", strict=0.7, level="high",
                                                breached=True)]))
    assert run.max_level is Level.MODERATE  # a budget on levels is recorded...
    for max_level in (FROM_HISTORY, "low", "high"):
        fig = leakage_figure(run, max_level=max_level)
        found = artists(fig)
        assert len(fig.axes) == 1 and "budget" not in found  # ...but has no axes to go on
        assert list(found["ceiling_strict"].get_ydata()) == [0.4, 0.4]
        assert list(found["breaches"].get_ydata()) == pytest.approx([0.7])
        assert fig.axes[-1].get_xlabel() == "epoch"


def test_the_drawing_is_re_exported_by_the_reader(tmp_path):
    assert history.leakage_figure is plots.leakage_figure
    assert history.plot_leakage is plots.plot_leakage
    assert history.PLOT_FILE == plots.PLOT_FILE == "leakage.png"
    [run] = read_history(write(tmp_path, [header("aa"), check(1, "aa")]))
    assert plot_leakage(run).read_bytes()[:4] == b"\x89PNG"
    for first in ("fesmia_hooks.plots", "fesmia_hooks.history"):  # no import cycle either way
        code = (f"import {first}; from fesmia_hooks.history import leakage_figure, "
                "plot_leakage, PLOT_FILE; import sys; print('matplotlib' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True)
        assert done.stdout.strip() == "False"  # matplotlib only when a picture is drawn


# ---------------------------------------------------------------------------- report
@pytest.fixture
def drawn(monkeypatch):
    """The figures ``report`` draws, with the arguments it drew them with."""
    figures = []
    original = plots.leakage_figure

    def spy(run, **kwargs):
        fig = original(run, **kwargs)
        figures.append((run, kwargs, fig))
        return fig

    monkeypatch.setattr(plots, "leakage_figure", spy)
    return figures


def test_report_without_flags_redraws_from_the_history(tmp_path, capsys, drawn):
    write(tmp_path / "a", [header("aa"), check(1, "aa", share=0.1),
                           check(2, "aa", strict=0.7, level="high", breached=True, share=0.65)])
    write(tmp_path / "b", [check(1), check(2)])  # an old file: no share, no header
    write(tmp_path / "c", [check(1, share=0.05), check(2, share=0.2)])  # no header: defaults
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "; budget: max_level moderate, log_mia_strict > 0.4, auc > 0.7, action stop" in out
    assert out.count("wrote ") == 3 and (tmp_path / "a" / "leakage.png").exists()
    (run_a, kwargs, fig_a), (run_b, _, fig_b), (run_c, _, fig_c) = drawn
    assert [r.folder.name for r in (run_a, run_b, run_c)] == ["a", "b", "c"]
    assert kwargs["max_level"] is FROM_HISTORY
    assert budget_at(fig_a) == 0.6
    assert list(artists(fig_a, 0)["ceiling_strict"].get_ydata()) == [0.4, 0.4]
    assert len(fig_b.axes) == 1 and "budget" not in artists(fig_b)
    assert budget_at(fig_c) == 0.1  # LevelBands() and "low": where "moderate" starts


def test_report_max_level_still_overrides_the_history(tmp_path, capsys, drawn):
    write(tmp_path, [header("aa"), check(1, "aa", share=0.2)])
    assert main(["report", str(tmp_path), "--max-level", "low"]) == 0
    assert main(["report", str(tmp_path), "--max-level", "none"]) == 0
    capsys.readouterr()
    (_, _, low), (_, _, none) = drawn
    assert budget_at(low) == 0.3  # where "moderate" starts on the recorded bands still
    assert len(none.axes) == 2
    assert "budget" not in artists(none) and "ceiling_strict" in artists(none, 0)


def test_report_draws_the_latest_of_interleaved_runs(tmp_path, capsys, drawn):
    write(tmp_path, [header("aa"), header("bb", {**SETTINGS, "budget": None}),
                     check(1, "bb", share=0.2), check(1, "aa", share=0.2)])
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(run 1 of 2 in privacy_history.jsonl, id aa)" in out
    assert "(run 2 of 2 in privacy_history.jsonl, id bb)" in out
    [(run, _, fig)] = drawn
    assert run.run_id == "bb" and len(fig.axes) == 2 and "budget" not in artists(fig)
