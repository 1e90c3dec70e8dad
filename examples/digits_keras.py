"""Keras 3 (torch backend): the callback adds privacy/* keys to the logs and stops fit().

Run: KERAS_BACKEND=torch python examples/digits_keras.py
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402

import fesmia_hooks as fh  # noqa: E402
from fesmia_hooks.demos.digits import load_noisy_digits  # noqa: E402
from fesmia_hooks.integrations.keras import PrivacyMonitor  # noqa: E402


def main(epochs=60, log_dir="runs/example-keras"):
    keras.utils.set_random_seed(0)
    task = load_noisy_digits()
    x, y = (t.numpy() for t in task.train)
    model = keras.Sequential([
        keras.Input(shape=(64,)),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    privacy = PrivacyMonitor(
        task.canaries,
        probe=fh.FeSMIA(method="simpleshot", shots=5, queries=15),
        budget=fh.LeakageBudget(max_level="low", action="stop"),
        log_dir=log_dir,
    )
    history = model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=[privacy])
    print("privacy/log_mia_strict per epoch:", history.history["privacy/log_mia_strict"])
    print("stopped at epoch", privacy.stopped_epoch, "reason:", privacy.stop_reason.value)
    return privacy


if __name__ == "__main__":
    main()
