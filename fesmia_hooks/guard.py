"""Run a model for a probe without changing its training (``docs/science.md#side-effects``).

Inside :func:`untouched`: every module is in eval mode, gradients are off, autocast is off,
and the global RNG (CPU and every CUDA device the model uses) is forked so that dropout or
augmentation elsewhere draw the same numbers with or without the probe. On exit each module's
``training`` flag is restored. Weights, buffers, grads and ``requires_grad`` are never written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["model_device", "untouched"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither.

    Example:
        >>> model_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _cuda_devices(model: nn.Module) -> list[int]:
    found = {t.device.index for t in model.parameters() if t.device.type == "cuda"}
    found |= {t.device.index for t in model.buffers() if t.device.type == "cuda"}
    return sorted(i if i is not None else torch.cuda.current_device() for i in found)


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which forward passes of ``model`` leave training exactly as it was.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
        >>> with untouched(m):
        ...     _ = m(torch.ones(1, 2))
        ...     m.training
        False
        >>> m.training
        True
    """
    flags = [(module, module.training) for module in model.modules()]
    devices = _cuda_devices(model)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices, enabled=True))
            stack.enter_context(torch.no_grad())
            for device_type in {"cpu", *(["cuda"] if devices else [])}:
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            model.eval()
            yield model
    finally:
        for module, flag in flags:
            module.training = flag
