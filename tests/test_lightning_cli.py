"""The Lightning callback configured from a file, as LightningCLI users do (short CPU runs)."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn")
pytest.importorskip("jsonargparse", minversion="4.27")

from _history import checks_in, headers_in  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from test_lightning import STEPS_PER_EPOCH, DigitsModule, _loader, _task  # noqa: E402

from fesmia_hooks import CanarySet, FeSMIA, LeakageBudget  # noqa: E402
from fesmia_hooks.integrations.lightning import PrivacyMonitor  # noqa: E402
from fesmia_hooks.sinks import HISTORY_FILE  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CALLBACK = "fesmia_hooks.integrations.lightning.PrivacyMonitor"


def make_canaries() -> CanarySet:
    """The canary factory a configuration names as ``test_lightning_cli:make_canaries``."""
    return _task().canaries


class DigitsData(pl.LightningDataModule):
    """The noisy digits; with ``with_canaries`` it also holds the canary set, as ``canaries``."""

    def __init__(self, with_canaries: bool = False) -> None:
        super().__init__()
        if with_canaries:
            self.canaries = _task().canaries

    def train_dataloader(self):
        return _loader()


def _config(tmp_path: Path, trainer: dict[str, Any], init_args: dict[str, Any]) -> Path:
    """Write a LightningCLI configuration file: ``trainer`` settings and our callback's options."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "log_every_n_steps": 50,
            **trainer,
            "callbacks": [{
                "class_path": CALLBACK,
                "init_args": {
                    "probe": {"class_path": "fesmia_hooks.FeSMIA",
                              "init_args": {"episodes": 20, "permutations": 199, "seed": 0}},
                    **init_args,
                },
            }],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _callback(cli: LightningCLI) -> PrivacyMonitor:
    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, PrivacyMonitor)]
    assert len(found) == 1
    return found[0]


def test_factory_module_is_importable_by_its_configured_name():
    # tests/ is on sys.path, so a configuration can name this file's factory
    assert importlib.util.find_spec("test_lightning_cli") is not None


def test_parser_offers_every_option_of_the_core_monitor():
    # The callback has no signature of its own: the parser follows the driver's **options to
    # the core monitor, so every core option (today's and any added later) is an init_arg.
    from jsonargparse import ArgumentParser

    import fesmia_hooks

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PrivacyMonitor, "callback")
    offered = set(vars(parser.get_defaults().callback))
    core = set(inspect.signature(fesmia_hooks.PrivacyMonitor).parameters)
    assert core <= offered
    assert offered - core == {"monitor"}


def test_cli_configures_the_callback_with_a_canary_factory(tmp_path):
    config = _config(
        tmp_path,
        trainer={"max_epochs": 1000, "max_steps": 40},
        init_args={
            "canaries": "test_lightning_cli:make_canaries",
            "every_n_epochs": 1,
            "alpha": 0.1,
            "budget": {"class_path": "fesmia_hooks.LeakageBudget",
                       "init_args": {"max_level": "low", "action": "alert"}},
        },
    )
    cli = LightningCLI(DigitsModule, DigitsData, args=["fit", "--config", str(config)])
    callback = _callback(cli)
    core = callback.monitor

    # every option reached the core monitor, typed by the parser
    assert isinstance(core.probe, FeSMIA) and core.probe.settings()["episodes"] == 20
    assert isinstance(core.budget, LeakageBudget)
    assert (core.budget.max_level.value, core.budget.action) == ("low", "alert")
    assert core.calibration.alpha == 0.1
    assert core.every_n_epochs == 1 and core.every_n_steps is None
    assert core.canaries is not None
    assert core.canaries.fingerprint() == make_canaries().fingerprint()

    # max_steps ends the run in its third epoch, long before max_epochs: the horizon says so
    assert cli.trainer.global_step == 40
    assert core.calibration.horizon == -(-40 // STEPS_PER_EPOCH) == 3
    assert len(callback.history) == 3

    history = Path(cli.trainer.log_dir) / HISTORY_FILE
    assert [h["run_id"] for h in headers_in(history)] == [core.run_id]
    assert [line["check"] for line in checks_in(history)] == [1, 2, 3]
    assert (Path(cli.trainer.log_dir) / "config.yaml").is_file()  # LightningCLI's own copy


def test_cli_without_canaries_reads_them_from_the_datamodule(tmp_path):
    # only max_steps: LightningCLI leaves max_epochs unset, so max_steps is the only limit
    config = _config(tmp_path, trainer={"max_steps": 20}, init_args={"every_n_steps": 5})
    cli = LightningCLI(DigitsModule, DigitsData, run=False, save_config_callback=None,
                       args=["--config", str(config), "--data.with_canaries=true"])
    callback = _callback(cli)
    assert callback.monitor.canaries is None  # read at the start of fit
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert callback.monitor.canaries is cli.datamodule.canaries
    assert [r.step for r in callback.history] == [5, 10, 15, 20]
    assert callback.monitor.calibration.horizon == 4
    assert len(checks_in(Path(cli.trainer.log_dir) / HISTORY_FILE)) == 4


@pytest.mark.parametrize(
    ("init_args", "message"),
    [
        ({"alpha": "lots"}, "Expected a <class 'float'>. Got value: lots"),
        # a misspelt option is not passed through to fail later: the parser knows the options
        ({"every_n_epoch": 2}, "Option 'every_n_epoch' is not accepted"),
    ],
    ids=["mistyped", "misspelt"],
)
def test_cli_rejects_a_bad_option(tmp_path, capsys, init_args, message):
    config = _config(tmp_path, trainer={"max_epochs": 1}, init_args=init_args)
    with pytest.raises(SystemExit):
        LightningCLI(DigitsModule, DigitsData, run=False, save_config_callback=None,
                     args=["--config", str(config)])
    assert message in capsys.readouterr().err


def test_cli_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("lightning_cli", EXAMPLES / "lightning_cli.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cli = example.main([
        "fit", "--config", str(EXAMPLES / "lightning_cli.yaml"),
        "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}",
    ])
    callback = _callback(cli)
    assert 1 <= len(callback.history) <= 2
    assert callback.monitor.canaries is cli.datamodule.canaries
    assert list(tmp_path.rglob(HISTORY_FILE)) == [Path(cli.trainer.log_dir) / HISTORY_FILE]
    # its ModelCheckpoint names the file by the privacy key, with no folder from the "/"
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    assert checkpoint.parent.name == "checkpoints"
    assert checkpoint.name.startswith("epoch") and "-strict" in checkpoint.name
