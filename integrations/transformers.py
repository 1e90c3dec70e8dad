"""Hugging Face ``Trainer`` adapter: a ``TrainerCallback`` over the shared driver.

The callback is the ``Trainer``'s hooks only (what every adapter shares is
:class:`fesmia_hooks.integrations.driver.MonitorDriver`). At the end of every n-th training
epoch (or every n optimizer steps) it hands the model the ``Trainer`` is training to the
core monitor, which forwards the canaries through it on its own device without touching
training (eval mode, no gradients, forked RNG; see :func:`fesmia_hooks.untouched`). For a
causal language model give :class:`~fesmia_hooks.SequenceCanarySet` canaries: the probe
passes ``attention_mask=`` and ``use_cache=False`` and reads ``outputs.logits``.

With the report it:

* logs ``{"privacy/<key>": value, ...}`` -- the keys of
  :func:`fesmia_hooks.sinks.scalar_metrics`, the vocabulary every adapter shares -- through
  ``Trainer.log``, so every ``report_to`` integration (the ``Trainer``'s TensorBoard run,
  W&B, MLflow, ...) receives them, and ``trainer.state.log_history`` (and
  ``trainer_state.json``) holds them, once per check. The integrations name them their own
  way: the ``Trainer``'s TensorBoard run shows ``train/privacy/<key>`` (its
  ``rewrite_logs`` puts ``train/`` before every key not starting with ``eval_`` or
  ``test_``). The callback finds its ``Trainer`` on the call stack when training starts; if
  it cannot (a trainer that is not a ``transformers.Trainer``), give it with
  :meth:`PrivacyMonitor.attach`, or the values go to ``log_history`` only (with a warning);
* on the main process, writes TensorBoard events (scalars, score histograms, PR curve,
  summary text, custom-scalars layout) and the ``privacy_history.jsonl`` history into
  ``log_dir`` (by default ``<output_dir>/privacy``; ``tensorboard --logdir <output_dir>``
  shows it next to the ``Trainer``'s own ``runs/``);
* when the budget asks to stop, reduces the decision over the processes of a distributed
  run (any process that wants to stop stops them all) and sets
  ``control.should_training_stop``, never clearing it.

Resuming: the callback saves the monitor's state as ``fesmia_monitor_state.json`` in each
checkpoint folder (on the processes that save checkpoints), and
``trainer.train(resume_from_checkpoint=True or path)`` continues the same run from the
checkpoint it resumes (same history, run id and run-level thresholds), also with a new
callback object. Loading a state yourself with ``callback.load_state_dict(...)`` before
``train`` does the same, and the checkpoint's file is then not read again. Any other
``train`` call is a new run: a fresh history, run id and stop state.

Needs ``transformers`` (tested with 5.x): ``pip install 'fesmia-hooks[transformers]'``. The
module imports without it (so that documentation tools can read it); building the callback
then raises an ``ImportError`` naming that extra.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from fesmia_hooks.distributed import any_rank
from fesmia_hooks.exceptions import ConfigurationError
from fesmia_hooks.guard import model_device
from fesmia_hooks.integrations.driver import MonitorDriver
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


class PrivacyMonitor(MonitorDriver, _Callback):  # type: ignore[misc]
    """``TrainerCallback`` that watches privacy leakage while a ``Trainer`` trains.

    A thin adapter over the core :class:`fesmia_hooks.PrivacyMonitor` (see there for the
    probe, the run-level calibrated significance and the budget). Every ``train`` call is a
    new run unless it resumes from a checkpoint holding the monitor's state (or a state was
    loaded with :meth:`load_state_dict`); the horizon of the run-level test comes from the
    run's epochs and steps, unless ``horizon`` fixes it. The ``privacy/*`` values go through
    the ``Trainer`` running the callback, found when training starts (see :meth:`attach`
    for a trainer that cannot be found).

    Args:
        canaries: The canary set (:class:`~fesmia_hooks.SequenceCanarySet` for a causal
            language model), or an importable factory ``"package.module:function"``.
        monitor: A ready core :class:`fesmia_hooks.PrivacyMonitor` instead of the options.
        log_dir: Folder of the TensorBoard events and the history; ``None`` uses
            ``<args.output_dir>/privacy``.
        tensorboard: Write TensorBoard events (the history file is always written).
        **options: Options of the core :class:`fesmia_hooks.PrivacyMonitor` (``probe``,
            ``budget``, ``every_n_epochs``, ``every_n_steps``, ``sinks``,
            ``restore_safe_weights``, ``on_error``, ``alpha``, ``horizon``, ``bands``).

    Raises:
        ImportError: When ``transformers`` is not installed.
        ConfigurationError: On an argument outside its allowed range.

    Example:
        A ``Trainer`` run, so not executed as a doctest (``model``, ``train_dataset`` and
        the member/non-member token ids are yours):

        >>> from transformers import Trainer, TrainingArguments  # doctest: +SKIP
        >>> from fesmia_hooks import LeakageBudget, SequenceCanarySet  # doctest: +SKIP
        >>> from fesmia_hooks.integrations.transformers import PrivacyMonitor  # doctest: +SKIP
        >>> canaries = SequenceCanarySet(  # doctest: +SKIP
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _transformers is None:
            raise ImportError(
                f"fesmia_hooks.integrations.transformers needs transformers: {_INSTALL}"
            )
        super().__init__(*args, **kwargs)
        self._model: nn.Module | None = None
        self._trainer: Any = None
        self._attached: Any = None

    def attach(self, trainer: Any) -> PrivacyMonitor:
        """Give the callback its ``Trainer`` (registering it there if it is not yet).

        Needed only when the callback cannot find the ``Trainer`` running it on the call
        stack (a trainer that is not a ``transformers.Trainer``, or one calling its callbacks
        in an unusual way): the ``privacy/*`` values then go through ``trainer.log`` all the
        same. The ``Trainer`` found running the callback, when there is one, comes first.

        Args:
            trainer: The trainer, with a ``log(dict)`` method (and ``add_callback``, used
                when the callback is not among its callbacks yet).

        Returns:
            This callback, so that ``PrivacyMonitor(...).attach(trainer)`` reads as one step.

        Raises:
            ConfigurationError: When ``trainer`` has no ``log`` method.
        """
        if not callable(getattr(trainer, "log", None)):
            raise ConfigurationError(
                "`trainer` must have a log(dict) method (a transformers.Trainer), "
                f"got {type(trainer).__name__}"
            )
        handler = getattr(trainer, "callback_handler", None)
        registered = handler is not None and any(cb is self for cb in handler.callbacks)
        if not registered and callable(getattr(trainer, "add_callback", None)):
            trainer.add_callback(self)
        self._attached = trainer
        return self

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the run (or continue the checkpoint's), find the Trainer, set the horizon."""
        self._model = kwargs.get("model")
        found, checkpoint = _calling_trainer(self)
        self._trainer = found if found is not None else self._attached
        if self._trainer is None:
            log.warning(
                "fesmia-hooks: the callback cannot find its Trainer, so the privacy/* values "
                "go to trainer.state.log_history only, not to the report_to integrations; "
                "call callback.attach(trainer)"
            )
        rank_zero = bool(state.is_world_process_zero)
        if state.global_step > 0 and not self.monitor.restored:
            self._load_checkpoint_state(args, state, checkpoint, rank_zero=rank_zero)
        epochs = getattr(state, "num_train_epochs", None) or args.num_train_epochs
        max_steps = int(state.max_steps or 0) or None
        max_epochs = int(math.ceil(float(epochs))) if epochs else None
        per_epoch = -(-max_steps // max_epochs) if max_steps and max_epochs else None
        continuing = self.monitor.restored
        self.begin_run(
            rank_zero=rank_zero,
            log_dir=Path(args.output_dir) / "privacy",
            max_epochs=max_epochs,
            max_steps=max_steps,
            steps_per_epoch=per_epoch,
            canary_sources=(self._model,),
            model=self._model,
            fresh=int(state.global_step) == 0,
        )
        if self.should_stop:  # a stop restored with the checkpoint, or decided at resume
            control.should_training_stop = True
        elif continuing:
            self._check_the_epoch_a_checkpoint_ended(state, control)

    def _check_the_epoch_a_checkpoint_ended(self, state: Any, control: Any) -> None:
        """Make the check of the epoch whose last step a resumed checkpoint was saved at.

        With ``save_strategy="steps"`` the Trainer saves at a step that ends an epoch before
        ``on_epoch_end``: the checkpoint holds that epoch's weights but not its check, and
        the resumed run starts with the next epoch. The check runs here, on those weights.
        """
        done = float(state.epoch or 0.0)
        if self.monitor.every_n_epochs is None or abs(done - round(done)) > 1e-6:
            return  # not at an epoch's end
        epoch = round(done) - 1
        if epoch >= 0 and self.monitor.is_due(epoch=epoch):
            self._check(state, control, self._model, epoch=epoch)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Check after every ``every_n_epochs``-th epoch (a last, partial one included)."""
        if self.monitor.every_n_epochs is None:
            return
        self._check(state, control, kwargs.get("model"), epoch=_epoch_index(state))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Check every ``every_n_steps`` optimizer steps."""
        if self.monitor.every_n_steps is None:
            return
        self._check(state, control, kwargs.get("model"), epoch=_epoch_index(state))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the monitor's state into the checkpoint folder just saved.

        On the processes that save checkpoints (``args.should_save``: the main process, or
        each node's with ``save_on_each_node``), so every checkpoint the ``Trainer`` can
        resume from holds it.
        """
        if not getattr(args, "should_save", state.is_world_process_zero):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            log.warning("fesmia-hooks: no checkpoint folder %s; the monitor's state is not "
                        "saved with this checkpoint", folder)
            return
        tmp = folder / (STATE_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.state_dict(), fh, default=_plain)
        os.replace(tmp, folder / STATE_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Flush and close the sinks (the last check landed at the last step)."""
        self.end_run()

    # ------------------------------------------------------------------ internals
    def _load_checkpoint_state(
        self, args: Any, state: Any, checkpoint: str | None, *, rank_zero: bool
    ) -> None:
        """Load the state saved with the checkpoint this run resumes from, if there is one."""
        folders = [] if checkpoint is None else [Path(checkpoint)]
        folders.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        saved = next((f / STATE_FILE for f in folders if (f / STATE_FILE).is_file()), None)
        if saved is None:
            log.warning(
                "fesmia-hooks: resuming at step %d without the monitor's state (no %s in %s); "
                "the monitor starts a new run", state.global_step, STATE_FILE,
                " or ".join(str(f) for f in folders),
            )
            return
        # Only the writing process may tell the sinks about the resumed run.
        self.monitor.writes = rank_zero
        with open(saved, encoding="utf-8") as fh:
            self.load_state_dict(json.load(fh))

    def _check(self, state: Any, control: Any, model: nn.Module | None, *, epoch: int) -> None:
        step = int(state.global_step)
        if not self.is_due(epoch=epoch, step=step):
            return
        model = model if model is not None else self._model
        if model is None:
            raise ConfigurationError(
                "the Trainer passed no model to the callback; use it with transformers.Trainer"
            )
        reports = [self.run_check(model, epoch=epoch, step=step)]
        if state.max_steps and step >= int(state.max_steps):
            # training ends here: a check still running lands now, while the report_to
            # loggers are open (they close before on_train_end reaches this callback)
            reports.append(self.monitor.land())
        for report in reports:
            if report is None:
                continue
            metrics = scalar_metrics(report)
            if self._trainer is not None:
                # Trainer.log clears control.should_log: keep the Trainer's own logging (the
                # loss) that is due at this step or epoch end.
                due = control.should_log
                self._trainer.log(metrics)
                control.should_log = due
            else:
                state.log_history.append({**metrics, "epoch": state.epoch, "step": step})
        device = model_device(model)
        if self.reduce_stop(lambda flag: any_rank(flag, device), epoch=epoch):
            if not control.should_training_stop and state.is_world_process_zero:
                log.info("fesmia-hooks: stopping training after epoch %d (%s)", epoch,
                         self.stop_reason.value)
            control.should_training_stop = True


def _epoch_index(state: Any) -> int:
    """The epoch (from 0) that ``state.epoch`` (epochs done, a float) is in or has just ended.

    ``state.epoch`` is ``e + k / n`` after step ``k`` of ``n`` in epoch ``e`` (so ``e + 1`` at
    its end, ``e + 0.5`` at the end of a last epoch cut short by ``max_steps``).

    Example:
        >>> from types import SimpleNamespace as S
        >>> [_epoch_index(S(epoch=e)) for e in (0.25, 1.0, 1.25, 2.5, 3.0, None)]
        [0, 0, 1, 2, 2, 0]
    """
    done = float(state.epoch or 0.0)
    return max(0, math.ceil(done - 1e-9) - 1)


def _calling_trainer(callback: Any) -> tuple[Any, str | None]:
    """The ``transformers.Trainer`` running ``callback``, and the checkpoint it resumes from.

    Callbacks are not given their trainer; the one running the training loop is found on
    the call stack as ``self`` of its methods: the nearest ``Trainer`` that holds
    ``callback`` among its callbacks (or else the nearest ``Trainer``). The checkpoint is
    that method's ``resume_from_checkpoint`` argument when it is a path (``None`` otherwise).
    """
    if _transformers is None:  # pragma: no cover
        return None, None
    nearest: tuple[Any, str | None] = (None, None)
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, _transformers.Trainer):
                checkpoint = frame.f_locals.get("resume_from_checkpoint")
                found = (candidate, os.fspath(checkpoint)
                         if isinstance(checkpoint, (str, os.PathLike)) else None)
                handler = getattr(candidate, "callback_handler", None)
                if handler is not None and any(cb is callback for cb in handler.callbacks):
                    return found
                if nearest[0] is None:
                    nearest = found
            frame = frame.f_back
    finally:
        del frame
    return nearest


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars in the state."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
