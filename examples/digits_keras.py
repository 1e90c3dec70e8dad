"""Keras 3 (torch backend): the callback adds privacy/* keys to the logs and stops fit().

The progress bar shows the few keys of ``log_keys`` (the history file and TensorBoard get
them all). ``validation_split`` holds out the last rows of the arrays, so the arrays are
built with ``training_arrays``, which keeps every canary member in the part Keras trains on.

Run: KERAS_BACKEND=torch python examples/digits_keras.py
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402

import fesmia_hooks as fh  # noqa: E402
from fesmia_hooks.demos.digits import load_noisy_digits  # noqa: E402
from fesmia_hooks.integrations.keras import PrivacyMonitor, training_arrays  # noqa: E402

VALIDATION_SPLIT = 0.1


def main(epochs=60, log_dir="runs/example-keras"):
    keras.utils.set_random_seed(0)
    task = load_noisy_digits()
    x, y = training_arrays(task.train, task.canaries, validation_split=VALIDATION_SPLIT)
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
        log_keys=["log_mia_strict", "auc", "level_index"],  # what the progress bar shows
    )
    history = model.fit(x, y, epochs=epochs, batch_size=32, verbose=2,
                        validation_split=VALIDATION_SPLIT, callbacks=[privacy])
    print("privacy/log_mia_strict per epoch:", history.history["privacy/log_mia_strict"])
    print("stopped at epoch", privacy.stopped_epoch, "reason:", privacy.stop_reason.value)
    return privacy


if __name__ == "__main__":
    main()
