"""The text of BENCHMARKS.md: formatting helpers, one writer per section, and the whole file.

Everything printed is read from the results; the prose around the tables says what each
figure means and where a target is missed. The numbers are computed in
``benchmarks/analysis.py`` and the plots drawn in ``benchmarks/figures.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.analysis import (
    TARGETS,
    alarm_moves,
    bound,
    cadence,
    cells_over_bound,
    cheaper_but_worse,
    choose_learner,
    costlier_alternatives,
    count_checks,
    first_significant,
    full_set_break_even,
    lira_hits,
    lira_misses,
    max_share,
    mean,
    rank_statistics,
    score_learners,
    section,
    slope,
    strict_flat_runs,
)
from benchmarks.figures import plot_cost, plot_fidelity
from fesmia_hooks.measurement import POOL_STATISTICS

#: Every section heading BENCHMARKS.md carries (the smoke test checks them).
HEADINGS: tuple[str, ...] = (
    "## Summary: targets and results",
    "## 1. Cost of one check against its floor",
    "### How the cost grows",
    "## 2. Training overhead",
    "## 3. Against TensorFlow Privacy's per-epoch full-set attack",
    "## 4. Fidelity to strong attacks",
    "## 5. Honest alarms: placebo runs and power",
    "## 6. Choosing defaults",
    "### Learners and features",
    "### Natural and crafted canaries",
    "### Recommendations",
    "## 7. Language models",
    "## 8. Choosing the alarm statistic, and what the interval covers",
    "## How these figures were made",
    "## 9. Differential privacy: the audit's lower bound beside the accountant's ε",
    "## 10. Data audit after training: was this data used to train this model?",
)


# --------------------------------------------------------------------------- formatting
def num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def pct(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * value:.{digits}f} %"


def when(epoch: Any) -> str:
    return "never" if epoch is None else f"at epoch {epoch}"


def ms(seconds: Any) -> str:
    if seconds is None:
        return "–"
    return f"{1000 * seconds:.1f}" if seconds < 1 else f"{1000 * seconds:,.0f}"


def times(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}×"


def times_rounds(entry: dict[str, Any], digits: int = 2, key: str = "ratio_to_floor") -> str:
    """``entry[key]`` with the range of its rounds' own ratios, when there are several."""
    text = times(entry[key], digits)
    rounds = entry.get("ratio_rounds") or []
    if len(rounds) > 1:
        text += f" (rounds {min(rounds):.{digits}f}–{max(rounds):.{digits}f}×)"
    return text


def met(ok: bool | None) -> str:
    return "–" if ok is None else ("**met**" if ok else "**missed**")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def interval(r: dict[str, Any] | None) -> str:
    if not r:
        return "–"
    lo, hi = r["ci95"]
    return f"{r['alarms']}/{r['runs']} = {pct(r['rate'])} [{pct(lo)}, {pct(hi)}]"


def mode_note(results: dict[str, Any], name: str) -> str:
    sec = results.get("sections", {}).get(name)
    if sec is None:
        return "_Not run yet._"
    cfgs = {s.get("mode") for s in results["sections"].values()}
    note = f"_From the **{sec['mode']}** run of {sec['started']} ({sec['seconds']:.0f} s)._"
    if len(cfgs) > 1 and sec["mode"] != "full":
        note += " **These figures come from a quick run, not the full one.**"
    return note


# --------------------------------------------------------------------------- sections
def _summary(results: dict[str, Any]) -> list[str]:
    rows = []
    cost = section(results, "cost")
    if cost:
        r = cost["workloads"]["cnn"]["ratio"]
        rows.append(["1", "check / forward pass, defaults, CNN", "≤ 1.25×",
                     times_rounds(cost["workloads"]["cnn"], 2, "ratio"),
                     met(r <= TARGETS["cost"])])
        d = cost["workloads"]["digits_mlp"]["ratio"]
        rows.append(["1", "check / forward pass, defaults, digits MLP", "≤ 10×",
                     times_rounds(cost["workloads"]["digits_mlp"], 1, "ratio"),
                     met(d <= TARGETS["cost_digits"])])
        txt = section(results, "text")
        if txt and "cost" in txt:
            t = txt["cost"]["sequence"]["ratio_to_floor"]
            rows.append(["1", "check / forward pass, text GRU (sequence signals)", "≤ 1.05×",
                         times_rounds(txt["cost"]["sequence"]), met(t <= TARGETS["cost_text"])])
            lazy_text = txt["cost"]["sequence"].get("async_ratio_to_floor")
            if lazy_text is not None:
                rows.append(["1", "… with `asynchronous=True`: the training thread's wait / "
                             "forward pass, text GRU", "–", times(lazy_text, 2), "–"])
        for key, what in (("cnn", "CNN"), ("digits_mlp", "digits MLP")):
            a = cost["workloads"][key].get("async_ratio")
            if a is not None:
                rows.append(["1", f"… with `asynchronous=True`: the training thread's wait / "
                             f"forward pass, {what}", "–", times(a, 2), "–"])
        wide = cost["workloads"].get("wide_cnn")
        if wide:
            rows.append(["1", "the same, on a VGG-style CNN (context: a costlier forward pass)",
                         "–", times(wide["ratio"], 2), "–"])
    ov = section(results, "overhead")
    if ov:
        c = ov["cnn"]
        rows.append(["2", "training with monitor / without, CNN (A/B; in-run)", "≤ 1.02×",
                     f"{times(c['ratio_ab'], 3)}; {times(c['ratio_in_run'], 3)}",
                     met(c["ratio_ab"] <= TARGETS["overhead"])])
        rows.append(["2", "same weights with and without the monitor", "identical",
                     num(c["weights_identical"] and ov["digits_mlp"]["weights_identical"]),
                     met(c["weights_identical"] and ov["digits_mlp"]["weights_identical"])])
        rows.append(["3", "TF Privacy per-epoch check / probe check, CNN", "≥ 20×",
                     times(c["tfp_over_probe"]), met(c["tfp_over_probe"] >= TARGETS["tfp"])])
    pan = section(results, "panel")
    if pan:
        runs = [r for r in pan["runs"] if not r["spec"]["crafted"]]
        agree = mean([r["summary"]["verdict_agreement"] for r in runs])
        rows.append(["3", "same verdicts as the full-set attack (share of checks, mean over "
                     "runs)", "≥ 90 %", pct(agree),
                     met(agree is not None and agree >= TARGETS["agreement"])])
        leaky = [r for r in runs if r["summary"]["leaky"]]
        rhos = [r["summary"]["rho_relaxed"] for r in leaky]
        low = min([v for v in rhos if v is not None], default=None)
        rows.append(["4", "Spearman ρ, probe vs population attack, leaky runs (min)",
                     "≥ 0.9", f"{num(low)} over {len(leaky)} leaky run(s)",
                     met(None if low is None else low >= TARGETS["rho"])])
        hits = lira_hits(runs)
        flagged = [r for r in hits if r["summary"]["alarmed"]]
        rows.append(["4", "probe flags (breaches the default budget) every run where LiRA "
                     "has TPR ≥ 10 % at 1 % FPR", "all", f"{len(flagged)} of {len(hits)}",
                     met(len(flagged) == len(hits))])
        sig = [r for r in hits if first_significant(r) is not None]
        rows.append(["4", "… the same runs where the run-level test is significant at some "
                     "check (any level)", "–", f"{len(sig)} of {len(hits)}", "–"])
        power = [r["summary"]["alarmed"] for r in leaky]
        delays = [r["summary"]["alarm_delay_epochs"] for r in leaky
                  if r["summary"]["alarm_delay_epochs"] is not None]
        rows.append(["5", "power: leaky runs that alarm; delay after the population attack",
                     "–", f"{sum(power)} of {len(power)}; delays {delays or '–'} epochs", "–"])
    pl = section(results, "placebo")
    if pl:
        d = pl["default"]
        rows.append(["5", "placebo false-alarm rate per run, default budget", "≤ 5 %",
                     interval(d), met(d["rate"] <= TARGETS["placebo"])])
    st = section(results, "statistics")
    if st:
        scen = st["scenarios"]
        cells = [(scen[s]["coverage"][f"{r}_canary"], s, r)
                 for s in scen for r in ("strict", "relaxed", "auc")]
        worst, ws, wr = min(cells, key=lambda c: c[0]["rate"])
        rows.append(["8", "reported interval covers the population value (worst scenario "
                     "and reading, simulation)", "≥ 90 %", f"{_rate(worst)} ({ws}, {wr})",
                     met(worst["rate"] >= 0.9)])
        chosen, default = st.get("chosen"), library_default_statistic()
        alt = section(results, "panel_centroid")
        alt_statistic = (results["sections"].get("panel_centroid") or {}).get(
            "config", {}).get("panel_statistic")
        alt_missed = alt is not None and any(
            ((r.get("lira") or {}).get("tpr_at_1pct_fpr") or 0) >= 0.10
            and r["summary"].get("probe_first_alarm_epoch") is None for r in alt["runs"])
        ranked = rank_statistics(st["scenarios"])
        passing = [c for c in ranked if not (alt_missed and c == alt_statistic)]
        top = passing[0] if passing else None
        if chosen == default:
            verdict, ok = f"`{chosen}`", True
        elif top == default:
            verdict, ok = (f"`{chosen}` on the pools, but it missed a LiRA-positive panel run; "
                           f"the next: `{default}`"), True
        else:
            verdict, ok = f"`{top}`", False
        rows.append(["8", "the default alarm statistic: the strongest on the synthetic pools "
                     "among those that alarm on every LiRA-positive panel run", default,
                     verdict, met(ok)])
    dp = section(results, "dp")
    if dp:
        dp_rows = [s for s in dp["summary"] if s["target"] is not None]
        above = sum(s["runs_with_bound_above_accountant"] for s in dp_rows)
        total = sum(s["runs"] for s in dp_rows)
        rows.append(["9", "DP-SGD runs where the ε lower bound passes the accountant's ε "
                     f"(targets {', '.join(format(s['target'], 'g') for s in dp_rows)})",
                     "none", f"{above} of {total}", met(above == 0)])
        plain = next((s for s in dp["summary"] if s["target"] is None), None)
        if plain is not None:
            rows.append(["9", "ε lower bound without DP (highest over epochs, per seed)", "–",
                         ", ".join(num(v) for v in plain["lower_bound_max"]), "–"])
    au = section(results, "audit")
    if au:
        rows += _audit_summary_rows(au)
    if not rows:
        return ["_No results yet._"]
    return [table(["item", "what", "target", "result", ""], rows)]


