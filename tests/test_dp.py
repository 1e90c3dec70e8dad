"""The monitor's differential-privacy readings: the accountant's ε and the audit's lower bound
in every report, the history and the summary; budgets on either; clear errors."""

import math

import pytest
import torch
from _history import checks_in
from torch import nn

import fesmia_hooks as fh


class Memoriser(nn.Module):
    """A model that has memorised the members' labels perfectly and knows nothing else."""

    def __init__(self, inputs, labels, num_classes):
        super().__init__()
        self.register_buffer("keys", inputs.clone())
        self.register_buffer("values", labels.clone())
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, x):
        hit = (x[:, None, :] == self.keys[None]).all(-1)  # [B, members]
        logits = torch.zeros(x.shape[0], self.num_classes)
        known = hit.any(1)
        label = self.values[hit.float().argmax(1)]
        return logits.scatter(1, label[:, None], self.scale * known[:, None].float())


def _audit_canaries(seed=0, size=256):
    g = torch.Generator().manual_seed(seed)
    data = (torch.randn(600, 5, generator=g), torch.randint(0, 4, (600,), generator=g))
    return fh.CanarySet.for_audit(data, num_classes=4, size=size, seed=seed)


def _probe():
    return fh.FeSMIA(episodes=40, permutations=99)


def test_memorised_canaries_give_a_bound_near_the_best_a_pool_of_this_size_allows(tmp_path):
    (x_in, y_in), canaries = _audit_canaries()
    monitor = fh.PrivacyMonitor(canaries, probe=_probe(), log_dir=tmp_path, preflight="off")
    report = monitor.step(Memoriser(x_in, y_in, 4), epoch=0)
    monitor.close()
    assert 2.0 < report.epsilon_lower_bound <= fh.epsilon.best_attainable_epsilon(256)
    assert report.epsilon_confidence == 0.95 and report.epsilon_delta == 1e-5
    assert math.isnan(report.epsilon_accountant)
    assert "DP audit: ε >= " in report.summary()
    line = checks_in(tmp_path / "privacy_history.jsonl")[0]
    assert line["epsilon_lower_bound"] == pytest.approx(report.epsilon_lower_bound)


def test_a_model_that_saw_no_canary_gives_a_bound_of_zero():
    (_, _), canaries = _audit_canaries(seed=1)
    torch.manual_seed(0)
    monitor = fh.PrivacyMonitor(canaries, probe=_probe(), preflight="off")
    report = monitor.step(nn.Linear(5, 4), epoch=0)
    assert report.epsilon_lower_bound == 0.0


def test_canaries_not_drawn_by_coins_claim_nothing():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 5, generator=g), torch.randint(0, 4, (200,), generator=g)
    canaries = fh.CanarySet(members=(x[:100], y[:100]), non_members=(x[100:], y[100:]))
    monitor = fh.PrivacyMonitor(canaries, probe=_probe(), preflight="off")
    report = monitor.step(Memoriser(x[:100], y[:100], 4), epoch=0)
    assert math.isnan(report.epsilon_lower_bound)  # NaN: not 0, which would say "nothing seen"
    assert "DP audit" not in report.summary()


def test_the_accountant_is_read_at_each_check_for_the_monitors_delta():
    (x_in, y_in), canaries = _audit_canaries()
    asked = []

    class Engine:  # the shape of Opacus's PrivacyEngine
        def get_epsilon(self, delta):
            asked.append(delta)
            return 0.5 * len(asked)

    monitor = fh.PrivacyMonitor(canaries, probe=_probe(), accountant=Engine(), delta=1e-6,
                                preflight="off")
    model = nn.Linear(5, 4)
    reports = [monitor.step(model, epoch=e) for e in range(3)]
    assert [r.epsilon_accountant for r in reports] == [0.5, 1.0, 1.5]
    assert asked == [1e-6] * 3
    assert all(r.epsilon_delta == 1e-6 for r in reports)
    assert "accountant ε 1.50" in reports[-1].summary()


