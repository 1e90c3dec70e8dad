"""Honest alarms: placebo canaries (never trained on) must not raise the alarm.

docs/science.md#run-level-test: the false-alarm rate per *training run*, over 30 checks, stays at the
budget's alpha (5 %). Each run draws its own data split, model initialisation and probe seed.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import fesmia_hooks as fh

DIGITS = load_digits()
X = torch.tensor(DIGITS.data / 16.0, dtype=torch.float32)
Y = torch.tensor(DIGITS.target)


def placebo_run(seed, epochs=30):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(X), generator=g)
    x, y = X[order], Y[order]
    flip = torch.rand(len(y), generator=g) < 0.2  # label noise: the model does memorise
    y = torch.where(flip, torch.randint(0, 10, (len(y),), generator=g), y)
    train_x, train_y = x[:300], y[:300]
    # "Members" that were never trained on: any alarm is a false alarm.
    placebo = fh.CanarySet(members=(x[300:348], y[300:348]), non_members=(x[348:396], y[348:396]))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = fh.PrivacyMonitor(
        placebo,
        probe=fh.FeSMIA(episodes=30, permutations=199, seed=seed),
        budget=fh.LeakageBudget(action="alert"),  # default ceiling and alpha, never stops
    )
    for epoch in range(epochs):
        for i in range(0, 300, 50):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(train_x[i : i + 50]), train_y[i : i + 50]).backward()
            optimizer.step()
        monitor.step(model, epoch=epoch)
    return monitor


def test_placebo_runs_raise_no_alarm_in_95_percent_of_runs():
    runs = [placebo_run(seed) for seed in range(40)]
    assert all(m.checks == 30 for m in runs)
    alarmed = sum(any(r.breached for r in m.history) for m in runs)
    # At a true rate of 5 %, 5 or more alarms in 40 runs happen with probability 0.048: more
    # is evidence (at the 5 % level) that the per-run rate exceeds alpha.
    assert alarmed <= 4, f"{alarmed} of {len(runs)} placebo runs alarmed"
    # The control that shows this can fail is in test_demo.py: the same kind of model, trained
    # on its canary members, does raise the alarm.