def _cost(results: dict[str, Any], plots: Path, md_dir: Path) -> list[str]:
    cost = section(results, "cost")
    out = [mode_note(results, "cost")]
    if not cost:
        return out
    out.append(
        "The floor is one side-effect-free forward pass of the 128 canaries; a check is "
        f"`FeSMIA().evaluate` (forward pass, signals, {cost['defaults']['episodes']} "
        f"episodes, and {cost['defaults']['permutations']} label permutations that give the "
        "run-level test its null). `monitor.check` adds the run-level test and queues the "
        "outputs (TensorBoard events and the history file) for the background writer, which "
        "is flushed outside the timings. Medians of interleaved repeats; floor and check "
        "alternate which runs first. The digits MLP and the small CNN are timed in "
        f"{cost['workloads']['cnn'].get('rounds', 1)} round(s) of "
        f"{cost['workloads']['cnn']['repeats']} repeats, their medians pooled; the range of "
        "each round's own ratio is in brackets (the run-to-run noise of this shared machine)."
        + (" **Measured before `permutations=\"auto\"` became the default** (it draws 999 to "
           "4,999 permutations, 999 with no horizon): a default check now costs more, "
           "roughly in proportion to its permutations (see the slope below)."
           if cost["defaults"]["permutations"] < 999 else "")
    )
    rows = []
    for w in cost["workloads"].values():
        if "check_s" not in w:
            continue
        rows.append([w["what"], ms(w["floor_s"]), ms(w["check_s"]), ms(w["features_s"]),
                     ms(w["attack_s"]), times_rounds(w, 2, "ratio"), ms(w.get("monitor_check_s")),
                     times(w.get("monitor_ratio"), 2), ms(w.get("async_check_s")),
                     times(w.get("async_ratio"), 2)])
    out.append(table(["workload", "floor ms", "check ms", "of which forward + signals ms",
                      "attack ms", "check / floor", "monitor.check ms", "monitor / floor",
                      "asynchronous monitor.check ms", "asynchronous / floor"], rows))
    out.append(
        "*Asynchronous* is `PrivacyMonitor(asynchronous=True)`: what the training thread waits "
        "for (the forward pass, one copy of the features to the host, queueing the attack); "
        "the attack then runs on a worker thread on one core while training goes on, and its "
        "decision lands at the next epoch end (or step). The null's permutations are split over "
        "`torch.get_num_threads()` threads in a synchronous check; these runs use one thread "
        "(so that the floor and the check use the same cores).")
    lm = cost["workloads"].get("gpt2_shaped")
    if lm:
        out.append(f"Language models: {lm['what']} (median of {lm['repeats']} repeat(s); the "
                   "floor forwards the pool in 4 batches of 32):")
        rows = [[name, ms(lm["floor_s"]), ms(r["check_s"]), ms(r["attack_s"]),
                 times(r["ratio"], 2), r["forward_passes_per_check"]]
                for name, r in lm.items() if isinstance(r, dict)]
        out.append(table(["signals", "floor ms", "check ms", "attack ms", "check / floor",
                          "forward passes per check"], rows))
        out.append("`token_means` is the default: the classification signals (phi, log_prob, "
                   "margin, neg_entropy) per token, averaged: four reductions of every "
                   "position's 50,257 logits, which cost more than the forward pass; "
                   "`sequence` is `SequenceSignals()` (log_prob, min_k, zlib), one reduction. "
                   "The passes are sized from free memory (`max_logit_elements=\"auto\"`).")
    out.append("Each learner at its defaults on the CNN (laplacianshot and finetune with "
               f"{cost['learners'].get('finetune', {}).get('repeats', '–')} repeat(s)):")
    rows = [[m, ms(r["check_s"]), ms(r["attack_s"]), times(r["ratio"])]
            for m, r in cost["learners"].items()]
    out.append(table(["learner", "check ms", "attack ms", "check / floor"], rows))
    out.append("### How the cost grows")
    if plot_cost(cost, plots / "cost_scaling.png"):
        rel = os.path.relpath(plots / "cost_scaling.png", md_dir)
        out.append(f"![cost of one check against each setting]({rel})")
    rows = []
    for param, sweep in cost["sweeps"].items():
        cells = ", ".join(f"{r['value']}: {ms(r['check_s'])}" for r in sweep["rows"])
        rows.append([param, cost["defaults"][param], cells, num(sweep["loglog_slope"]),
                     num(slope([r["value"] for r in sweep["rows"]],
                               [r["attack_s"] for r in sweep["rows"]]))])
    out.append(table(["setting", "default", "value: ms per check", "log-log slope, check",
                      "log-log slope, attack only"], rows))
    share = cost.get("null_share_at_default")
    if share is not None:
        out.append(
            f"**What dominates.** A straight line through the permutation sweep puts "
            f"{pct(share)} of a default check on the CNN in the permutation null "
            f"({1e3 * cost['seconds_per_permutation']:.4f} ms per permutation: the default "
            "alarm reads the whole pool, one pass over the 128 canaries per permutation; "
            "an alarm on the episodes' statistics solves all 100 episodes again instead, "
            "the `episode alarm` rows above). The forward pass and signals are the `forward "
            "+ signals` column. The slopes of the whole check include the fixed forward "
            "pass; the attack alone grows about linearly with episodes (the check's own and "
            "the half-pools of its interval), less than linearly with queries (the size of "
            "each task), and hardly with shots; more canaries cost a longer forward pass and "
            "a longer pass over the pool. Timings on this shared machine wobble by some "
            "10-20 %, so read slopes, not single cells."
        )
    rows = [[", ".join(f"{k}={v}" for k, v in c["settings"].items()), ms(c["check_s"]),
             times(c["ratio"])] for c in cost["candidates"]]
    if rows:
        out.append("Cheaper settings on the CNN (smallest p-value = 1 / (permutations + 1)):")
        out.append(table(["settings", "check ms", "check / floor"], rows))
    return out


def _overhead(results: dict[str, Any]) -> list[str]:
    ov = section(results, "overhead")
    out = [mode_note(results, "overhead")]
    if not ov:
        return out
    out.append(
        "Training with the monitor (default probe and cadence: a check after every epoch; "
        "default budget with `action=\"alert\"` so both runs train the same epochs; TensorBoard "
        "and history written to a temporary folder) against the same training without it, "
        "same seed, alternating which runs first. *A/B* divides median wall times; *in-run* "
        "divides each monitored run's time by its time outside `monitor.step`, which is far "
        "less exposed to the noise of a shared machine."
    )
    rows = []
    for key, target in (("digits_mlp", "–"), ("cnn", "≤ 1.02×")):
        r = ov[key]
        rows.append([r["what"], r["epochs"], r["checks_per_run"], f"{r['seconds_per_epoch']:.2f}",
                     ms(r["probe_check_s"]), times(r["ratio_ab"], 3), times(r["ratio_in_run"], 3),
                     target, num(r["weights_identical"])])
    out.append(table(["workload", "epochs", "checks", "s per epoch", "check ms",
                      "A/B ratio", "in-run ratio", "target", "identical weights"], rows))
    return out


