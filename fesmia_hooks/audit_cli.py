"""``fesmia-hooks audit``: was this data used to train this saved model?

The command loads a saved model and three sets of samples from files, runs
:func:`fesmia_hooks.audit.audit` on them and prints the verdict. Its exit status fits CI:
0 when membership of the suspects is *not shown*, 1 when it is *shown*, 2 when the audit could
not run (the one line ``fesmia-hooks: error: ...`` on stderr says why, without a traceback).
The output paths (``--json``, ``--plot``) are checked before anything is loaded, and the
files are written whole, all or none (each to a temporary file beside it, then moved in),
before the verdict is printed.

Models (``--model``; the format is told from the path, ``--format`` overrides it):

* ``torchscript``: a file written by ``torch.jit.save`` (``.pt``/``.pth`` holding code);
* ``state_dict``: a ``torch.save(model.state_dict())`` file with ``--factory
  package.module:function`` (or ``path/to/file.py:function``), called with no arguments to
  build the empty model; the weights must fit it exactly (``strict=True``);
* ``lightning``: a Lightning ``.ckpt`` with ``--lightning-module package.module:ClassName``;
* ``keras``: a Keras 3 ``.keras`` file, run on Keras's torch backend (a softmax output is
  read as log-probabilities, which are logits);
* ``huggingface``: a local folder with ``config.json``: a causal LM when the config's
  ``architectures`` name one, else a sequence classifier; its tokenizer, when the folder has
  one, tokenizes text data. Nothing is downloaded.

Every ``torch.save`` file (weights or data) is read with ``weights_only=True`` and every
``.npy``/``.npz`` with ``allow_pickle=False``: a file that needs pickle is refused, since
unpickling can run code.

Samples (``--suspects``, ``--non-members``, ``--members``), each one of:

* ``.pt``: a tensor (integer ``[n, T]``: token sequences), an ``(inputs, labels)`` pair, or
  a dict with ``inputs`` and ``labels`` (a classifier's samples) or ``input_ids`` and
  optionally ``attention_mask`` and ``labels`` (token sequences, as a tokenizer returns);
* ``.npy``: one array of integer token ids ``[n, T]``;
* ``.npz``: arrays ``inputs`` and ``labels``, or ``input_ids`` (and ``attention_mask``);
* a folder of images in class subfolders (``DIR/<class>/*.png``, as torchvision's
  ``ImageFolder``): RGB float ``[3, H, W]`` tensors in [0, 1], labels the indices of the
  sorted class folders (every folder must have the same class folders); needs Pillow;
* ``.txt``: one document per line (blank lines skipped), tokenized by the Hugging Face
  folder's tokenizer, by ``--encode package.module:function`` (``str -> list[int]``), or
  else as UTF-8 bytes (token id = byte value, vocabulary 256).

Floating inputs are cast to the model's floating dtype. Sample indices in the output are
positions in the order read (image folders: classes sorted, then file names sorted; text
files also give the line number). No sample, token id or label is ever printed.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="fesmia-hooks")
    >>> _ = add_parser(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["audit", "--model", "m.pt", "--suspects", "s.pt",
    ...                           "--non-members", "n.pt"])
    >>> args.alpha, args.permutations, args.device
    (0.05, 9999, 'cpu')
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import re
import secrets
import stat
import sys
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fesmia_hooks.exceptions import (
    CanaryError,
    ConfigurationError,
    FesmiaError,
    ProbeError,
    describe_error,
)

__all__ = [
    "DATA_FORMATS",
    "MODEL_FORMATS",
    "LoadedModel",
    "Samples",
    "add_parser",
    "detect_format",
    "load_model",
    "load_samples",
    "resolve",
    "run",
]

#: The model formats ``--format`` accepts.
MODEL_FORMATS = ("torchscript", "state_dict", "lightning", "keras", "huggingface")
#: The forms of sample files, as reported: torch.save, numpy, image folder, text.
DATA_FORMATS = ("pt", "npy", "npz", "images", "text")
#: Image files read from a class folder (those of torchvision's ImageFolder).
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
#: Files that mark a Hugging Face folder as holding a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "vocab.txt", "spiece.model")
#: Picture formats of ``--plot``.
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
#: Vocabulary of text read as UTF-8 bytes.
BYTE_VOCABULARY = 256
_PROG = "fesmia-hooks"
_SIDES = (("suspects", "--suspects"), ("non_members", "--non-members"),
          ("members", "--members"))


@dataclass
class LoadedModel:
    """A model read from disk, ready for :func:`~fesmia_hooks.audit.audit`.

    Attributes:
        module: The model (in eval mode, on the requested device).
        format: One of :data:`MODEL_FORMATS`.
        path: Where it was read from.
        task: ``"causal-lm"`` or ``"classifier"`` when the format tells (Hugging Face),
            else ``None`` (told from the data).
        tokenizer: The Hugging Face folder's tokenizer, or ``None``.
        vocab_size: The language model's vocabulary, when known.
        note: How the model is read, for the output (e.g. a softmax output).
    """

    module: nn.Module
    format: str
    path: Path
    task: str | None = None
    tokenizer: Any = None
    vocab_size: int | None = None
    note: str = ""


@dataclass
class Samples:
    """One side of the audit, read from disk.

    Attributes:
        data: What :func:`~fesmia_hooks.audit.audit` takes: an ``(inputs, labels)`` pair, an
            integer ``[n, T]`` tensor, a mapping with ``input_ids``, or a list of token lists.
        kind: ``"labelled"`` or ``"sequences"``.
        source: One of :data:`DATA_FORMATS`.
        path: Where they were read from.
        count: Number of samples.
        encoding: For text: how it was tokenized.
        lines: For text: the 1-based line number of each sample in the file.
        classes: For an image folder: its class folders, sorted (label = index).
    """

    data: Any
    kind: str
    source: str
    path: Path
    count: int
    encoding: str = ""
    lines: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ arguments
_EPILOG = """\
models (--model; --format overrides what the path tells):
  FILE.pt                     TorchScript (torch.jit.save)
  FILE.pt --factory M:F       a state_dict; F() builds the model (M: module or file.py)
  FILE.ckpt --lightning-module M:C
                              a Lightning checkpoint of LightningModule class C
  FILE.keras                  a Keras 3 model (torch backend)
  FOLDER/ with config.json    a Hugging Face causal LM or sequence classifier
