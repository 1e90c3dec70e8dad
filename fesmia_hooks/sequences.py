"""Token-sequence canaries of a causal language model.

A :class:`SequenceCanarySet` holds token ids ``[N, T]``, an attention mask ``[N, T]``,
next-token targets ``[N, T]`` (``targets[:, t]`` is scored against the logits at position
``t``; ``-100`` where nothing is scored) and the zlib-compressed length of each sequence.
Its forward pass (:meth:`SequenceCanarySet.features`) gives the model the token ids (and
``attention_mask=`` when its ``forward`` names it), reads ``[B, T, V]`` logits, and reduces
them to the sequence signals of :mod:`fesmia_hooks.text`, in batches sized so that the
model never returns more than a bounded number of logits at once.

Messages give counts, never token values: canary text stays private.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Union

import numpy as np
import torch
from torch import nn

from fesmia_hooks._validation import boolean, positive_int
from fesmia_hooks.canaries import Canaries, _to_tensor
from fesmia_hooks.exceptions import CanaryError, ConfigurationError, ProbeError
from fesmia_hooks.features import (
    Features,
    FeatureSpec,
    check_signal_block,
    forward_in_batches,
    select_rows,
)
from fesmia_hooks.guard import model_device
from fesmia_hooks.text import (
    DEFAULT_SEQUENCE_SIGNALS,
    IGNORE_INDEX,
    SEQUENCE_SIGNALS,
    SequenceSignals,
    decoded_texts,
    forward_logits,
    zlib_lengths,
)

__all__ = ["SequenceCanarySet"]

TokenSide = Union[torch.Tensor, np.ndarray, Sequence[Sequence[int]], Mapping[str, Any]]  # noqa: UP007


class SequenceCanarySet(Canaries):
    """Canaries of a causal language model: token sequences known in and out of training."""

    kind: ClassVar[str] = "sequences"
    is_sequence: ClassVar[bool] = True

    def __init__(
        self,
        members: TokenSide,
        non_members: TokenSide,
        *,
        pad_token_id: int | None = None,
        vocab_size: int | None = None,
        decode: Callable[[list[int]], str | bytes] | None = None,
        random_inclusion: bool = False,
    ) -> None:
        """Token sequences known in (members) and out of (non-members) training.

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
            random_inclusion: Declare that each sequence was put into training by an
                independent fair coin (see :class:`~fesmia_hooks.CanarySet`): a monitor
                then reports the one-run audit's ε lower bound.

        Attributes:
            inputs: The token ids ``[N, T]``.
            labels: The next-token targets ``[N, T]``.
            attention_mask: ``[N, T]`` of 0 and 1.
            zlib_bytes: ``[N]`` zlib-compressed lengths.

        Raises:
            CanaryError: On non-integer or out-of-range ids, a mask that is not 0/1 or does
                not match, a sequence with fewer than two unmasked tokens or no scored
                target, or a sequence present on both sides.

        Example:
            >>> import torch
            >>> g = torch.Generator().manual_seed(0)
            >>> ids = torch.randint(1, 50, (40, 16), generator=g)
            >>> canaries = SequenceCanarySet(ids[:20], ids[20:], vocab_size=50)
            >>> canaries
            SequenceCanarySet(members=20, non_members=20, sequence_length=16, vocab_size=50)
            >>> bool((canaries.labels[:, :-1] == ids[:, 1:]).all()), canaries.labels[0, -1].item()
            (True, -100)
            >>> short = SequenceCanarySet([[5, 6, 7], [8, 9]], [[1, 2, 3, 4]], pad_token_id=0)
            >>> short.inputs.tolist(), short.attention_mask.tolist()
            ([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]], [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
            >>> short.labels.tolist()
            [[6, 7, -100, -100], [9, -100, -100, -100], [2, 3, 4, -100]]
        """
        if vocab_size is not None:
            positive_int("vocab_size", vocab_size)
        if pad_token_id is not None:
            if isinstance(pad_token_id, (bool, np.bool_)) or not isinstance(
                pad_token_id, (int, np.integer)
            ) or pad_token_id < 0:
                raise CanaryError(
                    f"`pad_token_id` must be a non-negative int, got {pad_token_id!r}"
                )
            pad_token_id = int(pad_token_id)  # a NumPy integer (a tokenizer's) as well
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
        super().__init__()
        self.random_inclusion = boolean("random_inclusion", random_inclusion)
        self.inputs = torch.cat(ids_parts).contiguous()
        self.labels = torch.cat(target_parts).contiguous()
        self.num_members = int(ids_parts[0].shape[0])
        self.num_non_members = int(ids_parts[1].shape[0])
        self.attention_mask = torch.cat(mask_parts).contiguous()
        try:  # decoded once: for the zlib lengths and the words withheld from messages
            texts = (None if decode is None
                     else decoded_texts(self.inputs, self.attention_mask, decode))
        except ConfigurationError as exc:
            raise CanaryError(str(exc)) from exc
        self.zlib_bytes = zlib_lengths(self.inputs, self.attention_mask, texts=texts)
        self.private_words = frozenset(
            word.casefold() for text in texts or () for word in _WORD.findall(_text(text))
        ) - _FUNCTION_WORDS
        # What the model must be able to read (checked against it at every check, on these
        # numbers: no device sync): the padded length and the largest token id.
        self._largest_id = int(self.inputs.max()) if self.inputs.numel() else 0
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id

    def __repr__(self) -> str:
        return (
            f"SequenceCanarySet(members={self.num_members}, non_members="
            f"{self.num_non_members}, sequence_length={self.inputs.shape[1]}, "
            f"vocab_size={self.vocab_size})"
        )

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.inputs, self.labels, self.attention_mask, self.zlib_bytes)

    def sequences_on(
        self, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids, attention mask and zlib lengths on ``device`` (moved once, cached)."""
        ids, _, mask, zlib_bytes = self.on(device)
        return ids, mask, zlib_bytes

    def _fits(self, model: nn.Module) -> None:
        """Refuse canaries the model cannot read, naming why (not an ``IndexError`` inside it).

        Sequences longer than the model's context, or token ids beyond its input embedding.
        Reads what a Hugging Face model declares (``config.n_positions`` or
        ``config.max_position_embeddings``, ``get_input_embeddings()``); other models are
        left to fail on their own.
        """
        config = getattr(model, "config", None)
        context = next((v for v in (getattr(config, "n_positions", None),
                                    getattr(config, "max_position_embeddings", None))
                        if isinstance(v, int) and not isinstance(v, bool)), None)
        length = self.inputs.shape[1]
        if context is not None and length > context:
            raise ProbeError(
                f"the canary sequences are {length} tokens long (padded), longer than the "
                f"model's context of {context} positions; build the canaries from shorter "
                "sequences (or truncate them)"
            )
        embeddings = getattr(model, "get_input_embeddings", None)
        table = embeddings() if callable(embeddings) else None
        rows = getattr(table, "num_embeddings", None)
        if isinstance(rows, int) and self._largest_id >= rows:
            beyond = int((self.inputs >= rows).sum())  # a count, never an id
            raise ProbeError(
                f"{beyond} canary token id(s) lie beyond the model's input embedding of "
                f"{rows} rows (allowed: [0, {rows})); was the embedding resized after "
                "tokens were added?"
            )

    def features(
        self, model: nn.Module, spec: FeatureSpec, *, rows: torch.Tensor | None = None
    ) -> Features:
        """Forward the sequences through the language model without touching training.

        ``signals`` are the per-token signals of :mod:`fesmia_hooks.text` averaged over the
        scored tokens (the probe's ``signals``: a ``FeSMIA``'s default ``phi``, ``log_prob``,
        ``margin``, ``neg_entropy``; :data:`~fesmia_hooks.text.DEFAULT_SEQUENCE_SIGNALS`
        when the spec names none), or
        whatever a :class:`~fesmia_hooks.text.SequenceSignals` given as ``signal_fn`` asks
        for; any other ``signal_fn(model, ids, targets)`` gets ``batch_size`` sequences at
        a time. Batches are cut so that at most ``max_logit_elements`` logits (by default sized
        from the device's free memory) come back at
        once (the vocabulary's size is learnt from one sequence when the set does not
        know it). An embedding layer whose output is ``[B, T, D]`` is averaged over the
        unmasked positions (for the paper's text features, "logits averaged over
        positions", name the output layer). See
        :func:`fesmia_hooks.features.compute_features` for the arguments.
        """
        ids, targets, mask, zlib_bytes = select_rows(self.on(model_device(model)), rows)
        self._fits(model)
        signal_fn, kind, batch_size = spec.signal_fn, spec.kind, spec.batch_size
        reader: SequenceSignals | None = None
        if isinstance(signal_fn, SequenceSignals):
            reader = signal_fn
        elif signal_fn is None:
            names = DEFAULT_SEQUENCE_SIGNALS if spec.signals is None else tuple(spec.signals)
            unknown = [n for n in names if n not in SEQUENCE_SIGNALS]
            if unknown:
                raise ConfigurationError(
                    f"signal(s) {unknown} have no sequence form; allowed for token sequences: "
                    f"{', '.join(SEQUENCE_SIGNALS)}"
                )
            reader = SequenceSignals(names)
        length = ids.shape[1]
        vocab = [self.vocab_size]

        def rows_per_forward() -> int:
            if reader is None:
                return batch_size
            if vocab[0] is None:
                return 1  # learn the vocabulary's size from one sequence first
            return reader.rows_per_forward(length, vocab[0], batch_size, ids.device)

        pass_mask = None if reader is None else reader.pass_attention_mask

        def signals_of(start: int, stop: int) -> torch.Tensor | None:
            xb, yb, mb = ids[start:stop], targets[start:stop], mask[start:stop]
            if reader is None:
                assert signal_fn is not None
                return check_signal_block(signal_fn(model, xb, yb), stop - start)
            logits = forward_logits(model, xb, mb, pass_attention_mask=pass_mask)
            vocab[0] = int(logits.shape[-1]) if vocab[0] is None else vocab[0]
            if kind == "embeddings":
                return None
            return reader.reduce(logits, yb, zlib_bytes=zlib_bytes[start:stop])

        def pool(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            block_mask = mask[start:stop]
            if tensor.dim() == 3 and tuple(tensor.shape[:2]) == tuple(block_mask.shape):
                weight = block_mask.to(tensor.dtype)[..., None]
                tensor = (tensor * weight).sum(1) / weight.sum(1).clamp_min(1)
            return tensor

        return forward_in_batches(
            model,
            ids.shape[0],
            spec,
            signals_of=signals_of,
            forward=lambda start, stop: forward_logits(model, ids[start:stop], mask[start:stop]),
            batch_size=rows_per_forward(),
            pool=pool,
            preferred_size=rows_per_forward,
        )


# A word of text, as withheld from error messages (underscores split words: alice_smith).
_WORD = re.compile(r"[^\W_]{2,}")
# Words too common to tell anything, kept so that a message stays readable.
_FUNCTION_WORDS = frozenset(
    "the of to in is and or an at on for with be by as it not no this that are was from "
    "if but has have had its into than then there these those can will would should".split())


def _text(decoded: str | bytes) -> str:
    return decoded.decode("utf-8", "replace") if isinstance(decoded, bytes) else decoded


def withhold_words(message: str, words: frozenset[str]) -> str:
    """``message`` with every word of ``words`` (the canaries' text, case-folded) as ``…``.

    Example:
        >>> withhold_words("cannot read 'Alice_smith' at row 3", frozenset({"alice"}))
        "cannot read '…_smith' at row 3"
    """
    if not words:
        return message
    return _WORD.sub(lambda m: "…" if m.group(0).casefold() in words else m.group(0),
                     message)


def _integer_tokens(name: str, value: Any, *, mask_values: bool = False) -> torch.Tensor:
    t = _to_tensor(name, value)
    if mask_values and t.dtype == torch.bool:  # an attention mask of booleans
        return t.long().cpu()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        kind = "0/1 or boolean values" if mask_values else "integer token ids"
        raise CanaryError(f"{name} must be {kind}, got {t.dtype}")
    # Token sequences are small and their checks run on the CPU (the probe moves them to the
    # model's device once, see Canaries.on): ids of one side on a GPU and of the other on the
    # CPU, or padding made on the CPU, then meet on one device.
    return t.long().cpu()


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
        if _ragged(side["input_ids"]):  # a tokenizer's output without padding=True
            ids, mask = _padded_rows(f"{name} input_ids", side["input_ids"], pad_token_id)
            if side.get("attention_mask") is not None:
                given, _ = _padded_rows(f"{name} attention_mask", side["attention_mask"], 0,
                                        mask_values=True)
                mask = mask * given if given.shape == mask.shape else given
            if side.get("labels") is not None:
                labels, _ = _padded_rows(f"{name} labels", side["labels"], IGNORE_INDEX)
        else:
            ids = _integer_tokens(f"{name} input_ids", side["input_ids"])
            if side.get("attention_mask") is not None:
                mask = _integer_tokens(f"{name} attention_mask", side["attention_mask"],
                                       mask_values=True)
            if side.get("labels") is not None:
                labels = _integer_tokens(f"{name} labels", side["labels"])
    elif isinstance(side, (torch.Tensor, np.ndarray)):
        ids = _integer_tokens(f"{name} token ids", side)
    elif isinstance(side, Sequence) and not isinstance(side, (str, bytes)):
        ids, mask = _padded_rows(f"{name} token ids", side, pad_token_id)
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
    return _left_aligned(ids, mask, labels)


def _ragged(value: Any) -> bool:
    """Whether ``value`` is a list of token lists of different lengths."""
    if isinstance(value, (torch.Tensor, np.ndarray, str, bytes)) or not isinstance(
        value, Sequence
    ):
        return False
    lengths = {len(row) for row in value if isinstance(row, (Sequence, torch.Tensor,
                                                               np.ndarray))}
    return len(lengths) > 1


def _padded_rows(
    name: str, side: Sequence[Any], pad_token_id: int | None, *, mask_values: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of a list of 1-D token sequences, padded on the right."""
    rows = [_integer_tokens(name, row, mask_values=mask_values) if len(row) else None
            for row in side]
    if not rows:
        raise CanaryError(f"{name} must hold at least one sequence, got none")
    empty = sum(r is None for r in rows)
    if empty:
        raise CanaryError(f"{name} must hold no empty sequence, got {empty} empty one(s)")
    bad = [tuple(r.shape) for r in rows if r is not None and r.dim() != 1]
    if bad:
        raise CanaryError(
            f"{name} as a list must hold 1-D token sequences, got a sample of shape {bad[0]}"
        )
    length = max(len(r) for r in rows if r is not None)
    fill = 0 if pad_token_id is None else pad_token_id
    ids = torch.full((len(rows), length), fill, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        assert row is not None
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def _left_aligned(
    ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sequence's tokens moved to the start of its row, in order (padding on the right).

    A model with absolute positions (GPT-2's learnt ones, say) reads a left-padded sequence
    at shifted positions, and so scores it otherwise than the sequence alone: a tokenizer's
    ``padding_side="left"`` output would make leakage look smaller. Rows already so are
    left as they are; columns that hold only padding are dropped.
    """
    keep = mask.bool()
    first_gap = (~keep).long().cumsum(1) > 0
    if bool((first_gap & keep).any()):
        order = torch.sort((~keep).long(), dim=1, stable=True).indices
        ids, mask, labels = ids.gather(1, order), mask.gather(1, order), labels.gather(1, order)
    width = int(mask.sum(1).max())  # columns of padding only: dropped
    return ids[:, :width], mask[:, :width], labels[:, :width]


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