def _tfp(results: dict[str, Any]) -> list[str]:
    ov, pan = section(results, "overhead"), section(results, "panel")
    out = [mode_note(results, "panel")]
    out.append(
        "TensorFlow Privacy's `MembershipInferenceCallback` runs a threshold attack on the loss "
        "of the *entire* training and test sets after every epoch. It is re-done here (forward "
        "passes over both sets, per-sample loss, ROC, AUC, attacker advantage, PPV). It logs "
        "numbers and gives no verdict, so its attack is read with the probe's default budget "
        "(`LeakageBudget()`, which tolerates no significant leakage): it *flags* an epoch when "
        "its AUC is above 0.5 at level 0.05 / epochs (Mann-Whitney, one-sided). Loss and "
        "logit-scaled confidence rank samples alike, so this is also the population attack of "
        "items 4 and 5."
    )
    rows = []
    if ov:
        for key in ("digits_mlp", "cnn"):
            r = ov[key]
            rows.append([f"{r['what']} (overhead workload; test set {r['test_samples']:,})",
                         ms(r["tfp_check_s"]), ms(r["probe_check_s"]),
                         times(r["tfp_over_probe"]), times(r["tfp_overhead_ratio"], 3),
                         "–", "–", "–", "–", "–"])
    if pan:
        for run in pan["runs"]:
            s = run["summary"]
            rows.append([f"{run['spec']['name']} ({run['train_samples']:,} + "
                         f"{run['non_members']:,})", ms(s["tfp_check_s"]),
                         ms(s["probe_check_s"]), times(s["tfp_over_probe"]), "–",
                         pct(s["verdict_agreement"]),
                         f"{count_checks(run, True, False)} / {count_checks(run, False, True)}",
                         num(s["population_first_crossing_epoch"]),
                         num(s["probe_first_alarm_epoch"]),
                         num(run["checks"][-1]["population"]["crosses"])])
    out.append(table(["workload (train + test samples)", "full-set check ms", "probe check ms",
                      "full-set / probe (target ≥ 20×)", "full-set training overhead",
                      "same verdict (share of checks)", "checks flagged by full-set only / "
                      "probe only", "full-set first flag (epoch)", "probe first alarm (epoch)",
                      "full-set flags at the end"], rows))
    text = ("Epochs count from 0. The full-set check forwards every training and test sample, "
            "so its cost grows with the data; the probe's does not.")
    if ov:
        per_sample, samples = full_set_break_even(ov["cnn"])
        text += (f" On the CNN it costs {1e3 * per_sample:.2f} ms per sample, so it costs 20× "
                 f"the probe's check from about {samples:,.0f} "
                 "samples (training + test) on; on the digits data (1,797 samples in all) the "
                 "probe is the costlier of the two.")
    if pan:
        plain = [r for r in pan["runs"] if not r["spec"]["crafted"]]
        full_only = sum(count_checks(r, True, False) for r in plain)
        probe_only = sum(count_checks(r, False, True) for r in plain)
        both_end = [r for r in plain if r["summary"]["alarmed"]
                    and r["summary"]["population_first_crossing_epoch"] is not None]
        text += (f" Over the panel runs, {full_only} check(s) are flagged by the full-set "
                 f"attack only and {probe_only} by the probe only. The full-set attack tests "
                 "every training and test sample (1,797 on digits, 2,000 on the CNN), the probe "
                 "64 + 64 canaries, so on weak leakage the full-set test is significant "
                 "sooner: on "
                 f"{len(both_end)} of the {len(plain)} runs both flag, the probe later "
                 "(compare the two first-flag columns); LiRA (item 4) finds TPR ≥ 10 % at 1 % "
                 "FPR on each of them. The agreement target measures how soon the probe "
                 "catches up, and on short runs (15 CNN epochs) or slow leakage (digits-clean) "
                 "it does not within the target.")
    out.append(text)
    return out


def _fidelity(results: dict[str, Any], plots: Path, md_dir: Path) -> list[str]:
    pan = section(results, "panel")
    out = [mode_note(results, "panel")]
    if not pan:
        return out
    out.append(
        "Each panel run is watched by the default monitor after every epoch, and after every "
        "epoch the population attack (a threshold on the logit-scaled confidence over all "
        "members and all non-members) is measured on the same model. ρ is Spearman's rank "
        "correlation over the checks of one run between the probe's reading and the "
        "population attack's AUC; the target applies to *leaky* runs (at the run's last epoch "
        "the population attack is significant and its share beyond chance reaches the "
        "`moderate` band, 0.1). At the end, online LiRA (logit-scaled "
        "confidence, global variance, each pool sample in exactly half the shadows, shadows "
        "trained with the target's recipe on the same pool) gives the strong-attack verdict."
    )
    rows = []
    for run in pan["runs"]:
        if run["spec"]["crafted"]:
            continue
        s, f, li = run["summary"], run["summary"]["final"], run.get("lira") or {}
        rows.append([
            run["spec"]["name"], run["epochs"], num(s["leaky"]), num(s["rho_relaxed"]),
            num(s["rho_strict"]), f"{num(f['probe_strict'])} / {num(f['probe_relaxed'])}",
            f"{num(f.get('probe_share'))} / {num(f.get('population_share'))}",
            f["probe_level"], num(f["population_auc"]), pct(f["population_tpr_at_1pct_fpr"]),
            f"{pct(li.get('tpr_at_1pct_fpr'))} ({li.get('shadows', '–')})",
            num(li.get("auc")), num(first_significant(run)), num(max_share(run)),
            num(s["alarmed"]),
            met(None if not li else (s["alarmed"] or li["tpr_at_1pct_fpr"] < TARGETS["lira_tpr"])),
        ])
    out.append(table(["run", "epochs", "leaky", "ρ relaxed (target ≥ 0.9 if leaky)",
                      "ρ strict", "probe at end: strict / relaxed",
                      "share beyond chance at end: probe / population", "level at end",
                      "population AUC at end", "population TPR @ 1 % FPR",
                      "LiRA TPR @ 1 % FPR (shadows)", "LiRA AUC",
                      "first significant check (epoch)", "largest share beyond chance",
                      "probe alarmed",
                      "flags if LiRA ≥ 10 %"], rows))
    plain = [r for r in pan["runs"] if not r["spec"]["crafted"]]
    weak_runs = [r for r in plain if not r["summary"]["leaky"]]
    weak = [r["summary"]["rho_relaxed"] for r in weak_runs]
    if weak:
        first = mean([r["checks"][0]["population"]["auc"] for r in weak_runs])
        last = mean([r["checks"][-1]["population"]["auc"] for r in weak_runs])
        share = mean([r["summary"]["final"].get("population_share") for r in weak_runs])
        out.append(
            f"On the {len(weak)} run(s) that are not leaky in that sense, "
            f"its AUC goes from {num(first)} at the first epoch to {num(last)} at the last "
            f"(means over those runs), but its share beyond chance at the end stays at "
            f"{num(share)} on average, below the `moderate` band (0.1): the threshold attack "
            f"separates members at the low-confidence end, not at the top of its ranking. "
            f"ρ there averages {num(mean(weak))}. LiRA finds leakage on these runs.")
    hits = lira_hits(plain)
    quiet = [r for r in hits if not r["summary"]["alarmed"]]
    if quiet:
        sig = [r for r in quiet if first_significant(r) is not None]
        out.append(
            f"**Why the probe does not flag {len(quiet)} of the {len(hits)} runs where LiRA "
            f"reaches TPR ≥ 10 % at 1 % FPR.** On {len(sig)} of them the run-level test is "
            "significant at some check (first at epoch "
            + ", ".join(f"{first_significant(r)} on {r['spec']['name']}" for r in sig)
            + ") without the budget acting; see the monitor's settings in this run.")
    if plot_fidelity(pan["runs"], plots / "fidelity.png"):
        rel = os.path.relpath(plots / "fidelity.png", md_dir)
        out.append(f"![probe readings and the population attack, per epoch]({rel})")
    return out


def _honesty(results: dict[str, Any]) -> list[str]:
    pl, pan = section(results, "placebo"), section(results, "panel")
    out = [mode_note(results, "placebo")]
    if pl:
        out.append(
            f"Placebo runs: {pl['workload']}; {pl['epochs']} epochs, a check after every "
            f"epoch; seeds {pl['seeds'][0]}–{pl['seeds'][-1]} (data split, initialisation "
            "and probe). Any alarm is a false alarm. Intervals are exact (Clopper-Pearson) "
            "95 % binomial intervals. The *bound* is what the run-level test promises: with "
            "no horizon given, at most α·c/(c + 10) of runs alarm within c checks."
        )
        cand = ", ".join(f"{k}={v}" for k, v in pl.get("candidate_probe", {}).items())
        c = pl["default_checks_per_run"]
        rows = [["default: `FeSMIA()`, `LeakageBudget()`", c, interval(pl["default"]),
                 pct(bound(c)), "≤ 5 %", met(pl["default"]["rate"] <= 0.05)]]
        if pl.get("candidate"):
            rows.append([f"cheaper probe ({cand})", c, interval(pl["candidate"]), pct(bound(c)),
                         "≤ 5 %", met(pl["candidate"]["rate"] <= 0.05)])
        out.append(table(["probe", "checks per run", "false alarms per run [95 % CI]",
                          "bound", "target", ""], rows))
        hi = pl["default"]["ci95"][1]
        if hi <= 0.05:
            out.append(f"With {pl['default']['runs']} runs even the upper end of the default's "
                       f"interval ({pct(hi)}) is below the 5 % target. The default monitor "
                       f"reads the `{library_default_statistic()}` statistic on "
                       "`permutations=\"auto\"` (999 here: no horizon is given).")
        elif pl["default"]["rate"] <= 0.05 < hi:
            out.append(f"The point estimate meets the target; with {pl['default']['runs']} "
                       f"runs the interval cannot exclude rates up to {pct(hi)}. Narrowing it "
                       "to below 5 % would take several hundred runs.")
    if pan:
        out.append(mode_note(results, "panel"))
        rows = []
        for run in pan["runs"]:
            if run["spec"]["crafted"]:
                continue
            for label, s in (("default", run["summary"]),
                             ("cheaper", run.get("candidate_summary"))):
                if not s:
                    continue
                rows.append([run["spec"]["name"], label, num(s["leaky"]),
                             num(s["population_first_crossing_epoch"]),
                             num(s["probe_first_alarm_epoch"]), num(s["alarm_delay_epochs"])])
        out.append("Power on the panel (epochs count from 0; the delay is the alarm's epoch "
                   "minus the epoch where the population attack first crosses the budget; a "
                   "negative delay means the probe alarmed first):")
        out.append(table(["run", "probe", "leaky", "population first crosses (epoch)",
                          "alarm (epoch)", "delay (epochs)"], rows))
    return out


