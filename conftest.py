"""Root pytest configuration: doctests of the adapters need Keras on the torch backend."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
