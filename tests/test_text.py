"""Language models: token-sequence canaries, sequence signals, and the probe on a tiny LM."""

import copy
import math
import zlib

import pytest
import torch
from torch import nn

import fesmia_hooks as fh
from fesmia_hooks.text import (
    SEQUENCE_SIGNALS,
    SequenceSignals,
    sequence_signals,
    token_statistics,
    zlib_lengths,
)

V = 12


# ---------------------------------------------------------------------- reference maths
def reference(logits, targets, names, k=0.2, zlib_bytes=None, bins=4):
    """The signals computed one token at a time in float64, the plain way."""
    rows = []
    for b in range(logits.shape[0]):
        per = {s: [] for s in ("log_prob", "phi", "margin", "neg_entropy", "max_logit_gap")}
        for t in range(logits.shape[1]):
            y = int(targets[b, t])
            if y == -100:
                continue
            z = logits[b, t].double()
            others = torch.cat([z[:y], z[y + 1 :]])
            log_p = z - torch.logsumexp(z, 0)
            top = sorted(z.tolist(), reverse=True)
            per["log_prob"].append(float(log_p[y]))
            per["phi"].append(float(z[y] - torch.logsumexp(others, 0)))
            per["margin"].append(float(z[y] - others.max()))
            per["neg_entropy"].append(float((log_p.exp() * log_p).sum()))
            per["max_logit_gap"].append(top[0] - top[1])
        lp = per["log_prob"]
        row = []
        for name in names:
            if name == "min_k":
                low = sorted(lp)[: max(1, math.floor(k * len(lp)))]
                row.append(sum(low) / len(low))
            elif name == "zlib":
                row.append(sum(lp) / len(lp) / float(zlib_bytes[b]))
            elif name == "positions":
                parts = [[] for _ in range(bins)]
                for i, v in enumerate(lp):
                    parts[i * bins // len(lp)].append(v)
                row += [sum(p) / len(p) if p else sum(lp) / len(lp) for p in parts]
            else:
                row.append(sum(per[name]) / len(per[name]))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def hand_made(seed=0, b=4, t=9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, V, generator=g) * 3
    targets = torch.randint(0, V, (b, t), generator=g)
    targets[0, 6:] = -100  # right padding
    targets[1, :3] = -100  # left padding / an unscored prompt
    targets[2, 1::2] = -100  # holes
    targets[3, 1:] = -100  # one scored token only
    for row in range(b):
        pad = targets[row] == -100
        logits[row, pad] = float("nan")  # whatever sits at padding must not leak in
    return logits, targets


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("chunk_elements", [1, V * 3, V * 5, 10**6])
def test_signals_equal_a_direct_computation_with_padding(chunk_elements, contiguous):
    # Blocks of a few positions are read in place or, mostly padding (or the logits not
    # contiguous), gathered: every way gives the same signals.
    logits, targets = hand_made()
    if not contiguous:
        logits = logits.transpose(0, 1).contiguous().transpose(0, 1)
        assert not logits.is_contiguous()
    sizes = torch.tensor([31.0, 17.0, 8.0, 52.0])
    names = list(SEQUENCE_SIGNALS)
    got = sequence_signals(logits, targets, names, k=0.3, zlib_bytes=sizes, bins=3,
                           chunk_elements=chunk_elements)
    want = reference(logits, targets, names, k=0.3, zlib_bytes=sizes, bins=3)
    assert got.shape == (4, len(names) + 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_half_precision_logits_are_reduced_in_float32():
    logits, targets = hand_made(seed=1)
    logits = torch.nan_to_num(logits).to(torch.bfloat16)
    got = sequence_signals(logits, targets, ["log_prob", "phi"])
    want = reference(logits.float(), targets, ["log_prob", "phi"])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_saturated_tokens_still_separate_in_log_space():
    # docs/science.md#signals: p(target) == 1.0 in float32, but phi keeps the two apart.
    logits = torch.zeros(2, 2, 3)
    logits[0, :, 0], logits[1, :, 0] = 60.0, 40.0
    targets = torch.tensor([[0, 0], [0, 0]])
    stats = token_statistics(logits, targets, ["log_prob", "phi"])
    assert stats["log_prob"][0, 0] == stats["log_prob"][1, 0] == 0.0
    assert stats["phi"][0, 0] > stats["phi"][1, 0] + 19


def test_min_k_takes_the_lowest_share_and_at_least_one_token():
    logits = torch.zeros(1, 10, 2)
    logits[0, :, 0] = torch.arange(10.0)  # log p of token 0 rises with the position
    targets = torch.zeros(1, 10, dtype=torch.long)
    lp = token_statistics(logits, targets)["log_prob"][0]
    lowest = lp.sort().values
    got = sequence_signals(logits, targets, ["min_k"], k=0.2)
    assert got.item() == pytest.approx(lowest[:2].mean().item())
    got = sequence_signals(logits, targets, ["min_k"], k=0.01)
    assert got.item() == pytest.approx(lowest[0].item())


def test_signal_errors_are_clear():
    logits, targets = hand_made()
    with pytest.raises(fh.ConfigurationError, match=r"unknown sequence signal\(s\) \['loss'\]"):
        sequence_signals(logits, targets, ["loss"])
    with pytest.raises(fh.ConfigurationError, match=r"`k` must be a number in \(0, 1\], got 0"):
        sequence_signals(logits, targets, ["min_k"], k=0)
    with pytest.raises(fh.ConfigurationError, match="`bins` must be a positive int, got 0"):
        SequenceSignals(["positions"], bins=0)
    with pytest.raises(fh.ConfigurationError, match="must not repeat a signal"):
        SequenceSignals(["min_k", "min_k"])
    with pytest.raises(fh.ConfigurationError, match="'zlib' signal needs the zlib lengths"):
        sequence_signals(logits, targets, ["zlib"])
    with pytest.raises(fh.ProbeError, match=r"\[batch, length, vocab\] logits, got shape \(4, 9\)"):
        sequence_signals(logits[..., 0], targets)
    with pytest.raises(fh.ProbeError, match=r"^\d+ canary token target\(s\) lie outside the "
                                            r"model's vocabulary of 12 tokens"):
        sequence_signals(logits, targets.masked_fill(targets == 3, 12), ["log_prob"])


@pytest.mark.parametrize("planted", [987, -987])
def test_out_of_vocabulary_targets_are_counted_never_shown(planted):
    logits, targets = hand_made()
    targets[0, 2], targets[1, 4] = planted, 988
    with pytest.raises(fh.ProbeError) as info:
        token_statistics(logits, targets)
    message = str(info.value)
    assert message == (
        "2 canary token target(s) lie outside the model's vocabulary of 12 tokens (allowed: "
        "[0, 12), or -100 where nothing is scored)"
    )
    assert "987" not in message and "988" not in message


def test_a_failing_decode_is_named_without_its_message():
    def decode(ids):
        raise KeyError(f"no token {ids}")  # quotes the canary tokens

    for call in (
        lambda: zlib_lengths(torch.tensor([[987, 5, 6]]), torch.ones(1, 3), decode=decode),
        lambda: fh.SequenceCanarySet([[987, 5, 6]], [[1, 2, 3]], decode=decode),
    ):
        with pytest.raises((fh.ConfigurationError, fh.CanaryError)) as info:
            call()
        assert str(info.value) == (
            "`decode` raised KeyError on a canary sequence (its message is left out: it may "
            "quote canary tokens); check that it takes a list of token ids"
        )
        chained, seen = info.value, []
        while chained is not None:  # nothing in the chain a traceback prints quotes them
            seen.append(str(chained))
            chained = chained.__cause__ or chained.__context__
        assert not any("987" in text for text in seen)


# ---------------------------------------------------------------------- canary sets
def test_from_sequences_pads_masks_and_shifts():
    c = fh.CanarySet.from_sequences([[5, 6, 7], [8, 9]], [[1, 2, 3, 4, 5]], pad_token_id=0,
                                    vocab_size=10)
    assert c.is_sequence and c.num_members == 2 and c.num_non_members == 1
    assert c.inputs.tolist() == [[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert c.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert c.labels.tolist() == [[6, 7, -100, -100, -100], [9, -100, -100, -100, -100],
                                 [2, 3, 4, 5, -100]]
    assert isinstance(c, fh.SequenceCanarySet) and isinstance(c, fh.Canaries)
    assert repr(c) == "SequenceCanarySet(members=2, non_members=1, sequence_length=5, vocab_size=10)"
    assert not fh.CanarySet(members=torch.randn(3, 2), non_members=torch.randn(3, 2)).is_sequence


def test_from_sequences_takes_tokenizer_style_mappings_with_labels():
    members = {
        "input_ids": torch.tensor([[3, 4, 5, 6], [2, 3, 9, 9]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, 5, 6], [2, 3, 9, -100]]),  # a 2-token prompt
    }
    non_members = {"input_ids": torch.tensor([[7, 8, 9]])}
    c = fh.CanarySet.from_sequences(members, non_members, pad_token_id=0)
    assert c.labels.tolist() == [[-100, 5, 6, -100], [3, 9, -100, -100], [8, 9, -100, -100]]
    assert c.attention_mask.tolist()[2] == [1, 1, 1, 0]  # padded to the members' length
    assert c.inputs.tolist()[1:] == [[2, 3, 9, 0], [7, 8, 9, 0]]  # masked ids -> pad_token_id
    # With no mask, every pad token is padding -- even one inside the text (GPT-2's eos).
    c = fh.CanarySet.from_sequences(members, non_members, pad_token_id=9)
    assert c.attention_mask.tolist()[2] == [1, 1, 0, 0]


def test_tensor_form_masks_the_pad_token_and_zlib_uses_decode():
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    c = fh.CanarySet.from_sequences(ids[:1], ids[1:], pad_token_id=0)
    assert c.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert c.zlib_bytes.tolist() == [len(zlib.compress(bytes([1, 2, 3]))),
                                     len(zlib.compress(bytes([4, 5, 6, 7])))]
    letters = fh.CanarySet.from_sequences(ids[:1], ids[1:], pad_token_id=0,
                                          decode=lambda t: "ab" * sum(t))
    assert letters.zlib_bytes.tolist() == [len(zlib.compress(b"ab" * 6)),
                                           len(zlib.compress(b"ab" * 22))]
    assert torch.equal(zlib_lengths(c.inputs, c.attention_mask), c.zlib_bytes)


def test_padding_differently_does_not_make_two_sequences_different():
    with pytest.raises(fh.CanaryError, match="1 sequence\\(s\\) appear among both"):
        fh.CanarySet.from_sequences([[1, 2, 3]], {"input_ids": [[1, 2, 3, 0, 0]],
                                                  "attention_mask": [[1, 1, 1, 0, 0]]})


@pytest.mark.parametrize(
    ("members", "kwargs", "error", "match"),
    [
        (torch.ones(2, 4), {}, fh.CanaryError, "members token ids must be integer token ids, got torch.float32"),
        (torch.tensor([[1, 2, 12]]), {"vocab_size": 12}, fh.CanaryError, r"token ids must lie in \[0, 12\), got 1 id\(s\) outside it"),
        (torch.tensor([[1, -1, 2]]), {}, fh.CanaryError, r"must lie in \[0, vocab_size\), got 1 id\(s\) outside it"),
        ([[1, 2], [3]], {}, fh.CanaryError, r"at least 2 unmasked tokens .* 1 members sequence\(s\) have fewer"),
        (torch.tensor([[1, 2, 3]]), {"pad_token_id": 12, "vocab_size": 12}, fh.CanaryError, r"`pad_token_id` must lie in \[0, 12\), got 12"),
        (torch.tensor([[1, 2, 3]]), {"pad_token_id": -1}, fh.CanaryError, "`pad_token_id` must be a non-negative int, got -1"),
        (torch.tensor([[1, 2, 3]]), {"vocab_size": 0}, fh.ConfigurationError, "`vocab_size` must be a positive int, got 0"),
        ({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 2, 1]]}, {}, fh.CanaryError, "attention_mask must hold only 0 and 1"),
        ({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1]]}, {}, fh.CanaryError, r"attention_mask must have the shape of its token ids \(1, 3\), got \(1, 2\)"),
        ({"input_ids": [[1, 2, 3]], "labels": [[-100, -100, -100]]}, {}, fh.CanaryError, r"1 members sequence\(s\) have none \(all labels -100\)"),
        ({"input_ids": [[1, 2, 3]], "labels": [[1, 2, 40]]}, {"vocab_size": 12}, fh.CanaryError, r"labels must be -100 or lie in \[0, 12\), got 1 label\(s\) outside it"),
        ({"ids": [[1, 2, 3]]}, {}, fh.CanaryError, r"needs 'input_ids' .* got keys \['ids'\]"),
        ("hello", {}, fh.CanaryError, "members must be token ids .* got str"),
        ([[[1, 2]]], {}, fh.CanaryError, r"1-D token sequences, got a sample of shape \(1, 2\)"),
        (torch.tensor([1, 2, 3]), {}, fh.CanaryError, r"must be \[sequences, length\] .* got shape \(3,\)"),
        (torch.tensor([[1, 2, 3]]), {"decode": lambda ids: 3}, fh.CanaryError, "`decode` must return str or bytes, got int"),
        (torch.tensor([[1, 2, 3]]), {"decode": "text"}, fh.CanaryError, "`decode` must be callable, got str"),
    ],
)
def test_from_sequences_validation_messages(members, kwargs, error, match):
    with pytest.raises(error, match=match):
        fh.CanarySet.from_sequences(members, torch.tensor([[4, 5, 6]]), **kwargs)