samples (--suspects, --non-members, --members):
  .pt     a tensor, (inputs, labels), or a dict of inputs/labels or
          input_ids/attention_mask (read with weights_only=True)
  .npy    integer token ids [n, T];  .npz  arrays inputs/labels or input_ids
  DIR/    an image folder DIR/<class>/*.png (labels: sorted class folders)
  .txt    one document per line, tokenized by the model folder's tokenizer,
          --encode, or as UTF-8 bytes
exit status: 0 not shown, 1 shown, 2 could not run (one line on stderr).
'not shown' is not proof of absence: see docs/science.md#data-integrity.

example:
  fesmia-hooks audit --model model.pt --suspects suspects.pt \\
      --non-members held_out.npz --json audit.json --plot audit.png
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``audit`` subcommand on ``sub`` (an ``add_subparsers()`` result)."""
    parser = sub.add_parser(
        "audit",
        help="test whether suspect samples were used to train a saved model",
        description=(
            "Test whether the suspect samples were used to train a saved model, against\n"
            "samples known never to have been trained on (non-members) from the suspects'\n"
            "distribution. Exit status: 0 = membership not shown, 1 = shown, 2 = could not\n"
            "run."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="PATH",
                       help="the saved model: a file, or a Hugging Face model folder")
    model.add_argument("--format", choices=MODEL_FORMATS, default=None,
                       help="the model's format (default: told from the path)")
    model.add_argument("--factory", default=None, metavar="MODULE:FUNCTION",
                       help="for a state_dict: 'package.module:function' or "
                            "'path/to/file.py:function' returning the empty model (called "
                            "with no arguments); the current folder is importable")
    model.add_argument("--lightning-module", default=None, metavar="MODULE:CLASS",
                       help="for a Lightning .ckpt: the LightningModule class, as "
                            "'package.module:ClassName' or 'path/to/file.py:ClassName'")
    model.add_argument("--device", default="cpu",
                       help="where the model runs: cpu (default), cuda, cuda:1, mps (a Keras "
                            "model stays where Keras put it)")
    data = parser.add_argument_group("samples")
    data.add_argument("--suspects", required=True, metavar="PATH",
                      help="the samples in question")
    data.add_argument("--non-members", required=True, metavar="PATH",
                      help="samples known never to have been trained on, from the suspects' "
                           "distribution")
    data.add_argument("--members", default=None, metavar="PATH",
                      help="optional samples known to have been trained on: few-shot "
                           "per-suspect scores and, with 20 or more, the Log-MIA reading")
    data.add_argument("--encode", default=None, metavar="MODULE:FUNCTION",
                      help="for .txt samples: a function str -> list[int] that tokenizes a "
                           "line (default: the Hugging Face folder's tokenizer, else UTF-8 "
                           "bytes)")
    data.add_argument("--max-length", type=int, default=None, metavar="N",
                      help="for .txt samples: keep the first N tokens of each line")
    data.add_argument("--pad-token-id", type=int, default=None, metavar="ID",
                      help="for token-id tensors: the padding id (masked where it occurs)")
    data.add_argument("--num-classes", type=int, default=None, metavar="C",
                      help="check that labels lie in [0, C)")
    test = parser.add_argument_group("test")
    test.add_argument("--alpha", type=float, default=0.05,
                      help="level of the test (default: 0.05)")
    test.add_argument("--permutations", type=int, default=9999,
                      help="permutations of the set-level test (default: 9999)")
    test.add_argument("--seed", type=int, default=0, help="seed of the test (default: 0)")
    test.add_argument("--random-inclusion", action="store_true",
                      help="the --members and --non-members were chosen by independent fair "
                           "coins: report the one-run audit's epsilon lower bound")
    test.add_argument("--batch-size", type=int, default=256,
                      help="samples per forward pass (default: 256)")
    out = parser.add_argument_group("output")
    out.add_argument("--top", type=int, default=10, metavar="K",
                     help="list the K most member-like suspects (default: 10; 0: none)")
    out.add_argument("--json", default=None, metavar="PATH",
                     help="write the result as JSON (scores and p-values, never samples)")
    out.add_argument("--plot", default=None, metavar="PATH.png",
                     help="draw the suspects' and non-members' scores (.png, .pdf or .svg; "
                          "needs matplotlib)")
    out.add_argument("--traceback", action="store_true",
                     help="on an error, show the full traceback instead of one line")
    return parser  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------- helpers
def _one_line(text: str) -> str:
    """``text`` on one line: ANSI colours dropped, whitespace runs as one space."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return re.sub(r"\s+", " ", text).strip()


@contextlib.contextmanager
def _exits_as(error: type[FesmiaError], what: str) -> Iterator[None]:
    """User code run inside that calls ``sys.exit`` raises ``error("<what> called sys.exit")``.

    The exit code is not told (user code may pass anything to ``sys.exit``).

    Example:
        >>> with _exits_as(ConfigurationError, "the factory"):
        ...     sys.exit(3)
        Traceback (most recent call last):
        ...
        fesmia_hooks.exceptions.ConfigurationError: the factory called sys.exit
    """
    try:
        yield
    except SystemExit as exc:
        raise error(f"{what} called sys.exit") from exc


@contextlib.contextmanager
def _importable_cwd() -> Iterator[None]:
    """The current folder on ``sys.path`` while a user's module is imported (as ``python``)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def resolve(spec: str, option: str) -> Any:
    """The object named by ``spec``: ``"package.module:name"`` or ``"path/file.py:name"``.

    ``name`` may be dotted (``"module:Class.method"``). The current folder is importable,
    as it is for ``python -m``.

    Raises:
        ConfigurationError: When ``spec`` is malformed, the module cannot be imported, or it
            has no such attribute.

    Example:
        >>> resolve("os.path:join", "--factory").__name__
        'join'
        >>> resolve("os.path", "--factory")
        Traceback (most recent call last):
        ...
        fesmia_hooks.exceptions.ConfigurationError: --factory must be 'package.module:name' or 'path/to/file.py:name', got 'os.path'
    """  # noqa: E501
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name or not all(part.isidentifier() for part in name.split(".")):
        raise ConfigurationError(
            f"{option} must be 'package.module:name' or 'path/to/file.py:name', got {spec!r}")
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise ConfigurationError(f"{option} {spec!r}: no such file {module_name}")
        unique = f"_fesmia_user_{file.stem}_{abs(hash(str(file.resolve())))}"
        spec_ = importlib.util.spec_from_file_location(unique, file)
        if spec_ is None or spec_.loader is None:  # pragma: no cover - .py files have one
            raise ConfigurationError(f"{option} {spec!r}: {module_name} cannot be imported")
        module = importlib.util.module_from_spec(spec_)
        sys.modules[unique] = module
        try:
            with _importable_cwd(), _exits_as(ConfigurationError,
                                              f"{option} {spec!r}: importing {module_name}"):
                spec_.loader.exec_module(module)
        except BaseException as exc:
            sys.modules.pop(unique, None)
            if not isinstance(exc, Exception) or isinstance(exc, FesmiaError):
                raise
            raise ConfigurationError(
                f"{option} {spec!r}: importing {module_name} failed: {describe_error(exc)}"
            ) from exc
    else:
        try:
            with _importable_cwd(), _exits_as(ConfigurationError,
                                              f"{option} {spec!r}: importing {module_name}"):
                module = importlib.import_module(module_name)
        except FesmiaError:
            raise
        except ModuleNotFoundError as exc:
            raise ConfigurationError(
                f"{option} {spec!r} cannot be imported: no module named {exc.name!r}"
            ) from exc
        except Exception as exc:
            raise ConfigurationError(
                f"{option} {spec!r}: importing {module_name} failed: {describe_error(exc)}"
            ) from exc
    target: Any = module
    for part in name.split("."):
        if not hasattr(target, part):
            raise ConfigurationError(f"{option} {spec!r}: {module_name} has no {name!r}")
        target = getattr(target, part)
    return target


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(
            f"--device must be a torch device such as cpu, cuda or cuda:1, got {text!r}"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"--device {text}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigurationError(f"--device {text}: MPS is not available on this machine")
    return device


def _torch_load(path: Path, what: str, error: type[FesmiaError]) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with a clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            holds = f" ({found.group(1)})" if found else ""
            raise error(
                f"{what} {path} holds pickled Python objects{holds}, which loading with "
                "weights_only=True refuses (unpickling can run code): save tensors, dicts "
                "and lists of tensors only"
            ) from exc
        raise error(f"{what} {path} is not a readable torch.save file "
                    f"({describe_error(exc)})") from exc
    except Exception as exc:  # corrupt archive, not a torch file, cannot be read
        kind = "" if zipfile.is_zipfile(path) else (
            "not the zip archive torch.save writes: truncated, or another kind of file; ")
        raise error(f"{what} {path} is not a readable torch.save file "
                    f"({kind}{describe_error(exc)})") from exc


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a ``torch.jit.save`` archive (it holds a ``code/`` folder)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in f"/{name}" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):  # pragma: no cover - is_zipfile said yes
        return False


# ---------------------------------------------------------------------------------- model
def detect_format(path: str | os.PathLike[str], *, factory: str | None = None,
                  lightning_module: str | None = None) -> str:
    """The format of the model at ``path``, one of :data:`MODEL_FORMATS`.

    A folder with ``config.json`` is a Hugging Face model; ``.ckpt`` is a Lightning
    checkpoint; ``.keras`` a Keras 3 file; another file is TorchScript when it holds code, a
    ``state_dict`` when ``--factory`` is given.

    Raises:
        ConfigurationError: When the path is missing or its format cannot be told.

    Example:
        >>> detect_format("no/such/model.pt")
        Traceback (most recent call last):
        ...
        fesmia_hooks.exceptions.ConfigurationError: --model no/such/model.pt: no such file or folder
    """  # noqa: E501
    path = Path(path)
    if not path.exists():
        raise ConfigurationError(f"--model {path}: no such file or folder")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "huggingface"
        raise ConfigurationError(
            f"--model {path} is a folder without config.json: a model folder must be a "
            "Hugging Face one (save_pretrained); other models are files")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return "keras"
    if suffix in (".h5", ".hdf5"):
        raise ConfigurationError(
            f"--model {path}: legacy Keras HDF5 files are not read; save the model as a "
            "Keras 3 .keras file (model.save('model.keras'))")
    if suffix == ".ckpt" or (lightning_module is not None and factory is None):
        return "lightning"
    if factory is not None:
        return "state_dict"
    if _is_torchscript(path):
        return "torchscript"
    if zipfile.is_zipfile(path) or suffix in (".pt", ".pth", ".bin"):
        raise ConfigurationError(
            f"--model {path} is not TorchScript (no code inside): for a state_dict give "
            "--factory package.module:function that builds the model, or save the model "
            "with torch.jit.save(torch.jit.script(model), path)")
    raise ConfigurationError(
        f"--model {path}: cannot tell the format of a {suffix or 'suffix-less'} file; "
        f"give --format, one of {', '.join(MODEL_FORMATS)}")


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The model's floating dtype (that of its first floating parameter or buffer)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if torch.is_floating_point(tensor):
            return tensor.dtype
    return torch.float32


class KerasLogits(nn.Module):
    """A Keras 3 model (torch backend) seen as a torch classifier returning logits.

    Calls the model with ``training=False``. A model whose last layer is a softmax returns
    probabilities: they are returned as log-probabilities, which are logits of the same
    distribution (the probe's signals are read in log space).

    Args:
        model: A Keras model, which on the torch backend is a ``torch.nn.Module``.
        probabilities: Whether its output is a softmax.
    """

    def __init__(self, model: nn.Module, probabilities: bool) -> None:
        super().__init__()
        self.keras_model = model
        self.probabilities = probabilities

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's logits (or log-probabilities) of ``inputs``."""
        output = self.keras_model(inputs, training=False)
        if isinstance(output, (list, tuple)):
            output = output[0]
        output = torch.as_tensor(output)
        if self.probabilities:
            output = output.float().clamp_min(torch.finfo(torch.float32).tiny).log()
        return output


def _ends_in_softmax(model: Any) -> bool:
    layers = getattr(model, "layers", None) or []
    if not layers:
        return False
    last = layers[-1]
    if type(last).__name__ == "Softmax":
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def _load_keras(path: Path) -> LoadedModel:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as exc:
        raise ConfigurationError(
            f"reading a .keras model needs keras on the torch backend ({describe_error(exc)}): "
            "pip install 'fesmia-hooks[keras]' and set KERAS_BACKEND=torch") from exc
    backend = keras.backend.backend()
    if backend != "torch":
        raise ConfigurationError(
            f"reading a .keras model needs Keras's 'torch' backend, got {backend!r}: set "
            "KERAS_BACKEND=torch")
    try:
        with _exits_as(ConfigurationError, f"loading the Keras model {path}"):
            model = keras.saving.load_model(path, compile=False)  # no optimizer, no loss
    except FesmiaError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            f"--model {path} cannot be read as a Keras 3 file ({describe_error(exc)})") from exc
    if not isinstance(model, nn.Module):  # pragma: no cover - the torch backend's models are
        raise ConfigurationError(
            f"--model {path}: the Keras model is a {type(model).__name__}, not a "
            "torch.nn.Module (Keras's torch backend)")
    softmax = _ends_in_softmax(model)
    return LoadedModel(KerasLogits(model, softmax), "keras", path,
                       note="softmax output read as log-probabilities" if softmax else "")


def _load_state_dict(path: Path, factory: str | None, device: torch.device) -> LoadedModel:
    if factory is None:
        raise ConfigurationError(
            f"--model {path} is read as a state_dict, which needs --factory "
            "package.module:function (or path/to/file.py:function) that builds the model")
    if _is_torchscript(path):
        raise ConfigurationError(
            f"--model {path} is a TorchScript file, which holds its own model: leave out "
            "--factory")
    build = resolve(factory, "--factory")
    if not callable(build):
        raise ConfigurationError(
            f"--factory {factory!r} must name a callable, got {type(build).__name__}")
    try:
        with _exits_as(ConfigurationError, f"--factory {factory!r}"):
            model = build()
    except FesmiaError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            f"--factory {factory!r} failed when called with no arguments: {describe_error(exc)}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigurationError(
            f"--factory {factory!r} must return a torch.nn.Module, got {type(model).__name__}")
    state = _torch_load(path, "--model", ConfigurationError)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(
            state["state_dict"], Mapping):
        raise ConfigurationError(
            f"--model {path} is a checkpoint holding a 'state_dict' entry, not a state_dict: "
            "for a Lightning checkpoint use --lightning-module, else save "
            "model.state_dict() alone")
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigurationError(
            f"--model {path} must hold a state_dict (a dict of names to tensors, "
            f"torch.save(model.state_dict(), path)), got {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        problems = [_one_line(p).rstrip(".") for p in str(exc).split("\n\t") if p.strip()]
        shown = problems[1:4] if len(problems) > 1 else problems
        more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise ConfigurationError(
            f"the state_dict in {path} does not fit the model of --factory {factory!r}: "
            f"{'; '.join(shown)}{more}") from exc
    return LoadedModel(model.to(device), "state_dict", path)


def _load_lightning(path: Path, spec: str | None, device: torch.device) -> LoadedModel:
    if spec is None:
        raise ConfigurationError(
            f"--model {path} is a Lightning checkpoint, which needs --lightning-module "
            "package.module:ClassName (the LightningModule class that saved it)")
    cls = resolve(spec, "--lightning-module")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)
            and callable(getattr(cls, "load_from_checkpoint", None))):
        kind = cls.__name__ if isinstance(cls, type) else type(cls).__name__
        raise ConfigurationError(
            f"--lightning-module {spec!r} must be a LightningModule class, got {kind}")
    load = cls.load_from_checkpoint  # type: ignore[attr-defined]
    options: dict[str, Any] = {"map_location": device}
    if "weights_only" in inspect.signature(load).parameters:
        options["weights_only"] = True
    try:
        with _exits_as(ConfigurationError, f"--lightning-module {spec!r} loading {path}"):
            model = load(str(path), **options)
    except FesmiaError:
        raise
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise ConfigurationError(
                f"--model {path} is not a readable Lightning checkpoint ({describe_error(exc)})"
            ) from exc
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        holds = f" ({found.group(1)})" if found else ""
        raise ConfigurationError(
            f"--model {path} holds pickled Python objects{holds}, which loading with "
            "weights_only=True refuses (unpickling can run code): keep the module's "
            "hyperparameters to plain values, or save its state_dict and use --factory"
        ) from exc
    except Exception as exc:
        raise ConfigurationError(
            f"--model {path} cannot be loaded by {spec}.load_from_checkpoint "
            f"({describe_error(exc)})") from exc
    return LoadedModel(model.to(device), "lightning", path)


def _causal_architecture(architectures: Sequence[str]) -> bool:
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - a transformers without the table
        return False
    return bool(set(architectures) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Transformers' progress bars, load reports and warnings off, then as they were.

    Python's warnings are off too. Without transformers imported, only the warnings are.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "transformers" not in sys.modules:
            yield
            return
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        verbosity = hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def _load_huggingface(path: Path, device: torch.device) -> LoadedModel:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigurationError(
            f"--model {path}: config.json is not readable JSON ({describe_error(exc)})") from exc
    if not isinstance(config, dict):
        raise ConfigurationError(
            f"--model {path}: config.json must hold an object, got {type(config).__name__}")
    architectures = [str(a) for a in config.get("architectures") or []]
    try:
        import transformers
    except ImportError as exc:
        raise ConfigurationError(
            f"reading a Hugging Face model needs transformers ({describe_error(exc)}): "
            "pip install 'fesmia-hooks[transformers]'") from exc
    causal = _causal_architecture(architectures)
    auto = (transformers.AutoModelForCausalLM if causal
            else transformers.AutoModelForSequenceClassification)
    with _quiet_transformers():
        try:
            model, info = auto.from_pretrained(  # type: ignore[misc]
                path, local_files_only=True, output_loading_info=True)
        except Exception as exc:
            raise ConfigurationError(
                f"--model {path} cannot be loaded by {auto.__name__} ({describe_error(exc)})"
            ) from exc
        missing = list(info.get("missing_keys") or [])
        if missing:
            named = ", ".join(repr(k) for k in sorted(missing)[:3])
            raise ConfigurationError(
                f"--model {path}: {len(missing)} weight(s) of {auto.__name__} are not in the "
                f"folder (e.g. {named}; config architectures {architectures or 'none'}), so "
                "they would be random: save the model whose head was trained")
        tokenizer = None
        if any((path / name).is_file() for name in TOKENIZER_FILES):
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    path, local_files_only=True)
            except Exception as exc:
                raise ConfigurationError(
                    f"--model {path}: its tokenizer cannot be loaded ({describe_error(exc)})"
                ) from exc
    vocab = getattr(model.config, "vocab_size", None)
    return LoadedModel(model.to(device), "huggingface", path,
                       task="causal-lm" if causal else "classifier", tokenizer=tokenizer,
                       vocab_size=vocab if causal and isinstance(vocab, int) else None,
                       note=f"{auto.__name__}, {', '.join(architectures) or 'no architectures'}")


def load_model(path: str | os.PathLike[str], fmt: str | None = None, *,
               factory: str | None = None, lightning_module: str | None = None,
               device: str = "cpu") -> LoadedModel:
    """Read the model at ``path`` (format ``fmt``, or told from the path) for an audit.

    Raises:
        ConfigurationError: When the model cannot be found, told, imported or read, or its
            weights do not fit.

    Example:
        >>> load_model(".", "torchscript", factory="os.path:join")
        Traceback (most recent call last):
        ...
        fesmia_hooks.exceptions.ConfigurationError: --factory applies to a state_dict model, not torchscript
    """  # noqa: E501
    path = Path(path)
    if factory is not None and lightning_module is not None:
        raise ConfigurationError(
            "give --factory (a state_dict) or --lightning-module (a Lightning checkpoint), "
            "not both")
    fmt = fmt if fmt is not None else detect_format(
        path, factory=factory, lightning_module=lightning_module)
    if fmt not in MODEL_FORMATS:
        raise ConfigurationError(f"--format must be one of {', '.join(MODEL_FORMATS)}, "
                                 f"got {fmt!r}")
    if factory is not None and fmt != "state_dict":
        raise ConfigurationError(f"--factory applies to a state_dict model, not {fmt}")
    if lightning_module is not None and fmt != "lightning":
        raise ConfigurationError(f"--lightning-module applies to a Lightning checkpoint, "
                                 f"not {fmt}")
    if not path.exists():
        raise ConfigurationError(f"--model {path}: no such file or folder")
    if path.is_dir() != (fmt == "huggingface"):
        raise ConfigurationError(
            f"--model {path} is a {'folder' if path.is_dir() else 'file'}; --format {fmt} "
            f"reads a {'folder' if fmt == 'huggingface' else 'file'}")
    where = _device(device)
    if fmt == "torchscript":
        try:
            loaded = LoadedModel(torch.jit.load(str(path), map_location=where),
                                 "torchscript", path)
        except Exception as exc:
            raise ConfigurationError(
                f"--model {path} is not a readable TorchScript file ({describe_error(exc)})"
            ) from exc
    elif fmt == "state_dict":
        loaded = _load_state_dict(path, factory, where)
    elif fmt == "lightning":
        loaded = _load_lightning(path, lightning_module, where)
    elif fmt == "keras":
        loaded = _load_keras(path)
    else:
        loaded = _load_huggingface(path, where)
    loaded.module.eval()
    return loaded


# ---------------------------------------------------------------------------------- data
_ACCEPTED = ("a .pt file (a tensor, an (inputs, labels) pair, or a dict with inputs/labels "
             "or input_ids/attention_mask), a .npy array of token ids, a .npz file with "
             "inputs/labels or input_ids, an image folder DIR/<class>/*.png, or a .txt file")


def _tensor(value: Any, role: str, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise CanaryError(f"{role} {key} must hold numbers, got an array of dtype "
                              f"{value.dtype}")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise CanaryError(f"{role} {key} must be a tensor or an array, got {type(value).__name__}")


def _from_mapping(obj: Mapping[str, Any], role: str, path: Path) -> tuple[Any, str]:
    if not all(isinstance(k, str) for k in obj):
        raise CanaryError(f"{role} {path}: a dict of samples must have string keys "
                          "(inputs/labels or input_ids/attention_mask)")
    keys = sorted(obj)
    if "input_ids" in obj:
        allowed = {"input_ids", "attention_mask", "labels"}
        if set(keys) - allowed:
            raise CanaryError(
                f"{role} {path}: token sequences take the keys input_ids, attention_mask and "
                f"labels, got {keys}")
        return {k: _tensor(obj[k], role, k) for k in keys}, "sequences"
    if "inputs" in obj:
        if set(keys) - {"inputs", "labels"}:
            raise CanaryError(
                f"{role} {path}: a classifier's samples take the keys inputs and labels, got "
                f"{keys}")
        inputs = _tensor(obj["inputs"], role, "inputs")
        if "labels" in obj:
            return (inputs, _tensor(obj["labels"], role, "labels")), "labelled"
        return _bare(inputs, role, path)
    raise CanaryError(
        f"{role} {path} must hold 'inputs' (and 'labels') or 'input_ids' (and "
        f"'attention_mask'), got keys {keys[:10]}")


def _bare(tensor: torch.Tensor, role: str, path: Path) -> tuple[Any, str]:
    """A tensor without labels: token sequences when it is an integer ``[n, T]``."""
    if not torch.is_floating_point(tensor) and tensor.dim() == 2:
        return tensor, "sequences"
    raise CanaryError(
        f"{role} {path} holds {tensor.dim()}-d {str(tensor.dtype).replace('torch.', '')} "
        "inputs without labels: a classifier's samples need labels ((inputs, labels) or "
        "{'inputs', 'labels'} in a .pt file, arrays inputs and labels in a .npz file); "
        "token sequences are an integer [n, T] array")


def _read_pt(path: Path, role: str) -> tuple[Any, str]:
    obj = _torch_load(path, role, CanaryError)
    if isinstance(obj, torch.Tensor):
        return _bare(obj.detach(), role, path)
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(
            isinstance(part, torch.Tensor) for part in obj):
        return (obj[0].detach(), obj[1].detach()), "labelled"
    if isinstance(obj, Mapping):
        return _from_mapping(obj, role, path)
    raise CanaryError(
        f"{role} {path} must hold a tensor, an (inputs, labels) pair of tensors or a dict, "
        f"got {type(obj).__name__}" + (f" of {len(obj)}" if isinstance(obj, (tuple, list))
                                       else ""))


def _read_numpy(path: Path, role: str) -> tuple[Any, str]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            array = loaded
        else:
            with loaded:
                arrays = {name: loaded[name] for name in loaded.files}
    except ValueError as exc:
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise CanaryError(
                f"{role} {path} holds Python objects, which loading with allow_pickle=False "
                "refuses (unpickling can run code): save numeric arrays only") from exc
        raise CanaryError(f"{role} {path} is not a readable numpy file "
                          f"({describe_error(exc)})") from exc
    except Exception as exc:
        raise CanaryError(f"{role} {path} is not a readable numpy file "
                          f"({describe_error(exc)})") from exc
    if isinstance(loaded, np.ndarray):  # the file was read: its checks are the tool's own
        return _bare(_tensor(array, role, "array"), role, path)
    return _from_mapping(arrays, role, path)


def _read_images(path: Path, role: str, classes: Sequence[str] | None,
                 classes_from: str | None = None) -> tuple[Any, list[str]]:
    try:
        from PIL import Image
    except ImportError as exc:
        raise CanaryError(f"{role} {path}: reading an image folder needs Pillow "
                          "(pip install pillow)") from exc
    found = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise CanaryError(
            f"{role} {path} is a folder without class subfolders: images go in "
            "DIR/<class>/*.png (the label of an image is the index of its sorted class folder)")
    if classes is not None and list(classes) != found:
        other = classes_from or "the other samples"
        here = f"{role} {path}"
        only_other = [c for c in classes if c not in found]
        only_here = [c for c in found if c not in classes]

        def listed(names: list[str]) -> str:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            return ", ".join(repr(n) for n in names[:3]) + more

        odd = [f"{listed(names)} only in {side}" for names, side in
               ((only_other, other), (only_here, here)) if names]
        raise CanaryError(
            f"the class folders of {other} ({len(classes)}) and {here} ({len(found)}) "
            f"differ: {'; '.join(odd)}: labels are the indices of the sorted class folders, "
            "so every image folder needs the same class folders (add empty ones)")
    images, labels, size = [], [], None
    for index, name in enumerate(found):
        files = sorted(p for p in (path / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            try:
                with Image.open(file) as image:
                    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
            except Exception as exc:
                raise CanaryError(f"{role} {file} is not a readable image "
                                  f"({describe_error(exc)})") from exc
            if size is None:
                size = array.shape[:2]
            elif array.shape[:2] != size:
                raise CanaryError(
                    f"{role} {path}: images must all have the same size, got "
                    f"{size[1]}x{size[0]} and {array.shape[1]}x{array.shape[0]} ({file})")
            images.append(array)
            labels.append(index)
    if not images:
        raise CanaryError(f"{role} {path} holds no images ({', '.join(IMAGE_SUFFIXES)}) in "
                          "its class folders")
    inputs = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0)
    return (inputs.contiguous(), torch.tensor(labels, dtype=torch.long)), found


def _encoder(model: LoadedModel, encode: str | None) -> tuple[Callable[[str], Any], str]:
    """How text is tokenized: ``(function, description)``."""
    if encode is not None:
        function = resolve(encode, "--encode")
        if not callable(function):
            raise ConfigurationError(
                f"--encode {encode!r} must name a callable, got {type(function).__name__}")
        return function, f"--encode {encode}"
    if model.tokenizer is not None:
        tokenizer = model.tokenizer
        return (lambda line: tokenizer(line)["input_ids"]), "the model folder's tokenizer"
    return (lambda line: list(line.encode("utf-8"))), "UTF-8 bytes"


def _read_text(path: Path, role: str, encode: Callable[[str], Any], how: str,
               max_length: int | None) -> tuple[list[list[int]], list[int]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CanaryError(f"{role} {path} is not UTF-8 text (byte {exc.start} cannot be "
                          "decoded)") from exc
    who = "--encode" if how.startswith("--encode") else how
    sequences, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            with _quiet_transformers():  # e.g. a tokenizer's "longer than the maximum length"
                ids = encode(line)
        except SystemExit as exc:
            raise CanaryError(f"{role} {path}: {how} called sys.exit on line {number}"
                              ) from exc
        except Exception as exc:
            raise CanaryError(f"{role} {path}: tokenizing line {number} with {how} failed "
                              f"({type(exc).__name__})") from exc
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
            raise CanaryError(f"{role} {path}: {how} must turn a line into a list of int "
                              f"token ids, got {type(ids).__name__} for line {number}")
        if not ids:
            raise CanaryError(f"{role} {path}: {who} returned no token ids for line {number}")
        ids = [int(i) for i in ids]
        sequences.append(ids[:max_length] if max_length is not None else ids)
        lines.append(number)
    if not sequences:
        raise CanaryError(f"{role} {path} holds no text (only blank lines)")
    return sequences, lines


def load_samples(path: str | os.PathLike[str], role: str = "--suspects", *,
                 model: LoadedModel | None = None, encode: str | None = None,
                 max_length: int | None = None, classes: Sequence[str] | None = None,
                 classes_from: str | None = None) -> Samples:
    """Read one side of an audit from ``path`` (see the module's docstring for the forms).

    Args:
        path: The file or image folder.
        role: The option it came from, for messages.
        model: The loaded model (its tokenizer and vocabulary tokenize text).
        encode: ``"package.module:function"`` tokenizing a line of text.
        max_length: Keep the first ``max_length`` tokens of each line of text.
        classes: For an image folder: the class folders of another side (they must match).
        classes_from: That side, for messages (e.g. ``"--suspects DIR"``).

    Raises:
        CanaryError: When the samples cannot be read or are of no accepted form.
        ConfigurationError: When ``encode`` cannot be imported.

    Example:
        >>> load_samples("no/such/file.pt")
        Traceback (most recent call last):
        ...
        fesmia_hooks.exceptions.CanaryError: --suspects no/such/file.pt: no such file or folder
    """
    path = Path(path)
    if not path.exists():
        raise CanaryError(f"{role} {path}: no such file or folder")
    suffix = path.suffix.lower()
    if path.is_dir():
        data, found = _read_images(path, role, classes, classes_from)
        return Samples(data, "labelled", "images", path, len(data[1]), classes=found)
    if suffix == ".txt":
        if max_length is not None and max_length < 2:
            raise ConfigurationError(f"--max-length must be an int >= 2, got {max_length}")
        function, how = _encoder(model or LoadedModel(nn.Identity(), "", path), encode)
        sequences, lines = _read_text(path, role, function, how, max_length)
        return Samples(sequences, "sequences", "text", path, len(sequences), how, lines)
    if suffix in (".pt", ".pth"):
        data, kind = _read_pt(path, role)
        source = "pt"
    elif suffix in (".npy", ".npz"):
        data, kind = _read_numpy(path, role)
        source = suffix[1:]
    else:
        raise CanaryError(f"{role} {path}: samples must be {_ACCEPTED}; got a "
                          f"{suffix or 'suffix-less'} file")
    if kind == "labelled":
        inputs, labels = data
        if labels.dim() == 0 or inputs.dim() == 0 or len(labels) != len(inputs):
            raise CanaryError(
                f"{role} {path}: inputs and labels must hold one row per sample, got "
                f"{tuple(inputs.shape)} inputs and {tuple(labels.shape)} labels")
        if labels.dtype == torch.bool:  # as the Python API: True/False are no class indices
            raise CanaryError(f"{role} {path}: labels must be integer class indices, got "
                              "torch.bool")
        if not torch.is_floating_point(labels) and labels.dtype != torch.long:
            labels = labels.long()
        data = (inputs, labels)
        count = len(labels)
    else:
        for key, value in (data.items() if isinstance(data, Mapping) else [("", data)]):
            if key != "attention_mask" and value.dtype == torch.bool:  # as the Python API
                what = f" {key}" if key else ""
                raise CanaryError(f"{role} {path}{what} must be integer token ids, got "
                                  "torch.bool")
        if isinstance(data, Mapping):
            data = {k: v.long() if not torch.is_floating_point(v) else v
                    for k, v in data.items()}
            count = len(data["input_ids"])
        else:
            data = data.long()
            count = len(data)
    return Samples(data, kind, source, path, count)


def _describe_kind(kind: str) -> str:
    return "token sequences" if kind == "sequences" else "(inputs, labels) samples"


def _fit(samples: Samples, model: LoadedModel) -> None:
    """Check the samples suit the model; cast floating inputs to the model's dtype."""
    if model.task == "causal-lm" and samples.kind != "sequences":
        raise CanaryError(
            f"{samples.path} holds {_describe_kind(samples.kind)}, but the model is a causal "
            "language model: give token sequences (.txt, input_ids, integer [n, T] arrays)")
    if model.task == "classifier" and samples.kind != "labelled":
        raise CanaryError(
            f"{samples.path} holds {_describe_kind(samples.kind)}, but the model is a "
            "sequence classifier: give (inputs, labels) samples (.pt or .npz)")
    if samples.kind == "labelled":
        inputs, labels = samples.data
        if torch.is_floating_point(inputs):
            inputs = inputs.to(_float_dtype(model.module))
        samples.data = (inputs, labels)


def _check_sides(kind: str, suspects: Samples, non_members: Samples,
                 members: Samples | None, options: dict[str, Any]) -> None:
    """The canary sets' checks, each message naming the sides as the command does."""
    from fesmia_hooks.audit import _pool

    _pool(kind, suspects.data, non_members.data, first_name="suspects", **options)
    if members is not None:
        _pool(kind, members.data, non_members.data, **options)


# -------------------------------------------------------------------------------- output
def _number(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"


def format_result(result: Any, model: LoadedModel, sides: Mapping[str, Samples | None],
                  top: int = 10) -> str:
    """The result as a person reads it: inputs, verdict, test, effect, top suspects.

    Example:
        >>> from fesmia_hooks.audit import AuditResult
        >>> r = AuditResult("not shown", 0.4, 0.05, 0.52, 0.4, 0.64, 3, 40, 0, 999,
        ...                 ("phi",), np.array([0.1, 0.3, -0.2]), np.array([0.5, 0.3, 0.8]))
        >>> m = LoadedModel(nn.Identity(), "torchscript", Path("m.pt"))
        >>> s = Samples(None, "labelled", "pt", Path("s.pt"), 3)
        >>> print(format_result(r, m, {"suspects": s, "non_members": s}, top=2))
        model        m.pt (torchscript)
        suspects     s.pt (pt): 3 samples
        non-members  s.pt (pt): 3 samples
        members      none
        <BLANKLINE>
        verdict      not shown: the 3 suspects are not shown to differ from the 40 known non-members
        p-value      0.4 > alpha 0.05 (999 permutations)
        effect AUC   0.52 [0.40, 0.64] (95 % interval; 0.5 = no difference)
        signals      phi
        <BLANKLINE>
        top 2 of 3 suspects, most member-like first (score: higher = more member-like)
          rank  index     score  p-value
             1      1     0.300      0.3
             2      0     0.100      0.5
        <BLANKLINE>
        'not shown' is not proof of absence: see effect AUC's lower end and docs/science.md#data-integrity
    """  # noqa: E501
    lines = [f"{'model':<12} {model.path.name} ({model.format}"
             + (f"; {model.note}" if model.note else "") + ")"]
    for key, label in (("suspects", "suspects"), ("non_members", "non-members"),
                       ("members", "members")):
        side = sides.get(key)
        if side is None:
            lines.append(f"{label:<12} none")
            continue
        how = f"; {side.encoding}" if side.source == "text" else ""
        lines.append(f"{label:<12} {side.path.name} ({side.source}{how}): {side.count} samples")
    test = "<=" if result.p_value <= result.alpha else ">"
    verb = "are more member-like than" if result.shown else "are not shown to differ from"
    lines += [
        "",
        f"{'verdict':<12} {result.verdict}: the {result.suspects} suspects {verb} the "
        f"{result.non_members} known non-members",
        f"{'p-value':<12} {result.p_value:.3g} {test} alpha {result.alpha:g} "
        f"({result.permutations} permutations)",
        f"{'effect AUC':<12} {result.effect_auc:.2f} [{result.effect_auc_low:.2f}, "
        f"{result.effect_auc_high:.2f}] (95 % interval; 0.5 = no difference)",
        f"{'signals':<12} {', '.join(result.signals)}",
    ]
    if result.log_mia is not None:
        r = result.log_mia
        lines.append(f"{'Log-MIA':<12} strict {r.strict:.2f} (chance {r.chance_strict:.2f}), "
                     f"AUC {r.auc:.2f}, p = {_number(r.p_value)} on the {result.members} "
                     "known members")
    if math.isfinite(result.epsilon_lower_bound):
        lines.append(f"{'epsilon':<12} >= {result.epsilon_lower_bound:.2f} (95 %, one-run "
                     "audit on the known members)")
    shown = min(max(top, 0), result.suspects)
    if shown:
        suspects = sides.get("suspects")
        text_lines = suspects.lines if suspects is not None else []
        score = ("few-shot log-odds against the known members" if result.members
                 else "higher = more member-like")
        lines += ["", f"top {shown} of {result.suspects} suspects, most member-like first "
                      f"(score: {score})",
                  "  rank  index" + ("   line" if text_lines else "") + "     score  p-value"]
        for rank, index in enumerate(result.ranking()[:shown], start=1):
            line = f"{text_lines[index]:>7}" if text_lines else ""
            lines.append(f"  {rank:>4}  {int(index):>5}{line}  {result.suspect_scores[index]:>8.3f}"
                         f"  {_number(float(result.suspect_p_values[index])):>7}")
    if not result.shown:
        lines += ["", "'not shown' is not proof of absence: see effect AUC's lower end and "
                      "docs/science.md#data-integrity"]
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float as ``None`` (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def result_json(result: Any, model: LoadedModel, sides: Mapping[str, Samples | None]
                ) -> dict[str, Any]:
    """The JSON document of ``--json``: ``as_dict()`` plus the model and the files read."""
    from fesmia_hooks import __version__

    out = result.as_dict()
    out["model"] = {"path": str(model.path), "format": model.format,
                    **({"note": model.note} if model.note else {})}
    out["inputs"] = {
        key: None if side is None else {
            "path": str(side.path), "format": side.source, "samples": side.count,
            **({"tokenized_as": side.encoding} if side.source == "text" else {}),
        }
        for key, side in sides.items()
    }
    suspects = sides.get("suspects")
    if suspects is not None and suspects.lines:
        out["suspect_lines"] = list(suspects.lines)
    out["fesmia_hooks_version"] = __version__
    return _finite(out)  # type: ignore[no-any-return]


def _plot_bytes(result: Any, fmt: str) -> bytes:
    """Histograms of the suspects' and non-members' scores, and of the suspects' p-values."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    # the set-level test's scores: suspects and non-members on one scale
    suspects = np.asarray(result.suspect_set_scores, dtype=float)
    non_members = np.asarray(result.non_member_scores, dtype=float)
    both = np.concatenate([suspects, non_members])
    bins = np.histogram_bin_edges(both[np.isfinite(both)], bins=30)
    left.hist(non_members, bins=bins, density=True, alpha=0.55, color="tab:blue",
              label=f"non-members ({len(non_members)})")
    left.hist(suspects, bins=bins, density=True, alpha=0.55, color="tab:red",
              label=f"suspects ({len(suspects)})")
    left.set_title("membership score (higher = more member-like)")
    left.legend()
    left.set_xlabel("score")
    left.set_ylabel("density")
    right.hist(np.asarray(result.suspect_p_values, dtype=float), bins=20, range=(0, 1),
               color="tab:red", alpha=0.7)
    right.axhline(len(suspects) / 20, color="gray", linestyle="--",
                  label="expected if never trained on")
    right.set_title("suspects' p-values")
    right.set_xlabel("p-value against the non-members")
    right.set_ylabel("suspects")
    right.legend()
    fig.suptitle(f"{result.verdict}: p = {result.p_value:.3g}, AUC {result.effect_auc:.2f} "
                 f"[{result.effect_auc_low:.2f}, {result.effect_auc_high:.2f}]")
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_figure(buffer, format=fmt)
    return buffer.getvalue()


def plot_scores(result: Any, target: Path) -> Path:
    """Histograms of the suspects' and non-members' scores, and of the suspects' p-values.

    The picture (its format told by ``target``'s suffix) is written whole or not at all.
    """
    target = Path(target)
    _write_outputs([("--plot", target, _plot_bytes(result, target.suffix[1:].lower()))])
    return target


class _OutputError(FesmiaError, OSError):
    """An output file (``--json``, ``--plot``) cannot be written."""


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (links followed; either may not exist yet)."""
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def _check_output(option: str, value: str, inputs: Sequence[tuple[str, str]]) -> None:
    """Refuse an output path that cannot be written or would overwrite an input."""
    path = Path(value)
    if path.is_dir():
        raise ConfigurationError(f"{option} {value} is a folder; give a file path")
    if path.exists() and not path.is_file():
        raise ConfigurationError(
            f"{option} {value} exists and is not a regular file (a device, a pipe or a "
            "socket); give a file path")
    for in_option, in_value in inputs:
        source = Path(in_value)
        if _same_file(path, source):
            raise ConfigurationError(
                f"{option} {value} is the {in_option} input, which writing would overwrite; "
                "give another path")
        if source.is_dir() and _inside(path, source) and (
                path.exists() or in_option != "--model"):
            raise ConfigurationError(
                f"{option} {value} lies inside the {in_option} folder {in_value}: writing "
                "it would change what is read from there; give a path outside it")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        if folder.is_symlink():  # a dangling link: mkdir cannot make its folder
            raise ConfigurationError(
                f"{option} {value}: its folder {folder} is a broken link")
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigurationError(
            f"{option} {value}: {folder} is a file, not a folder, so nothing can be written "
            "below it")
    if not os.access(folder, os.W_OK | os.X_OK):
        made = "" if folder == path.parent else ", where its folder would be made"
        raise ConfigurationError(
            f"{option} {value}: the folder {folder} is not writable{made} (permission denied)")
    if path.is_file() and not os.access(path, os.W_OK):
        raise ConfigurationError(f"{option} {value} exists and is not writable")


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse ``--json``/``--plot`` paths that cannot be written, before anything runs."""
    inputs = [(option, getattr(args, key)) for key, option in
              (("model", "--model"), *_SIDES) if getattr(args, key, None) is not None]
    outputs = [(option, value) for option, value in (("--json", args.json),
                                                      ("--plot", args.plot)) if value is not None]
    for option, value in outputs:
        _check_output(option, value, inputs)
    if len(outputs) == 2 and _same_file(Path(args.json), Path(args.plot)):
        raise ConfigurationError(
            f"--json and --plot name the same file {args.json}; give two paths")


def _check_options(args: argparse.Namespace) -> None:
    """Refuse bad options and outputs that cannot be written before anything is loaded."""
    if not 0 < args.alpha < 1:
        raise ConfigurationError(f"--alpha must be a number in (0, 1), got {args.alpha:g}")
    for option, value, least in (("--permutations", args.permutations, 1),
                                 ("--batch-size", args.batch_size, 1), ("--seed", args.seed, 0),
                                 ("--top", args.top, 0)):
        if value < least:
            raise ConfigurationError(f"{option} must be an int >= {least}, got {value}")
    for option, value, least in (("--max-length", args.max_length, 2),
                                 ("--num-classes", args.num_classes, 2),
                                 ("--pad-token-id", args.pad_token_id, 0)):
        if value is not None and value < least:
            raise ConfigurationError(f"{option} must be an int >= {least}, got {value}")
    if args.plot is not None:
        if Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
            raise ConfigurationError(
                f"--plot must end in {', '.join(PLOT_SUFFIXES)}, got {args.plot}")
        if importlib.util.find_spec("matplotlib") is None:
            raise ConfigurationError("--plot needs matplotlib: pip install 'fesmia-hooks[plot]'")
    _check_outputs(args)
    if args.random_inclusion and args.members is None:
        raise ConfigurationError("--random-inclusion describes the known members: give "
                                 "--members too")


def _stage(option: str, path: Path, data: bytes, made: list[Path]) -> tuple[Path, Path]:
    """Write ``data`` to a new temporary file beside ``path``: ``(temporary, target)``.

    Folders that had to be made are added to ``made`` (outermost first). A link is
    followed: the file it points to is replaced, the link stays.
    """
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    missing = [folder for folder in (target.parent, *target.parent.parents)
               if not folder.exists()]
    for folder in reversed(missing):
        folder.mkdir()
        made.append(folder)
    mode = 0o666  # as open() makes a file (less the umask), or the mode of the file replaced
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(target.stat().st_mode)
    temporary = target.with_name(f".{target.name[:64]}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with open(descriptor, "wb", closefd=True) as file:
            file.write(data)
            file.flush()
            try:
                os.fsync(file.fileno())
            except OSError as exc:  # a file system without fsync: the write itself stands
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
                    raise
        if target.exists():
            os.chmod(temporary, mode)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return temporary, target


def _write_outputs(outputs: Sequence[tuple[str, Path, bytes]]) -> None:
    """Write every ``(option, path, data)`` whole, or none of them.

    Each file is written to a temporary file in its folder, and only when all are written
    are they moved onto their paths (``os.replace``); on any failure the temporary files,
    the outputs already moved and the folders made are removed.

    Raises:
        _OutputError: When a file cannot be written (disk full, file-size limit, ...).
    """
    made: list[Path] = []
    staged: list[tuple[Path, Path]] = []
    moved: list[Path] = []
    failing = ""  # the output being written, for the message
    try:
        for option, path, data in outputs:
            failing = f"{option} {path}"
            staged.append(_stage(option, path, data, made))
        for (temporary, target), (option, path, _) in zip(staged, outputs, strict=True):
            failing = f"{option} {path}"
            os.replace(temporary, target)
            moved.append(target)
    except BaseException as exc:
        for temporary, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        for target in moved:  # all or nothing: an output written before the failure goes
            with contextlib.suppress(OSError):
                os.unlink(target)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if not isinstance(exc, OSError):
            raise
        reason = exc.strerror or describe_error(exc)
        raise _OutputError(f"{failing} cannot be written ({reason}); no output was "
                           "written") from exc


# ------------------------------------------------------------------------------------ run
def audit_files(args: argparse.Namespace) -> tuple[Any, LoadedModel, dict[str, Samples | None]]:
    """Load what ``args`` name, check it and run the audit; raises on any problem.

    Python's warnings (and transformers' log) are kept off stderr meanwhile: loaders'
    notices are no part of the command's output.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _audit_files(args)


def _audit_files(args: argparse.Namespace
                 ) -> tuple[Any, LoadedModel, dict[str, Samples | None]]:
    from fesmia_hooks.audit import audit

    _check_options(args)
    model = load_model(args.model, args.format, factory=args.factory,
                       lightning_module=args.lightning_module, device=args.device)
    sides: dict[str, Samples | None] = {}
    classes: list[str] | None = None
    classes_from: str | None = None
    for key, option in _SIDES:
        path = getattr(args, key)
        if path is None:
            sides[key] = None
            continue
        samples = load_samples(path, option, model=model, encode=args.encode,
                               max_length=args.max_length, classes=classes,
                               classes_from=classes_from)
        if samples.source == "images" and classes is None:
            classes, classes_from = samples.classes, f"{option} {path}"
        _fit(samples, model)
        sides[key] = samples
    suspects, non_members, members = sides["suspects"], sides["non_members"], sides["members"]
    assert suspects is not None and non_members is not None
    for other in (non_members, members):
        if other is not None and other.kind != suspects.kind:
            raise CanaryError(
                f"{suspects.path} holds {_describe_kind(suspects.kind)} but {other.path} "
                f"holds {_describe_kind(other.kind)}: every side must be of one kind")
    vocab = model.vocab_size
    texts = [s for s in sides.values() if s is not None and s.source == "text"]
    if suspects.kind == "sequences" and any(s.encoding == "UTF-8 bytes" for s in texts):
        vocab = BYTE_VOCABULARY if vocab is None else min(vocab, BYTE_VOCABULARY)
    options: dict[str, Any] = {
        "num_classes": args.num_classes, "pad_token_id": args.pad_token_id,
        "vocab_size": vocab if suspects.kind == "sequences" else None,
    }
    _check_sides(suspects.kind, suspects, non_members, members, options)
    tokenizer = model.tokenizer if any(s.encoding != "UTF-8 bytes" for s in texts) else None
    try:
        with _quiet_transformers(), _exits_as(ProbeError, "the model's forward"):
            result = audit(
                model.module, suspects.data, non_members.data,
                members=None if members is None else members.data,
                kind=suspects.kind,  # type: ignore[arg-type]
                alpha=args.alpha, permutations=args.permutations, seed=args.seed,
                random_inclusion=args.random_inclusion, batch_size=args.batch_size,
                decode=getattr(tokenizer, "decode", None), **options)
    except ProbeError as exc:  # the model failed on the samples: say how they were read
        if isinstance(exc.__cause__, SystemExit):
            raise
        hint = ""
        cure = "try --max-length" if texts else "cut them shorter"
        if suspects.kind == "sequences" and _index_error(exc):
            hint = (" (token ids beyond the model's vocabulary, or sequences longer than its "
                    f"context window: {cure})")
        elif suspects.kind == "sequences" and "longer than the model's context" in str(exc):
            hint = f" ({cure})"
        raise ProbeError(f"{exc}, read as {_describe_kind(suspects.kind)}{hint}") from exc
    return result, model, sides


def _index_error(exc: BaseException) -> bool:
    """Whether an IndexError caused ``exc`` (in its chain, or told in its message)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, IndexError) or "IndexError" in str(cause):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _error(message: str) -> int:
    """Print the one error line and return 2."""
    print(f"{_PROG}: error: {_one_line(message)}", file=sys.stderr)
    return 2


def _stdout_to_devnull() -> None:
    """After a broken pipe, send what is left of stdout to devnull (Python's docs' advice).

    The flush at exit then fails no more.
    """
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


def run(args: argparse.Namespace) -> int:
    """Run ``fesmia-hooks audit``; returns 0 (not shown), 1 (shown) or 2 (could not run).

    The outputs (``--json``, ``--plot``) are written, all or none, before the verdict is
    printed; when one cannot be written no verdict is printed. A stdout closed early (``|
    head``) still gets the verdict's status.
    """
    show = bool(getattr(args, "traceback", False))
    try:
        result, model, sides = audit_files(args)
        outputs: list[tuple[str, Path, bytes]] = []
        if args.json is not None:
            document = json.dumps(result_json(result, model, sides), indent=2,
                                  allow_nan=False)
            outputs.append(("--json", Path(args.json), (document + "\n").encode("utf-8")))
        if args.plot is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                picture = _plot_bytes(result, Path(args.plot).suffix[1:].lower())
            outputs.append(("--plot", Path(args.plot), picture))
        _write_outputs(outputs)
    except KeyboardInterrupt:
        if show:
            traceback.print_exc()
        return _error("interrupted")
    except SystemExit:  # user code outside the places that name it
        if show:
            traceback.print_exc()
        return _error("user code called sys.exit while the audit ran")
    except Exception as exc:
        if show:
            traceback.print_exc()
        return _error(str(exc) if isinstance(exc, FesmiaError) else describe_error(exc))
    text = format_result(result, model, sides, top=args.top)
    for _, path, _ in outputs:
        text += f"\nwrote {path}"
    try:
        print(text, flush=True)
    except BrokenPipeError:  # e.g. `| head -1`: the outputs are written, the status stands
        _stdout_to_devnull()
    return 1 if result.shown else 0
