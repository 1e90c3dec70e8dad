"""After training: was this set of passages used to train this language model?

The text is the Python reference manual's topics that ship with CPython
(``pydoc_data.topics``), cut into passages of 64 to 192 characters. An author holds 50
passages (the *suspects*) and 200 other passages known never to have been trained on (the
*non-members*). Two character-level GRUs (the text demo's ``CharGRU``) are trained briefly
with the same recipe: one on 150 other passages plus the suspects, one on the 150 alone. The
audit reads each model's likelihood-based signals of every passage (mean log-likelihood,
Min-K% probability, zlib ratio) and says "shown" when the suspects are significantly more
member-like than the non-members (one-sided permutation test, level 0.05).

"Not shown" is not proof of absence: BENCHMARKS.md (section 10) measures how often a set of
passages trained on this briefly goes unnoticed.

Run: python examples/audit_text.py
"""

import torch

from fesmia_hooks.audit import audit
from fesmia_hooks.demos import one_torch_thread
from fesmia_hooks.demos.text_demo import (
    PAD,
    CharGRU,
    encode,
    load_pydoc_passages,
    pad_batch,
    train_epoch,
)


def train(sequences, vocab_size, *, epochs, seed):
    """The text demo's GRU and training step (Adam 3e-3, batch 32, gradients clipped at 1)."""
    torch.manual_seed(seed)
    model = CharGRU(vocab_size)  # forward(ids [B, T]) -> logits [B, T, V]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = pad_batch(sequences)  # right-padded ids and next-character targets
    for _ in range(epochs):
        train_epoch(model, optimizer, data)
    return model.eval()


def main(epochs=15, base=150, suspects=50, non_members=200, permutations=9999, seed=0):
    with one_torch_thread():  # a small model: on a shared CPU, more threads only wait
        return _run(epochs, base, suspects, non_members, permutations, seed)


def _run(epochs, base, suspects, non_members, permutations, seed):
    passages = load_pydoc_passages()
    vocab = ["<pad>", *sorted({c for p in passages for c in p})]  # id 0 is padding
    ids = encode(passages, {c: i for i, c in enumerate(vocab)})
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    trained = [ids[i] for i in order[:base]]
    suspect = [ids[i] for i in order[base:base + suspects]]
    outside = [ids[i] for i in order[base + suspects:base + suspects + non_members]]

    results = {}
    for name, data in (("with", trained + suspect), ("without", trained)):
        model = train(data, len(vocab), epochs=epochs, seed=seed)
        # token sequences as lists of ids: padded and masked by the audit
        result = audit(model, suspect, outside, permutations=permutations, seed=seed,
                       pad_token_id=PAD, vocab_size=len(vocab))
        print(f"model trained {name} the suspects -> {result.summary()}")
        results[name] = result
    return results


if __name__ == "__main__":
    main()
