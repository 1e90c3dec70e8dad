"""Run a model for a probe without changing its training (``docs/science.md#side-effects``).

Inside :func:`untouched`: every module is in eval mode, gradients are off, autocast is off,
and the global random number generators are forked: torch's (CPU and every CUDA device the
model uses), numpy's legacy global one (``np.random``) and Python's ``random``, so that
dropout, augmentation or a ``forward`` that draws from any of them leaves training drawing the
same numbers with or without the probe. On exit, also after an exception, each module's
``training`` flag and every generator's state are restored. Weights, grads and
``requires_grad`` are never written.

Buffers. A module may write a buffer during an eval-mode forward (a layer that updates a
running statistic whatever its mode, a cache); the canary-derived values must not stay in the
model. On entry :func:`untouched` records, for every module, which tensors its ``_buffers``
hold, and for every buffer its storage, shape, strides and version counter. On exit:

- a buffer that was rebound (``self.x = new_tensor``), deleted or added is put back as it
  was, the original tensor object included (parameters are left to their owners: sharding
  wrappers such as FSDP swap parameter objects during a forward);
- a buffer of at most :data:`BUFFER_COPY_LIMIT` bytes was copied on entry; when its bytes
  differ on exit it is written back in place, bit for bit (a buffer that did not change is
  not written, so its version counter and any autograd graph saving it are left alone);
- a larger buffer is not copied (copying every large mask, table or cache at each check
  would cost memory and time for nothing, since they almost never change): a change is
  detected through its version counter and a byte checksum read on entry and exit, and
  :func:`untouched` raises :class:`~fesmia_hooks.exceptions.ProbeError` naming the module
  and the buffer (never its values) rather than keep the change silently.

The checksum is needed because the version counter misses some writes: the running
statistics written by ``torch.nn.functional.batch_norm`` and writes through ``.data`` do not
bump it. It is a sum of the buffer's bytes, computed in chunks so that it allocates little;
a write that keeps both the version counter and that sum (for example one through ``.data``
that only permutes bytes), or a write to a non-contiguous large buffer that keeps the
version counter, is not detected. Other state a forward may keep (plain attributes, new
submodules, files) is not covered.

An uninitialised lazy module (``torch.nn.LazyLinear`` and the like) would be initialised by
the probe's forward, with shapes taken from the canaries and parameters the optimizer never
sees: :func:`untouched` refuses such a model before any forward.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from fesmia_hooks.exceptions import ConfigurationError, ProbeError

__all__ = ["model_device", "random_streams_forked", "untouched"]

BUFFER_COPY_LIMIT = 1 << 20
"""Buffers of at most this many bytes are copied on entry to :func:`untouched` and restored."""

_CHUNK = 1 << 22  # bytes summed at a time by the checksum (it widens them to int64)


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


def _refuse_lazy(model: nn.Module) -> None:
    lazy = [
        f"{type(module).__name__} at {repr(name) if name else 'the top level'}"
        for name, module in model.named_modules()
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()
    ]
    if lazy:
        listed = ", ".join(lazy[:3]) + (f" and {len(lazy) - 3} more" if len(lazy) > 3 else "")
        raise ConfigurationError(
            f"the model has uninitialised lazy modules ({listed}); run one training step "
            "(or a dry forward) before the first check"
        )


def _writing(tensor: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    return torch.inference_mode() if tensor.is_inference() else torch.no_grad()


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as bytes, without a copy (the last dimension becomes bytes)."""
    return tensor.detach().unsqueeze(-1).view(torch.uint8)


def _checksum(tensor: torch.Tensor) -> torch.Tensor | None:
    """The sum of the bytes of a contiguous tensor (a 0-dim int64 tensor), or ``None``."""
    if not tensor.is_contiguous():
        return None
    flat = _bytes(tensor).reshape(-1)
    total = torch.zeros((), dtype=torch.int64, device=tensor.device)
    for start in range(0, flat.numel(), _CHUNK):
        total += flat[start : start + _CHUNK].sum(dtype=torch.int64)
    return total


@dataclass
class _Buffer:
    """One buffer tensor as it was on entry."""

    module: str
    kind: str
    name: str
    tensor: torch.Tensor
    storage: torch.UntypedStorage
    offset: int
    shape: torch.Size
    stride: tuple[int, ...]
    version: int | None
    copy: torch.Tensor | None  # buffers of at most BUFFER_COPY_LIMIT bytes
    checksum: torch.Tensor | None  # larger ones

    @classmethod
    def take(cls, module: str, kind: str, name: str, tensor: torch.Tensor) -> _Buffer:
        small = tensor.numel() * tensor.element_size() <= BUFFER_COPY_LIMIT
        with torch.no_grad():
            return cls(
                module=module,
                kind=kind,
                name=name,
                tensor=tensor,
                storage=tensor.untyped_storage(),
                offset=tensor.storage_offset(),
                shape=tensor.shape,
                stride=tensor.stride(),
                version=_version(tensor),
                copy=tensor.detach().clone() if small else None,
                checksum=None if small else _checksum(tensor),
            )

    def reseat(self) -> None:
        """Put the tensor back on its original storage, shape and strides if they changed."""
        t = self.tensor
        if (
            t.untyped_storage().data_ptr() != self.storage.data_ptr()
            or t.storage_offset() != self.offset
            or t.shape != self.shape
            or t.stride() != self.stride
        ):
            with _writing(t):
                t.set_(self.storage, self.offset, self.shape, self.stride)

    def where(self) -> str:
        module = repr(self.module) if self.module else "the top level"
        return f"buffer {self.name!r} of module {module} ({self.kind})"