def _defaults(results: dict[str, Any]) -> list[str]:
    pan, pl = section(results, "panel"), section(results, "placebo")
    out = [mode_note(results, "panel")]
    if not pan:
        return out
    alt = ", ".join(f"{k}={v}" for k, v in pan["alt_probe"].items())
    out.append("### Learners and features")
    out.append(
        f"Every configuration is replayed on the weights kept at {pan['alt_checks']} evenly "
        f"spaced epochs of each panel run, with a fresh monitor and the default budget, and "
        f"with {alt} (laplacianshot and finetune cost seconds per check at the default's 999 "
        "or more permutations; "
        "the same setting for every configuration keeps the comparison fair). ρ is computed "
        "on those checks. Placebo alarms come from the placebo runs "
        + (f"({pl['alt_checks_per_run']} checks per run, so the run-level bound is "
           f"{pct(bound(pl['alt_checks_per_run']))}; laplacianshot and finetune on the first "
           f"{pl['heavy_runs']} runs only)." if pl else "(not run).")
    )
    runs = [r for r in pan["runs"] if not r["spec"]["crafted"]]
    names: list[str] = []
    for r in runs:
        names += [n for n in r["alt"] if n not in names]
    rows = []
    for name in names:
        per = [r["alt"].get(name) for r in runs]
        if all(p is None or p.get("cost_only") for p in per):
            cost = {r["spec"]["kind"]: ms(r["alt"][name]["seconds_per_check"])
                    for r in runs if name in r["alt"]}
            rows.append([name, cost.get("digits", "–"), cost.get("cnn", "–"),
                         "not compared: cost only", "", "", ""])
            continue
        kinds: dict[str, list[float]] = {}
        for r, p in zip(runs, per, strict=True):
            if p is not None and not p.get("cost_only"):
                kinds.setdefault(r["spec"]["kind"], []).append(p["seconds_per_check"])
        leaky = [p for r, p in zip(runs, per, strict=True)
                 if p is not None and r["summary"]["leaky"]]
        rows.append([
            name,
            ms(mean(kinds.get("digits", []))), ms(mean(kinds.get("cnn", []))),
            num(mean([p["rho_relaxed"] for p in per if p is not None])),
            num(mean([p["rho_relaxed"] for p in leaky])),
            f"{sum(p['alarmed'] for p in leaky)} of {len(leaky)}",
            interval(pl["configs"].get(name, {}).get("natural")) if pl else "–",
        ])
    out.append(table(["learner/features", "ms per check, digits", "ms per check, CNN",
                      "mean ρ, all runs", "mean ρ, leaky runs", "leaky runs alarmed",
                      "placebo false alarms [95 % CI]"], rows))
    out.append("### Natural and crafted canaries")
    out.append(
        "Crafted canaries are held-out samples given a certainly wrong label; 64 of them are "
        "added to training and 64 more held out. They measure worst-case memorisation: how "
        "much the model learns about a sample it can only memorise. Natural canaries "
        "(ordinary samples) measure what an attacker learns about typical training data. On "
        "the same model the two answer different questions. Readings at the last epoch "
        "(default probe, every epoch):"
    )
    rows = []
    for run in pan["runs"]:
        cs = run.get("crafted_summary")
        if not cs:
            continue
        for kind in ("natural", "crafted"):
            k = cs[kind]
            rows.append([run["spec"]["name"], kind, num(k["final_auc"]), num(k["final_strict"]),
                         num(k["final_relaxed"]), num(k["rho_relaxed"]), num(k["alarm_epoch"])])
    out.append(table(["run", "canaries", "episode AUC at end", "strict at end",
                      "relaxed at end", "ρ relaxed vs population", "first alarm (epoch)"], rows))
    if pl:
        rows = []
        for name, r in pl["configs"].items():
            if r.get("crafted"):
                rows.append([name, interval(r["natural"]), interval(r["crafted"])])
        c = pl["alt_checks_per_run"]
        out.append(f"Placebo false alarms by canary kind (never trained on; crafted placebos "
                   f"carry wrong labels; {c} checks per run with "
                   f"{pan['alt_probe'].get('permutations', 499)} permutations, so the bound is "
                   f"{pct(bound(c))} per run):")
        out.append(table(["learner/features", "natural placebo", "crafted placebo"], rows))
        over = [f"{name} on {kind} placebos, {cell['alarms']}/{cell['runs']}: P = {p:.2f}"
                for name, kind, cell, p in cells_over_bound(pl["configs"], c)]
        if over:
            out.append("Cells above the bound, with the chance of seeing at least that many "
                       "alarms if the true rate were the bound: " + "; ".join(over) + ". Eight "
                       "cells of each kind are read, so one such cell is not by itself "
                       "evidence of a broken test; a repeat with more runs would settle it.")
    out.append("### Recommendations")
    out += recommendations(results)
    return out


# --------------------------------------------------------------------------- recommendations
def recommendations(results: dict[str, Any]) -> list[str]:
    """The defaults the evidence supports; every number is read from the results."""
    pan, pl = section(results, "panel"), section(results, "placebo")
    cost, ov = section(results, "cost"), section(results, "overhead")
    out: list[str] = []
    runs = [r for r in pan["runs"] if not r["spec"]["crafted"]] if pan else []
    if runs:
        out.append(_reco_learner(runs, pl))
        out.append(_reco_size(runs, pl, cost, pan))
    crafted = [r for r in pan["runs"] if r.get("crafted_summary")] if pan else []
    if crafted:
        out.append(_reco_crafted(crafted, pl))
    if ov:
        out.append(_reco_cadence(ov))
    if cost:
        out.append(_reco_cost(cost))
    if runs:
        out.append(_reco_strict(runs))
        out.append(_reco_misses(runs))
    return [p for p in out if p]


def _reco_learner(runs: list[dict[str, Any]], pl: dict[str, Any] | None) -> str:
    scored = score_learners(runs, pl)
    choice = choose_learner(scored)
    if choice is None:
        return ""
    honest, best, near, cheap = choice
    default = "simpleshot/signals"
    text = (f"- **Learner and features.** On the leaky runs, the highest mean ρ among "
            f"configurations with at most 5 % placebo alarms is `{best}` "
            f"(ρ {num(honest[best]['rho'])}, {ms(honest[best]['seconds'])} ms per check); the "
            f"cheapest within 0.05 of it is `{cheap}` (ρ {num(honest[cheap]['rho'])}, "
            f"{ms(honest[cheap]['seconds'])} ms). ")
    if default in near:
        d = honest[default]
        others = [f"`{k}` {ratio:.0f}×"
                  for k, ratio in costlier_alternatives(honest, near, default)]
        text += (f"**Keep `simpleshot` on `signals`**: it is within 0.05 of the best "
                 f"(ρ {num(d['rho'])}, alarmed on {d['alarmed']} of {d['n']} leaky runs)")
        text += (", and the others as good cost " + ", ".join(others) + " as much per check"
                 if others else "") + ". "
        for k in cheaper_but_worse(honest, near, default):
            text += (f"`{k}` is cheaper, but over all runs, weak leakage included, it "
                     f"tracks the population attack worse (mean ρ {num(honest[k]['rho_all'])}"
                     f" against {num(d['rho_all'])}). ")
    else:
        text += f"The default `{default}` is not among the best; consider `{cheap}`. "
    emb = scored.get("simpleshot/embeddings")
    if emb:
        text += (f"Embeddings alone carry little of the membership signal here (simpleshot ρ "
                 f"{num(emb['rho'])}, alarmed on {emb['alarmed']} of {emb['n']} leaky runs): "
                 "they are label-free, while memorisation shows in the label's confidence; "
                 "`both` adds their cost without adding fidelity.")
    return text


