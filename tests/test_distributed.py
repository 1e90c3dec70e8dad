"""Two processes (gloo, CPU) training one DDP model: sharded probe, same report, same stop."""

import contextlib
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _history import checks_in, spawn_or_fail  # noqa: E402
from torch import nn

import fesmia_hooks as fh
from fesmia_hooks.demos.digits import digits_mlp, load_noisy_digits

EPOCHS = 30


def probe():
    return fh.FeSMIA(episodes=30, permutations=199, seed=3)


def worker(rank, world, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        task = load_noisy_digits(seed=0)
        x, y = task.train
        model = nn.parallel.DistributedDataParallel(digits_mlp(hidden=256))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        probed = []  # canary rows this rank forwards in eval mode (the probe's passes)
        model.module.register_forward_hook(
            lambda m, inputs, out: None if m.training else probed.append(inputs[0].shape[0]))
        monitor = fh.PrivacyMonitor(
            task.canaries, probe=probe(), budget=fh.LeakageBudget(max_level="none"), horizon=EPOCHS,
            log_dir=os.path.join(folder, "run") if rank == 0 else None,  # rank zero writes
        )
        mine = torch.arange(rank, len(x), world)
        for epoch in range(EPOCHS):
            for idx in mine.split(16):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                optimizer.step()
            monitor.step(model.module, epoch=epoch)
            if monitor.should_stop:
                break
        result = {
            "stopped_epoch": monitor.stopped_epoch,
            "epochs_run": epoch + 1,
            "reports": [r.as_dict() for r in monitor.history],
            "rows_per_check": sum(probed) / max(monitor.checks, 1),
        }
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as fh_:
            json.dump(result, fh_)
        if rank == 0:
            torch.save(model.module.state_dict(), os.path.join(folder, "final.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_stop_together_and_match_the_single_process_report(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["stopped_epoch"] is not None, "the leaky run should stop"
    assert ranks[0]["stopped_epoch"] == ranks[1]["stopped_epoch"]
    assert ranks[0]["epochs_run"] == ranks[1]["epochs_run"]
    # Each rank forwards only its half of the 128 canaries.
    assert ranks[0]["rows_per_check"] == ranks[1]["rows_per_check"] == 64

    def numbers(report):  # NaN (a reading not taken) equals NaN here
        return {k: ("nan" if v != v else v) for k, v in report.items()
                if not k.startswith("seconds_")}

    assert [numbers(r) for r in ranks[0]["reports"]] == [numbers(r) for r in ranks[1]["reports"]]
    # Only rank zero wrote files.
    files = sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_file())
    assert "privacy_history.jsonl" in files and not (tmp_path / "run" / "rank1").exists()
    assert len(checks_in(tmp_path / "run" / "privacy_history.jsonl")) == len(ranks[0]["reports"])
    # The gathered report equals the single-process one on the same weights and seed.
    model = digits_mlp(hidden=256)
    model.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))
    single = probe().evaluate(model, load_noisy_digits(seed=0).canaries)
    last = ranks[0]["reports"][-1]
    assert single.strict == pytest.approx(last["log_mia_strict"], abs=1e-6)
    assert single.relaxed == pytest.approx(last["log_mia_relaxed"], abs=1e-6)
    assert single.auc == pytest.approx(last["auc"], abs=1e-6)


class NanOnNonMembers(nn.Module):
    """Returns NaN logits for rows whose first input is negative: only on one rank's shard."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        z = self.fc(x)
        return torch.where(x[:, :1] < 0, torch.full_like(z, float("nan")), z)


@contextlib.contextmanager
def process_group(rank, world, folder, name):
    """One gloo process of a spawned test, on one thread, torn down whatever happens."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/{name}", rank=rank,
                            world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def failing_worker(rank, world, folder):
    with process_group(rank, world, folder, "rendezvous2"):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g).abs()
        x[32:, 0] *= -1  # the non-members, second half of the pool: rank 1's shard
        y = torch.randint(0, 3, (64,), generator=g)
        canaries = fh.CanarySet(members=(x[:32], y[:32]), non_members=(x[32:], y[32:]))
        monitor = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=5, permutations=9))
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = monitor.step(NanOnNonMembers(), epoch=0)
        with open(os.path.join(folder, f"fail{rank}.json"), "w") as fh_:
            json.dump({"result": result is None, "errors": monitor.errors,
                       "warned": [str(w.message) for w in caught]}, fh_)


def test_a_check_failing_on_one_rank_fails_on_all_without_hanging(tmp_path):
    spawn_or_fail(failing_worker, (2, str(tmp_path)),
                  hang="a rank hung after another rank's check failed")
    results = [json.loads((tmp_path / f"fail{r}.json").read_text()) for r in range(2)]
    assert all(r["result"] for r in results)
    assert "non-finite" in results[1]["errors"][0]["error"]
    assert "failed on another process" in results[0]["errors"][0]["error"]


def fsdp_worker(rank, world, folder):
    import datetime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/fsdp", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
        fully_shard(model)  # parameters sharded: every forward needs both ranks
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        canaries = fh.CanarySet(members=(x[:32], y[:32]), non_members=(x[32:], y[32:]))
        monitor = fh.PrivacyMonitor(
            canaries, probe=fh.FeSMIA(episodes=10, permutations=19, batch_size=5))
        monitor.preflight(model)
        report = monitor.step(model, epoch=0)
        out = {"report": None if report is None else report.as_dict(),
               "errors": monitor.errors}
        with open(os.path.join(folder, f"fsdp{rank}.json"), "w") as fh_:
            json.dump(out, fh_)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_sharded_model_is_probed_in_lockstep(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    spawn_or_fail(fsdp_worker, (2, str(tmp_path)),
                  hang="a rank hung while probing a sharded model")
    results = [json.loads((tmp_path / f"fsdp{r}.json").read_text()) for r in range(2)]
    assert all(r["errors"] == [] and r["report"] is not None for r in results)
    # every rank forwarded its share in the same number of batches and got the same report
    readings = [{k: v for k, v in r["report"].items() if not k.startswith("seconds")}
                for r in results]
    assert readings[0] == readings[1]


def accountant_worker(rank, world, folder):
    with process_group(rank, world, folder, "rendezvous3"):
        import warnings

        g = torch.Generator().manual_seed(0)
        data = (torch.randn(600, 5, generator=g), torch.randint(0, 4, (600,), generator=g))
        _, canaries = fh.CanarySet.for_audit(data, num_classes=4, size=128, seed=0)

        def accountant(delta):  # a rank whose engine cannot answer (not attached there)
            if rank == 1:
                raise RuntimeError("no engine on this rank")
            return 9.0

        budget = fh.LeakageBudget(max_values={"epsilon_accountant": 8.0}, action="stop")
        monitor = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=20, permutations=19),
                                    preflight="off", accountant=accountant, budget=budget)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = monitor.step(nn.Linear(5, 4), epoch=0)
        with open(os.path.join(folder, f"acc{rank}.json"), "w") as fh_:
            json.dump({"stop": monitor.should_stop, "eps": report.epsilon_accountant}, fh_)


def test_every_rank_decides_on_rank_zeros_accountant(tmp_path):
    spawn_or_fail(accountant_worker, (2, str(tmp_path)),
                  hang="a rank hung when the ranks' accountants disagreed")
    results = [json.loads((tmp_path / f"acc{r}.json").read_text()) for r in range(2)]
    assert results == [{"stop": True, "eps": 9.0}] * 2
