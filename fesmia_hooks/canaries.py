"""The canary set: a few samples known to be trained on, and a few known never to be.

Two kinds of canaries share the small base :class:`Canaries` (sizes, members-first order,
the device cache, a fingerprint): samples of a classifier (:class:`CanarySet`, with
:meth:`CanarySet.split`, :meth:`CanarySet.from_datasets` and :meth:`CanarySet.crafted`) and
token sequences of a causal language model (:class:`~fesmia_hooks.sequences.SequenceCanarySet`,
also built by :meth:`CanarySet.from_sequences`). Each kind owns its forward pass
(:meth:`Canaries.features`), run through the one batching loop of
:func:`fesmia_hooks.features.forward_in_batches`.

Canary data is private. Nothing in this module, nor anywhere in fesmia-hooks, writes canary
inputs or labels to a log, a report, a history file, an exception message or a state dict;
the :meth:`~Canaries.fingerprint` is a hash that identifies a set without revealing it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from fesmia_hooks._validation import positive_int
from fesmia_hooks.exceptions import CanaryError, ConfigurationError, describe_error
from fesmia_hooks.features import (
    Features,
    FeatureSpec,
    check_signal_block,
    forward_in_batches,
    select_rows,
)
from fesmia_hooks.guard import model_device
from fesmia_hooks.signals import DEFAULT_SIGNALS, classification_signals, extract_logits

if TYPE_CHECKING:  # pragma: no cover
    from fesmia_hooks.sequences import SequenceCanarySet

__all__ = ["Canaries", "CanarySet", "wrong_labels"]

Side = Union[tuple[Any, Any], Dataset, torch.Tensor, np.ndarray]  # noqa: UP007


def _as_model_floats(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Floating inputs in the floating dtype of ``model``'s parameters, when they share one.

    Canaries built from NumPy arrays are float64; a float32 model (or a bfloat16 one)
    refuses them. Integer inputs (token or category ids), and the inputs of a model whose
    parameters mix floating dtypes (which dtype it reads is its own affair), are left as
    they are.
    """
    if not x.is_floating_point():
        return x
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return x
    (dtype,) = dtypes
    return x if dtype == x.dtype else x.to(dtype)


def _to_tensor(name: str, value: Any) -> torch.Tensor:
    """``value`` as a tensor of numbers with real storage, or a :class:`CanaryError`.

    Refused up front, each with its own message: tensors on the ``meta`` device (no data),
    sparse, quantized and nested tensors, SciPy sparse matrices, and arrays whose dtype holds
    no numbers (objects, strings, dates). Messages name types, dtypes and layouts, never values.
    """
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        if hasattr(value, "toarray") and hasattr(value, "nnz"):  # a SciPy sparse matrix
            raise CanaryError(
                f"{name} are a sparse matrix ({type(value).__name__}), which is not supported: "
                "call .toarray()"
            )
        try:
            array = np.ascontiguousarray(value)
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
            raise CanaryError(
                f"{name} must be a tensor, an array or a sequence of numbers, "
                f"got {type(value).__name__}"
            ) from exc
        if array.dtype.kind not in "biufc":
            dtype = f" of dtype {array.dtype}" if isinstance(value, np.ndarray) else ""
            raise CanaryError(
                f"{name} must be a tensor, an array or a sequence of numbers, got "
                f"{type(value).__name__}{dtype}"
            )
        try:
            tensor = torch.as_tensor(array)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CanaryError(
                f"{name} must be a tensor, an array or a sequence of numbers, got "
                f"{type(value).__name__} of dtype {array.dtype}, which torch does not support"
            ) from exc
    _check_storage(name, tensor)
    return tensor


def _check_storage(name: str, tensor: torch.Tensor) -> None:
    """Refuse tensors whose values cannot be read as one dense block of numbers."""
    if tensor.is_meta:
        raise CanaryError(
            f"{name} are on the 'meta' device, which holds no data: give tensors with real "
            "values"
        )
    if tensor.is_nested:
        raise CanaryError(
            f"{name} are a nested tensor, which is not supported: pad the samples into one "
            "dense tensor"
        )
    if tensor.layout != torch.strided:
        raise CanaryError(
            f"{name} are a sparse tensor ({tensor.layout}), which is not supported: call "
            ".to_dense()"
        )
    if tensor.is_quantized:
        raise CanaryError(
            f"{name} are a quantized tensor ({tensor.dtype}), which is not supported: call "
            ".dequantize()"
        )