def test_an_asynchronous_check_reports_the_accountants_epsilon_of_its_own_weights():
    (_, _), canaries = _audit_canaries()
    calls = []
    monitor = fh.PrivacyMonitor(canaries, probe=_probe(), asynchronous=True, preflight="off",
                                accountant=lambda delta: float(len(calls.append(1) or calls)))
    model = nn.Linear(5, 4)
    monitor.step(model, epoch=0)
    calls.extend([1] * 10)  # training goes on: the accountant's ε grows before it lands
    monitor.flush()
    assert monitor.history[0].epsilon_accountant == 1.0
    monitor.close()


def test_a_failing_accountant_reads_nan_and_warns():
    (_, _), canaries = _audit_canaries()

    def broken(delta):
        raise RuntimeError("no steps yet")

    monitor = fh.PrivacyMonitor(canaries, probe=_probe(), accountant=broken, preflight="off")
    with pytest.warns(UserWarning, match="the accountant could not give ε"):
        report = monitor.step(nn.Linear(5, 4), epoch=0)
    assert math.isnan(report.epsilon_accountant)


def test_a_budget_on_the_accountants_epsilon_stops_without_a_significant_test():
    (_, _), canaries = _audit_canaries()
    eps = iter([1.0, 2.0, 3.5, 4.0])
    budget = fh.LeakageBudget(max_values={"epsilon_accountant": 3.0}, action="stop")
    monitor = fh.PrivacyMonitor(canaries, probe=_probe(), budget=budget, preflight="off",
                                accountant=lambda delta: next(eps))
    model = nn.Linear(5, 4)
    reports = [monitor.step(model, epoch=e) for e in range(3)]
    assert not any(r.significant for r in reports)
    assert [r.breached for r in reports] == [False, False, True]
    assert monitor.should_stop and monitor.stopped_epoch == 2
    assert "epsilon_accountant = 3.5 exceeds the budget 3" in monitor.stop_message


def test_a_budget_on_the_lower_bound_stops_when_the_canaries_prove_it():
    (x_in, y_in), canaries = _audit_canaries()
    budget = fh.LeakageBudget(max_values={"epsilon_lower_bound": 1.0}, action="stop")
    monitor = fh.PrivacyMonitor(canaries, probe=_probe(), budget=budget, preflight="off")
    torch.manual_seed(0)
    assert not monitor.step(nn.Linear(5, 4), epoch=0).breached
    assert monitor.step(Memoriser(x_in, y_in, 4), epoch=1).breached
    assert "epsilon_lower_bound" in monitor.stop_message


def test_budgets_on_an_epsilon_that_cannot_be_read_are_refused():
    (_, _), audit = _audit_canaries()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 5, generator=g), torch.randint(0, 4, (200,), generator=g)
    plain = fh.CanarySet(members=(x[:100], y[:100]), non_members=(x[100:], y[100:]))
    with pytest.raises(fh.ConfigurationError, match="needs an `accountant`"):
        fh.PrivacyMonitor(audit, budget=fh.LeakageBudget(max_values={"epsilon_accountant": 8}))
    with pytest.raises(fh.ConfigurationError, match="needs canaries included by independent coins"):
        fh.PrivacyMonitor(plain, budget=fh.LeakageBudget(max_values={"epsilon_lower_bound": 1}))