def _reco_size(
    runs: list[dict[str, Any]], pl: dict[str, Any] | None, cost: dict[str, Any] | None,
    pan: dict[str, Any],
) -> str:
    cand = pan.get("candidate_probe") or {}
    if not cand or not all(r.get("candidate_summary") for r in runs):
        return ""
    label = ", ".join(f"{k}={v}" for k, v in cand.items())
    firsts, later, alarmed = alarm_moves(runs)
    moves = [f"{name} {when(d)} → {when(c)}" for name, d, c in firsts]
    weak = [r for r in runs if not r["summary"]["leaky"]]
    rho_d = mean([r["summary"]["rho_relaxed"] for r in weak])
    rho_c = mean([r["candidate_summary"]["rho_relaxed"] for r in weak])
    speed = ""
    if cost:
        match = [c for c in cost["candidates"] if c["settings"] == cand]
        if match:
            speed = (f" costs {ms(match[0]['check_s'])} ms per check on the CNN against "
                     f"{ms(cost['workloads']['cnn']['check_s'])} ms for the default, and")
    honest = ""
    if pl and pl.get("candidate"):
        honest = (f" Placebo false alarms: default {interval(pl['default'])}, cheaper "
                  f"{interval(pl['candidate'])}.")
    verdict = ("**Keep the default episodes and permutations.**" if later else
               f"**The cheaper probe ({label}) loses no power here and may replace the "
               "default.**")
    return (f"- **Episodes and permutations.** {verdict} The cheaper probe ({label}){speed} "
            f"alarms later or not at all on {later} of the {alarmed} panel runs where the "
            f"default alarms (first alarm, default → cheaper: {'; '.join(moves)}); on the "
            f"runs that leak only weakly its readings are noisier (mean ρ {num(rho_c)} against "
            f"{num(rho_d)}).{honest} The permutation null is what buys the power to alarm "
            "early on weak leakage with a run-level error rate; spend less on it only with a "
            "sparser cadence.")


def _reco_crafted(crafted: list[dict[str, Any]], pl: dict[str, Any] | None) -> str:
    parts = []
    for r in crafted:
        cs = r["crafted_summary"]
        parts.append(
            f"{r['spec']['name']}: episode AUC {num(cs['natural']['final_auc'])} natural "
            f"against {num(cs['crafted']['final_auc'])} crafted at the end; natural canaries "
            f"alarm {when(cs['natural']['alarm_epoch'])}, crafted "
            f"{when(cs['crafted']['alarm_epoch'])}")
    honest = ""
    if pl:
        r = pl["configs"].get("simpleshot/signals", {})
        if r.get("crafted"):
            honest = (f" On placebo runs, crafted canaries raise {interval(r['crafted'])} "
                      f"false alarms (natural: {interval(r['natural'])}).")
    return ("- **Crafted canaries earn a place, as an option.** On the same models ("
            + "; ".join(parts) + ")." + honest + " They answer the worst-case question (does "
            "the model memorise what it can only memorise?) and they raise it early even on a "
            "clean model whose natural canaries stay quiet; natural canaries answer what an "
            "attacker learns about ordinary training data (data integrity). Offer them in "
            "`CanarySet` as an explicit constructor, documented as that different question; "
            "keep natural canaries the default, since crafted ones must be inserted into "
            "training and slightly change it.")


def _reco_cadence(ov: dict[str, Any]) -> str:
    parts = []
    for key, name in (("digits_mlp", "digits MLP"), ("cnn", "CNN")):
        r = ov[key]
        share, every = cadence(r)
        parts.append(f"{name}: a check is {pct(share)} of an epoch (in-run ratio "
                     f"{times(r['ratio_in_run'], 3)} at every epoch), so a 2 % overhead needs "
                     f"`every_n_epochs={every}`")
    return ("- **Cadence.** A check costs the same whatever the model beyond its forward pass, "
            "so its share of training is the check's time over an epoch's: "
            + "; ".join(parts) + ". Keep every epoch as the default (the earliest alarm), and "
            "document how to pick `every_n_epochs` from the check time that every report "
            "carries (`seconds_forward + seconds_attack`).")


def _reco_cost(cost: dict[str, Any]) -> str:
    cnn = cost["workloads"]["cnn"]
    digits = cost["workloads"]["digits_mlp"]
    text = (f"- **The cost targets at defaults**: {times(cnn['ratio'], 2)} the forward pass on "
            f"the CNN (target ≤ 1.25×: {met(cnn['ratio'] <= 1.25)}), "
            f"{times(digits['ratio'], 1)} on the digits MLP (target ≤ 10×: "
            f"{met(digits['ratio'] <= 10)}). ")
    if cost.get("null_share_at_default") is not None:
        text += (f"{pct(cost['null_share_at_default'], 0)} of a default check on the CNN is "
                 "the permutation null. ")
    episodic = cost["workloads"].get("cnn_episode_alarm")
    episodic_digits = cost["workloads"].get("digits_mlp_episode_alarm")
    if episodic and episodic_digits:
        text += (f"With the episodes' statistic as the alarm (`statistic=\"auc+strict\"`, the "
                 f"previous default: every episode solved again under each permutation) a "
                 f"check costs {times(episodic['ratio'], 2)} on the CNN and "
                 f"{times(episodic_digits['ratio'], 1)} on the digits MLP. ")
    wide = cost["workloads"].get("wide_cnn")
    if wide:
        text += (f"On a model whose forward pass costs what a CIFAR ResNet's does (the "
                 f"VGG-style CNN), the default check is {times(wide['ratio'], 2)} its floor. ")
    lazy = cnn.get("async_ratio")
    if lazy is not None:
        text += (f"With `asynchronous=True` the training thread waits {times(lazy, 2)} the "
                 "forward pass on the CNN: the attack runs on another core and its decision "
                 "lands at the next epoch end (or step).")
    return text


def _reco_strict(runs: list[dict[str, Any]]) -> str:
    flat = strict_flat_runs(runs)
    if not flat:
        return ""
    parts = []
    for r in flat:
        cs = r["checks"]
        parts.append(f"{r['spec']['name']}: population AUC {num(cs[0]['population']['auc'])} → "
                     f"{num(cs[-1]['population']['auc'])}, ρ relaxed "
                     f"{num(r['summary']['rho_relaxed'])} but ρ strict "
                     f"{num(r['summary']['rho_strict'])}")
    return ("- **The bands read the strict reading (members named with no false accusation), "
            "which need not grow with leakage.** "
            + "; ".join(parts) + ". Memorised noisy labels separate members from non-members "
            "at the low-confidence end of the scores, while the strict reading looks only at "
            "the top, where correctly labelled members and non-members are all confident; the "
            "population attack's own strict reading stays flat there too (plot of item 4). "
            "The significance test reads the relaxed value and tracks; a level that reads the "
            "strict value can stay at `moderate` while leakage grows. Worth a look when the "
            "bands are next revised (not changed here).")


def _reco_misses(runs: list[dict[str, Any]]) -> str:
    missed = lira_misses(runs)
    byname = {r["spec"]["name"]: r for r in runs}
    sig = [n for n in missed if first_significant(byname[n]) is not None]
    if missed and len(sig) == len(missed):
        return (f"- **What the defaults miss.** LiRA finds TPR ≥ 10 % at 1 % FPR on "
                f"{', '.join(missed)}; the probe's run-level test is significant on every one "
                "of them, yet the default budget did not act.")
    if not missed:
        return ("- **Strong attacks.** The probe alarmed on every panel run where LiRA finds "
                "TPR ≥ 10 % at 1 % FPR.")
    return (f"- **What the defaults miss.** LiRA finds TPR ≥ 10 % at 1 % FPR on "
            f"{', '.join(missed)}, and the probe does not alarm there: the canary signals are "
            "threshold-style confidences, and an attack with per-sample shadow models sees "
            "leakage they cannot. A ceiling on the level is not a guarantee against LiRA-class "
            "attacks; say so in the docs.")


