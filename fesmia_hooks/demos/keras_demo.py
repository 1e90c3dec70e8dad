"""The digits demo in Keras 3: the same noisy-label MLP as the plain-torch demo, in ``fit``.

Keras runs on its torch backend (``KERAS_BACKEND=torch``, set here if unset). Needs Keras 3
and scikit-learn (``pip install 'fesmia-hooks[keras,examples]'``). Keras is imported when the
demo runs, not when this module is imported.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fesmia_hooks.budget import LeakageBudget
from fesmia_hooks.demos.digits import closing_lines, format_row, load_noisy_digits
from fesmia_hooks.exceptions import ConfigurationError
from fesmia_hooks.monitor import PrivacyMonitor
from fesmia_hooks.probe import FeSMIA

__all__ = ["run_keras_demo"]


def _import_keras() -> Any:
    """Import Keras on the torch backend; refuse a Keras already running another backend."""
    imported = "keras" in sys.modules
    if not imported:
        os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as exc:
        if exc.name == "keras":
            raise ImportError(
                "the Keras demo needs Keras 3: pip install 'fesmia-hooks[keras,examples]'"
            ) from exc
        raise ImportError(
            f"keras failed to import with KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r} "
            f"({exc}); the Keras demo runs on KERAS_BACKEND=torch"
        ) from exc
    backend = keras.backend.backend()
    if backend != "torch":
        how = (
            "keras was imported before the demo started"
            if imported
            else f"KERAS_BACKEND is set to {os.environ.get('KERAS_BACKEND')!r}"
        )
        raise ConfigurationError(
            f"the Keras demo needs the 'torch' backend, got {backend!r} ({how}); "
            "run it with KERAS_BACKEND=torch in a fresh process"
        )
    return keras


def run_keras_demo(
    *,
    log_dir: str | Path = "runs/fesmia-demo-keras",
    epochs: int = 100,
    seed: int = 0,
    out: Callable[[str], None] = print,
) -> PrivacyMonitor:
    """Train the digits MLP with ``keras.Model.fit``, checking leakage after every epoch.

    The setting of :func:`~fesmia_hooks.demos.digits.run_torch_demo`: 300 training samples
    with 20 % label noise, 64 + 64 canaries, an MLP 64-1024-10, Adam at 1e-3, batches of 32,
    the default probe and a :class:`LeakageBudget` over ``epochs`` checks. Training stops when
    the budget is breached.

    Returns:
        The core monitor (the callback's :attr:`monitor`).

    Raises:
        ConfigurationError: If Keras is already running on a backend other than torch.
    """
    keras = _import_keras()
    from fesmia_hooks.integrations.keras import PrivacyMonitor as KerasPrivacyMonitor

    keras.utils.set_random_seed(seed)
    task = load_noisy_digits(seed=seed)
    x, y = (t.numpy() for t in task.train)
    model = keras.Sequential(
        [
            keras.Input(shape=(x.shape[1],)),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(task.num_classes),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    privacy = KerasPrivacyMonitor(
        task.canaries,
        probe=FeSMIA(seed=seed),
        budget=LeakageBudget(),
        log_dir=log_dir,
    )
    monitor = privacy.monitor

    def print_row(epoch: int, logs: dict[str, Any] | None) -> None:
        report = monitor.last_report
        if report is not None and report.epoch == epoch:
            loss = None if not logs or "loss" not in logs else float(logs["loss"])
            out(format_row(report, loss))

    out(f"fesmia-hooks demo (Keras {keras.__version__}, torch backend): digits MLP, "
        f"{len(x)} training samples with 20% label noise, {task.canaries}")
    out(f"probe {monitor.probe!r}; budget {monitor.budget!r}")
    start = time.perf_counter()
    model.fit(
        x, y, epochs=epochs, batch_size=32, verbose=0,
        callbacks=[privacy, keras.callbacks.LambdaCallback(on_epoch_end=print_row)],
    )  # fmt: skip
    closing_lines(monitor, epochs=epochs, log_dir=log_dir, start=start, out=out)
    return monitor
