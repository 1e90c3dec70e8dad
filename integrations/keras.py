"""Keras 3 adapter: a ``keras.callbacks.Callback`` over the core :class:`PrivacyMonitor`.

It runs on Keras's **torch** backend only. There a Keras model *is* a ``torch.nn.Module``,
so the core probe forwards the canaries through the very model being trained, on its own
device, with no copy and no conversion. With any other backend the callback refuses at
construction rather than measure something that is not the trained model. Set the backend
before Keras is first imported::

    KERAS_BACKEND=torch python train.py

The adapter is Keras's hooks only (what every adapter shares is
:class:`fesmia_hooks.integrations.driver.MonitorDriver`). At each epoch end (or every n-th
batch) it hands the model to the core monitor, copies the chosen scalars of the report
(:func:`fesmia_hooks.sinks.scalar_metrics`, keys such as ``privacy/log_mia_strict``) into
Keras's ``logs`` and sets ``model.stop_training`` when the budget says stop.

The probe's forward pass is in inference mode twice over: the core's
:func:`~fesmia_hooks.guard.untouched` puts every torch module in eval mode, forks the torch
RNG and turns gradients off, and the adapter calls the model as ``model(x, training=False)``
(Keras layers read their ``training`` argument, not ``module.training``). Dropout then draws
no random numbers and Keras ``SeedGenerator`` states are left as they were; BatchNormalization
reads its moving statistics and does not update them.

Which keys reach ``logs``: a check has some twenty ``privacy/*`` scalars. All of them go to
the history file and TensorBoard; only those named by ``log_keys`` go into Keras's ``logs``,
and so into ``History``, ``CSVLogger``, ``EarlyStopping`` and the progress bar. The default
(:data:`DEFAULT_LOG_KEYS`) keeps the progress bar readable; ``log_keys="all"`` sends them all.

Logs on epochs without a check: the ``privacy/*`` keys are present only at the end of an
epoch where a check ran (every ``every_n_epochs``-th epoch, and not after a check that
failed), as Keras does for validation metrics with ``validation_freq > 1``. No number is
repeated or invented for an epoch that was not measured. ``EarlyStopping`` on a
``privacy/*`` key therefore counts its patience in checks (it warns, and waits, on the
epochs in between), and ``History.history["privacy/..."]`` holds one value per check. With
``every_n_steps``, an epoch's logs hold the last check made during that epoch (every check
is in the history file and TensorBoard), and nothing when no check fell in it. ``CSVLogger``
takes its columns from the first epoch's logs: with checks that skip epoch 0, give it
``log_keys`` that the first epoch has, or read the history file.

``validation_split`` and canary members: Keras holds out the **last** fraction of the
training arrays for validation, before it shuffles, and never trains on it. A member that
lies there is not a member, and the monitor would read the model's leakage on it as if it
were: it would underestimate leakage. Keras 3 gives callbacks no sight of ``validation_split``
or ``validation_data`` (``params`` holds only ``epochs``, ``steps`` and ``verbose``), so the
callback reads them from the running ``Model.fit`` call and refuses to start, with
:class:`~fesmia_hooks.CanaryError`, when a member is validated on and not trained on. It can
read arrays and tensors only: with a dataset or generator, nothing is checked. Build the
arrays with :func:`training_arrays`, which keeps every member in the part that is trained
on::

    x, y = training_arrays(train, canaries, validation_split=0.2)
    model.fit(x, y, validation_split=0.2, callbacks=[privacy])

One-hot labels (``keras.utils.to_categorical``) may be given to
:class:`~fesmia_hooks.CanarySet` as they are: each row with a single 1 is read as its class.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fesmia_hooks._validation import probability
from fesmia_hooks.canaries import Canaries, _fingerprints
from fesmia_hooks.exceptions import CanaryError, ConfigurationError, PrivacyBudgetExceeded
from fesmia_hooks.integrations.driver import MonitorDriver
from fesmia_hooks.report import LeakageReport, scalar_keys
from fesmia_hooks.sinks import PREFIX, scalar_metrics

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

__all__ = ["DEFAULT_LOG_KEYS", "PrivacyMonitor", "REQUIRED_BACKEND", "training_arrays"]

#: The only Keras backend this adapter runs on.
REQUIRED_BACKEND = "torch"

#: The report keys put into Keras's ``logs`` unless ``log_keys`` says otherwise: the two
#: Log-MIA values (the measure itself: the share of members an attacker names, at no and at
#: some error), the attack's AUC (the usual membership-inference summary), the p-value of
#: the run-level test (is the leakage real?) and the level's index (0 = none, 1 = low, ...:
#: what the budget compares, and a number ``EarlyStopping`` can watch). The interval bounds,
#: chance levels, TPR at fixed FPR, timings and the rest stay in the history and TensorBoard.
DEFAULT_LOG_KEYS: tuple[str, ...] = (
    "log_mia_strict",
    "log_mia_relaxed",
    "auc",
    "p_value",
    "level_index",
)


def _check_backend() -> None:
    backend = keras.backend.backend()
    if backend != REQUIRED_BACKEND:
        raise ConfigurationError(
            f"the Keras adapter of fesmia-hooks needs the {REQUIRED_BACKEND!r} backend, got "
            f"{backend!r}: set KERAS_BACKEND={REQUIRED_BACKEND} before keras is first imported"
        )


def _log_keys(value: Any) -> tuple[str, ...]:
    """``log_keys`` as report keys without the ``privacy/`` prefix, validated."""
    allowed = scalar_keys()
    if isinstance(value, str):
        if value == "all":
            return tuple(allowed)
        raise ConfigurationError(
            f"`log_keys` must be 'all' or a sequence of keys, got the string {value!r} "
            f"(for one key, write [{value!r}])"
        )
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        raise ConfigurationError(
            f"`log_keys` must be 'all' or a sequence of keys, got {type(value).__name__}"
        )
    keys: list[str] = []
    unknown: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigurationError(
                f"`log_keys` must hold strings, got a {type(item).__name__}"
            )
        key = item[len(PREFIX):] if item.startswith(PREFIX) else item
        if key not in allowed:
            unknown.append(item)
        elif key not in keys:
            keys.append(key)
    if unknown:
        raise ConfigurationError(
            f"`log_keys` has unknown key(s) {unknown}; allowed: 'all' or any of "
            f"{', '.join(allowed)} (with or without the {PREFIX!r} prefix)"
        )
    return tuple(keys)


def _optimizer_steps(model: Any) -> int:
    """The steps ``model``'s optimizer has taken (``optimizer.iterations``); 0 if unknown."""
    iterations = getattr(getattr(model, "optimizer", None), "iterations", None)
    if iterations is None:
        return 0
    value = getattr(iterations, "value", iterations)
    try:
        return int(value.detach().cpu()) if isinstance(value, torch.Tensor) else int(
            np.asarray(value))
    except (TypeError, ValueError, RuntimeError):
        return 0


