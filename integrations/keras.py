"""Keras 3 adapter: a ``keras.callbacks.Callback`` over the core :class:`PrivacyMonitor`.

It runs on Keras's **torch** backend only. There a Keras model *is* a ``torch.nn.Module``,
so the core probe forwards the canaries through the very model being trained, on its own
device, with no copy and no conversion. With any other backend the callback refuses at
construction rather than measure something that is not the trained model. Set the backend
before Keras is first imported::

    KERAS_BACKEND=torch python train.py

The adapter is Keras's hooks only (what every adapter shares is
:class:`fesmia_hooks.integrations.driver.MonitorDriver`). At each epoch end (or every n-th
batch) it hands the model to the core monitor, copies the report's scalars
(:func:`fesmia_hooks.sinks.scalar_metrics`, keys such as ``privacy/log_mia_strict``) into
Keras's ``logs`` and sets ``model.stop_training`` when the budget says stop.

The probe's forward pass is in inference mode twice over: the core's
:func:`~fesmia_hooks.guard.untouched` puts every torch module in eval mode, forks the torch
RNG and turns gradients off, and the adapter calls the model as ``model(x, training=False)``
(Keras layers read their ``training`` argument, not ``module.training``). Dropout then draws
no random numbers and Keras ``SeedGenerator`` states are left as they were; BatchNormalization
reads its moving statistics and does not update them.

Logs on epochs without a check: the ``privacy/*`` keys are present only at the end of an
epoch where a check ran (every ``every_n_epochs``-th epoch, and not after a check that
failed), as Keras does for validation metrics with ``validation_freq > 1``. No number is
repeated or invented for an epoch that was not measured. ``EarlyStopping`` on a
``privacy/*`` key therefore counts its patience in checks (it warns, and waits, on the
epochs in between), and ``History.history["privacy/..."]`` holds one value per check.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fesmia_hooks.exceptions import ConfigurationError, PrivacyBudgetExceeded
from fesmia_hooks.integrations.driver import MonitorDriver
from fesmia_hooks.sinks import scalar_metrics

try:
    import keras
except ImportError as exc:  # pragma: no cover - depends on the environment
    if exc.name == "keras":
        raise ImportError(
            "fesmia_hooks.integrations.keras needs Keras 3: pip install 'fesmia-hooks[keras]'"
        ) from exc
    raise ImportError(
        f"keras failed to import ({exc}). fesmia-hooks runs Keras 3 on its torch backend: "
        "set KERAS_BACKEND=torch before keras is first imported"
    ) from exc

__all__ = ["PrivacyMonitor", "REQUIRED_BACKEND"]

#: The only Keras backend this adapter runs on.
REQUIRED_BACKEND = "torch"


def _check_backend() -> None:
    backend = keras.backend.backend()
    if backend != REQUIRED_BACKEND:
        raise ConfigurationError(
            f"the Keras adapter of fesmia-hooks needs the {REQUIRED_BACKEND!r} backend, got "
            f"{backend!r}: set KERAS_BACKEND={REQUIRED_BACKEND} before keras is first imported"
        )


class _InferenceForward(nn.Module):
    """The Keras model seen by the core probe: its forward is ``model(x, training=False)``.

    Modules, parameters, buffers and state dict are the Keras model's own, under its own
    names, so ``embedding_layer`` names and saved weights are the same as on the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.keras_model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the Keras model in inference mode."""
        return self.keras_model(*args, training=False, **kwargs)

    def named_modules(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self.keras_model.named_modules(*args, **kwargs)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self.keras_model.named_parameters(*args, **kwargs)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self.keras_model.named_buffers(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self.keras_model.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self.keras_model.load_state_dict(*args, **kwargs)


class PrivacyMonitor(MonitorDriver, keras.callbacks.Callback):
    """Watch a Keras model's privacy leakage during ``fit``; stop it when over budget.

    A thin Keras callback over the core :class:`fesmia_hooks.PrivacyMonitor` (available as
    :attr:`monitor`). After every ``every_n_epochs``-th epoch (or every ``every_n_steps``
    batches) it runs the FeS-MIA probe on the canaries, writes the report to ``log_dir``
    (TensorBoard events through ``torch.utils.tensorboard`` and ``privacy_history.jsonl``;
    TensorFlow is not needed), adds the report's ``privacy/*`` scalars to the epoch's
    ``logs`` (so ``History``, ``CSVLogger`` and ``EarlyStopping`` placed after it see them)
    and sets ``model.stop_training`` when the budget is breached with ``action="stop"``.
    With ``action="raise"``, :class:`~fesmia_hooks.PrivacyBudgetExceeded` propagates out of
    ``fit``; with ``action="alert"`` training goes on.

    Every ``fit`` is one training run unless a state was loaded with
    :meth:`load_state_dict` before it: the previous run's checks are forgotten, and the
    budget's ``alpha`` is spent over ``epochs // every_n_epochs`` checks (or the steps'
    equivalent) unless ``horizon`` fixes it. The TensorBoard step of a check is its epoch
    (counted from 0), as in Keras's own ``TensorBoard`` callback; runs that share a
    ``log_dir`` are told apart in the history by their run id.

    Args:
        canaries: The canary set (its members must be in the training data), or an
            importable factory ``"package.module:function"``.
        monitor: A ready core :class:`fesmia_hooks.PrivacyMonitor` instead of the options.
        log_dir: Folder for TensorBoard events and the history file; ``None`` writes nothing.
        tensorboard: Write TensorBoard events into ``log_dir``.
        **options: Options of the core :class:`fesmia_hooks.PrivacyMonitor` (``probe``,
            ``budget``, ``every_n_epochs``, ``every_n_steps``, ``sinks``,
            ``restore_safe_weights``, ``on_error``, ``alpha``, ``horizon``, ``bands``).

    Raises:
        ConfigurationError: If Keras does not run on the torch backend, or an argument is
            out of range.

    Example:
        Run with ``KERAS_BACKEND=torch``; ``canaries`` hold training samples as members::

            from fesmia_hooks import CanarySet, FeSMIA, LeakageBudget
            from fesmia_hooks.integrations.keras import PrivacyMonitor

            train, canaries = CanarySet.split((x, y), size=64, num_classes=10)
            privacy = PrivacyMonitor(canaries, budget=LeakageBudget(max_level="low"),
                                     log_dir="runs/keras")
            model.fit(train[0].numpy(), train[1].numpy(), epochs=50,
                      callbacks=[privacy, keras.callbacks.CSVLogger("log.csv")])
            privacy.stop_reason, privacy.history[-1].summary()
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _check_backend()
        super().__init__(*args, **kwargs)
        self._forward: _InferenceForward | None = None
        self._steps = 0
        self._epoch = 0

    # ------------------------------------------------------------------ Keras hooks
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Start a new run (or continue a loaded one) and wrap the model for the probe."""
        model = self.model
        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                f"the Keras model must be a torch.nn.Module (Keras on the "
                f"{REQUIRED_BACKEND!r} backend), got {type(model).__name__}"
            )
        self._forward = _InferenceForward(model)
        params = self.params or {}
        continuing = self.monitor.restored
        self.begin_run(
            max_epochs=params.get("epochs"),
            steps_per_epoch=params.get("steps"),
            canary_sources=(model,),
        )
        if not continuing:
            self._steps = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Remember the epoch, for checks made by steps."""
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Count an optimizer step; check every ``every_n_steps`` of them."""
        self._steps += 1
        if self.monitor.every_n_steps is not None:
            self._check(epoch=self._epoch, step=self._steps, logs=None)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Check if due, add the report's scalars to ``logs``, stop if over budget."""
        if self.monitor.every_n_epochs is not None:
            self._check(epoch=epoch, step=None, logs=logs)
        if self.should_stop:
            self.model.stop_training = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        """Flush and close the sinks (a later ``fit`` reopens them)."""
        self.end_run()

    def _check(self, *, epoch: int, step: int | None, logs: dict[str, Any] | None) -> None:
        if self._forward is None or self._forward.keras_model is not self.model:
            self._forward = _InferenceForward(self.model)
        try:
            report = self.run_check(self._forward, epoch=epoch, step=step)
        except PrivacyBudgetExceeded:
            self.model.stop_training = True
            self.end_run()
            raise
        if report is not None and logs is not None:
            logs.update(scalar_metrics(report))
        if self.should_stop:
            self.model.stop_training = True

    def state_dict(self) -> dict[str, Any]:
        """The core monitor's state, with the callback's step count."""
        return {**super().state_dict(), "keras_steps": self._steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: the next ``fit`` continues that run."""
        super().load_state_dict(state_dict)
        self._steps = int(state_dict.get("keras_steps", 0))