@pytest.mark.parametrize("kwargs, message", [
    ({"accountant": 3.0}, "`accountant` must have get_epsilon(delta)"),
    ({"delta": 1.0}, "delta"),
    ({"delta": -0.1}, "delta"),
    ({"audit_confidence": 1.0}, "audit_confidence"),
])
def test_bad_dp_options_get_clear_errors(kwargs, message):
    (_, _), canaries = _audit_canaries()
    with pytest.raises(fh.ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fh.PrivacyMonitor(canaries, **kwargs)


def test_the_dp_chart_draws_both_epsilons(tmp_path):
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fesmia_hooks.sinks import custom_scalar_layout

    (x_in, y_in), canaries = _audit_canaries()
    monitor = fh.PrivacyMonitor(canaries, probe=_probe(), log_dir=tmp_path, preflight="off",
                                accountant=lambda delta: 2.0)
    monitor.step(Memoriser(x_in, y_in, 4), epoch=0)
    monitor.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    charts = custom_scalar_layout()["Privacy leakage (FeS-MIA)"]
    kind, patterns = next(v for k, v in charts.items() if k.startswith("DP ε"))
    assert kind == "Multiline"
    assert [[t for t in tags if re.search(p, t)] for p in patterns] == [
        ["privacy/epsilon_accountant"], ["privacy/epsilon_lower_bound"]]


def test_a_budget_on_the_bound_spends_its_confidence_over_the_run():
    (x_in, y_in), canaries = _audit_canaries()
    budget = fh.LeakageBudget(max_values={"epsilon_lower_bound": 50.0}, action="alert")
    capped = fh.PrivacyMonitor(canaries, probe=_probe(), budget=budget, preflight="off")
    free = fh.PrivacyMonitor(canaries, probe=_probe(), preflight="off")
    model = Memoriser(x_in, y_in, 4)
    for epoch in range(3):
        capped.step(model, epoch=epoch)
        free.step(model, epoch=epoch)
    # check k at 1 - 0.05 / (k (k + 1)): the family holds at 95 % over any number of checks
    assert [r.epsilon_confidence for r in capped.history] == pytest.approx(
        [1 - 0.05 / 2, 1 - 0.05 / 6, 1 - 0.05 / 12])
    assert [r.epsilon_confidence for r in free.history] == [0.95] * 3
    assert all(c.epsilon_lower_bound < f.epsilon_lower_bound
               for c, f in zip(capped.history, free.history, strict=True))


def test_readings_not_taken_are_left_out_of_the_scalars():
    from fesmia_hooks.sinks import scalar_metrics

    (_, _), canaries = _audit_canaries()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 5, generator=g), torch.randint(0, 4, (200,), generator=g)
    plain = fh.CanarySet(members=(x[:100], y[:100]), non_members=(x[100:], y[100:]))
    report = fh.PrivacyMonitor(plain, probe=_probe(), preflight="off").step(nn.Linear(5, 4),
                                                                            epoch=0)
    keys = scalar_metrics(report)
    assert "privacy/epsilon_lower_bound" not in keys and "privacy/epsilon_accountant" not in keys
    assert "privacy/log_mia_strict" in keys
    audited = fh.PrivacyMonitor(canaries, probe=_probe(), preflight="off",
                                accountant=lambda d: 1.0).step(nn.Linear(5, 4), epoch=0)
    assert {"privacy/epsilon_lower_bound", "privacy/epsilon_accountant"} <= set(
        scalar_metrics(audited))


def test_a_budget_on_the_bound_needs_a_probe_that_reads_signals():
    (_, _), canaries = _audit_canaries()
    budget = fh.LeakageBudget(max_values={"epsilon_lower_bound": 1.0})
    probe = fh.FeSMIA(features="embeddings", embedding_layer="0", episodes=40, permutations=99)
    with pytest.raises(fh.ConfigurationError, match="computed from the probe's signals"):
        fh.PrivacyMonitor(canaries, probe=probe, budget=budget)


def test_new_canaries_wait_for_the_asynchronous_check_taken_on_the_old_ones():
    (x_in, y_in), first = _audit_canaries(seed=0)
    (_, _), second = _audit_canaries(seed=5)
    sync = fh.PrivacyMonitor(first, probe=_probe(), preflight="off")
    lazy = fh.PrivacyMonitor(first, probe=_probe(), preflight="off", asynchronous=True)
    model = Memoriser(x_in, y_in, 4)
    expected = sync.step(model, epoch=0)
    lazy.step(model, epoch=0)
    lazy.set_canaries(second)  # the pending check lands first, on the canaries it was taken on
    assert lazy.history[0].epsilon_lower_bound == expected.epsilon_lower_bound
    lazy.close()


def test_a_history_line_without_dp_readings_reads_back_as_nan(tmp_path):
    from fesmia_hooks.report import LeakageReport

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 5, generator=g), torch.randint(0, 4, (200,), generator=g)
    plain = fh.CanarySet(members=(x[:100], y[:100]), non_members=(x[100:], y[100:]))
    monitor = fh.PrivacyMonitor(plain, probe=_probe(), preflight="off", log_dir=tmp_path)
    monitor.step(nn.Linear(5, 4), epoch=0)
    monitor.close()
    line = checks_in(tmp_path / "privacy_history.jsonl")[0]
    assert line["epsilon_lower_bound"] is None  # JSON has no NaN
    back = LeakageReport.from_dict(line)
    assert math.isnan(back.epsilon_lower_bound) and "DP audit" not in back.summary()