def _stack_dataset(name: str, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise CanaryError(f"{name}: a Dataset must define __len__") from exc
    except Exception as exc:  # noqa: BLE001 - the user's __len__, told without its values
        raise CanaryError(f"{name}: the Dataset's __len__ failed ({describe_error(exc)})"
                          ) from None
    xs, ys = [], []
    for i in range(n):
        try:
            item = dataset[i]
        except Exception as exc:  # noqa: BLE001 - the user's __getitem__: its message may
            # quote the sample, so it is told without its values
            raise CanaryError(f"{name}: reading a sample of the Dataset failed "
                              f"({type(exc).__name__}; its message is withheld, since it may "
                              "quote the sample: read one sample yourself to see it)"
                              ) from None
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            xs.append(_to_tensor(f"{name} inputs", item[0]))
            ys.append(_to_tensor(f"{name} labels", item[1]))
        else:
            xs.append(_to_tensor(f"{name} inputs", item))
    if not xs:
        return torch.empty(0), None
    try:
        x = torch.stack(xs)
        y = torch.stack(ys) if ys else None
    except RuntimeError as exc:
        spread = any(len({t.device for t in part}) > 1 for part in (xs, ys))
        what = "device" if spread else "shape"
        raise CanaryError(f"{name}: samples of the Dataset do not all have one {what}") from exc
    if y is not None and y[0].numel() == 1:
        y = y.reshape(len(ys))  # one label per sample, even if each came as a [1] tensor
    return x, y


def _unpack(name: str, side: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(side, Dataset) and not isinstance(side, (torch.Tensor, np.ndarray)):
        return _stack_dataset(name, side)
    if isinstance(side, (tuple, list)) and len(side) == 2 and not _is_number_sequence(side):
        return _to_tensor(f"{name} inputs", side[0]), _to_tensor(f"{name} labels", side[1])
    return _to_tensor(f"{name} inputs", side), None


def _is_number_sequence(side: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) for v in side)


_WIDE_UNSIGNED = tuple(
    getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)
)


def _class_indices(name: str, y: torch.Tensor | None, num_classes: int | None) -> Any:
    """Labels as one class index per sample: one-hot rows ``[n, C]`` become their argmax.

    Keras's ``to_categorical`` idiom gives labels as one-hot rows. A row with exactly one 1
    and every other entry 0 names one class without doubt, so it is read as that class; any
    other ``[n, C]`` label (soft or multi-hot) is refused, since the probe needs one class per
    sample and guessing one would measure something else. A ``[n, 1]`` column of integers
    (``keras.datasets`` gives labels so) is read as one index per row. Other shapes are left
    to :meth:`CanarySet._validate`, which refuses them.

    Messages give counts and shapes, never label values: canary labels stay private.
    """
    if y is not None and y.dtype in _WIDE_UNSIGNED:
        y = y.long()  # torch compares uint16/32/64 on few backends; a wrapped value is < 0
    if y is None or y.dim() != 2:
        return y
    if y.shape[1] == 1 and not (y.is_floating_point() or y.is_complex()):
        return y.reshape(-1)
    if y.shape[1] < 2 or y.is_complex():
        return y
    n, width = (int(d) for d in y.shape)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and (
        width != num_classes
    ):
        raise CanaryError(
            f"{name} labels are one-hot rows of width {width}, but num_classes is {num_classes}"
        )
    binary = (y == 0) | (y == 1)
    one_hot = binary.all(dim=1) & ((y == 1).sum(dim=1) == 1)
    bad = n - int(one_hot.sum())
    if bad:
        raise CanaryError(
            f"{name} labels of shape {(n, width)} are read as one-hot rows (a single 1, every "
            f"other entry 0), but {bad} of the {n} rows are not (soft or multi-hot labels); "
            "the probe needs one class per sample: give integer class indices (shape "
            f"({n},)) or one-hot rows"
        )
    return (y == 1).to(torch.uint8).argmax(dim=1)


def _fingerprints(x: torch.Tensor) -> list[bytes]:
    """A 16-byte hash of each sample (row) of ``x``: equal samples, equal hashes.

    Floating values are normalised first: ``x + 0.0`` turns ``-0.0`` into ``0.0`` (IEEE 754
    addition rounds ``-0.0 + 0.0`` to ``+0.0``, and leaves every other finite value as it
    is), so two samples that compare equal hash equal although their bytes differ. (Not
    float8, which torch cannot add and :class:`CanarySet` refuses.)
    """
    if (x.is_floating_point() or x.is_complex()) and x.element_size() >= 2:
        x = x + 0.0
    width = math.prod(x.shape[1:])
    flat = x.reshape(x.shape[0], width).contiguous().cpu().view(torch.uint8).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


