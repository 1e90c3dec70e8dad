"""docs/science.md#side-effects: a check leaves training exactly as it was."""

import copy

import pytest
import torch
from torch import nn

import fesmia_hooks as fh


class Victim(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(32, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.head(self.body(x)))


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 3, (200,), generator=g)
    canaries = fh.CanarySet(members=(x[:32], y[:32]), non_members=(x[-32:], y[-32:]))
    return x[:168], y[:168], canaries


def snapshot(model, optimizer):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        copy.deepcopy(optimizer.state_dict()),
        torch.get_rng_state(),
    )


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_a_check_changes_nothing_it_can_reach():
    x, y, canaries = make_data()
    torch.manual_seed(0)
    model = Victim().train()
    model.head.eval()  # a mixed state must come back mixed
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
    optimizer.step()
    before = snapshot(model, optimizer)
    fh.FeSMIA(episodes=10, permutations=9).evaluate(model, canaries)
    after = snapshot(model, optimizer)
    assert same(before, after)


def train(with_monitor, epochs=4, seed=0):
    x, y, canaries = make_data()
    torch.manual_seed(seed)
    model = Victim()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9
    )
    monitor = fh.PrivacyMonitor(
        canaries,
        probe=fh.FeSMIA(method="finetune", episodes=4, permutations=9),
        budget=fh.LeakageBudget(action="alert"),
    )
    for epoch in range(epochs):
        model.train()
        for i in torch.randperm(len(x)).split(32):  # the global RNG drives shuffling and dropout
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            optimizer.step()
        if with_monitor:
            monitor.step(model, epoch=epoch)
    return model, monitor


def test_training_with_and_without_the_monitor_ends_with_identical_weights():
    plain, _ = train(with_monitor=False)
    watched, monitor = train(with_monitor=True)
    assert monitor.checks == 4
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_model_is_never_moved_and_canaries_are_cached():
    x, y, canaries = make_data()
    model = Victim()
    probe = fh.FeSMIA(episodes=5, permutations=9)
    probe.evaluate(model, canaries)
    cached = canaries.on("cpu")[0]
    probe.evaluate(model, canaries)
    assert canaries.on("cpu")[0] is cached
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_model_without_parameters_runs():
    class Fixed(nn.Module):
        def forward(self, x):
            return x[:, :3] * 4

    x, y, canaries = make_data()
    report = fh.FeSMIA(episodes=5, permutations=9).evaluate(Fixed(), canaries)
    assert 0 <= report.strict <= 1


def test_half_precision_model_and_autocast():
    x, y, canaries = make_data()
    model = nn.Linear(8, 3).to(torch.bfloat16)
    probe = fh.FeSMIA(episodes=5, permutations=9)
    half = fh.CanarySet(
        members=(canaries.inputs[:32].bfloat16(), canaries.labels[:32]),
        non_members=(canaries.inputs[32:].bfloat16(), canaries.labels[32:]),
    )
    report = probe.evaluate(model, half)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = probe.evaluate(model, half)
    assert report.strict == again.strict


def test_a_canary_batch_too_large_for_memory_falls_back_to_smaller_batches():
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

    class Tight(nn.Module):
        """Runs out of memory on batches over 16 rows, like a full accelerator would."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)
            self.batches = []

        def forward(self, x):
            if x.shape[0] > 16:
                raise oom("simulated: out of memory")
            self.batches.append(x.shape[0])
            return self.fc(x)

    x, y, canaries = make_data()
    model = Tight()
    probe = fh.FeSMIA(episodes=10, permutations=9, batch_size=64)
    with pytest.warns(UserWarning, match="retrying with 16 per batch"):
        report = probe.evaluate(model, canaries)
    assert model.batches == [16, 16, 16, 16]
    plain = fh.FeSMIA(episodes=10, permutations=9, batch_size=16).evaluate(model, canaries)
    assert report.strict == plain.strict and report.relaxed == plain.relaxed