# ---------------------------------------------------------------------- validation_split
def _rows_like(data: Any, like: torch.Tensor) -> torch.Tensor | None:
    """``data`` as a CPU tensor of ``like``'s dtype if it holds samples shaped as ``like``'s."""
    if isinstance(data, torch.Tensor):
        rows = data.detach().cpu()
    elif isinstance(data, np.ndarray):
        try:
            rows = torch.from_numpy(np.ascontiguousarray(data))
        except TypeError:  # a dtype torch has no match for (object, strings)
            return None
    else:
        return None
    if rows.dim() != like.dim() or rows.shape[1:] != like.shape[1:]:
        return None
    if rows.is_floating_point() and like.is_floating_point() and (
        rows.element_size() < like.element_size()
    ):
        return rows  # compared at the lower precision (see _members_among)
    return rows.to(like.dtype)


def _members_among(canaries: Canaries, rows: torch.Tensor) -> list[bytes]:
    """The hashes of the canary members among ``rows`` (as the overlap check hashes).

    At ``rows``' precision when it is the lower: Keras turns float64 arrays into float32
    before it splits off ``validation_split``, so float64 canaries are compared as float32.
    """
    present = set(_fingerprints(rows))
    members = canaries.inputs[: canaries.num_members].to(rows.dtype)
    return [h for h in _fingerprints(members) if h in present]