@pytest.mark.parametrize(
    ("members", "match"),
    [
        (lambda ids: ids.to("meta"), r"^members token ids are on the 'meta' device, which "
                                     r"holds no data"),
        (lambda ids: ids.to_sparse(), r"^members token ids are a sparse tensor "
                                      r"\(torch.sparse_coo\), which is not supported: call "
                                      r"\.to_dense\(\)$"),
        (lambda ids: {"input_ids": ids, "attention_mask": torch.ones_like(ids, device="meta")},
         r"^members attention_mask are on the 'meta' device"),
        (lambda ids: {"input_ids": ids, "labels": ids.to_sparse()},
         r"^members labels are a sparse tensor"),
        (lambda ids: [row.to("meta") for row in ids], r"^members token ids are on the 'meta'"),
        (lambda ids: ids.numpy().astype(object), r"^members token ids must be a tensor, an array "
                                                 r"or a sequence of numbers, got ndarray of "
                                                 r"dtype object$"),
        (lambda ids: ids.to(torch.complex64), r"^members token ids must be integer token ids, "
                                              r"got torch.complex64$"),
    ],
    ids=["meta", "sparse", "meta-mask", "sparse-labels", "meta-rows", "object", "complex"],
)
def test_token_sequences_without_dense_integer_storage_are_refused(members, match):
    ids = torch.tensor([[987, 5, 6, 7], [8, 987, 9, 10]])
    with pytest.raises(fh.CanaryError, match=match) as info:
        fh.SequenceCanarySet(members(ids), torch.tensor([[1, 2, 3, 4]]))
    assert "987" not in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_token_sequences_on_a_gpu_meet_the_cpu_side():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    c = fh.SequenceCanarySet(ids[:1].cuda(), [[4, 5]], pad_token_id=0)
    assert c.inputs.tolist() == [[1, 2, 3], [4, 5, 0]]
    with pytest.raises(fh.CanaryError, match=r"1 sequence\(s\) appear among both"):
        fh.SequenceCanarySet(ids.cuda(), ids[1:])