# --------------------------------------------------------------------------- method
def _how(results: dict[str, Any]) -> list[str]:
    out = [
        "Regenerate everything with `make bench` (full) or `make bench-quick`; "
        "`python benchmarks/run.py --only placebo` re-runs one section and merges it into "
        "`benchmarks/results.json`; `--report-only` rewrites this file from the results.",
        "All figures are ratios or counts measured in one process; absolute times depend on "
        "the machine, which is shared and noisy. Torch runs on one thread "
        "(`torch.set_num_threads(1)`, faster here for these small tensors).",
    ]
    rows = []
    for name, sec in results.get("sections", {}).items():
        m = sec["machine"]
        rows.append([name, sec["mode"], sec["started"], f"{sec['seconds']:.0f}",
                     f"{m['platform']}; {m['processor']}; {m['cpu_count']} CPUs",
                     f"torch {m['torch']}, {m['torch_threads']} thread(s)",
                     ", ".join(str(v) for v in m["load_average_at_start"])])
    out.append(table(["section", "mode", "started (UTC)", "seconds", "machine", "torch",
                      "load average at start"], rows))
    out.append(
        "Seeds: every panel run uses seed 0 for its data split, initialisation, batch order "
        "and probe; LiRA's shadows use seeds 17–32 and a balanced inclusion matrix from seed "
        "0; placebo runs use seeds 1000 onwards. Workloads: the digits MLP is "
        "`fesmia_hooks.demos.digits` (`load_noisy_digits`, `digits_mlp`; Adam lr 1e-3, batch "
        "32); its population non-members are every other digit, with the same label noise. "
        "The CNN's images are made in code (`benchmarks/common.py: make_images`): a digit "
        "upsampled to 24×24 at a random place on a 32×32 canvas, random foreground and "
        "background colours, Gaussian pixel noise, 20 % label noise; Adam lr 1e-3, batch 64."
    )
    secs = results.get("sections", {})
    parts = []
    if "panel" in secs:
        c = secs["panel"]["config"]
        parts.append(
            f"panel ({c['mode']}): digits runs {c['digits_epochs']} epochs; the CNN run "
            f"{c['cnn_members']:,} members + {c['cnn_members']:,} non-members, "
            f"{c['cnn_epochs']} epochs; LiRA {c['lira_shadows']} shadows (CNN "
            f"{c['cnn_lira_shadows']}); population attack read on {c['population_episodes']:,} "
            f"random query sets; learners compared on {c['alt_checks']} kept epochs per run")
    if "overhead" in secs:
        c = secs["overhead"]["config"]
        parts.append(
            f"overhead ({c['mode']}): digits {c['overhead_digits_epochs']} epochs, CNN "
            f"{c['overhead_cnn_members']:,} samples for {c['overhead_cnn_epochs']} epochs, "
            f"{c['overhead_repeats']} repeat(s) of each pair")
    if "placebo" in secs:
        c = secs["placebo"]["config"]
        parts.append(
            f"placebo ({c['mode']}): {c['placebo_runs']} runs of {c['placebo_epochs']} epochs; "
            f"learners compared on {c['placebo_alt_checks']} kept epochs per run, laplacianshot "
            f"and finetune on the first {c['placebo_runs_heavy']} runs")
    if "statistics" in secs:
        c = secs["statistics"]["config"]
        parts.append(
            f"statistics ({c['mode']}): {c['stat_pools']} pools of 64 + 64 per scenario, "
            f"{c['stat_permutations']} permutations, population values from "
            f"{c['stat_population']:,} + {c['stat_population']:,} samples and "
            f"{c['stat_pop_episodes']:,} episodes")
    if parts:
        out.append("Sizes: " + "; ".join(parts) + ".")
    out.append(
        "What was cut to fit two shared cores: the CNN panel run trains on fewer samples and "
        "epochs than the overhead workload so that its 16 LiRA shadows fit; LiRA queries each "
        "sample once (no augmented queries, unlike Carlini et al.); the comparison of learners "
        "uses 99 permutations and a subset of epochs, and the costly learners fewer placebo "
        "runs; finetune on embeddings is timed but not compared (seconds per check)."
    )
    return out


def _text(results: dict[str, Any]) -> list[str]:
    sec = section(results, "text")
    if sec is None:
        return ["_Not run yet: `python benchmarks/run.py --only text`._"]
    cfg, fid, cst = sec["config"], sec["fidelity"], sec["cost"]
    first, last = fid["population_auc_first_last"]
    intro = (
        f"The text demo's character-level GRU (`fesmia_hooks.demos.text_demo`), trained "
        f"{cfg['epochs']} epochs on {cfg['members']} prose passages of CPython's "
        f"`pydoc_data.topics` ({cfg['non_members']} more never trained on), without stopping, "
        f"watched after every epoch by two probes on {cfg['canaries_per_side']} + "
        f"{cfg['canaries_per_side']} canaries: *sequence* reads `{cfg['sequence_signals']}` "
        f"(mean log-likelihood, Min-K%, zlib ratio); *token means* reads `FeSMIA()`'s default "
        f"signals averaged over tokens. The population attack thresholds each signal over all "
        f"passages; its AUC on the log-likelihood goes from {num(first)} to {num(last)}, and "
        f"its expected strict Log-MIA (the probe's scale, on random 15 + 15 query sets) first "
        f"reaches 0.25 {when(fid['population_crosses_budget_epoch'])}. One thread; seed "
        f"{cfg['seed']}. The cost is timed on the final model: "
        + (f"{cst['rounds']} rounds of {cst['repeats']} interleaved repeats, the ratios of "
           "the medians over all of them, and in brackets the range of each round's own "
           "ratio (the run-to-run noise of this shared machine)."
           if cst.get("rounds", 1) > 1 else f"{cst['repeats']} interleaved repeats.")
    )
    rows = []
    for name in ("sequence", "token_means"):
        f, c = fid[name], cst[name]
        rows.append([
            name.replace("_", " "),
            num(f["spearman_auc_vs_population_auc"]),
            num(f["spearman_relaxed_vs_population_auc"]),
            when(f["first_significant_epoch"]),
            when(f["first_breach_epoch"]),
            num(f["population_auc_at_first_breach"]),
            ms(c["check_s"]),
            times_rounds(c),
            pct(c["share_of_train_epoch"], 0),
            times(c.get("async_ratio_to_floor"), 2),
        ])
    header = ["probe", "ρ AUC vs population AUC", "ρ relaxed vs population AUC",
              "first significant", "first breach", "population AUC at breach",
              "check ms", f"check / forward pass ({ms(cst['floor_s'])} ms)",
              f"check / training epoch ({num(cst['train_epoch_s'], 1)} s)",
              "asynchronous: training thread's wait / forward pass"]
    return [mode_note(results, "text"), intro, table(header, rows)]


def _dp(results: dict[str, Any]) -> list[str]:
    sec = section(results, "dp")
    if sec is None:
        return ["_Not run yet: `python benchmarks/run.py --only dp`._"]
    cfg = sec["config"]
    intro = (
        f"The digits MLP (64-1024-10) trained {cfg['epochs']} epochs with DP-SGD (Opacus: "
        f"clipping at norm {cfg['max_grad_norm']:g}, noise sized for each target ε at "
        f"δ = {cfg['delta']:g}, Poisson sampling, RDP accountant) and without DP (Adam), "
        f"{cfg['seeds']} seed(s) each. {cfg['canaries']} held-out digits with a certainly "
        "wrong label were each put into training by their own fair coin "
        "(`CanarySet.for_audit`); the monitor read after every epoch the accountant's ε, "
        f"the one-run audit's lower bound ({cfg['confidence']:.0%}, δ = {cfg['delta']:g}, "
        "black-box: one label-free signal of the final model per canary) and Log-MIA. "
        "A lower bound above the accountant's ε would mean a broken DP implementation."
    )
    rows = []
    for s in sec["summary"]:
        target = "no DP" if s["target"] is None else f"ε = {s['target']:g}"
        rows.append([
            target,
            "∞ (no guarantee)" if s["accountant_final"] is None else num(s["accountant_final"]),
            ", ".join(num(v) for v in s["lower_bound_final"]),
            ", ".join(num(v) for v in s["lower_bound_max"]),
            f"{s['runs_with_bound_above_accountant']} of {s['runs']}"
            if s["target"] is not None else "–",
            num(s["strict_final"]), num(s["relaxed_final"]), num(s["auc_final"]),
            f"{s['significant_runs']} of {s['runs']}", pct(s["accuracy"], 0),
            num(s["seconds"], 0),
        ])
    header = ["training", "accountant ε (final)", "lower bound, final (per seed)",
              "highest per-epoch bound (each at 95 %; the highest of many is not a 95 % "
              "statement)", "runs with bound > accountant",
              "Log-MIA strict (final)", "relaxed", "AUC", "runs flagged (run-level test)",
              "test accuracy", "s per run"]
    best = sec["best_attainable"]
    best_rows = [[m, num(v)] for m, v in best.items()]
    dp_rows = [s for s in sec["summary"] if s["target"] is not None]
    plain = next((s for s in sec["summary"] if s["target"] is None), None)
    above = sum(s["runs_with_bound_above_accountant"] for s in dp_rows)
    total = sum(s["runs"] for s in dp_rows)
    verdict = (
        f"**Validity:** the lower bound passed the accountant's ε in {above} of {total} DP "
        "runs, at any epoch."
    )
    if plain is not None:
        reached = max(plain["lower_bound_max"])
        most = best.get(str(cfg["canaries"]), best.get(cfg["canaries"]))
        beaten = [f"{s['target']:g}" for s in dp_rows if reached > s["accountant_final"]]
        verdict += (
            f" **Without DP** the same canaries proved ε > {num(reached)} (the most "
            f"{cfg['canaries']} canaries can show is {num(most)}), "
            + (f"above the accountant's ε of the DP run(s) at ε = {', '.join(beaten)}: the "
               "audit tells a private run from a non-private one there"
               if beaten else "below every DP target tried: these canaries cannot tell the "
               "runs apart by ε alone")
            + ". The AUC of the few-shot attack falls with ε: "
            + ", ".join(f"{'no DP' if s['target'] is None else 'ε = ' + format(s['target'], 'g')}"
                        f" {num(s['auc_final'])}" for s in sec["summary"]) + "."
        )
    notes = (
        "The largest bound a pool of canaries can give (every guess right, 95 %, δ = 1e-5; "
        "the guess counts on a fixed grid, Bonferroni): a lower bound is only as high as its "
        "canaries allow, whatever the model does. For comparison, Steinke, Nasr and "
        "Jagielski (NeurIPS 2023) report a one-run lower bound of about 1.8 against an "
        "accountant's ε of 4 for a Wide ResNet on CIFAR-10 in the *white-box* setting "
        "(gradient canaries); black-box audits of the final model, as here, give lower "
        "bounds (see `docs/science.md#dp-audit`)."
    )
    return [mode_note(results, "dp"), intro, table(header, rows), verdict, notes,
            table(["canaries m", "best attainable ε lower bound"], best_rows)]