def _running_fit(model: Any) -> dict[str, Any] | None:
    """``x``, ``validation_split`` and ``validation_data`` of the running ``model.fit``.

    Keras 3 shows callbacks none of them (``params`` holds ``epochs``, ``steps`` and
    ``verbose``), so they are read from the frame of the innermost running ``fit`` of
    ``model``: once Keras has split the arrays there, ``x`` is the part it trains on and
    ``validation_data`` the held-out tail. ``None`` when no such frame is found (a
    hand-written loop calling the hooks).
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            code = frame.f_code
            if code.co_name == "fit" and "validation_split" in code.co_varnames:
                found = frame.f_locals
                if found.get("self") is model:
                    return {key: found.get(key)
                            for key in ("x", "validation_split", "validation_data")}
            frame = frame.f_back
        return None
    finally:
        del frame


def training_arrays(
    train: Sequence[Any], canaries: Canaries, validation_split: float = 0.0
) -> tuple[Any, ...]:
    """The arrays to give ``fit(..., validation_split=...)``: every canary member trained on.

    Keras's ``validation_split`` holds out the **last** ``validation_split`` share of the
    arrays (before shuffling), so members that lie there are never trained on. This returns
    copies of ``train`` as NumPy arrays, in the same order except that each member in that
    tail swaps places with a row of the trained part that is not a canary (the last such
    rows first). Every array of ``train`` is reordered alike. It also checks that every
    member is in the arrays, and that no non-member is trained on.

    Args:
        train: The training arrays: inputs first, then any arrays aligned with them (labels,
            sample weights; ``None`` passes through), as tensors or NumPy arrays, for example
            the training part returned by :meth:`fesmia_hooks.CanarySet.split`.
        canaries: The canary set whose members must be trained on.
        validation_split: The ``validation_split`` that will be given to ``fit``, in
            ``[0, 1)``.

    Returns:
        The arrays, reordered, as NumPy arrays (``None`` stays ``None``).

    Raises:
        CanaryError: When a member is not in the inputs, the trained part cannot hold every
            member, or a non-member would be trained on.
        ConfigurationError: On arrays of different lengths, inputs that are not an array of
            samples shaped like the canaries, or a ``validation_split`` outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> from fesmia_hooks import CanarySet
        >>> x, y = torch.randn(100, 4), torch.randint(0, 2, (100,))
        >>> canaries = CanarySet(members=(x[80:], y[80:]), non_members=(x[:20] + 9, y[:20]))
        >>> x_fit, y_fit = training_arrays((x, y), canaries, validation_split=0.2)
        >>> trained = {tuple(row) for row in x_fit[:80].tolist()}  # what Keras trains on
        >>> all(tuple(row) in trained for row in canaries.inputs[:20].tolist())
        True
    """
    split = probability("validation_split", validation_split, open_low=False)
    if not isinstance(canaries, Canaries):
        raise ConfigurationError(
            f"`canaries` must be a CanarySet or SequenceCanarySet, got {type(canaries).__name__}"
        )
    if isinstance(train, (str, bytes)) or not isinstance(train, Sequence) or not train:
        raise ConfigurationError(
            "`train` must be a sequence of arrays (inputs first), got "
            f"{type(train).__name__}"
        )
    arrays = [None if a is None else
              a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
              for a in train]
    lengths = {len(a) for a in arrays if a is not None}
    if len(lengths) != 1 or arrays[0] is None:
        raise ConfigurationError(
            f"the arrays of `train` must have one length, inputs first, got lengths "
            f"{[None if a is None else len(a) for a in arrays]}"
        )
    members = canaries.inputs[: canaries.num_members]
    rows = _rows_like(arrays[0], members)
    if rows is None:
        raise ConfigurationError(
            "the inputs (first array of `train`) must be an array of samples shaped "
            f"{tuple(members.shape[1:])} like the canaries, got shape "
            f"{tuple(np.shape(arrays[0]))}"
        )
    row_hashes = _fingerprints(rows)  # at the lower of the two precisions (_rows_like)
    member_hashes = _fingerprints(members.to(rows.dtype))
    non_member_hashes = set(_fingerprints(canaries.inputs[canaries.num_members :].to(rows.dtype)))
    present = set(row_hashes)
    missing = sum(h not in present for h in member_hashes)
    if missing:
        raise CanaryError(
            f"{missing} of the {canaries.num_members} canary members are not in the training "
            f"arrays; members must be trained on (rows are compared exactly, as "
            f"{rows.dtype})"
        )
    n = len(row_hashes)
    trained = int(math.floor(n * (1.0 - split)))  # Keras's own split point
    member_set = set(member_hashes)
    is_member = np.array([h in member_set for h in row_hashes], dtype=bool)
    is_non_member = np.array([h in non_member_hashes for h in row_hashes], dtype=bool)
    held_out = np.flatnonzero(is_member[trained:]) + trained
    free = np.flatnonzero(~is_member[:trained] & ~is_non_member[:trained])[::-1]
    if len(free) < len(held_out):
        raise CanaryError(
            f"validation_split={validation_split} leaves {trained} of {n} rows to train on, "
            f"too few to hold the {int(is_member.sum())} rows of canary members"
        )
    order = np.arange(n)
    for tail, head in zip(held_out, free[: len(held_out)], strict=True):
        order[tail], order[head] = order[head], order[tail]
    trained_non_members = int(is_non_member[order[:trained]].sum())
    if trained_non_members:
        raise CanaryError(
            f"{trained_non_members} rows of the training arrays are canary non-members that "
            "Keras would train on; non-members must never be trained on"
        )
    return tuple(None if a is None else a[order] for a in arrays)


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
    TensorFlow is not needed), adds the ``log_keys`` scalars of the report to the epoch's
    ``logs`` (so ``History``, ``CSVLogger``, ``EarlyStopping`` placed after it and the
    progress bar see them) and sets ``model.stop_training`` when the budget is breached
    with ``action="stop"``. With ``action="raise"``,
    :class:`~fesmia_hooks.PrivacyBudgetExceeded` propagates out of ``fit``; with
    ``action="alert"`` training goes on.

    Every ``fit`` is one training run unless a state was loaded with
    :meth:`load_state_dict` before it: the previous run's checks are forgotten, and the
    budget's ``alpha`` is spent over ``epochs // every_n_epochs`` checks (or the steps'
    equivalent) unless ``horizon`` fixes it. A loaded state continues its run instead: same
    run id, check numbers and run-level test, and ``fit(..., initial_epoch=...)`` picks up
    where it stopped. The TensorBoard step of a check is its epoch (counted from 0), as in
    Keras's own ``TensorBoard`` callback, or its batch count with ``every_n_steps``; runs
    that share a ``log_dir`` are told apart in the history by their run id.

    When the running ``fit`` validates on any canary member (``validation_split`` holds out
    the last rows of the arrays; see :func:`training_arrays`), ``fit`` is refused at its
    start: those members are never trained on.

    Args:
        canaries: The canary set (its members must be in the training data), or an
            importable factory ``"package.module:function"``.
        monitor: A ready core :class:`fesmia_hooks.PrivacyMonitor` instead of the options.
        log_dir: Folder for TensorBoard events and the history file; ``None`` writes nothing.
        tensorboard: Write TensorBoard events into ``log_dir``.
        log_keys: The report keys (:func:`fesmia_hooks.report.scalar_keys`, with or without
            the ``privacy/`` prefix) put into Keras's ``logs`` as ``privacy/<key>``, or
            ``"all"``; :data:`DEFAULT_LOG_KEYS` by default. Every key goes to the history
            file, TensorBoard and ``sinks`` whatever this says.
        **options: Options of the core :class:`fesmia_hooks.PrivacyMonitor` (``probe``,
            ``budget``, ``every_n_epochs``, ``every_n_steps``, ``sinks``,
            ``restore_safe_weights``, ``on_error``, ``alpha``, ``horizon``, ``bands``).

    Raises:
        ConfigurationError: If Keras does not run on the torch backend, or an argument is
            out of range (an unknown ``log_keys`` key: the message lists the allowed ones).

    Example:
        Run with ``KERAS_BACKEND=torch``; ``canaries`` hold training samples as members::

            from fesmia_hooks import CanarySet, FeSMIA, LeakageBudget
            from fesmia_hooks.integrations.keras import PrivacyMonitor, training_arrays

            train, canaries = CanarySet.split((x, y), size=64, num_classes=10)
            x_fit, y_fit = training_arrays(train, canaries, validation_split=0.1)
            privacy = PrivacyMonitor(canaries, budget=LeakageBudget(max_level="low"),
                                     log_dir="runs/keras")
            model.fit(x_fit, y_fit, epochs=50, validation_split=0.1,
                      callbacks=[privacy, keras.callbacks.CSVLogger("log.csv")])
            privacy.stop_reason, privacy.history[-1].summary()
    """

    def __init__(
        self,
        *args: Any,
        log_keys: Sequence[str] | Literal["all"] = DEFAULT_LOG_KEYS,
        **kwargs: Any,
    ) -> None:
        _check_backend()
        self.log_keys: tuple[str, ...] = _log_keys(log_keys)
        super().__init__(*args, **kwargs)
        self._forward: _InferenceForward | None = None
        self._steps = 0
        self._epoch = 0
        self._epoch_scalars: dict[str, float] | None = None

    # ------------------------------------------------------------------ Keras hooks
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Start a new run (or continue a loaded one) and wrap the model for the probe.

        Raises:
            ConfigurationError: When the model is not a ``torch.nn.Module``.
            CanaryError: When the running ``fit`` validates on (never trains on) members.
        """
        model = self.model
        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                f"the Keras model must be a torch.nn.Module (Keras on the "
                f"{REQUIRED_BACKEND!r} backend), got {type(model).__name__}"
            )
        self._forward = _InferenceForward(model)
        if self.monitor.canaries is None:
            self.monitor.set_canaries(self._find_canaries((model,)))
        self._refuse_members_held_out(model)
        params = self.params or {}
        continuing = self.monitor.restored
        self.begin_run(
            max_epochs=params.get("epochs"),
            steps_per_epoch=params.get("steps"),
            canary_sources=(model,),
            model=self._forward,
            # a model its optimizer has already stepped (a second fit) is no longer the
            # untrained one the pre-flight check asks about
            fresh=_optimizer_steps(model) == 0,
        )
        if not continuing:
            self._steps = 0
        self._epoch_scalars = None
        if self.should_stop:  # a stop restored with the state, or decided at resume
            model.stop_training = True

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Remember the epoch, for checks made by steps."""
        self._epoch = epoch
        self._epoch_scalars = None

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Count an optimizer step; check every ``every_n_steps`` of them."""
        self._steps += 1
        if self.monitor.every_n_steps is not None:
            self._check(epoch=self._epoch, step=self._steps, logs=None)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Check if due, add the report's ``log_keys`` to ``logs``, stop if over budget.

        With ``every_n_steps``, ``logs`` get the last check made during this epoch, if any.
        """
        if self.monitor.every_n_epochs is not None:
            self._check(epoch=epoch, step=None, logs=logs)
        elif self._epoch_scalars is not None and logs is not None:
            logs.update(self._epoch_scalars)
        self._epoch_scalars = None
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
        if report is not None:
            chosen = self.logged_scalars(report)
            if logs is not None:
                logs.update(chosen)
            else:
                self._epoch_scalars = chosen  # the epoch's logs get the last check of it
        if self.should_stop:
            self.model.stop_training = True

    def logged_scalars(self, report: LeakageReport) -> dict[str, float]:
        """The ``privacy/<key>`` scalars of ``report`` that go into Keras's ``logs``."""
        values = scalar_metrics(report)
        return {PREFIX + k: values[PREFIX + k] for k in self.log_keys if PREFIX + k in values}

    def _refuse_members_held_out(self, model: Any) -> None:
        """Refuse a ``fit`` that validates on canary members: Keras never trains on them."""
        fit = _running_fit(model)
        canaries = self.monitor.canaries
        if fit is None or canaries is None:
            return
        data = fit["validation_data"]
        inputs = data[0] if isinstance(data, (tuple, list)) and data else None
        rows = _rows_like(inputs, canaries.inputs)
        if rows is None:  # no validation arrays, or none this check can read (a dataset)
            return
        in_validation = _members_among(canaries, rows)
        trained_rows = _rows_like(fit["x"], canaries.inputs) if in_validation else None
        if trained_rows is None:  # nothing held out, or training data this cannot read
            return
        trained = set(_fingerprints(trained_rows.to(rows.dtype)))
        held = sum(h not in trained for h in in_validation)  # validated on, never trained on
        if not held:
            return
        split = fit["validation_split"]
        if split:
            raise CanaryError(
                f"{held} of the {canaries.num_members} canary members are never trained on: "
                f"validation_split={split} holds out the last {len(rows)} rows of the "
                "training arrays (before shuffling) for validation, and they lie there. The "
                "monitor would measure them as members. Keep every member in the trained "
                "part: fit on fesmia_hooks.integrations.keras.training_arrays((x, y), "
                f"canaries, validation_split={split})"
            )
        raise CanaryError(
            f"{held} of the {canaries.num_members} canary members are in validation_data "
            "and not in the training arrays: Keras never trains on them, and the monitor "
            "would measure them as members. Put members in the training arrays (non-members "
            "may be in validation_data)"
        )

    def state_dict(self) -> dict[str, Any]:
        """The core monitor's state, with the callback's step count."""
        return {**super().state_dict(), "keras_steps": self._steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: the next ``fit`` continues that run."""
        core = dict(state_dict)
        steps = core.pop("keras_steps", 0)
        super().load_state_dict(core)
        self._steps = int(steps)
