"""docs/science.md#side-effects: a check leaves training exactly as it was."""

import copy
import random

import numpy as np
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


# --- what a forward can do besides computing: fh.untouched puts it all back ------------------


class Noisy(nn.Module):
    """Draws from numpy's and Python's global generators, as some augmentations do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        noise = np.random.rand() + random.random()
        return self.fc(x) + float(noise)


class Tracker(nn.Module):
    """Updates running statistics whatever its mode, in two ways the version counter sees
    differently: ``F.batch_norm`` (does not bump it) and an in-place ``mul_``/``add_``."""

    def __init__(self, width=8, big=0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("var", torch.ones(width))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(width))
        self.register_buffer("table", torch.zeros(big))

    def forward(self, x):
        out = nn.functional.batch_norm(x, self.mean, self.var, training=True)
        self.seen += 1
        self.ema.mul_(0.9).add_(x.mean(0), alpha=0.1)
        return out


def tracked_model(big=0):
    torch.manual_seed(0)
    return nn.Sequential(Tracker(big=big), nn.Linear(8, 3))


def test_numpy_and_python_random_draws_inside_forward_do_not_move_the_callers_streams():
    model = Noisy()
    np.random.seed(1)
    random.seed(1)
    expected = (np.random.rand(3), [random.random() for _ in range(3)])
    np.random.seed(1)
    random.seed(1)
    with fh.untouched(model):
        model(torch.ones(2, 8))
    got = (np.random.rand(3), [random.random() for _ in range(3)])
    assert np.array_equal(got[0], expected[0]) and got[1] == expected[1]


def test_buffers_written_in_eval_mode_come_back_bit_identical():
    model = tracked_model()
    model.train()
    model(torch.randn(16, 8))  # a training step gives the statistics values of their own
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in model.named_buffers()}
    with fh.untouched(model):
        model(torch.randn(16, 8) * 5 + 3)
        assert not torch.equal(model[0].mean, before["0.mean"])  # the write did happen
    assert same(before, {k: v for k, v in model.state_dict().items()})
    assert all(b is tensors[k] for k, b in model.named_buffers())  # same objects, in place


def test_a_buffer_nobody_wrote_is_not_written_back():
    model = tracked_model()
    model[0].forward = lambda x: x  # reads nothing, writes nothing
    versions = [b._version for b in model.buffers()]
    with fh.untouched(model):
        model(torch.randn(4, 8))
    assert [b._version for b in model.buffers()] == versions


def test_a_reassigned_or_added_buffer_is_put_back():
    class Rebinder(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.arange(4.0))
            self.register_buffer("empty", None)

        def forward(self, x):
            self.cache = x[0, :4].clone()  # replaces the _buffers entry
            self.empty = x[0]
            self.register_buffer("extra", x.sum(0))
            return x

    model = Rebinder()
    original = model.cache
    with fh.untouched(model):
        model(torch.randn(2, 8))
        assert model.cache is not original
    assert model.cache is original and torch.equal(original, torch.arange(4.0))
    assert model.empty is None and "extra" not in dict(model.named_buffers())
    assert list(model.state_dict()) == ["cache"]


@pytest.mark.parametrize("how", ["in place", "through .data"])
def test_a_large_buffer_written_is_refused_with_its_module_named(how):
    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("keys", torch.zeros(fh.guard.BUFFER_COPY_LIMIT // 4 + 1))

        def forward(self, x):
            if how == "in place":
                self.keys[: x.numel()] = x.flatten()
            else:  # invisible to the version counter
                self.keys.data[: x.numel()] = x.flatten()
            return x

    model = nn.Sequential(nn.Identity(), nn.Sequential(Cache()))
    with pytest.raises(fh.ProbeError, match=r"buffer 'keys' of module '1\.0' \(Cache\)") as info:
        with fh.untouched(model):
            model(torch.full((2, 3), 0.123))
    assert "0.123" not in str(info.value)


def test_a_large_buffer_only_read_is_accepted():
    model = tracked_model(big=fh.guard.BUFFER_COPY_LIMIT // 4 + 1)
    with fh.untouched(model):
        model(torch.randn(4, 8))  # writes the small buffers only: they are restored


def test_uninitialised_lazy_modules_are_refused_before_any_forward():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    model.add_module("head", nn.LazyLinear(3))
    with pytest.raises(fh.ConfigurationError, match=r"LazyLinear at 'head'.*before the first"):
        with fh.untouched(model):
            pytest.fail("the block must not run")  # pragma: no cover
    assert model.head.has_uninitialized_params()
    model(torch.randn(2, 8))  # one dry forward initialises it; then checks are fine
    with fh.untouched(model):
        model(torch.randn(2, 8))


def test_an_exception_inside_the_block_still_restores_everything():
    model = tracked_model().train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    np.random.seed(3)
    random.seed(3)
    torch.manual_seed(3)
    states = (np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state())
    with pytest.raises(KeyError):
        with fh.untouched(model):
            model(torch.randn(16, 8) + 7)
            np.random.rand(5), random.random(), torch.rand(5)
            raise KeyError("boom")
    assert same(before, dict(model.state_dict()))
    assert (model.training, model[0].training, model[1].training) == (True, True, False)
    assert np.array_equal(np.random.get_state()[1], states[0])
    assert random.getstate() == states[1] and torch.equal(torch.get_rng_state(), states[2])
    assert torch.is_grad_enabled()


def test_a_full_check_on_a_model_that_writes_its_buffers_changes_nothing():
    x, y, canaries = make_data()
    model = tracked_model()
    model(x[:16])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fh.FeSMIA(episodes=5, permutations=9).evaluate(model, canaries)
    assert same(before, dict(model.state_dict()))


def test_scripted_submodules_are_restored_too():
    model = nn.Sequential(torch.jit.script(nn.BatchNorm1d(8)), nn.Linear(8, 3)).train()
    model(torch.randn(16, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with fh.untouched(model):
        model[0].train()  # a forward that forces training mode updates the statistics
        model(torch.randn(16, 8) + 5)
    assert same(before, dict(model.state_dict())) and model[0].training
