"""Smoke test of the benchmark harness: every section on a tiny configuration, into tmp_path.

The numbers of a tiny run mean nothing; this checks that the machinery runs end to end, that
results.json has the structure BENCHMARKS.md is written from, and that every table heading
is written. No timing value is asserted.
"""

import json
import logging

import pytest

from benchmarks import report
from benchmarks.panel import CONFIGS, COST_ONLY, config_name
from benchmarks.run import SECTIONS, Config, main, run_all

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _restore_logging():
    # The runner's main() configures logging for a console run; leave other tests as found.
    logger = logging.getLogger("fesmia_hooks")
    level, root_handlers = logger.level, list(logging.getLogger().handlers)
    yield
    logger.setLevel(level)
    logging.getLogger().handlers[:] = root_handlers


def test_tiny_benchmark_writes_results_and_every_table(tmp_path):
    cfg = Config.tiny()
    results_path = tmp_path / "results.json"
    markdown = tmp_path / "BENCHMARKS.md"
    plots = tmp_path / "plots"
    run_all(cfg, results_path=results_path, markdown_path=markdown, plots_dir=plots)

    results = json.loads(results_path.read_text())
    assert set(results["sections"]) == set(SECTIONS)
    for sec in results["sections"].values():
        assert sec["mode"] == "tiny"
        assert sec["config"]["probe_kwargs"] == {"episodes": 10, "permutations": 19}
        assert {"platform", "torch", "torch_threads", "cpu_count"} <= set(sec["machine"])
        assert sec["machine"]["torch_threads"] == 1

    cost = results["sections"]["cost"]["result"]
    assert set(cost["workloads"]) == {"digits_mlp", "cnn", "digits_mlp_episode_alarm",
                                        "cnn_episode_alarm"}
    for w in cost["workloads"].values():
        assert w["floor_s"] > 0 and w["check_s"] > 0
        assert w["ratio"] == pytest.approx(w["check_s"] / w["floor_s"], rel=1e-3)
    assert set(cost["learners"]) == {"threshold", "simpleshot", "laplacianshot", "finetune"}
    assert [r["value"] for r in cost["sweeps"]["episodes"]["rows"]] == [10, 20]

    overhead = results["sections"]["overhead"]["result"]
    for key in ("digits_mlp", "cnn"):
        # Trap 4: training with the monitor ends with exactly the weights it has without it.
        assert overhead[key]["weights_identical"] is True
        assert overhead[key]["checks_per_run"] == overhead[key]["epochs"]

    dp = results["sections"]["dp"]["result"]
    assert [s["target"] for s in dp["summary"]] == [None, 8.0]
    for run in dp["runs"]:
        assert len(run["epochs"]) == cfg.dp_epochs
        if run["target"] is not None:  # the engine's ε is read at every check
            assert all(row["epsilon_accountant"] > 0 for row in run["epochs"])
        assert all(row["epsilon_lower_bound"] >= 0 for row in run["epochs"])

    audit = results["sections"]["audit"]["result"]
    for key, seeds in (("digits", cfg.audit_digits_seeds), ("text", cfg.audit_text_seeds)):
        victim = audit[key]
        assert len(victim["runs"]) == seeds
        assert [r["size"] for r in victim["sizes"]] == list(cfg.audit_sizes)
        for row in victim["sizes"]:
            for cond in ("with", "without"):
                r = row[cond]
                assert r["runs"] == seeds
                assert 0.0 <= r["low"] <= r["rate"] <= r["high"] <= 1.0
                assert 0.0 <= r["auc_mean"] <= 1.0
        assert victim["placebo"]["runs"] == seeds * 2 * cfg.audit_placebo_draws
    assert audit["placebo_pooled"]["runs"] == sum(audit[k]["placebo"]["runs"]
                                                  for k in ("digits", "text"))

    panel = results["sections"]["panel"]["result"]
    assert [r["spec"]["name"] for r in panel["runs"]] == [s.name for s in cfg.panel]
    for run in panel["runs"]:
        assert len(run["checks"]) == run["epochs"]
        first = run["checks"][0]
        assert {"probe", "candidate", "population", "tfp"} <= set(first)
        assert 0.0 <= first["population"]["auc"] <= 1.0
        assert isinstance(first["population"]["crosses"], bool)
        assert 0.0 <= run["summary"]["verdict_agreement"] <= 1.0
        compared = {config_name(m, f) for m, f in CONFIGS}
        assert compared <= set(run["alt"])
        if run["spec"]["crafted"]:
            assert "lira" not in run
            assert set(run["crafted_summary"]) == {"natural", "crafted"}
            assert "simpleshot/signals" in run["alt_crafted"]
        else:
            assert run["lira"]["shadows"] == 2
            assert 0.0 <= run["lira"]["tpr_at_1pct_fpr"] <= 1.0
    cnn = next(r for r in panel["runs"] if r["spec"]["name"] == "cnn-noise20")
    assert {config_name(m, f) for m, f in COST_ONLY} <= set(cnn["alt"])

    placebo = results["sections"]["placebo"]["result"]
    assert placebo["default"]["runs"] == cfg.placebo_runs
    lo, hi = placebo["default"]["ci95"]
    assert 0.0 <= lo <= placebo["default"]["rate"] <= hi <= 1.0
    assert placebo["configs"]["laplacianshot/signals"]["natural"]["runs"] == 1
    assert placebo["configs"]["simpleshot/signals"]["crafted"]["runs"] == cfg.placebo_runs

    text = markdown.read_text()
    for heading in report.HEADINGS:
        assert heading + "\n" in text, heading
    for name in ("cost_scaling.png", "fidelity.png"):
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC
        assert f"](plots/{name})" in text
    assert "tiny" in text

    # The markdown can be regenerated from results.json alone.
    again = tmp_path / "again.md"
    main(["--report-only", "--results", str(results_path), "--markdown", str(again),
          "--plots", str(plots)])
    assert again.read_text() == text
