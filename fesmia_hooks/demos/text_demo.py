"""The language-model demo: a character-level GRU memorises English prose, and leaks.

The text is the Python reference manual's topics that ship with every CPython
(``pydoc_data.topics``, about 465,000 characters; nothing is downloaded). Its paragraphs are
cut at word boundaries into passages of 64 to 192 characters; a few hundred of them are the
training set (the *members*), the rest are never trained on (*non-members*). 64 members and
64 non-members are the canaries. A small GRU trained on so little text for many epochs
learns its passages by heart: the canary members' likelihood rises above the non-members',
and the probe sees it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fesmia_hooks.budget import LeakageBudget
from fesmia_hooks.canaries import CanarySet
from fesmia_hooks.demos import one_torch_thread
from fesmia_hooks.demos.digits import closing_lines, format_row
from fesmia_hooks.monitor import PrivacyMonitor
from fesmia_hooks.probe import FeSMIA
from fesmia_hooks.text import IGNORE_INDEX, SequenceSignals

__all__ = [
    "CharGRU",
    "TextTask",
    "encode",
    "load_pydoc_passages",
    "make_text_task",
    "run_text_demo",
    "text_probe",
    "train_epoch",
]

#: Token id of padding in the demo's character vocabulary.
PAD = 0


def load_pydoc_passages(
    *, min_chars: int = 64, max_chars: int = 192, min_letters: float = 0.7
) -> list[str]:
    """Prose passages of CPython's ``pydoc_data.topics``, whitespace normalised, unique.

    Each paragraph is cut at word boundaries into pieces of at most ``max_chars``
    characters; pieces shorter than ``min_chars``, and pieces of which letters make less than
    ``min_letters`` (grammar rules, code, ASCII tables and underlines: text that any model
    predicts well, member or not), are dropped. The order is the topics' (sorted by name), so
    the list is the same on every run of one Python version.

    Example:
        >>> passages = load_pydoc_passages()
        >>> len(passages) > 1000, all(64 <= len(p) <= 192 for p in passages)
        (True, True)
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[str] = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            words = paragraph.split()
            piece: list[str] = []
            size = 0
            for word in [*words, None]:
                if word is not None and (not piece or size + 1 + len(word) <= max_chars):
                    size += len(word) + (1 if piece else 0)
                    piece.append(word)
                    continue
                text = " ".join(piece)
                letters = sum(c.isalpha() for c in text)
                if (min_chars <= len(text) <= max_chars and text not in seen
                        and letters >= min_letters * len(text)):
                    seen.add(text)
                    out.append(text)
                piece, size = ([word], len(word)) if word is not None else ([], 0)
    return out


def encode(texts: Sequence[str], stoi: dict[str, int]) -> list[list[int]]:
    """Each text as a list of character ids (unknown characters are dropped)."""
    return [[stoi[c] for c in text if c in stoi] for text in texts]


def pad_batch(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``[n, T]`` and next-token targets ``[n, T]`` (``-100`` on padding)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), PAD, dtype=torch.long)
    targets = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for i, seq in enumerate(sequences):
        row = torch.as_tensor(seq, dtype=torch.long)
        ids[i, : len(row)] = row
        targets[i, : len(row) - 1] = row[1:]
    return ids, targets


