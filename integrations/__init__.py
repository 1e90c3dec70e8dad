"""Framework adapters of fesmia-hooks, installed as ``fesmia_hooks.integrations``.

This folder sits at the top of the repository, beside the framework-neutral core
``fesmia_hooks/``, so that the split between the science and the frameworks is visible at a
glance; ``pyproject.toml`` installs it as the subpackage ``fesmia_hooks.integrations`` (never
as a top-level ``integrations`` package). Import the adapters from there:

* ``fesmia_hooks.integrations.lightning.PrivacyMonitor`` -- a Lightning ``Callback``;
* ``fesmia_hooks.integrations.keras.PrivacyMonitor`` -- a Keras 3 callback (torch backend);
* ``fesmia_hooks.integrations.transformers.PrivacyMonitor`` -- a Hugging Face
  ``TrainerCallback``;
* ``fesmia_hooks.integrations.torch.attach`` -- plain PyTorch loops, on the optimizer's step.

Each adapter is its framework's hooks only; what they share (building the core monitor,
when a run starts, the horizon, rank-zero output, the reduced stop) is
:class:`fesmia_hooks.integrations.driver.MonitorDriver`. Importing this package imports no
framework.
"""
