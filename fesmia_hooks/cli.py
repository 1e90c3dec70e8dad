"""The ``fesmia-hooks`` command line.

* ``fesmia-hooks demo [--framework torch|lightning|keras]`` trains a small model on the
  digits data and prints one row per privacy check; ``fesmia-hooks demo --task text`` trains
  a character-level language model on CPython's bundled reference manual instead;
  ``fesmia-hooks demo --dp`` trains the digits model with Opacus's DP-SGD at target ε 1 and
  8 and without DP, and prints the accountant's ε beside the canaries' ε lower bound.
* ``fesmia-hooks report LOG_DIR`` prints a table per run found in ``LOG_DIR`` and, when
  matplotlib is installed, writes ``leakage.png`` into each run's folder. The bands and the
  budget come from each run's history (``--max-level`` overrides the budget line).
* ``fesmia-hooks audit --model PATH --suspects PATH --non-members PATH`` tests whether the
  suspects were used to train a saved model (:mod:`fesmia_hooks.audit_cli`); it exits with 0
  when membership is not shown, 1 when it is shown.

A usage problem, a missing optional dependency or an unreadable history prints one line
``fesmia-hooks: error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fesmia_hooks import audit_cli
from fesmia_hooks.report import Level

__all__ = ["DEMOS", "main"]

#: ``framework: (module, function, default log dir, extra to install)`` of each demo.
DEMOS: dict[str, tuple[str, str, str, str]] = {
    "torch": ("fesmia_hooks.demos.digits", "run_torch_demo", "runs/fesmia-demo", "examples"),
    "lightning": ("fesmia_hooks.demos.lightning_demo", "run_lightning_demo",
                  "runs/fesmia-demo-lightning", "lightning,examples"),
    "keras": ("fesmia_hooks.demos.keras_demo", "run_keras_demo", "runs/fesmia-demo-keras",
              "keras,examples"),
}
#: The same for the language-model demo (``--task text``); its data ship with CPython.
TEXT_DEMOS: dict[str, tuple[str, str, str, str]] = {
    "torch": ("fesmia_hooks.demos.text_demo", "run_text_demo", "runs/fesmia-demo-text", ""),
}
#: The same for the differential-privacy demo (``--dp``, digits in a plain torch loop).
DP_DEMOS: dict[str, tuple[str, str, str, str]] = {
    "torch": ("fesmia_hooks.demos.dp_demo", "run_dp_demo", "runs/fesmia-demo-dp",
              "dp,examples"),
}
#: Most epochs of each task's demo unless ``--epochs`` says otherwise.
DEFAULT_EPOCHS = {"digits": 100, "text": 60}
#: Epochs of each run of the ``--dp`` demo unless ``--epochs`` says otherwise.
DP_EPOCHS = 15

_LEVEL_CHOICES = ["none", *(lv.value for lv in Level if lv not in (Level.NONE, Level.CRITICAL))]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fesmia-hooks", description="Watch a model's privacy leakage while it trains."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model and watch it leak")
    demo.add_argument("--task", choices=sorted(DEFAULT_EPOCHS), default="digits",
                      help="digits: an MLP on noisy digits (default); text: a character-level "
                           "language model on the Python reference manual")
    demo.add_argument("--framework", choices=sorted(DEMOS), default="torch",
                      help="training loop to run: plain torch (default), lightning or keras "
                           "(the text task: torch only)")
    demo.add_argument("--dp", action="store_true",
                      help="train the digits model with differential privacy (Opacus DP-SGD) "
                           "at target epsilon 1 and 8 and without DP, and print the "
                           "accountant's epsilon beside the canaries' lower bound (needs "
                           "pip install 'fesmia-hooks[dp]')")
    demo.add_argument("--log-dir", default=None,
                      help="TensorBoard/history folder (default: runs/fesmia-demo[-FRAMEWORK], "
                           "runs/fesmia-demo-text or runs/fesmia-demo-dp)")
    demo.add_argument("--epochs", type=int, default=None,
                      help="most epochs to train (default: 100 for digits, 60 for text, 15 "
                           "per run with --dp)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, model and probe")
    report = sub.add_parser(
        "report", help="print the checks of every run below LOG_DIR and plot them"
    )
    report.add_argument("log_dir", metavar="LOG_DIR",
                        help="a run's folder, a folder of runs, or a privacy_history.jsonl")
    report.add_argument("--out", default=None,
                        help="write the pictures here (mirroring the run folders) instead of "
                             "into each run's folder")
    report.add_argument("--no-plot", action="store_true", help="print the tables only")
    report.add_argument("--max-level", choices=_LEVEL_CHOICES, default=None,
                        help="the budget's max_level, for the budget line (default: the one "
                             "each run's history records, or low for a history without it; "
                             "'none' draws no line)")
    audit_cli.add_parser(sub)
    return parser


def _error(message: str) -> int:
    print(f"fesmia-hooks: error: {message}", file=sys.stderr)
    return 2


def _demos(task: str) -> dict[str, tuple[str, str, str, str]]:
    """The demos of ``task``: ``"digits"``, ``"text"`` or ``"dp"`` (``--dp``)."""
    return TEXT_DEMOS if task == "text" else DP_DEMOS if task == "dp" else DEMOS


def _demo_function(framework: str, task: str = "digits") -> Callable[..., Any]:
    """Import the demo of ``framework`` only now; its framework may not be installed."""
    module_name, function, _, _ = _demos(task)[framework]
    if framework == "keras":
        os.environ.setdefault("KERAS_BACKEND", "torch")
    module = importlib.import_module(module_name)
    return getattr(module, function)  # type: ignore[no-any-return]


def _missing(framework: str, exc: ModuleNotFoundError, task: str = "digits") -> str:
    """One line for a module that a demo could not import."""
    _, _, _, extra = _demos(task)[framework]
    if exc.name is not None and exc.name.startswith("fesmia_hooks"):
        return f"the {framework} demo is not part of this installation (no module {exc.name})"
    install = f"pip install 'fesmia-hooks[{extra}]'" if extra else "pip install fesmia-hooks"
    return (f"the {framework} demo needs {exc.name or 'a package that is not installed'}: "
            f"{install}")


def _run_demo(args: argparse.Namespace) -> int:
    task = args.task
    if args.dp:
        if task != "digits":
            return _error(f"--dp trains the digits task, got --task {task}")
        task = "dp"
    default_epochs = DP_EPOCHS if task == "dp" else DEFAULT_EPOCHS[task]
    epochs = args.epochs if args.epochs is not None else default_epochs
    if epochs < 1:
        return _error(f"--epochs must be a positive int, got {epochs}")
    demos = _demos(task)
    if task == "dp" and args.framework not in demos:
        return _error(
            f"--dp runs with --framework {', '.join(sorted(demos))}, got {args.framework} "
            "(see examples/dp_opacus.py for Lightning)"
        )
    if args.framework not in demos:
        return _error(
            f"--task {args.task} runs with --framework {', '.join(sorted(demos))}, got "
            f"{args.framework} (see examples/text_lm_lightning.py for Lightning)"
        )
    _, _, default_dir, _ = demos[args.framework]
    log_dir = args.log_dir if args.log_dir is not None else default_dir
    try:
        run = _demo_function(args.framework, task)
        run(log_dir=log_dir, epochs=epochs, seed=args.seed)
    except ModuleNotFoundError as exc:  # the framework, on import or while the demo runs
        return _error(_missing(args.framework, exc, task))
    except ImportError as exc:  # e.g. the demo's own message naming the extra to install
        return _error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from fesmia_hooks.history import HistoryError, format_table, load_runs
    from fesmia_hooks.plots import FROM_HISTORY, plot_leakage

    root = Path(args.log_dir)
    try:
        runs = load_runs(root)
    except HistoryError as exc:
        return _error(str(exc))
    base = root if root.is_dir() else root.parent
    max_level = (FROM_HISTORY if args.max_level is None else
                 None if args.max_level == "none" else args.max_level)
    can_plot = not args.no_plot
    if can_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fesmia-hooks: note: no leakage.png without matplotlib: "
                  "pip install 'fesmia-hooks[plot]'", file=sys.stderr)
            can_plot = False
    for index, run in enumerate(runs):
        relative = run.folder.relative_to(base) if run.folder.is_relative_to(base) else None
        name = str(run.folder)
        if index:
            print()
        print(format_table(run, name=name))
        # one picture per folder: the latest run of a file that several runs appended to
        if not can_plot or run.run != run.runs:
            continue
        if not run.records:
            print(f"(no picture: {run.path} holds failed checks only)")
            continue
        target = None
        if args.out is not None:
            target = Path(args.out) / (relative if relative is not None else run.folder.name)
            target = target / "leakage.png"
        written = plot_leakage(run, target, max_level=max_level, title=name)
        print(f"wrote {written}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fesmia-hooks``; returns the exit status.

    Example:
        >>> main(["report", "no/such/folder"])
        2
    """
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "report":
        return _run_report(args)
    if args.command == "audit":
        return audit_cli.run(args)
    return _error(f"unknown command {args.command!r}")  # pragma: no cover - argparse guards


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
