"""A small CNN with BatchNorm and Dropout on image-shaped data, monitored every epoch.

The probe runs in eval mode with the RNG forked, so BatchNorm statistics and dropout draws
are exactly what they would be without it. The checks are asynchronous: each forwards the
canaries, then the attack runs on another core while the next epoch trains, and its report
and decision arrive at the next epoch end (``monitor.step`` returns the report that landed;
a loop that does not check every epoch calls ``monitor.land()`` there).
Images: the digits upsampled to 1x16x16 with pixel noise. Run: python examples/cnn_torch.py
"""

import torch
from torch import nn

import fesmia_hooks as fh
from fesmia_hooks.demos.digits import load_noisy_digits


def images(x):
    return nn.functional.interpolate(x.reshape(-1, 1, 8, 8), size=16, mode="bilinear")


def main(epochs=40, log_dir="runs/example-cnn"):
    torch.manual_seed(0)
    task = load_noisy_digits(label_noise=0.3)
    x, y = images(task.train[0]), task.train[1]
    c = task.canaries
    n = c.num_members
    canaries = fh.CanarySet(
        members=(images(c.inputs[:n]), c.labels[:n]),
        non_members=(images(c.inputs[n:]), c.labels[n:]),
        num_classes=10,
    )
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 16, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = fh.PrivacyMonitor(canaries, budget=fh.LeakageBudget(), horizon=epochs,
                                log_dir=log_dir, asynchronous=True)
    monitor.preflight(model)  # before training: members and non-members must look alike
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx] + 0.05 * torch.randn_like(x[idx])),
                                        y[idx]).backward()
            optimizer.step()
        report = monitor.step(model, epoch=epoch)  # the previous epoch's check, landed now
        if report is not None:
            print(report.summary())
        if monitor.should_stop:
            print(f"stopped after epoch {epoch}: {monitor.stop_reason.value} "
                  f"(leakage read at epoch {monitor.stopped_epoch})")
            break
    monitor.close()  # waits for the last check
    return monitor


if __name__ == "__main__":
    main()