class _Snapshot:
    """What :func:`untouched` puts back on exit (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.bindings: list[tuple[nn.Module, dict, set]] = []
        self.buffers: list[_Buffer] = []
        seen: set[int] = set()
        for path, module in model.named_modules():
            self.bindings.append(
                (
                    module,
                    dict(module._buffers),
                    set(getattr(module, "_non_persistent_buffers_set", ())),
                )
            )
            for name, tensor in module._buffers.items():
                if (
                    tensor is None
                    or id(tensor) in seen
                    or tensor.layout != torch.strided
                    or tensor.device.type == "meta"
                ):
                    continue
                seen.add(id(tensor))
                self.buffers.append(_Buffer.take(path, type(module).__name__, name, tensor))

    def restore(self) -> list[str]:
        """Put everything back; the large buffers that changed, which cannot be."""
        for module, before, non_persistent in self.bindings:
            # Buffers only: parameters belong to the optimizer, and sharding wrappers (FSDP)
            # legitimately swap their objects during a forward and its lazy initialisation.
            store = module._buffers
            now = dict(store.items())
            if now.keys() != before.keys() or any(now[k] is not v for k, v in before.items()):
                for name in now.keys() - before.keys():
                    del store[name]
                for name, value in before.items():
                    if name not in now or now[name] is not value:
                        module.__dict__.pop(name, None)
                        module._modules.pop(name, None)
                        store[name] = value
            names = getattr(module, "_non_persistent_buffers_set", None)
            if names is not None and names != non_persistent:
                names.clear()
                names.update(non_persistent)
        versions = [_version(b.tensor) for b in self.buffers]
        for buffer in self.buffers:
            buffer.reseat()
        small = [b for b in self.buffers if b.copy is not None]
        for buffer, differs in zip(small, _differ(small), strict=True):
            if differs:
                with _writing(buffer.tensor):
                    buffer.tensor.copy_(buffer.copy)
        changed = []
        for buffer, version in zip(self.buffers, versions, strict=True):
            if buffer.copy is not None:
                continue
            now = _checksum(buffer.tensor) if buffer.checksum is not None else None
            if version != buffer.version or (
                now is not None and not torch.equal(now, buffer.checksum)
            ):
                changed.append(buffer.where())
        return changed


def _differ(buffers: list[_Buffer]) -> list[bool]:
    """Whether each small buffer's bytes differ from its copy (one sync per device)."""
    out = [False] * len(buffers)
    pending: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, b in enumerate(buffers):
        try:
            flag = (_bytes(b.tensor) != _bytes(b.copy)).any()
        except RuntimeError:  # a dtype without a byte view
            out[i] = not torch.equal(b.tensor, b.copy)
        else:
            pending.setdefault(flag.device, []).append((i, flag))
    for items in pending.values():
        values = torch.stack([flag for _, flag in items]).tolist()
        for (i, _), value in zip(items, values, strict=True):
            out[i] = bool(value)
    return out


@contextlib.contextmanager
def random_streams_forked(devices: list[int] | None = None) -> Iterator[None]:
    """Context whose random draws (torch, NumPy's global, Python's) leave the caller's alone.

    Example:
        >>> before = torch.random.get_rng_state()
        >>> with random_streams_forked():
        ...     _ = torch.rand(3), np.random.rand(), random.random()
        >>> torch.equal(before, torch.random.get_rng_state())
        True
    """
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices or [], enabled=True):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which forward passes of ``model`` leave training exactly as it was.

    Raises:
        ConfigurationError: On entry, when the model has uninitialised lazy modules.
        ProbeError: On exit, when a forward wrote a buffer too large to have been copied
            (see the module docstring); everything else has been restored by then.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
        >>> with untouched(m):
        ...     _ = m(torch.ones(1, 2))
        ...     m.training
        False
        >>> m.training
        True
    """
    _refuse_lazy(model)
    flags = [(module, module.training) for module in model.modules()]
    devices = _cuda_devices(model)
    snapshot = _Snapshot(model)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices, enabled=True))
            stack.enter_context(torch.no_grad())
            for device_type in {"cpu", *(["cuda"] if devices else [])}:
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            model.eval()
            yield model
    finally:
        try:
            for module, flag in flags:
                module.training = flag
            changed = snapshot.restore()
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
        if changed:  # raised even when the block raised: the model has changed
            raise ProbeError(
                f"the model's forward wrote {'; '.join(changed)} during a check, in eval "
                f"mode; buffers over {BUFFER_COPY_LIMIT} bytes are not copied, so the "
                "canary-derived values stay in the model. Update such buffers only when "
                "`self.training` is true"
            )
