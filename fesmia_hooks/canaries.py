"""The canary set: a few samples known to be trained on, and a few known never to be.

Two kinds of canaries share one class: samples of a classifier (inputs and class labels,
:class:`CanarySet` itself, :meth:`CanarySet.split`, :meth:`CanarySet.from_datasets`) and token
sequences of a causal language model (:meth:`CanarySet.from_sequences`).

Canary data is private. Nothing in this module, nor anywhere in fesmia-hooks, writes canary
inputs or labels to a log, a report, a history file, an exception message or a state dict.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from fesmia_hooks._validation import positive_int
from fesmia_hooks.exceptions import CanaryError, ConfigurationError
from fesmia_hooks.text import IGNORE_INDEX, zlib_lengths

__all__ = ["CanarySet", "wrong_labels"]

Side = Union[tuple[Any, Any], Dataset, torch.Tensor, np.ndarray]  # noqa: UP007
TokenSide = Union[torch.Tensor, np.ndarray, Sequence[Sequence[int]], Mapping[str, Any]]  # noqa: UP007


def _to_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.ascontiguousarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CanaryError(
            f"{name} must be a tensor, an array or a sequence of numbers, "
            f"got {type(value).__name__}"
        ) from exc


def _stack_dataset(name: str, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise CanaryError(f"{name}: a Dataset must define __len__") from exc
    xs, ys = [], []
    for i in range(n):
        item = dataset[i]
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            xs.append(_to_tensor(f"{name} inputs", item[0]))
            ys.append(_to_tensor(f"{name} labels", item[1]))
        else:
            xs.append(_to_tensor(f"{name} inputs", item))
    if not xs:
        return torch.empty(0), None
    try:
        x = torch.stack(xs)
        y = torch.stack(ys).reshape(len(ys)) if ys else None
    except RuntimeError as exc:
        raise CanaryError(f"{name}: samples of the Dataset do not all have one shape") from exc
    return x, y


def _unpack(name: str, side: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(side, Dataset) and not isinstance(side, (torch.Tensor, np.ndarray)):
        return _stack_dataset(name, side)
    if isinstance(side, (tuple, list)) and len(side) == 2 and not _is_number_sequence(side):
        return _to_tensor(f"{name} inputs", side[0]), _to_tensor(f"{name} labels", side[1])
    return _to_tensor(f"{name} inputs", side), None


def _is_number_sequence(side: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) for v in side)


def _fingerprints(x: torch.Tensor) -> list[bytes]:
    flat = x.reshape(x.shape[0], -1).contiguous().cpu().view(torch.uint8).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


class CanarySet:
    """Members (trained on) and non-members (never trained on) of one data distribution.

    Args:
        members: Samples that are, or will be, in the training set: a pair ``(inputs,
            labels)`` of tensors or arrays, a ``torch.utils.data.Dataset`` yielding
            ``(input, label)``, or inputs alone when labels are not needed.
        non_members: Samples of the same distribution that are never trained on, in the
            same form as ``members``.
        num_classes: When given, labels are checked to lie in ``[0, num_classes)``.

    Raises:
        CanaryError: On empty sides, shapes or dtypes that disagree, non-integer or
            out-of-range labels, non-finite inputs, or a sample present on both sides.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(40, 8, generator=g)
        >>> y = torch.randint(0, 3, (40,), generator=g)
        >>> canaries = CanarySet(members=(x[:20], y[:20]), non_members=(x[20:], y[20:]))
        >>> canaries
        CanarySet(members=20, non_members=20, input_shape=(8,), labels=yes)
    """

    def __init__(
        self,
        members: Side,
        non_members: Side,
        *,
        num_classes: int | None = None,
    ) -> None:
        xm, ym = _unpack("members", members)
        xn, yn = _unpack("non_members", non_members)
        self._validate(xm, ym, xn, yn, num_classes)
        self.inputs = torch.cat([xm, xn]).contiguous()
        self.labels = None if ym is None or yn is None else torch.cat([ym, yn]).long()
        self.num_members = int(xm.shape[0])
        self.num_non_members = int(xn.shape[0])
        self.num_classes = num_classes
        self._device_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # Token sequences only (see from_sequences); None for classification canaries.
        self.attention_mask: torch.Tensor | None = None
        self.zlib_bytes: torch.Tensor | None = None
        self.vocab_size: int | None = None
        self.pad_token_id: int | None = None
        self._sequence_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

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

    def require(self, per_side: int, *, who: str = "the probe") -> None:
        """Raise :class:`CanaryError` unless each side holds at least ``per_side`` samples."""
        small = min(self.num_members, self.num_non_members)
        if small < per_side:
            raise CanaryError(
                f"{who} needs at least {per_side} members and {per_side} non-members "
                f"(shots + queries), got {self.num_members} members and "
                f"{self.num_non_members} non-members"
            )

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self.num_members + self.num_non_members

    def __repr__(self) -> str:
        if self.is_sequence:
            return (
                f"CanarySet(members={self.num_members}, non_members={self.num_non_members}, "
                f"sequence_length={self.inputs.shape[1]}, vocab_size={self.vocab_size})"
            )
        shape = tuple(self.inputs.shape[1:])
        labels = "yes" if self.labels is not None else "no"
        return (
            f"CanarySet(members={self.num_members}, non_members={self.num_non_members}, "
            f"input_shape={shape}, labels={labels})"
        )

    @property
    def is_member(self) -> torch.Tensor:
        """Boolean ``[len(self)]``: members first, then non-members."""
        flags = torch.zeros(len(self), dtype=torch.bool)
        flags[: self.num_members] = True
        return flags

    @property
    def is_sequence(self) -> bool:
        """Whether the canaries are token sequences (built by :meth:`from_sequences`)."""
        return getattr(self, "attention_mask", None) is not None

    def on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inputs and labels on ``device``; moved once, then served from a cache.

        For token sequences these are the token ids ``[N, T]`` and the next-token targets
        ``[N, T]`` (``targets[:, t]`` is scored against the logits at position ``t``;
        ``-100`` where nothing is scored).
        """
        key = str(torch.device(device))
        if key not in self._device_cache:
            x = self.inputs.to(device)
            y = None if self.labels is None else self.labels.to(device)
            self._device_cache[key] = (x, y)
        return self._device_cache[key]

    def sequences_on(
        self, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids, attention mask and zlib lengths on ``device`` (token sequences only).

        Raises:
            CanaryError: When the canaries are not token sequences.
        """
        if self.attention_mask is None or self.zlib_bytes is None:
            raise CanaryError(
                "these canaries are not token sequences; build them with "
                "CanarySet.from_sequences"
            )
        key = str(torch.device(device))
        if key not in self._sequence_cache:
            x, _ = self.on(device)
            self._sequence_cache[key] = (
                x, self.attention_mask.to(device), self.zlib_bytes.to(device)
            )
        return self._sequence_cache[key]

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
        ordinary data (natural canaries, :meth:`split`). Measured on the benchmark's clean
        digits MLP: attack AUC 1.00 on crafted canaries against 0.68 on natural ones.

        Args:
            data: A ``Dataset`` yielding ``(input, label)`` or a pair ``(inputs, labels)``,
                held out from training.
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
        y = y.long()
        wrong = wrong_labels(y, num_classes, g)
        to_train = (x[:size], wrong[:size])
        canaries = cls(members=to_train, non_members=(x[size:], wrong[size:]),
                       num_classes=num_classes)
        return to_train, canaries

    @classmethod
    def split(
        cls,
        dataset: Any,
        *,
        size: int = 64,
        seed: int = 0,
        num_classes: int | None = None,
    ) -> tuple[Any, CanarySet]:
        """Carve a canary set out of one dataset.

        Draws ``size`` members and ``size`` non-members at random. The returned training
        part keeps the members and drops the non-members, so training on it makes the
        members real members.

        Args:
            dataset: A ``Dataset`` yielding ``(input, label)`` or a pair ``(inputs, labels)``.
            size: Canaries per side.
            seed: Seed of the draw.
            num_classes: Passed to the :class:`CanarySet` checks.

        Returns:
            ``(train_part, canaries)``: a ``Subset`` for a Dataset, a pair of tensors for a
            pair.

        Example:
            >>> import torch
            >>> x, y = torch.randn(200, 4), torch.randint(0, 2, (200,))
            >>> (x_train, y_train), canaries = CanarySet.split((x, y), size=16)
            >>> len(x_train), canaries.num_members, canaries.num_non_members
            (184, 16, 16)
        """
        positive_int("size", size)
        n = _length(dataset)
        if 2 * size > n:
            raise CanaryError(f"split(size={size}) needs at least {2 * size} samples, got {n}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        member_idx, non_member_idx = order[:size], order[size : 2 * size]
        dropped = set(non_member_idx)
        keep = [i for i in range(n) if i not in dropped]
        canaries = cls(
            members=_select(dataset, member_idx),
            non_members=_select(dataset, non_member_idx),
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
    ) -> CanarySet:
        """Draw members from the training set and non-members from a held-out set.

        Example:
            >>> import torch
            >>> train = (torch.randn(100, 4), torch.randint(0, 2, (100,)))
            >>> holdout = (torch.randn(50, 4), torch.randint(0, 2, (50,)))
            >>> CanarySet.from_datasets(train, holdout, size=20).num_non_members
            20
        """
        positive_int("size", size)
        picks = []
        g = torch.Generator().manual_seed(seed)
        for name, data in (("train", train), ("holdout", holdout)):
            n = _length(data)
            if n < size:
                raise CanaryError(
                    f"from_datasets(size={size}) needs {size} {name} samples, got {n}"
                )
            picks.append(_select(data, torch.randperm(n, generator=g)[:size].tolist()))
        return cls(members=picks[0], non_members=picks[1], num_classes=num_classes)


    @classmethod
    def from_sequences(
        cls,
        members: TokenSide,
        non_members: TokenSide,
        *,
        pad_token_id: int | None = None,
        vocab_size: int | None = None,
        decode: Callable[[list[int]], str | bytes] | None = None,
    ) -> CanarySet:
        """Canaries of a causal language model: token sequences known in and out of training.

        Each side is one of:

        * a ``LongTensor`` or integer array ``[n, T]``: every position is a token, except
          positions equal to ``pad_token_id`` when it is given;
        * a list of 1-D token sequences of any lengths: padded on the right with
          ``pad_token_id`` (0 when it is not given) and masked;
        * a mapping with ``"input_ids"`` and optionally ``"attention_mask"`` and
          ``"labels"``, as a Hugging Face tokenizer (``padding=True``) or data collator
          returns. ``labels`` follow Hugging Face's convention: aligned with the inputs,
          ``-100`` where a token is not scored (a prompt, say); the shift happens here.

        The two sides are padded to one length ``T``. Next-token targets are the inputs
        (or ``labels``) shifted by one: ``targets[:, t] = input_ids[:, t + 1]``, scored
        only where positions ``t`` and ``t + 1`` are both unmasked (and the label is not
        ``-100``); every other target is ``-100``. Masked positions of the token ids are
        overwritten with ``pad_token_id`` when it is given.

        The zlib-compressed length of each sequence (for the ``zlib`` signal of
        :mod:`fesmia_hooks.text`) is computed here, once: of ``decode(tokens)`` encoded as
        UTF-8 when ``decode`` is given (``tokenizer.decode``, as Carlini et al. 2021
        compress the text), otherwise of the unmasked token ids packed in the fewest bytes
        per id (for a byte- or character-level vocabulary that is the text itself).

        Pass ``attention_mask`` explicitly (the mapping form) when the pad token also occurs
        inside the text, as with GPT-2 whose pad token is its end-of-text token: with the
        tensor form every occurrence of ``pad_token_id`` is masked.

        Args:
            members: Sequences that are, or will be, in the training data.
            non_members: Sequences of the same distribution that are never trained on.
            pad_token_id: Token id of padding (a non-negative int).
            vocab_size: When given, token ids and labels are checked to lie in
                ``[0, vocab_size)``.
            decode: ``decode(list_of_token_ids) -> str | bytes``, used for the zlib lengths
                only.

        Returns:
            A :class:`CanarySet` whose :attr:`inputs` are the token ids ``[N, T]``,
            :attr:`labels` the next-token targets ``[N, T]``, plus :attr:`attention_mask`
            ``[N, T]`` and :attr:`zlib_bytes` ``[N]``.

        Raises:
            CanaryError: On non-integer or out-of-range ids, a mask that is not 0/1 or does
                not match, a sequence with fewer than two unmasked tokens or no scored
                target, or a sequence present on both sides.

        Example:
            >>> import torch
            >>> g = torch.Generator().manual_seed(0)
            >>> ids = torch.randint(1, 50, (40, 16), generator=g)
            >>> canaries = CanarySet.from_sequences(ids[:20], ids[20:], vocab_size=50)
            >>> canaries
            CanarySet(members=20, non_members=20, sequence_length=16, vocab_size=50)
            >>> bool((canaries.labels[:, :-1] == ids[:, 1:]).all()), canaries.labels[0, -1].item()
            (True, -100)
            >>> short = CanarySet.from_sequences([[5, 6, 7], [8, 9]], [[1, 2, 3, 4]],
            ...                                  pad_token_id=0)
            >>> short.inputs.tolist(), short.attention_mask.tolist()
            ([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]], [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
            >>> short.labels.tolist()
            [[6, 7, -100, -100], [9, -100, -100, -100], [2, 3, 4, -100]]
        """
        if vocab_size is not None:
            positive_int("vocab_size", vocab_size)
        if pad_token_id is not None:
            if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or (
                pad_token_id < 0
            ):
                raise CanaryError(
                    f"`pad_token_id` must be a non-negative int, got {pad_token_id!r}"
                )
            if vocab_size is not None and pad_token_id >= vocab_size:
                raise CanaryError(
                    f"`pad_token_id` must lie in [0, {vocab_size}), got {pad_token_id}"
                )
        if decode is not None and not callable(decode):
            raise CanaryError(f"`decode` must be callable, got {type(decode).__name__}")
        sides = [
            _token_side(name, side, pad_token_id)
            for name, side in (("members", members), ("non_members", non_members))
        ]
        length = max(ids.shape[1] for ids, _, _ in sides)
        fill = 0 if pad_token_id is None else pad_token_id
        ids_parts, mask_parts, target_parts = [], [], []
        for name, (ids, mask, labels) in zip(("members", "non_members"), sides, strict=True):
            ids, mask, labels = (
                _pad_right(t, length, v)
                for t, v in ((ids, fill), (mask, 0), (labels, IGNORE_INDEX))
            )
            if pad_token_id is not None:
                ids = ids.masked_fill(mask == 0, pad_token_id)
            _check_tokens(name, ids, mask, labels, vocab_size)
            ids_parts.append(ids)
            mask_parts.append(mask)
            target_parts.append(_shift_targets(labels, mask))
        for name, targets in zip(("members", "non_members"), target_parts, strict=True):
            empty = int(((targets != IGNORE_INDEX).sum(1) == 0).sum())
            if empty:
                raise CanaryError(
                    f"every sequence needs at least one scored next-token target; {empty} "
                    f"{name} sequence(s) have none (all labels -100)"
                )
        shared = set(_token_fingerprints(ids_parts[0], mask_parts[0])) & set(
            _token_fingerprints(ids_parts[1], mask_parts[1])
        )
        if shared:
            raise CanaryError(
                f"{len(shared)} sequence(s) appear among both members and non_members; "
                "the two sides must be disjoint"
            )
        obj = cls.__new__(cls)
        obj.inputs = torch.cat(ids_parts).contiguous()
        obj.labels = torch.cat(target_parts).contiguous()
        obj.num_members = int(ids_parts[0].shape[0])
        obj.num_non_members = int(ids_parts[1].shape[0])
        obj.num_classes = None
        obj._device_cache = {}
        obj.attention_mask = torch.cat(mask_parts).contiguous()
        try:
            obj.zlib_bytes = zlib_lengths(obj.inputs, obj.attention_mask, decode=decode)
        except ConfigurationError as exc:
            raise CanaryError(str(exc)) from exc
        obj.vocab_size = vocab_size
        obj.pad_token_id = pad_token_id
        obj._sequence_cache = {}
        return obj


def _integer_tokens(name: str, value: Any) -> torch.Tensor:
    t = _to_tensor(name, value)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise CanaryError(f"{name} must be integer token ids, got {t.dtype}")
    return t.long()


def _token_side(
    name: str, side: Any, pad_token_id: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, mask, labels)`` of one side, each ``[n, T]`` long; labels unshifted."""
    labels: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    if isinstance(side, Mapping):
        if "input_ids" not in side:
            raise CanaryError(
                f"{name} as a mapping needs 'input_ids' (and optionally 'attention_mask', "
                f"'labels'), got keys {sorted(map(str, side))}"
            )
        ids = _integer_tokens(f"{name} input_ids", side["input_ids"])
        if side.get("attention_mask") is not None:
            mask = _integer_tokens(f"{name} attention_mask", side["attention_mask"])
        if side.get("labels") is not None:
            labels = _integer_tokens(f"{name} labels", side["labels"])
    elif isinstance(side, (torch.Tensor, np.ndarray)):
        ids = _integer_tokens(f"{name} token ids", side)
    elif isinstance(side, Sequence) and not isinstance(side, (str, bytes)):
        rows = [_integer_tokens(f"{name} token ids", row) for row in side]
        if not rows:
            raise CanaryError(f"{name} must hold at least one sequence, got none")
        bad = [tuple(r.shape) for r in rows if r.dim() != 1]
        if bad:
            raise CanaryError(
                f"{name} as a list must hold 1-D token sequences, got a sample of shape {bad[0]}"
            )
        length = max(len(r) for r in rows)
        fill = 0 if pad_token_id is None else pad_token_id
        ids = torch.full((len(rows), length), fill, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
    else:
        raise CanaryError(
            f"{name} must be token ids [n, T], a list of token sequences or a mapping with "
            f"'input_ids', got {type(side).__name__}"
        )
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise CanaryError(
            f"{name} token ids must be [sequences, length] with at least one sequence, "
            f"got shape {tuple(ids.shape)}"
        )
    if mask is None:
        mask = torch.ones_like(ids) if pad_token_id is None else (ids != pad_token_id).long()
    for what, t in (("attention_mask", mask), ("labels", labels)):
        if t is not None and t.shape != ids.shape:
            raise CanaryError(
                f"{name} {what} must have the shape of its token ids {tuple(ids.shape)}, "
                f"got {tuple(t.shape)}"
            )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise CanaryError(f"{name} attention_mask must hold only 0 and 1")
    short = int((mask.sum(1) < 2).sum())
    if short:
        raise CanaryError(
            f"every sequence needs at least 2 unmasked tokens (one next-token target); "
            f"{short} {name} sequence(s) have fewer"
        )
    if labels is None:
        labels = ids.clone()
    return ids, mask, labels


def _pad_right(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    pad = torch.full((t.shape[0], length - t.shape[1]), value, dtype=t.dtype)
    return torch.cat([t, pad], dim=1)


def _check_tokens(
    name: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None,
) -> None:
    # Messages give counts, never token values: canary text stays private.
    allowed = f"[0, {vocab_size})" if vocab_size is not None else "[0, vocab_size)"
    bad = int(((ids < 0) | (ids >= vocab_size if vocab_size is not None else False)).sum())
    if bad:
        raise CanaryError(
            f"{name} token ids must lie in {allowed}, got {bad} id(s) outside it; masked "
            "positions are overwritten only when `pad_token_id` is given"
        )
    scored = labels[(mask == 1) & (labels != IGNORE_INDEX)]
    if scored.numel():
        bad = int(((scored < 0) | (scored >= vocab_size if vocab_size is not None else False))
                  .sum())
        if bad:
            raise CanaryError(
                f"{name} labels must be -100 or lie in {allowed}, got {bad} label(s) outside it"
            )


def _shift_targets(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the logits: ``-100`` where nothing is scored."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    scored = (mask[:, :-1] == 1) & (mask[:, 1:] == 1) & (labels[:, 1:] != IGNORE_INDEX)
    targets[:, :-1] = torch.where(scored, labels[:, 1:], IGNORE_INDEX)
    return targets


def _valid_tokens(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [row[keep.bool()] for row, keep in zip(ids, mask, strict=True)]


def _token_fingerprints(ids: torch.Tensor, mask: torch.Tensor) -> list[bytes]:
    return [
        hashlib.blake2b(row.numpy().astype(np.int64).tobytes(), digest_size=16).digest()
        for row in _valid_tokens(ids, mask)
    ]


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


def _select(data: Any, idx: list[int]) -> Any:
    if isinstance(data, (tuple, list)) and len(data) == 2:
        index = torch.as_tensor(idx, dtype=torch.long)
        return tuple(_to_tensor("data", part)[index] for part in data)
    return Subset(data, idx)
