"""The table of signals: every list of names derives from it, and both paths share its maths."""

import pytest
import torch

import fesmia_hooks as fh
from fesmia_hooks import signals, text
from fesmia_hooks.signals import (
    CLASSIFICATION_SIGNALS,
    SIGNALS,
    Rows,
    Signal,
    classification_signals,
    index_signals,
    row_signals,
)
from fesmia_hooks.text import SEQUENCE_SIGNALS, sequence_signals, token_statistics


def test_the_lists_of_names_derive_from_the_table_in_their_documented_order():
    assert CLASSIFICATION_SIGNALS == ("phi", "log_prob", "margin", "neg_entropy", "max_logit_gap")
    assert SEQUENCE_SIGNALS == ("log_prob", "min_k", "zlib", "phi", "margin", "neg_entropy",
                                "max_logit_gap", "positions")
    assert text._TOKEN_STATS == ("log_prob", "phi", "margin", "neg_entropy", "max_logit_gap")
    assert text._NEEDS == {"log_prob": "log_prob", "min_k": "log_prob", "zlib": "log_prob",
                           "phi": "phi", "margin": "margin", "neg_entropy": "neg_entropy",
                           "max_logit_gap": "max_logit_gap", "positions": "log_prob"}
    assert signals.DEFAULT_SIGNALS == ("phi", "log_prob", "margin", "neg_entropy")
    assert text.DEFAULT_SEQUENCE_SIGNALS == ("log_prob", "min_k", "zlib")
    assert [s.name for s in SIGNALS if s.sequence_only] == ["min_k", "zlib", "positions"]


def _target_logit(rows):
    return rows.z_y


@pytest.fixture
def with_target_logit(monkeypatch):
    """The built-in table plus one per-row signal, as if it had been added to SIGNALS."""
    index = index_signals(SIGNALS + (Signal("target_logit", per_row=_target_logit),))
    monkeypatch.setattr(signals, "_INDEX", index)
    monkeypatch.setattr(text, "_INDEX", index)
    return index


def test_one_entry_makes_a_signal_available_to_classifiers_and_sequences(with_target_logit):
    index = with_target_logit
    assert index.classification == CLASSIFICATION_SIGNALS + ("target_logit",)
    assert index.sequence == SEQUENCE_SIGNALS[:-1] + ("target_logit", "positions")
    assert index.token_statistics[-1] == "target_logit"
    assert index.reads["target_logit"] == "target_logit"

    z = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 2, 2])
    got = classification_signals(z, y, ["phi", "target_logit"])
    assert torch.equal(got[:, 1], z[torch.arange(5), y])

    logits = torch.randn(2, 3, 4)
    targets = torch.tensor([[1, 2, -100], [0, 3, 3]])
    per_token = token_statistics(logits, targets, ["target_logit"], chunk_elements=4)
    want = logits.gather(2, targets.clamp_min(0)[..., None]).squeeze(2)
    assert torch.equal(per_token["target_logit"][targets != -100], want[targets != -100])
    got = sequence_signals(logits, targets, ["target_logit", "min_k"])
    means = torch.stack([want[0, :2].mean(), want[1].mean()])
    torch.testing.assert_close(got[:, 0], means)


def test_without_the_entry_the_name_is_refused():
    with pytest.raises(fh.ConfigurationError, match="unknown signal"):
        classification_signals(torch.zeros(1, 3), torch.tensor([0]), ["target_logit"])
    with pytest.raises(fh.ConfigurationError, match="unknown sequence signal"):
        sequence_signals(torch.zeros(1, 2, 3), torch.tensor([[0, 1]]), ["target_logit"])