class Canaries:
    """What every kind of canary set shares: members first, then non-members.

    Subclasses set :attr:`inputs`, :attr:`labels` (targets: class labels, or next-token
    targets), :attr:`num_members` and :attr:`num_non_members` in their constructor, call
    ``super().__init__()``, and implement :meth:`features`.

    Attributes:
        kind: ``"labelled"`` or ``"sequences"``.
        inputs: ``[N, ...]`` inputs, members first.
        labels: ``[N]`` class labels or ``[N, T]`` next-token targets, or ``None``.
        num_members: Members in the set.
        num_non_members: Non-members in the set.
    """

    kind: ClassVar[str] = "base"
    is_sequence: ClassVar[bool] = False
    inputs: torch.Tensor
    labels: torch.Tensor | None
    num_members: int
    num_non_members: int

    #: Whether each canary was put into training by an independent fair coin (the one-run
    #: audit's design; :meth:`CanarySet.for_audit`): only then does a monitor compute the
    #: ε lower bound of :mod:`fesmia_hooks.epsilon`.
    random_inclusion: bool = False

    def __init__(self) -> None:
        self._device_cache: dict[str, tuple[torch.Tensor, ...]] = {}
        #: Words of the canaries' text (token sequences built with ``decode``): withheld
        #: from the messages of errors raised while they are read.
        self.private_words: frozenset[str] = frozenset()

    def require(self, per_side: int, *, who: str = "the probe") -> None:
        """Raise :class:`CanaryError` unless each side holds at least ``per_side`` samples."""
        small = min(self.num_members, self.num_non_members)
        if small < per_side:
            raise CanaryError(
                f"{who} needs at least {per_side} members and {per_side} non-members "
                f"(shots + queries), got {self.num_members} members and "
                f"{self.num_non_members} non-members"
            )

    def __len__(self) -> int:
        return self.num_members + self.num_non_members

    @property
    def is_member(self) -> torch.Tensor:
        """Boolean ``[len(self)]``: members first, then non-members."""
        flags = torch.zeros(len(self), dtype=torch.bool)
        flags[: self.num_members] = True
        return flags

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors :meth:`on` moves to a device, in order."""
        return (self.inputs, self.labels)

    def on(self, device: torch.device | str) -> tuple[Any, ...]:
        """The set's tensors on ``device``; moved once, then served from a cache.

        ``(inputs, labels)`` for labelled canaries; see the subclass for others.
        """
        key = str(torch.device(device))
        if key not in self._device_cache:
            self._device_cache[key] = tuple(
                None if t is None else t.to(device) for t in self._tensors()
            )
        return self._device_cache[key]

    def fingerprint(self) -> str:
        """A hash of the whole set (kind, sizes, every tensor): equal sets, equal prints.

        It names a canary set in a run's history and in saved states without revealing
        any of its data.

        Example:
            >>> import torch
            >>> x, y = torch.ones(4, 2), torch.tensor([0, 1, 0, 1])
            >>> a = CanarySet(members=(x[:2], y[:2]), non_members=(x[2:] * 2, y[2:]))
            >>> b = CanarySet(members=(x[:2], y[:2]), non_members=(x[2:] * 2, y[2:]))
            >>> a.fingerprint() == b.fingerprint(), len(a.fingerprint())
            (True, 32)
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.kind}:{self.num_members}:{self.num_non_members}".encode())
        for t in self._tensors():
            if t is None:
                h.update(b"none")
                continue
            c = t.detach().cpu().contiguous()
            h.update(f"{c.dtype}:{tuple(c.shape)}".encode())
            h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def features(
        self, model: nn.Module, spec: FeatureSpec, *, rows: torch.Tensor | None = None
    ) -> Features:
        """Forward the set (or its ``rows``) through ``model`` without touching training.

        Each kind of canary set implements it; see
        :func:`fesmia_hooks.features.compute_features`.
        """
        raise NotImplementedError


