"""Hugging Face ``Trainer`` adapter: a ``TrainerCallback`` over the core :class:`PrivacyMonitor`.

The callback computes no measure. At the end of every n-th training epoch (or every n
optimizer steps) it hands the model the ``Trainer`` is training to the core monitor, which
forwards the canaries through it on its own device without touching training (eval mode,
no gradients, forked RNG; see :func:`fesmia_hooks.untouched`). For a causal language model
give :meth:`CanarySet.from_sequences <fesmia_hooks.CanarySet.from_sequences>` canaries: the
probe passes ``attention_mask=`` and ``use_cache=False`` and reads ``outputs.logits``.

With the report it:

* appends ``{"privacy/<key>": value, ..., "epoch", "step"}`` -- the keys of
  :func:`fesmia_hooks.sinks.scalar_metrics`, the vocabulary every adapter shares -- to
  ``trainer.state.log_history`` (so they are in ``trainer_state.json`` too);
* on the main process, writes TensorBoard events (scalars, score histograms, PR curve,
  summary text, custom-scalars layout) and the ``privacy_history.jsonl`` history into
  ``log_dir`` (by default ``<output_dir>/privacy``; ``tensorboard --logdir <output_dir>``
  shows it next to the ``Trainer``'s own ``runs/``);
* when the budget asks to stop, reduces the decision over the processes of a distributed
  run (any process that wants to stop stops them all) and sets
  ``control.should_training_stop``, never clearing it.

A callback cannot write through the ``Trainer``'s own reporters (its ``TensorBoardCallback``,
W&B, ...): they receive only what ``Trainer.log`` sends. The monitor's state is not restored
by ``Trainer`` from a checkpoint (it rebuilds callbacks from plain arguments, and canaries are
not plain); the callback saves it as ``fesmia_monitor_state.json`` in each checkpoint folder,
and ``callback.load_state_dict(json.load(open(path)))`` resumes it.

Needs ``transformers`` (tested with 5.x): ``pip install 'fesmia-hooks[transformers]'``. The
module imports without it (so that documentation tools can read it); building the callback
then raises an ``ImportError`` naming that extra.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fesmia_hooks.budget import LeakageBudget
from fesmia_hooks.canaries import CanarySet
from fesmia_hooks.exceptions import ConfigurationError
from fesmia_hooks.guard import model_device
from fesmia_hooks.monitor import PrivacyMonitor as CoreMonitor
from fesmia_hooks.monitor import RankedMonitorView
from fesmia_hooks.probe import FeSMIA
from fesmia_hooks.sinks import scalar_metrics

__all__ = ["STATE_FILE", "PrivacyMonitor"]

log = logging.getLogger(__name__)

_INSTALL = "pip install 'fesmia-hooks[transformers]'"
#: Name of the monitor's state file written into each checkpoint folder.
STATE_FILE = "fesmia_monitor_state.json"

try:
    import transformers as _transformers

    _Callback: Any = _transformers.TrainerCallback
except ImportError:  # pragma: no cover - exercised by a test that hides the package
    _transformers = None  # type: ignore[assignment]
    _Callback = object


class PrivacyMonitor(RankedMonitorView, _Callback):  # type: ignore[misc]
    """``TrainerCallback`` that watches privacy leakage while a ``Trainer`` trains.

    A thin adapter over the core :class:`fesmia_hooks.PrivacyMonitor` (see there for the
    probe, the run-level calibrated significance and the budget).

    When the budget fixes no ``horizon``, the horizon of the run-level test is set in
    :meth:`on_train_begin` from the run's epochs (``state.num_train_epochs //
    every_n_epochs``) or steps (``state.max_steps // every_n_steps``).

    Args:
        canaries: The canary set: members inside the training data, non-members outside.
        probe: The probe; ``FeSMIA()`` when omitted.
        budget: The leakage budget; ``None`` only measures and logs.
        log_dir: Folder of the TensorBoard events and the history; ``None`` uses
            ``<args.output_dir>/privacy``.
        every_n_epochs: Check after every n-th training epoch (counted from 0, so the first
            check follows epoch ``n - 1``).
        every_n_steps: Check every n optimizer steps (``state.global_step``) instead.
        tensorboard: Write TensorBoard events (the history file is always written).
        restore_safe_weights: On a stop, load back the last weights that were within budget.
        on_error: ``"warn"`` records a failed check and carries on; ``"raise"`` re-raises.

    Raises:
        ImportError: When ``transformers`` is not installed.
        ConfigurationError: On an argument outside its allowed range.

    Example:
        A ``Trainer`` run, so not executed as a doctest (``model``, ``train_dataset`` and
        the member/non-member token ids are yours):

        >>> from transformers import Trainer, TrainingArguments  # doctest: +SKIP
        >>> from fesmia_hooks import CanarySet, LeakageBudget  # doctest: +SKIP
        >>> from fesmia_hooks.integrations.transformers import PrivacyMonitor  # doctest: +SKIP
        >>> canaries = CanarySet.from_sequences(  # doctest: +SKIP
        ...     tokenizer(member_texts, padding=True, return_tensors="pt"),
        ...     tokenizer(non_member_texts, padding=True, return_tensors="pt"),
        ...     vocab_size=len(tokenizer), decode=tokenizer.decode)
        >>> monitor = PrivacyMonitor(canaries, budget=LeakageBudget())  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=TrainingArguments("out", num_train_epochs=20),
        ...                   train_dataset=train_dataset, callbacks=[monitor])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> monitor.stopped_epoch, monitor.stop_reason  # doctest: +SKIP
        (7, <StopReason.LEVEL_EXCEEDED: 'level_exceeded'>)
    """

    def __init__(
        self,
        canaries: CanarySet,
        *,
        probe: FeSMIA | None = None,
        budget: LeakageBudget | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        tensorboard: bool = True,
        restore_safe_weights: bool = False,
        on_error: Literal["warn", "raise"] = "warn",
    ) -> None:
        if _transformers is None:
            raise ImportError(
                f"fesmia_hooks.integrations.transformers needs transformers: {_INSTALL}"
            )
        super().__init__()
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ConfigurationError(
                f"`log_dir` must be a path (str or os.PathLike) or None, "
                f"got {type(log_dir).__name__}"
            )
        for name, flag in (("tensorboard", tensorboard),
                           ("restore_safe_weights", restore_safe_weights)):
            if not isinstance(flag, bool):
                raise ConfigurationError(f"`{name}` must be a bool, got {flag!r}")
        self.monitor = CoreMonitor(
            canaries,
            probe=probe,
            budget=budget,
            log_dir=None,
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            restore_safe_weights=restore_safe_weights,
            on_error=on_error,
        )
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.tensorboard = tensorboard
        self._model: nn.Module | None = None
        self._reduced_stop_epoch: int | None = None

    # ------------------------------------------------------------------ public state
    def state_dict(self) -> dict[str, Any]:
        """The core monitor's plain-value state (history, counters, run-level test, stop)."""
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (e.g. a checkpoint's ``STATE_FILE``)."""
        self.monitor.load_state_dict(state)
        self._reduced_stop_epoch = None

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Decide the sinks (main process only) and the horizon of the run-level test."""
        self._model = kwargs.get("model")
        core = self.monitor
        if state.is_world_process_zero:
            folder = self.log_dir if self.log_dir is not None else (
                Path(args.output_dir) / "privacy"
            )
            core.set_log_dir(folder, tensorboard=self.tensorboard)
        else:
            core.set_log_dir(None)
        if core.checks or (core.budget is not None and core.budget.horizon is not None):
            return
        if core.every_n_epochs is not None:
            epochs = getattr(state, "num_train_epochs", None) or args.num_train_epochs
            most, every = int(math.ceil(float(epochs))), core.every_n_epochs
        else:
            most, every = int(state.max_steps or 0), int(core.every_n_steps or 1)
        if most > 0:
            core.reset(horizon=max(1, most // every))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Check after every ``every_n_epochs``-th epoch."""
        if self.monitor.every_n_epochs is None:
            return
        epoch = max(0, int(round(float(state.epoch or 0.0))) - 1)
        self._check(state, control, kwargs.get("model"), epoch=epoch)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Check every ``every_n_steps`` optimizer steps."""
        if self.monitor.every_n_steps is None:
            return
        epoch = max(0, int(math.ceil(float(state.epoch or 0.0))) - 1)
        self._check(state, control, kwargs.get("model"), epoch=epoch)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the monitor's state into the checkpoint folder just saved (main process)."""
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            with open(folder / STATE_FILE, "w", encoding="utf-8") as fh:
                json.dump(self.monitor.state_dict(), fh, default=_plain)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Flush and close the sinks."""
        self.monitor.close()

    # ------------------------------------------------------------------ internals
    def _check(self, state: Any, control: Any, model: nn.Module | None, *, epoch: int) -> None:
        core = self.monitor
        step = int(state.global_step)
        if not core.is_due(epoch=epoch, step=step):
            return
        model = model if model is not None else self._model
        if model is None:
            raise ConfigurationError(
                "the Trainer passed no model to the callback; use it with transformers.Trainer"
            )
        # Raises PrivacyBudgetExceeded on a breach with action="raise" (on every process alike).
        report = core.check(model, epoch=epoch, step=step)
        if report is not None:
            state.log_history.append(
                {**scalar_metrics(report), "epoch": state.epoch, "step": step}
            )
        if _any_process(core.should_stop, model):
            if self._reduced_stop_epoch is None and core.stopped_epoch is None:
                self._reduced_stop_epoch = epoch
            if not control.should_training_stop:
                log.info("fesmia-hooks: stopping training after epoch %d (%s)", epoch,
                         core.stop_reason.value)
            control.should_training_stop = True


def _any_process(flag: bool, model: nn.Module) -> bool:
    """``flag`` OR-reduced over the processes of a distributed run (itself otherwise)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = model_device(model)
    if dist.get_backend() == "nccl" and device.type != "cuda":  # pragma: no cover
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars in the state."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