def test_a_malformed_table_is_refused():
    with pytest.raises(fh.ConfigurationError, match="exactly one of"):
        Signal("both", per_row=_target_logit, reads="log_prob")
    with pytest.raises(fh.ConfigurationError, match="exactly one of"):
        Signal("neither")
    with pytest.raises(fh.ConfigurationError, match="repeat"):
        index_signals(SIGNALS + (Signal("phi", per_row=_target_logit),))
    with pytest.raises(fh.ConfigurationError, match="not a per-row signal"):
        index_signals(SIGNALS + (Signal("bad", reads="min_k"),))


def test_rows_share_their_pieces():
    rows = Rows(torch.tensor([[60.0, 0.0, 0.0], [1.0, 2.0, 2.0]]), torch.tensor([0, 1]))
    assert rows.others is rows.others and rows.logsumexp is rows.logsumexp
    assert rows.others.tolist() == [[-float("inf"), 0.0, 0.0], [1.0, -float("inf"), 2.0]]
    assert rows.z_y.tolist() == [60.0, 2.0]


def test_tokens_and_samples_get_the_same_numbers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g) * 10
    logits[0, 0] = torch.tensor([60.0, 0, 0, 0, 0, 0, 0])  # saturated
    logits[0, 1] = 0.0  # all tied
    targets = torch.randint(0, 7, (3, 5), generator=g)
    targets[2, 3:] = -100
    scored = targets != -100
    names = list(CLASSIFICATION_SIGNALS)
    per_sample = classification_signals(logits[scored], targets[scored], names)
    for chunk in (7, 10**6):  # one position at a time, all at once
        per_token = token_statistics(logits, targets, names, chunk_elements=chunk)
        for i, name in enumerate(names):
            assert torch.equal(per_token[name][scored], per_sample[:, i]), name


def test_the_shared_pieces_match_their_textbook_forms_in_float64():
    # The fast forms (logsumexp through the log-softmax at each row's maximum, the entropy as
    # a dot product) against direct float64 computations, saturated and tied rows included.
    g = torch.Generator().manual_seed(3)
    z = torch.randn(64, 300, generator=g) * 6
    z[:8, 5] = 200.0  # saturated far past float32's exp range
    z[8:12] = 1.5  # all tied
    y = torch.randint(0, 300, (64,), generator=g)
    y[:4] = 5  # the saturated class is the target in half of those rows
    got = dict(zip(CLASSIFICATION_SIGNALS,
                   row_signals(z, y, CLASSIFICATION_SIGNALS), strict=True))
    zd = z.double()
    zy = zd.gather(1, y[:, None]).squeeze(1)
    others = zd.scatter(1, y[:, None], float("-inf"))
    p, logp = torch.softmax(zd, 1), torch.log_softmax(zd, 1)
    want = {
        "phi": zy - torch.logsumexp(others, 1),
        "log_prob": zy - torch.logsumexp(zd, 1),
        "margin": zy - others.amax(1),
        "neg_entropy": (p * logp).sum(1),
        "max_logit_gap": zd.topk(2, 1).values[:, 0] - zd.topk(2, 1).values[:, 1],
    }
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-4,
                                   msg=name)
    torch.testing.assert_close(Rows(z, y).logsumexp.double(), torch.logsumexp(zd, 1),
                               rtol=1e-6, atol=1e-4)


def test_a_masked_token_logit_of_minus_infinity_leaves_the_signals_finite():
    # A model that masks part of its vocabulary with -inf: p = 0 there, and 0 * log 0 adds
    # nothing to the entropy (it was 0 * -inf = NaN).
    z = torch.tensor([[3.0, -float("inf"), 0.0, 1.0], [-float("inf"), 2.0, 2.0, -float("inf")]])
    values = row_signals(z, torch.tensor([0, 2]), CLASSIFICATION_SIGNALS)
    for name, value in zip(CLASSIFICATION_SIGNALS, values, strict=True):
        assert torch.isfinite(value).all(), name
    p = torch.tensor([2.0, 2.0]).softmax(0)
    assert values[CLASSIFICATION_SIGNALS.index("neg_entropy")][1].item() == pytest.approx(
        float((p * p.log()).sum()))