class CanarySet(Canaries):
    """Members (trained on) and non-members (never trained on) of one data distribution.

    Args:
        members: Samples that are, or will be, in the training set: a pair ``(inputs,
            labels)`` of tensors or arrays, a ``torch.utils.data.Dataset`` yielding
            ``(input, label)``, or inputs alone when labels are not needed. Labels are
            class indices ``[n]`` (or a ``[n, 1]`` integer column), or one-hot rows
            ``[n, C]`` (Keras's ``to_categorical``; float, int or bool), which are read as
            the index of their 1.
        non_members: Samples of the same distribution that are never trained on, in the
            same form as ``members``.
        num_classes: When given, labels are checked to lie in ``[0, num_classes)`` (and
            one-hot rows to have ``num_classes`` columns).
        random_inclusion: Declare that each canary was put into training by an
            independent fair coin, as :meth:`for_audit` does; a monitor then reports the
            one-run audit's ε lower bound (``docs/science.md#dp-audit``). Declaring it for
            canaries drawn any other way makes that bound meaningless.

    Raises:
        CanaryError: On empty sides, shapes or dtypes that disagree, non-integer or
            out-of-range labels, ``[n, C]`` labels that are not one-hot (soft or multi-hot
            rows), non-finite inputs, or a sample present on both sides.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(40, 8, generator=g)
        >>> y = torch.randint(0, 3, (40,), generator=g)
        >>> canaries = CanarySet(members=(x[:20], y[:20]), non_members=(x[20:], y[20:]))
        >>> canaries
        CanarySet(members=20, non_members=20, input_shape=(8,), labels=yes)

        One-hot labels name the same classes:

        >>> one_hot = torch.nn.functional.one_hot(y, 3).float()
        >>> same = CanarySet(members=(x[:20], one_hot[:20]), non_members=(x[20:], one_hot[20:]))
        >>> torch.equal(same.labels, canaries.labels)
        True
    """

    kind: ClassVar[str] = "labelled"

    def __init__(
        self,
        members: Side,
        non_members: Side,
        *,
        num_classes: int | None = None,
        random_inclusion: bool = False,
    ) -> None:
        super().__init__()
        self.random_inclusion = _flag("random_inclusion", random_inclusion)
        xm, ym = _unpack("members", members)
        xn, yn = _unpack("non_members", non_members)
        ym = _class_indices("members", ym, num_classes)
        yn = _class_indices("non_members", yn, num_classes)
        self._validate(xm, ym, xn, yn, num_classes)
        self.inputs = torch.cat([xm, xn]).contiguous()
        self.labels = None if ym is None or yn is None else torch.cat([ym, yn]).long()
        self.num_members = int(xm.shape[0])
        self.num_non_members = int(xn.shape[0])
        self.num_classes = num_classes

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate(
        xm: torch.Tensor,
        ym: torch.Tensor | None,
        xn: torch.Tensor,
        yn: torch.Tensor | None,
        num_classes: int | None,
    ) -> None:
        for name, x in (("members", xm), ("non_members", xn)):
            if x.dim() == 0 or x.shape[0] == 0:
                raise CanaryError(f"{name} must hold at least one sample, got none")
            if x.numel() == 0:
                raise CanaryError(
                    f"{name} samples must hold at least one value each, got samples of shape "
                    f"{tuple(x.shape[1:])}"
                )
            if x.is_complex():
                raise CanaryError(
                    f"{name} inputs are complex ({x.dtype}), which is not supported: give "
                    "real-valued inputs"
                )
            if x.is_floating_point() and x.element_size() < 2:
                raise CanaryError(
                    f"{name} inputs are {x.dtype}, which is not supported: give float16, "
                    "bfloat16, float32 or float64 inputs"
                )
        if xm.shape[1:] != xn.shape[1:]:
            raise CanaryError(
                "members and non_members must have the same sample shape, got "
                f"{tuple(xm.shape[1:])} and {tuple(xn.shape[1:])}"
            )
        if xm.dtype != xn.dtype:
            raise CanaryError(
                f"members and non_members must have the same dtype, got {xm.dtype} and {xn.dtype}"
            )
        if (ym is None) != (yn is None):
            raise CanaryError("give labels for both members and non_members, or for neither")
        for what, a, b in (("inputs", xm, xn), ("labels", ym, yn)):
            if a is not None and b is not None and a.device != b.device:
                raise CanaryError(
                    f"members and non_members {what} must be on one device, got {a.device} and "
                    f"{b.device}: move both sides to one device (.cpu(), say)"
                )
        for name, x in (("members", xm), ("non_members", xn)):
            if x.is_floating_point() and not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())
                raise CanaryError(
                    f"{name} inputs must be finite, got {bad} sample(s) with NaN or infinity"
                )
        for name, x, y in (("members", xm, ym), ("non_members", xn, yn)):
            if y is None:
                continue
            if y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise CanaryError(
                    f"{name} labels must be one class index per sample ({x.shape[0]}), "
                    f"got shape {tuple(y.shape)}"
                )
            if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
                raise CanaryError(f"{name} labels must be integer class indices, got {y.dtype}")
            # Messages give counts, never label values: canary labels stay private.
            negative = int((y < 0).sum())
            if negative:
                raise CanaryError(
                    f"{name} labels must be class indices >= 0, got {negative} negative label(s)"
                )
            if num_classes is not None:
                positive_int("num_classes", num_classes)
                outside = int((y >= num_classes).sum())
                if outside:
                    raise CanaryError(
                        f"{name} labels must lie in [0, {num_classes}), got {outside} label(s) "
                        "outside it"
                    )
        shared = set(_fingerprints(xm)) & set(_fingerprints(xn))
        if shared:
            raise CanaryError(
                f"{len(shared)} sample(s) appear among both members and non_members; "
                "the two sides must be disjoint"
            )

    def __repr__(self) -> str:
        shape = tuple(self.inputs.shape[1:])
        labels = "yes" if self.labels is not None else "no"
        return (
            f"CanarySet(members={self.num_members}, non_members={self.num_non_members}, "
            f"input_shape={shape}, labels={labels})"
        )

    def features(
        self, model: nn.Module, spec: FeatureSpec, *, rows: torch.Tensor | None = None
    ) -> Features:
        """Forward the samples through the classifier ``model`` without touching training.

        The model gets a batch of inputs and returns logits ``[B, C]`` (a tensor, or an
        output holding them; see :func:`~fesmia_hooks.extract_logits`); the signals of
        :func:`~fesmia_hooks.classification_signals` are read against the labels, unless
        ``signal_fn(model, inputs, labels)`` replaces them. See
        :func:`fesmia_hooks.features.compute_features` for the arguments.
        """
        names = DEFAULT_SIGNALS if spec.signals is None else tuple(spec.signals)
        signal_fn, kind = spec.signal_fn, spec.kind
        x, y = select_rows(self.on(model_device(model)), rows)
        if signal_fn is None:  # a signal_fn gets the canaries as they were given
            x = _as_model_floats(x, model)
        if signal_fn is None and kind != "embeddings" and y is None:
            raise ConfigurationError(
                "the built-in classification signals need canary labels; give (inputs, labels) "
                "pairs or pass `signal_fn`"
            )

        def signals_of(start: int, stop: int) -> torch.Tensor | None:
            xb, yb = x[start:stop], None if y is None else y[start:stop]
            if signal_fn is not None:
                return check_signal_block(signal_fn(model, xb, yb), stop - start)
            out = model(xb)
            if kind == "embeddings":
                return None
            assert yb is not None
            return classification_signals(extract_logits(out), yb, names)

        return forward_in_batches(
            model,
            x.shape[0],
            spec,
            signals_of=signals_of,
            forward=lambda start, stop: model(x[start:stop]),
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def crafted(
        cls,
        data: Any,
        *,
        num_classes: int,
        size: int = 64,
        seed: int = 0,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], CanarySet]:
        """Mislabeled canaries: a worst-case question, not the natural one.

        Draws ``2 * size`` samples from ``data`` (which must not be in the training set) and
        gives each a label that is certainly wrong. Add the first half to the training set;
        the second half is never trained on. A model can only fit a wrong label by memorising
        that one sample, so these canaries measure *worst-case memorisation* (how much the
        model can reveal about an outlier it was given), not what an attacker learns about
        ordinary data (natural canaries, :meth:`split`); BENCHMARKS.md compares the two on
        the same models.

        Args:
            data: A ``Dataset`` yielding ``(input, label)`` or a pair ``(inputs, labels)``,
                held out from training. One-hot labels give one-hot ``to_train`` labels.
            num_classes: Number of classes (a wrong label is drawn among the others).
            size: Canaries per side.
            seed: Seed of the draw and of the wrong labels.

        Returns:
            ``(to_train, canaries)``: the ``(inputs, wrong_labels)`` pair to add to the
            training set, and the :class:`CanarySet` (its members are exactly ``to_train``).

        Example:
            >>> import torch
            >>> x, y = torch.randn(200, 4), torch.randint(0, 3, (200,))
            >>> (x_in, y_in), canaries = CanarySet.crafted((x, y), num_classes=3, size=10)
            >>> len(x_in), canaries.num_members, canaries.num_non_members
            (10, 10, 10)
        """
        positive_int("size", size)
        positive_int("num_classes", num_classes, minimum=2)
        n = _length(data)
        if 2 * size > n:
            raise CanaryError(f"crafted(size={size}) needs at least {2 * size} samples, got {n}")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=g)[: 2 * size].tolist()
        x, y = _select(data if isinstance(data, (tuple, list)) else _pairs(data), idx)
        one_hot = y.dim() == 2 and y.shape[1] > 1
        wrong = wrong_labels(_class_indices("data", y, num_classes).long(), num_classes, g)
        canaries = cls(members=(x[:size], wrong[:size]), non_members=(x[size:], wrong[size:]),
                       num_classes=num_classes)
        # the labels to train on come in the form the data gave them (one-hot stays one-hot)
        train_labels = (
            torch.nn.functional.one_hot(wrong[:size], num_classes).to(y.dtype) if one_hot
            else wrong[:size]
        )
        to_train = (x[:size], train_labels)
        return to_train, canaries

    @classmethod
    def for_audit(
        cls,
        data: Any,
        *,
        num_classes: int | None = None,
        size: int = 256,
        seed: int = 0,
        mislabel: bool = True,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], CanarySet]:
        """Canaries for a privacy audit: each put into training by its own fair coin.

        Draws ``size`` samples from ``data`` (which must not be in the training set) and
        flips an independent fair coin for each: heads, it is added to the training set (a
        member); tails, it never is. This is the design of the one-run audit (Steinke, Nasr
        and Jagielski, 2023) under which a monitor reports ``epsilon_lower_bound``, an
        empirical lower bound on the run's differential-privacy ε
        (``docs/science.md#dp-audit``); the numbers of members and non-members are random
        (about ``size / 2`` each). With ``mislabel`` (the default) each canary gets a label
        that is certainly wrong, as in :meth:`crafted`: a model can fit it only by
        memorising that one sample, the worst case that a DP guarantee must cover, so the
        audit's bound is as high as a black-box attacker can push it.

        Args:
            data: A ``Dataset`` yielding ``(input, label)`` or a pair ``(inputs, labels)``,
                held out from training.
            num_classes: Number of classes (needed with ``mislabel``).
            size: Canaries in all, ``m``: the best bound grows with it (the table in
                ``docs/science.md#dp-audit``).
            seed: Seed of the draw, the coins and the wrong labels.
            mislabel: Give each canary a wrong label.

        Returns:
            ``(to_train, canaries)``: the ``(inputs, labels)`` pair to add to the training
            set (the members, in the form the data gave its labels), and the
            :class:`CanarySet` with ``random_inclusion=True``.

        Raises:
            CanaryError: On too few samples, or a draw whose coins leave a side empty.

        Example:
            >>> import torch
            >>> x, y = torch.randn(300, 4), torch.randint(0, 3, (300,))
            >>> (x_in, y_in), canaries = CanarySet.for_audit((x, y), num_classes=3, size=200)
            >>> len(x_in) == canaries.num_members, len(canaries), canaries.random_inclusion
            (True, 200, True)
        """
        positive_int("size", size, minimum=2)
        positive_int("seed", seed, minimum=0)
        mislabel = _flag("mislabel", mislabel)
        if mislabel:
            if num_classes is None:
                raise CanaryError("for_audit(mislabel=True) needs `num_classes`, got None")
            positive_int("num_classes", num_classes, minimum=2)
        n = _length(data)
        if size > n:
            raise CanaryError(f"for_audit(size={size}) needs at least {size} samples, got {n}")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=g)[:size].tolist()
        # a Dataset is read only where drawn
        x, y = (_select(data, idx) if isinstance(data, (tuple, list))
                else _pairs(Subset(data, idx)))
        heads = torch.rand(size, generator=g) < 0.5
        if bool(heads.all()) or not bool(heads.any()):
            raise CanaryError(
                f"for_audit: the coins of seed {seed} put all {size} canaries on one side; "
                "use more canaries or another seed"
            )
        one_hot = y.dim() == 2 and y.shape[1] > 1
        labels = _class_indices("data", y, num_classes)
        if labels is None or labels.is_floating_point() or labels.dtype == torch.bool:
            raise CanaryError(
                "for_audit needs integer class labels (or one-hot rows), got "
                f"{'none' if labels is None else labels.dtype}")
        labels = labels.long()
        if num_classes is not None:
            outside = int(((labels < 0) | (labels >= num_classes)).sum())
            if outside:
                raise CanaryError(f"for_audit: {outside} label(s) fall outside "
                                  f"[0, {num_classes})")
        if mislabel:
            assert num_classes is not None
            labels = wrong_labels(labels, num_classes, g)
        canaries = cls(members=(x[heads], labels[heads]), non_members=(x[~heads], labels[~heads]),
                       num_classes=num_classes, random_inclusion=True)
        train_labels = (
            torch.nn.functional.one_hot(labels[heads], y.shape[1]).to(y.dtype) if one_hot
            else labels[heads]
        )
        return (x[heads], train_labels), canaries

    @classmethod
    def split(
        cls,
        dataset: Any,
        *,
        size: int = 64,
        seed: int = 0,
        num_classes: int | None = None,
        check_overlap: bool = True,
    ) -> tuple[Any, CanarySet]:
        """Carve a canary set out of one dataset.

        Draws ``size`` members and ``size`` non-members at random. The returned training
        part keeps the members and drops the non-members, so training on it makes the
        members real members.

        A dataset that holds the same sample twice could leave a copy of a drawn non-member
        in the training part: that "non-member" would then be trained on, and the check
        would understate the leak. So every sample of the training part is hashed (as the
        overlap check of :class:`CanarySet` hashes; ``-0.0`` and ``0.0`` count as equal) and
        ``split`` *refuses*, with a :class:`CanaryError` giving the count, when a drawn
        non-member has an exact duplicate left there: deduplicate the data first (for
        tensors, ``torch.unique(x, dim=0, return_inverse=True)`` finds the copies). It
        refuses rather than drops the copies, so that the training part is always the
        dataset less exactly the non-members drawn. Data without duplicates gives the same
        split as ever. For a ``Dataset`` the check reads every sample once; pass
        ``check_overlap=False`` to skip it (a large dataset read from disk, or one with
        random transforms, where two reads of one sample differ anyway).

        Args:
            dataset: A ``Dataset`` yielding ``(input, label)`` or a pair ``(inputs, labels)``.
            size: Canaries per side.
            seed: Seed of the draw.
            num_classes: Passed to the :class:`CanarySet` checks.
            check_overlap: Refuse a drawn non-member that has a duplicate in the training
                part (see above).

        Returns:
            ``(train_part, canaries)``: a ``Subset`` for a Dataset, a pair of tensors for a
            pair.

        Raises:
            CanaryError: On too few samples, on the checks of :class:`CanarySet`, or on a
                drawn non-member with a duplicate in the training part.

        Example:
            >>> import torch
            >>> x, y = torch.randn(200, 4), torch.randint(0, 2, (200,))
            >>> (x_train, y_train), canaries = CanarySet.split((x, y), size=16)
            >>> len(x_train), canaries.num_members, canaries.num_non_members
            (184, 16, 16)
        """
        positive_int("size", size)
        check_overlap = _flag("check_overlap", check_overlap)
        n = _length(dataset)
        if 2 * size > n:
            raise CanaryError(f"split(size={size}) needs at least {2 * size} samples, got {n}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        member_idx, non_member_idx = order[:size], order[size : 2 * size]
        dropped = set(non_member_idx)
        keep = [i for i in range(n) if i not in dropped]
        non_members = _select(dataset, non_member_idx)
        if check_overlap:
            # Before the CanarySet checks: a non-member equal to a member is such a copy too,
            # and this message says what to do about it.
            inputs, _ = _unpack("non_members", non_members)
            copies = _present_in(inputs, dataset, keep) if inputs.dim() > 0 else 0
            if copies:
                raise CanaryError(
                    f"split: {copies} of the {size} drawn non-member(s) have an exact "
                    "duplicate left in the training part (the dataset holds the same sample "
                    "more than once), so they would be trained on: deduplicate the data "
                    "first, or pass check_overlap=False to accept it"
                )
        canaries = cls(
            members=_select(dataset, member_idx),
            non_members=non_members,
            num_classes=num_classes,
        )
        return _select(dataset, keep), canaries

    @classmethod
    def from_datasets(
        cls,
        train: Any,
        holdout: Any,
        *,
        size: int = 64,
        seed: int = 0,
        num_classes: int | None = None,
        check_overlap: bool = True,
    ) -> CanarySet:
        """Draw members from the training set and non-members from a held-out set.

        The non-members must never be trained on, so ``holdout`` may not be ``train``
        itself, and a drawn non-member equal to any sample of ``train`` (hashed as the
        overlap check of :class:`CanarySet` hashes) is refused with a :class:`CanaryError`
        giving the count. For a ``Dataset`` that check reads every sample of ``train``
        once; pass ``check_overlap=False`` to skip it (a large training set read from disk,
        or one with random transforms).

        Args:
            train: The training data (a ``Dataset`` or a pair ``(inputs, labels)``).
            holdout: Data of the same distribution, never trained on.
            size: Canaries per side.
            seed: Seed of the draw.
            num_classes: Passed to the :class:`CanarySet` checks.
            check_overlap: Refuse non-members equal to a sample of ``train`` (see above).

        Example:
            >>> import torch
            >>> train = (torch.randn(100, 4), torch.randint(0, 2, (100,)))
            >>> holdout = (torch.randn(50, 4), torch.randint(0, 2, (50,)))
            >>> CanarySet.from_datasets(train, holdout, size=20).num_non_members
            20
        """
        positive_int("size", size)
        check_overlap = _flag("check_overlap", check_overlap)
        if _same_data(train, holdout):
            raise CanaryError(
                "from_datasets: `holdout` is the training set itself, so its samples are "
                "trained on: give data held out from training as `holdout`"
            )
        picks = []
        g = torch.Generator().manual_seed(seed)
        for name, data in (("train", train), ("holdout", holdout)):
            n = _length(data)
            if n < size:
                raise CanaryError(
                    f"from_datasets(size={size}) needs {size} {name} samples, got {n}"
                )
            picks.append(_select(data, torch.randperm(n, generator=g)[:size].tolist()))
        if check_overlap:
            # Before the CanarySet checks: a non-member equal to a drawn member is such a
            # sample too, and this message says where the trouble lies.
            inputs, _ = _unpack("non_members", picks[1])
            copies = _present_in(inputs, train, None) if inputs.dim() > 0 else 0
            if copies:
                raise CanaryError(
                    f"from_datasets: {copies} of the {size} non-member(s) drawn from `holdout` "
                    "equal a sample of `train`, so they are trained on: draw non-members from "
                    "data held out from training (deduplicate `holdout` against `train`)"
                )
        return cls(members=picks[0], non_members=picks[1], num_classes=num_classes)

    @classmethod
    def from_sequences(
        cls,
        members: Any,
        non_members: Any,
        *,
        pad_token_id: int | None = None,
        vocab_size: int | None = None,
        decode: Callable[[list[int]], str | bytes] | None = None,
    ) -> SequenceCanarySet:
        """Token-sequence canaries of a causal language model: a :class:`SequenceCanarySet`.

        A shortcut for ``SequenceCanarySet(members, non_members, ...)``; see there.

        Example:
            >>> import torch
            >>> ids = torch.randint(1, 50, (40, 16), generator=torch.Generator().manual_seed(0))
            >>> CanarySet.from_sequences(ids[:20], ids[20:], vocab_size=50)
            SequenceCanarySet(members=20, non_members=20, sequence_length=16, vocab_size=50)
        """
        from fesmia_hooks.sequences import SequenceCanarySet

        return SequenceCanarySet(
            members, non_members, pad_token_id=pad_token_id, vocab_size=vocab_size, decode=decode
        )


def wrong_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A label that is certainly wrong for every sample, drawn among the other classes.

    Example:
        >>> y = torch.tensor([0, 1, 2, 2])
        >>> bool((wrong_labels(y, 3, torch.Generator().manual_seed(0)) != y).all())
        True
    """
    shift = torch.randint(1, num_classes, (len(y),), generator=generator)
    return (y.long() + shift) % num_classes


def _pairs(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``Dataset`` of ``(input, label)`` as one pair of stacked tensors."""
    x, y = _stack_dataset("data", dataset)
    if y is None:
        raise CanaryError("crafted canaries need labelled samples (input, label)")
    return x, y


def _length(data: Any) -> int:
    if isinstance(data, (tuple, list)) and len(data) == 2:
        n0, n1 = len(data[0]), len(data[1])
        if n0 != n1:
            raise CanaryError(f"inputs and labels must have one length, got {n0} and {n1}")
        return int(n0)
    try:
        return len(data)
    except TypeError as exc:
        raise CanaryError(
            f"expected a Dataset or a pair (inputs, labels), got {type(data).__name__}"
        ) from exc


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"`{name}` must be True or False, got {type(value).__name__}")
    return value