#: The suspect-set size the audit's acceptance is read at (issue 14), when it was measured.
AUDIT_SIZE = 50
_AUDIT_VICTIMS = (("digits", "digits MLP"), ("text", "text GRU"))


def _shown(r: dict[str, Any]) -> str:
    """``k/n = rate [low, high]`` of the audit's "shown" verdicts."""
    return f"{r['shown']}/{r['runs']} = {_rate(r)}"


def _compatible(r: dict[str, Any], alpha: float) -> bool:
    """A false-positive rate compatible with ``alpha``: its exact interval reaches it."""
    return r["low"] <= alpha


def _audit_row(victim: dict[str, Any]) -> dict[str, Any]:
    """The row of :data:`AUDIT_SIZE` suspects, or the middle size when it was not measured."""
    rows = victim["sizes"]
    return next((r for r in rows if r["size"] == AUDIT_SIZE), rows[len(rows) // 2])


def _audit_summary_rows(au: dict[str, Any]) -> list[list[str]]:
    alpha = au["config"]["alpha"]
    rows = []
    for key, name in _AUDIT_VICTIMS:
        v = au[key]
        r = _audit_row(v)
        what = f"{name}, {r['size']} suspects"
        rows.append(["10", f"audit, {what}: \"shown\" on models trained with them (power)",
                     "–", _shown(r["with"]), "–"])
        rows.append(["10", f"audit, {what}: \"shown\" on models trained without them "
                     "(false positives)", f"{pct(alpha, 0)} within the 95 % CI",
                     _shown(r["without"]), met(_compatible(r["without"], alpha))])
    pooled = au["placebo_pooled"]
    rows.append(["10", "audit placebo: \"shown\" where nothing was trained on (both victims)",
                 f"{pct(alpha, 0)} within the 95 % CI", _shown(pooled),
                 met(_compatible(pooled, alpha))])
    return rows


def _audit(results: dict[str, Any]) -> list[str]:
    sec = section(results, "audit")
    if sec is None:
        return ["_Not run yet: `python benchmarks/run.py --only audit`._"]
    cfg = sec["config"]
    d, t, alpha = cfg["digits"], cfg["text"], cfg["alpha"]
    intro = (
        "`fesmia_hooks.audit.audit(model, suspects, non_members)` after training: the "
        "model's label-free membership signals of every sample, standardised over suspects "
        "and non-members together and averaged into one score; a one-sided permutation test "
        f"({cfg['permutations']:,} permutations) on the difference of mean scores, \"shown\" "
        f"at p ≤ {alpha:g}; the effect is the AUC of suspects against non-members. For each "
        "seed the data are split at random into a base training set, a pool of suspects, "
        f"{cfg['non_members']} known non-members and the rest; a model is trained on the base "
        "set alone (*without*) and, with the same recipe and seed, on the base set plus the "
        "suspects (*with*). The first *k* suspects of the pool are audited against the same "
        "non-members on both models: the share of seeds where the audit says \"shown\" is "
        "its power on *with* and its false-positive rate on *without*, each with its exact "
        "(Clopper-Pearson) 95 % interval."
    )
    victims = (
        f"**Digits MLP** ({d['model']}, scikit-learn's digits, clean labels): Adam lr "
        f"{d['lr']:g}, batch {d['batch']}, {d['epochs']} epochs on {d['base']} digits plus "
        f"the *k* suspects (one *with* model per size); {d['seeds']} seed(s). "
        f"**Text GRU** ({t['model']}, the text demo's model, on passages of 64–192 characters "
        f"of CPython's `pydoc_data.topics`): the demo's training step (Adam lr {t['lr']:g}, "
        f"batch {t['batch']}, gradient norm clipped at 1), {t['epochs']} epochs on "
        f"{t['base']} passages plus "
        + (f"the whole pool of {max(cfg['sizes'])} suspect passages (one *with* model per "
           "seed: the *k* audited passages are part of the added pool, which keeps the cost "
           "to two models per seed)" if t["nested"] else "the *k* suspect passages")
        + f"; {t['seeds']} seed(s). Neither recipe was tuned to the audit: the MLP is "
        "trained until it fits its training set, as a small network on little data usually "
        "is; the GRU briefly (the text demo trains it 60 epochs). How much they overfit:"
    )
    fit_rows = []
    for key, name in _AUDIT_VICTIMS:
        for model, f in sec[key]["fit"].items():
            label = "without" if model == "without" else f"with {model.split('_')[1]}"
            if "train_accuracy" in f:
                fit_rows.append([name, label, "accuracy", pct(f["train_accuracy"]),
                                 pct(f["held_out_accuracy"])])
            else:
                fit_rows.append([name, label, "loss (nats per character)",
                                 num(f["train_nll"], 3), num(f["held_out_nll"], 3)])
    out = [mode_note(results, "audit"), intro, victims,
           table(["victim", "model", "measure (mean over seeds)", "training set",
                  "held out"], fit_rows)]
    rows = []
    for key, name in _AUDIT_VICTIMS:
        v = sec[key]
        for r in v["sizes"]:
            w, wo = r["with"], r["without"]
            rows.append([name, r["size"], _shown(w),
                         f"{num(w['auc_mean'])} ({num(w['auc_min'])}–{num(w['auc_max'])})",
                         num(w["p_median"], 4), _shown(wo),
                         f"{num(wo['auc_mean'])} ({num(wo['auc_min'])}–{num(wo['auc_max'])})",
                         num(_compatible(wo, alpha))])
    out.append(table(["victim", "suspects k", "trained with them: shown [95 % CI]",
                      "effect AUC, mean (range)", "median p", "trained without: shown "
                      "[95 % CI]", "effect AUC, mean (range)",
                      f"false-positive rate compatible with {pct(alpha, 0)}"], rows))
    verdicts = []
    for key, name in _AUDIT_VICTIMS:
        r = _audit_row(sec[key])
        verdicts.append(
            f"the {name} with {r['size']} suspects: \"shown\" on {_shown(r['with'])} of the "
            f"models trained with them, on {_shown(r['without'])} of those trained without")
    out.append("**At the acceptance size:** " + "; ".join(verdicts) + ".")
    out.append(
        f"**Placebo:** on every *with* and *without* model, {cfg['placebo_draws']} audit(s) "
        f"of {cfg['placebo_suspects']} suspects and {cfg['non_members']} non-members drawn "
        "at random from samples no model of the seed was trained on: nothing leaks by "
        "construction, so each \"shown\" is a false positive, whatever the model learnt.")
    placebo_rows = [[name, _shown(sec[key]["placebo"]), num(sec[key]["placebo"]["p_mean"]),
                     num(_compatible(sec[key]["placebo"], alpha))]
                    for key, name in _AUDIT_VICTIMS]
    placebo_rows.append(["both", _shown(sec["placebo_pooled"]), "–",
                         num(_compatible(sec["placebo_pooled"], alpha))])
    out.append(table(["victim", "placebo audits: shown [95 % CI]", "mean p (0.5 expected)",
                      f"compatible with {pct(alpha, 0)}"], placebo_rows))
    out.append(
        "A false-positive rate is *compatible* with the level when its exact interval reaches "
        f"{pct(alpha, 0)}. Within one seed the sizes share their models and nested suspect "
        "sets, so the rows of one victim are not independent of each other; across seeds "
        f"everything is redrawn. One audit took {ms(sec['digits']['audit_seconds'])} ms "
        f"(digits) and {ms(sec['text']['audit_seconds'])} ms (text), median; training took "
        f"{num(sec['digits']['train_seconds_per_seed'], 0)} s and "
        f"{num(sec['text']['train_seconds_per_seed'], 0)} s per seed. \"Not shown\" is not "
        "proof of absence: the power column says how often a set of that size trained on "
        "with these recipes goes unnoticed."
    )
    return out


def _rate(r: dict[str, Any] | None) -> str:
    """A rate with its exact 95 % interval, e.g. ``4.3 % [2.3, 7.3]``."""
    if not r:
        return "–"
    return f"{pct(r['rate'])} [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"


def _statistics(results: dict[str, Any]) -> list[str]:
    st = section(results, "statistics")
    out = [mode_note(results, "statistics")]
    if st is None:
        return out + ["_Run `python benchmarks/run.py --only statistics`._"]
    c = st["config"]
    scen = list(st["scenarios"])
    leaky = [s for s in scen if s != "null"]
    cands = list(st["scenarios"][scen[0]]["rejection"])
    default = library_default_statistic()
    out.append(
        f"Synthetic canary pools of {c['members']} members + {c['non_members']} non-members "
        f"(`benchmarks/statistics.py`), {c['pools']:,} pools per scenario, one check each "
        f"(`FeSMIA()` defaults, {c['permutations']} permutations): *null* (members and "
        "non-members from one distribution: the rate is the test's size), *mean shift* "
        "(members' confidence +0.5 sd), *memorised outliers* (10 % of members at +4 sd), "
        "*low tail* (30 % of non-members at -3 sd, the top of the ranking unchanged). Every "
        "candidate is computed on the same fixed permutations, so each is a valid permutation "
        "test; `a+b` is the min-p combination of `a` and `b`. The table gives the share of "
        f"pools whose per-check p-value is ≤ {c['alpha']}, with its exact (Clopper-Pearson) "
        "95 % interval; in the null column that share should be about 5 %.")
    rows = []
    for cand in cands:
        cells = [_rate(st["scenarios"][s]["rejection"][cand]) for s in scen]
        null = st["scenarios"]["null"]["rejection"][cand] if "null" in scen else None
        worst = min((st["scenarios"][s]["rejection"][cand]["rate"] for s in leaky),
                    default=None)
        name = f"`{cand}`"
        if cand == st.get("chosen"):
            name += " (chosen)"
        if cand == default:
            name += " (library default)"
        rows.append([name, *cells, num(None if null is None else null["low"] <= c["alpha"]),
                     pct(worst)])
    out.append(table(["statistic", *[f"{s}: rejected [95 % CI]" for s in scen],
                      "size compatible with 5 %", "worst power (leaky scenarios)"], rows))
    small = c.get("small_level")
    if small is not None and "rejection_small" in st["scenarios"][scen[0]]:
        out.append(
            f"The same pools at the per-check level **{small}**: what the run-level rule "
            f"leaves a check of a run with ten expected checks (alpha / 10), where the alarms "
            f"of a real run are decided. The cost column is what the permutations cost: the "
            f"pool's statistics (`centroid_*`, `signal_mean`) need no episode under the "
            f"permutations, the others solve every episode again under each.")
        rows = []
        for cand in cands:
            cells = [_rate(st["scenarios"][s]["rejection_small"][cand]) for s in scen]
            worst = min((st["scenarios"][s]["rejection_small"][cand]["rate"] for s in leaky),
                        default=None)
            pool_only = all(p in POOL_STATISTICS for p in cand.split("+"))
            rows.append([f"`{cand}`", *cells, pct(worst),
                         "one pass over the pool" if pool_only
                         else "every episode, every permutation"])
        out.append(table(["statistic", *[f"{s}: rejected [95 % CI]" for s in scen],
                          f"worst power at {small}", "null's cost"], rows))
    chosen = st.get("chosen")
    rule = ("**The rule:** among the statistics whose size is compatible with 5 % (the lower "
            "end of the null interval at most 5 %), take the one whose worst power over the "
            "three leaky scenarios is highest; mean power breaks ties. ")
    if chosen is None:
        rule += "No candidate passed the size check."
    elif chosen == default:
        rule += (f"It chooses `{chosen}`, which is the library's default "
                 "(`fesmia_hooks.calibration.DEFAULT_STATISTIC`).")
    else:
        rule += (f"On these pools it chooses `{chosen}`, **not** the library's default "
                 f"`{default}`. ")
    rule += ("A default must then also alarm on every benchmark-panel run where LiRA finds "
             "TPR ≥ 10 % at 1 % FPR (real models, item 4): synthetic pools are not the "
             "leakage real training makes.")
    out.append(rule)
    out.extend(_panel_alternative(results, chosen, default))
    out.append(
        "**What the interval covers.** The population value of a reading is its mean over "
        f"{c['population_episodes']:,} episodes drawn from a pool of {c['population_size']:,} "
        f"+ {c['population_size']:,} samples of the same population; *coverage* is the share "
        "of the pools whose interval contains it (exact 95 % interval). The *canary-draw* "
        "interval (`log_mia_*_low/_high`, `auc_low/_high`, the one reported) is the 2.5th to "
        "97.5th percentile of the readings of 200 random half-pools around the check's "
        "reading (their own episode noise removed), so its width carries the pool-to-pool "
        "variance and a skewed reading gets a skewed interval (a normal interval, reading ± "
        "1.96 sd from the same half-pools, covered the AUC under a mean shift in 89.0 % "
        "[84.9, 92.3] of pools in the previous version of this table); the *episode* "
        "interval (`*_episode_low/_high`, the paper's) only the episode-to-episode variance "
        "inside one pool. The *spread across pools* is the standard deviation of the reading "
        "over the pools: the width a 95 % interval needs is about 2 × that spread.")
    rows = []
    low_cov = []
    for s in scen:
        row = st["scenarios"][s]
        for r in ("strict", "relaxed", "auc"):
            can, epi = row["coverage"][f"{r}_canary"], row["coverage"][f"{r}_episode"]
            if can["rate"] < 0.9:
                low_cov.append(f"{s} / {r} ({pct(can['rate'])})")
            rows.append([s, r, num(row["population"][r], 3), _rate(can), _rate(epi),
                         num(row["half_width"][f"{r}_canary"], 3),
                         num(row["half_width"][f"{r}_episode"], 3),
                         num(row["spread_across_pools"][r], 3)])
    out.append(table(["scenario", "reading", "population value",
                      "canary-draw interval covers [95 % CI]", "episode interval covers",
                      "half-width, canary draws", "half-width, episodes",
                      "spread across pools (sd)"], rows))
    worst = min(st["scenarios"][s]["coverage"][f"{r}_canary"]["rate"]
                for s in scen for r in ("strict", "relaxed", "auc"))
    text = (f"The reported (canary-draw) interval covers the population value in at least "
            f"{pct(worst)} of pools in every scenario and reading (target ≥ 90 %: "
            f"{met(worst >= 0.9)}). ")
    if low_cov:
        text += ("Below 90 %: " + "; ".join(low_cov) + "; "
                 + ("the exact interval of every such cell still contains 90 %, so a "
                    "larger simulation could settle either way. " if all(
                        st["scenarios"][s]["coverage"][f"{r}_canary"]["high"] >= 0.9
                        for s in scen for r in ("strict", "relaxed", "auc")) else
                    "at least one cell's exact interval lies wholly below 90 %. "))
    epi = max(st["scenarios"][s]["coverage"][f"{r}_episode"]["rate"]
              for s in scen for r in ("strict", "relaxed", "auc"))
    text += (f"The episode interval covers it in at most {pct(epi)} of pools: it describes "
             "the episodes of one canary pool, not what another pool of the same data would "
             "read.")
    out.append(text)
    return out


def _panel_alternative(results: dict[str, Any], chosen: str | None, default: str) -> list[str]:
    """The panel watched with the runner-up statistic, next to the default's alarms."""
    alt, base = section(results, "panel_centroid"), section(results, "panel")
    if alt is None or base is None:
        return []
    config = results["sections"]["panel_centroid"]["config"]
    statistic = config.get("panel_statistic") or "?"
    first = {r["spec"]["name"]: r["summary"].get("probe_first_alarm_epoch")
             for r in base["runs"]}
    rows, hits, caught = [], 0, 0
    for r in alt["runs"]:
        tpr = (r.get("lira") or {}).get("tpr_at_1pct_fpr")
        positive = tpr is not None and tpr >= 0.10
        mine = r["summary"].get("probe_first_alarm_epoch")
        hits += positive
        caught += positive and mine is not None
        rows.append([r["spec"]["name"], pct(tpr) if tpr is not None else "–",
                     "never" if mine is None else mine,
                     "never" if first.get(r["spec"]["name"]) is None
                     else first[r["spec"]["name"]]])
    note = config.get("note")
    text = (f"**The panel with `{statistic}` as the alarm** (`benchmarks/run.py --only "
            f"panel_centroid`{'; ' + note if note else ''}): it alarmed on {caught} of the "
            f"{hits} LiRA-positive runs. First alarm epoch of each run, next to the default's "
            "(item 4):")
    verdict = ""
    if caught < hits:
        verdict = (f"So `{statistic}` cannot be the default, however it fares on the synthetic "
                   "pools: on a LiRA-positive run it never alarmed.")
    return [text, table(["run", "LiRA TPR at 1 % FPR", f"first alarm, `{statistic}`",
                         f"first alarm, `{default}` (default)"], rows), verdict]


def library_default_statistic() -> str:
    from fesmia_hooks.calibration import DEFAULT_STATISTIC

    return DEFAULT_STATISTIC


def write_markdown(results: dict[str, Any], path: Path, plots: Path) -> None:
    """Write the whole BENCHMARKS.md to ``path`` and its plots into ``plots``."""
    path = Path(path)
    plots = Path(plots)
    md_dir = path.parent
    parts: list[str] = [
        "# Benchmarks",
        "Is the probe cheap, is it right, and are its alarms honest? Generated by "
        "`benchmarks/run.py` from `benchmarks/results.json`; do not edit by hand.",
        HEADINGS[0], *_summary(results),
        HEADINGS[1], *_cost(results, plots, md_dir),
        HEADINGS[3], *_overhead(results),
        HEADINGS[4], *_tfp(results),
        HEADINGS[5], *_fidelity(results, plots, md_dir),
        HEADINGS[6], *_honesty(results),
        HEADINGS[7], *_defaults(results),
        HEADINGS[11], *_text(results),
        HEADINGS[12], *_statistics(results),
        HEADINGS[14], *_dp(results),
        HEADINGS[15], *_audit(results),
        HEADINGS[13], *_how(results),
    ]
    text = "\n\n".join(p for p in parts if p) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