def test_canary_tokens_never_appear_in_messages():
    secret = [[7, 7, 7, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    with pytest.raises(fh.CanaryError) as info:
        fh.CanarySet.from_sequences(secret, secret)
    assert "1, 2, 3" not in str(info.value) and "7, 7" not in str(info.value)
    c = fh.CanarySet.from_sequences(secret, [[9, 8]])
    assert "1, 2, 3" not in repr(c)


# ---------------------------------------------------------------------- the probe
class TinyLM(nn.Module):
    def __init__(self, vocab=V, hidden=64, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.rnn = nn.GRU(16, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.head(self.drop(self.rnn(self.embed(ids))[0]))


class MaskedLM(TinyLM):
    """Records what it is called with, and answers in the Hugging Face form."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, input_ids, attention_mask=None, use_cache=True):
        self.calls.append((tuple(input_ids.shape), attention_mask, use_cache))
        logits = super().forward(input_ids)
        if attention_mask is not None:  # garbage wherever the mask says "not a token"
            logits = logits.masked_fill(attention_mask[..., None] == 0, 1e4)
        return type("CausalLMOutput", (), {"logits": logits})()


def random_tokens(n, length=20, seed=0):
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(seed))


def variable_canaries(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, V, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g)
            for _ in range(2 * n)]
    return fh.CanarySet.from_sequences(seqs[:n], seqs[n:], pad_token_id=0, vocab_size=V)


def test_the_model_gets_the_attention_mask_and_padding_changes_nothing():
    torch.manual_seed(0)
    model = MaskedLM()
    canaries = variable_canaries()
    probe = fh.FeSMIA(signal_fn=SequenceSignals(list(SEQUENCE_SIGNALS)), episodes=10,
                      permutations=9)
    feats = probe.features_of(model, canaries)
    assert all(mask is not None and use_cache is False for _, mask, use_cache in model.calls)
    # The same sequences padded to 40 give the very same features.
    ids, mask = canaries.inputs, canaries.attention_mask
    wide = fh.CanarySet.from_sequences(
        {"input_ids": torch.cat([ids[:32], torch.zeros(32, 21, dtype=torch.long)], 1),
         "attention_mask": torch.cat([mask[:32], torch.zeros(32, 21, dtype=torch.long)], 1)},
        {"input_ids": ids[32:], "attention_mask": mask[32:]},
        pad_token_id=0,
    )
    assert wide.inputs.shape[1] == ids.shape[1]  # columns of padding only are dropped
    torch.testing.assert_close(probe.features_of(model, wide).signals, feats.signals)
    # Padded on the left (a decoder tokenizer's padding_side="left"), each sequence is moved
    # to the start of its row: read at the positions it has alone, the same features.
    lengths = mask.sum(1)
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        left_ids[i, ids.shape[1] - n:] = ids[i, :n]
        left_mask[i, ids.shape[1] - n:] = 1
    left = fh.CanarySet.from_sequences(
        {"input_ids": left_ids[:32], "attention_mask": left_mask[:32]},
        {"input_ids": left_ids[32:], "attention_mask": left_mask[32:]}, pad_token_id=0)
    assert bool((left_mask != mask).any()) and torch.equal(left.inputs, canaries.inputs)
    torch.testing.assert_close(probe.features_of(model, left).signals, feats.signals)
    # and they equal the direct computation from the model's own logits
    with torch.no_grad():
        logits = TinyLM.forward(model, ids)
    want = reference(logits, canaries.labels, list(SEQUENCE_SIGNALS),
                     zlib_bytes=canaries.zlib_bytes)
    torch.testing.assert_close(feats.signals, want, rtol=1e-4, atol=1e-4)


def test_plain_models_get_token_ids_only_and_batches_stay_bounded():
    calls = []

    class Plain(TinyLM):
        def forward(self, ids):
            calls.append(ids.shape[0])
            return super().forward(ids)

    canaries = variable_canaries()  # 64 sequences of length <= 19, vocabulary 12
    length = canaries.inputs.shape[1]
    spec = SequenceSignals(max_logit_elements=5 * length * V)
    fh.FeSMIA(signal_fn=spec, episodes=10, permutations=9, batch_size=8).features_of(
        Plain(), canaries
    )
    assert calls == [5] * 12 + [4]
    calls.clear()
    unknown = fh.CanarySet.from_sequences(canaries.inputs[:32], canaries.inputs[32:])
    fh.FeSMIA(signal_fn=spec, episodes=10, permutations=9).features_of(Plain(), unknown)
    assert calls[:2] == [1, 5] and sum(calls) == 64  # one sequence first, to learn V


def test_the_default_feature_pass_is_sized_from_free_memory(monkeypatch):
    from fesmia_hooks import text

    calls = []

    class Counted(TinyLM):
        def forward(self, ids):
            calls.append(ids.shape[0])
            return super().forward(ids)

    canaries = variable_canaries()  # 64 sequences
    length = canaries.inputs.shape[1]
    per_sequence = length * V
    page = 4096
    for free_logits, passes in ((16 * per_sequence + per_sequence // 2, 4), (10**9, 1)):
        # a quarter of the free memory at 8 bytes per logit, within the bounds
        monkeypatch.setattr(text, "LOGIT_BUDGET_BOUNDS", (1, 2**28))
        pages = free_logits * 4 * 8 // page
        monkeypatch.setattr(text.os, "sysconf", lambda key, pages=pages: (
            pages if key == "SC_AVPHYS_PAGES" else page))
        calls.clear()
        fh.FeSMIA(episodes=10, permutations=9).features_of(Counted(), canaries)
        assert len(calls) == passes and sum(calls) == 64
    # memory that cannot be read: the fixed default bound
    monkeypatch.setattr(text.os, "sysconf", lambda key: (_ for _ in ()).throw(ValueError(key)))
    assert text.logit_budget("cpu") == text.DEFAULT_MAX_LOGIT_ELEMENTS


def test_default_signals_are_per_token_means_and_generic_signal_fns_get_targets():
    torch.manual_seed(0)
    model, canaries = TinyLM(), variable_canaries()
    feats = fh.FeSMIA(episodes=10, permutations=9).features_of(model, canaries)
    with torch.no_grad():
        logits = model(canaries.inputs)
    names = ["phi", "log_prob", "margin", "neg_entropy"]
    torch.testing.assert_close(feats.signals, reference(logits, canaries.labels, names),
                               rtol=1e-4, atol=1e-4)
    seen = []

    def signal_fn(m, ids, targets):
        seen.append((ids.shape, targets.shape))
        return (targets != -100).sum(1).float()

    fh.FeSMIA(signal_fn=signal_fn, episodes=10, permutations=9).features_of(model, canaries)
    assert seen == [((64, 19), (64, 19))]


def test_embeddings_of_token_outputs_are_averaged_over_real_positions():
    torch.manual_seed(0)
    model, canaries = TinyLM(), variable_canaries()
    probe = fh.FeSMIA(features="both", embedding_layer="head", episodes=10, permutations=9)
    feats = probe.features_of(model, canaries)
    with torch.no_grad():
        out = model(canaries.inputs)
    mask = canaries.attention_mask[..., None].float()
    torch.testing.assert_close(feats.embeddings, (out * mask).sum(1) / mask.sum(1))
    assert feats.signals.shape == (64, 4)


def test_text_canaries_reject_signals_without_a_sequence_form():
    from fesmia_hooks.features import FeatureSpec, compute_features

    with pytest.raises(fh.ConfigurationError, match=r"\['loss'\] have no sequence form"):
        compute_features(TinyLM(), variable_canaries(), FeatureSpec(signals=["loss"]))


def train_lm(model, data, epochs, monitors=(), seed=0):
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(data)).split(16):
            optimizer.zero_grad()
            logits = model(data[idx][:, :-1])
            nn.functional.cross_entropy(logits.reshape(-1, V), data[idx][:, 1:].reshape(-1)).backward()
            optimizer.step()
        for monitor in monitors:
            monitor.step(model, epoch=epoch)
    return model, optimizer


def test_a_memorising_lm_is_flagged_and_a_placebo_set_is_not():
    data = random_tokens(96)  # random tokens: only memorisation can lower a member's loss
    canaries = fh.CanarySet.from_sequences(data[:32], data[64:96], vocab_size=V)
    # Never trained on, either side: any alarm is false. Such a placebo alarms in at most
    # alpha = 5 % of runs (1 run of 60 in a measurement for this test's setting).
    others = random_tokens(64, seed=1)
    placebo = fh.CanarySet.from_sequences(others[:32], others[32:], vocab_size=V)

    def monitor(c):
        return fh.PrivacyMonitor(
            c,
            probe=fh.FeSMIA(signal_fn=SequenceSignals(), episodes=20, permutations=99),
            budget=fh.LeakageBudget(action="alert"), horizon=12,
        )

    watched, control = monitor(canaries), monitor(placebo)
    torch.manual_seed(0)
    train_lm(TinyLM(), data[:64], epochs=12, monitors=(watched, control))
    assert watched.checks == control.checks == 12
    assert any(r.breached for r in watched.history)
    assert watched.history[-1].strict > 0.9 and watched.history[-1].significant
    assert not any(r.breached or r.significant for r in control.history)


def test_a_check_on_an_lm_with_dropout_changes_nothing():
    data = random_tokens(96, seed=1)
    canaries = fh.CanarySet.from_sequences(data[:32], data[64:96], vocab_size=V)

    def run(with_monitor):
        torch.manual_seed(0)
        model = TinyLM(dropout=0.3)
        monitors = ()
        if with_monitor:
            monitors = (fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(
                signal_fn=SequenceSignals(list(SEQUENCE_SIGNALS)), episodes=10,
                permutations=9)),)
        return train_lm(model, data[:64], epochs=3, monitors=monitors)

    model, optimizer = run(True)
    plain, plain_optimizer = run(False)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert str(optimizer.state_dict()) == str(plain_optimizer.state_dict())
    # and one check, directly: training flags, weights, grads and the RNG are as they were
    model.train()
    model.drop.eval()
    model(data[:4]).sum().backward()
    before = (copy.deepcopy(model.state_dict()), [p.grad.clone() for p in model.parameters()],
              {n: m.training for n, m in model.named_modules()}, torch.get_rng_state())
    fh.FeSMIA(episodes=10, permutations=9).evaluate(model, canaries)
    assert all(torch.equal(a, b) for a, b in zip(before[0].values(), model.state_dict().values(), strict=True))
    assert all(torch.equal(a, p.grad) for a, p in zip(before[1], model.parameters(), strict=True))
    assert before[2] == {n: m.training for n, m in model.named_modules()}
    assert torch.equal(before[3], torch.get_rng_state())


def test_a_non_finite_token_log_probability_is_not_dropped_by_min_k():
    # A +inf logit (or a NaN) at a scored position makes that token's log-probability
    # non-finite; Min-K% must not rank it out of the lowest k and read a finite value.
    for bad in (float("inf"), float("nan")):
        logits = torch.zeros(1, 4, 5)
        logits[0, 1, 3] = bad
        got = sequence_signals(logits, torch.zeros(1, 4, dtype=torch.long), ["min_k"], k=0.5)
        assert not torch.isfinite(got).any(), bad


def test_sparse_targets_are_gathered_into_few_blocks():
    # Only the last token of each sequence scored (a masked prompt): the scored rows of
    # many mostly-unscored spans travel together, not one block per sequence.
    from fesmia_hooks.text import _logit_blocks

    logits = torch.randn(16, 50, 7)
    targets = torch.full((16, 50), -100)
    targets[:, -1] = 3
    where = (targets.reshape(-1) != -100).nonzero().squeeze(1)
    blocks = list(_logit_blocks(logits, where, step=40))
    assert len(blocks) == 1 and torch.equal(blocks[0][1], where)
    got = token_statistics(logits, targets, ["log_prob"], chunk_elements=40 * 7)["log_prob"]
    want = torch.log_softmax(logits[:, -1], 1)[:, 3]
    torch.testing.assert_close(got[:, -1], want)
    assert got[:, :-1].isnan().all()