class CharGRU(nn.Module):
    """A character-level language model: embedding, one GRU layer, linear read-out.

    ``forward(ids [B, T]) -> logits [B, T, V]``; position ``t`` predicts token ``t + 1``.
    Padding is on the right, so a causal GRU's outputs at real positions do not see it.
    """

    def __init__(self, vocab_size: int, *, embed: int = 48, hidden: int = 256,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the next character at every position."""
        hidden, _ = self.gru(self.embed(ids))
        return self.head(self.drop(hidden))


@dataclass
class TextTask:
    """Data of the text demo.

    Attributes:
        train: ``(ids, targets)`` of the training passages (the members), right-padded.
        held_out: ``(ids, targets)`` of passages never trained on (the non-members).
        canaries: 64 members (inside ``train``) and 64 non-members (inside ``held_out``).
        vocab: The characters; id 0 is padding.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    held_out: tuple[torch.Tensor, torch.Tensor]
    canaries: CanarySet
    vocab: list[str]

    @property
    def vocab_size(self) -> int:
        """Characters plus padding."""
        return len(self.vocab)


def make_text_task(
    *, members: int = 256, held_out: int = 256, canaries: int = 64, seed: int = 0
) -> TextTask:
    """Split the pydoc passages into training passages, held-out passages and canaries.

    ``members`` passages are trained on; the first ``canaries`` of them are the canary
    members. ``held_out`` other passages are never trained on; the first ``canaries`` of
    them are the canary non-members (the rest serve the population-level benchmark).
    """
    passages = load_pydoc_passages()
    if members + held_out > len(passages) or canaries > min(members, held_out):
        raise ValueError(
            f"make_text_task needs members + held_out <= {len(passages)} and canaries <= both, "
            f"got members={members}, held_out={held_out}, canaries={canaries}"
        )
    vocab = ["<pad>", *sorted({c for p in passages for c in p})]
    stoi = {c: i for i, c in enumerate(vocab)}
    order = torch.randperm(len(passages), generator=torch.Generator().manual_seed(seed))
    chosen = [passages[i] for i in order[: members + held_out].tolist()]
    member_ids = encode(chosen[:members], stoi)
    other_ids = encode(chosen[members:], stoi)
    canary_set = CanarySet.from_sequences(
        member_ids[:canaries],
        other_ids[:canaries],
        pad_token_id=PAD,
        vocab_size=len(vocab),
        decode=lambda ids: "".join(vocab[i] for i in ids),
    )
    return TextTask(
        train=pad_batch(member_ids),
        held_out=pad_batch(other_ids),
        canaries=canary_set,
        vocab=vocab,
    )


def text_probe(seed: int = 0) -> FeSMIA:
    """The demo's probe: SimpleShot on mean log-likelihood, Min-K% and zlib signals."""
    return FeSMIA(signal_fn=SequenceSignals(("log_prob", "min_k", "zlib")), seed=seed)


def lm_loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored positions."""
    logits = model(ids)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    batch_size: int = 32,
) -> float:
    """One shuffled epoch (the global RNG shuffles); returns the last batch's loss."""
    ids, targets = data
    model.train()
    loss_value = float("nan")
    for idx in torch.randperm(len(ids)).split(batch_size):
        optimizer.zero_grad()
        loss = lm_loss(model, ids[idx], targets[idx])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = loss.item()
    return loss_value


def run_text_demo(
    *,
    log_dir: str | Path = "runs/fesmia-demo-text",
    epochs: int = 60,
    seed: int = 0,
    out: Callable[[str], None] = print,
) -> PrivacyMonitor:
    """Train the character-level GRU on pydoc passages, checking leakage after every epoch.

    Stops when the default :class:`LeakageBudget` is breached. Returns the core monitor.
    Runs on one CPU thread (restored on return): the model is small, and on a shared
    two-core machine more threads only wait on each other (its cost is measured in
    BENCHMARKS.md).

    Args:
        log_dir: Folder of the TensorBoard events and the history.
        epochs: Most epochs to train (also the horizon of the run-level test).
        seed: Seed of the split, the model, the shuffling and the probe.
        out: Where the printed lines go.
    """
    with one_torch_thread():
        return _run(log_dir=log_dir, epochs=epochs, seed=seed, out=out)


def _run(
    *, log_dir: str | Path, epochs: int, seed: int, out: Callable[[str], None]
) -> PrivacyMonitor:
    torch.manual_seed(seed)
    task = make_text_task(seed=seed)
    model = CharGRU(task.vocab_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    monitor = PrivacyMonitor(
        task.canaries,
        probe=text_probe(seed),
        budget=LeakageBudget(),
        horizon=epochs,
        log_dir=log_dir,
    )
    out(f"fesmia-hooks demo (text): character-level GRU on {len(task.train[0])} passages of "
        f"the Python reference manual (pydoc_data.topics), {task.canaries}")
    out(f"probe {monitor.probe!r} on {monitor.probe.signal_fn!r}; budget {monitor.budget!r}")
    monitor.preflight(model)  # before training: the split must not be told apart yet
    start = time.perf_counter()
    for epoch in range(epochs):
        loss = train_epoch(model, optimizer, task.train)
        report = monitor.step(model, epoch=epoch)
        if report is not None:
            out(format_row(report, loss))
        if monitor.should_stop:
            break
    closing_lines(monitor, epochs=epochs, log_dir=log_dir, start=start, out=out)
    return monitor