def _same_data(train: Any, holdout: Any) -> bool:
    """Whether ``holdout`` is ``train`` itself (the same object, or pairs of one tensor)."""
    if train is holdout:
        return True
    pairs = all(isinstance(d, (tuple, list)) and len(d) == 2 for d in (train, holdout))
    return pairs and train[0] is holdout[0]


_BLOCK_BYTES = 2**26  # at most this many bytes of a pair's inputs are hashed at once


def _present_in(targets: torch.Tensor, data: Any, indices: list[int] | None) -> int:
    """How many rows of ``targets`` equal a sample of ``data`` (its ``indices`` if given).

    Samples are compared by :func:`_fingerprints`; one of another shape or dtype than the
    rows never equals one. ``data`` is a pair ``(inputs, labels)``, hashed in blocks of
    about 64 MiB, or a ``Dataset``, read one sample at a time. Only a count comes out.
    """
    wanted = _fingerprints(targets)
    pending = set(wanted)
    found: set[bytes] = set()
    shape, dtype = tuple(targets.shape[1:]), targets.dtype
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x = _to_tensor("data inputs", data[0])
        if x.dim() == 0 or tuple(x.shape[1:]) != shape or x.dtype != dtype:
            return 0
        allowed = None
        if indices is not None:
            allowed = [False] * x.shape[0]
            for i in indices:
                allowed[i] = True
        rows = max(1, _BLOCK_BYTES // max(1, math.prod(shape) * x.element_size()))
        for start in range(0, x.shape[0], rows):
            for i, h in enumerate(_fingerprints(x[start : start + rows]), start):
                if h in pending and (allowed is None or allowed[i]):
                    found.add(h)
    else:
        for i in range(len(data)) if indices is None else indices:
            item = data[i]
            sample = item[0] if isinstance(item, (tuple, list)) and len(item) >= 2 else item
            t = _to_tensor("data inputs", sample)
            if tuple(t.shape) != shape or t.dtype != dtype:
                continue
            h = _fingerprints(t[None])[0]
            if h in pending:
                found.add(h)
                pending.discard(h)
                if not pending:
                    break
    return sum(h in found for h in wanted)


def _select(data: Any, idx: list[int]) -> Any:
    if isinstance(data, (tuple, list)) and len(data) == 2:
        index = torch.as_tensor(idx, dtype=torch.long)
        return tuple(_to_tensor("data", part)[index] for part in data)
    return Subset(data, idx)
