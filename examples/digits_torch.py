"""Plain PyTorch: watch a digits MLP leak while it trains, and stop at the budget.

Run: python examples/digits_torch.py   (then: tensorboard --logdir runs/example-torch)
"""

import torch
from torch import nn

import fesmia_hooks as fh
from fesmia_hooks.demos.digits import load_noisy_digits


def main(epochs=60, log_dir="runs/example-torch"):
    torch.manual_seed(0)
    task = load_noisy_digits(label_noise=0.2)  # 300 training samples; 64 + 64 canaries
    x, y = task.train

    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = fh.PrivacyMonitor(
        task.canaries,
        probe=fh.FeSMIA(method="simpleshot", shots=5, queries=15),
        budget=fh.LeakageBudget(max_level="low", action="stop"),
        horizon=epochs,  # checks expected: alpha is spent evenly over them
        log_dir=log_dir,
    )
    monitor.preflight(model)  # before training: members and non-members must look alike
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        report = monitor.step(model, epoch=epoch)  # None when no check is due
        if report is not None:
            print(report.summary())
        if monitor.should_stop:
            print("stopped:", monitor.stop_message)
            break
    monitor.close()
    return monitor


if __name__ == "__main__":
    main()
