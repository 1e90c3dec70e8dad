"""The post-training audit: a valid set-level test (placebos), power on memorised suspects,
per-suspect scores, the known-members readings, token sequences, no side effects, clear
errors."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import fesmia_hooks as fh
from fesmia_hooks.audit import audit, set_test


class Memoriser(nn.Module):
    """A classifier that memorised the labels of ``keys`` and knows nothing else."""

    def __init__(self, keys, labels, num_classes=4):
        super().__init__()
        self.register_buffer("keys", keys.clone())
        self.register_buffer("values", labels.clone())
        self.num_classes = num_classes
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        hit = (x[:, None, :] == self.keys[None]).all(-1)
        label = self.values[hit.float().argmax(1)]
        logits = torch.zeros(x.shape[0], self.num_classes) + self.bias
        return logits.scatter_add(1, label[:, None], 6.0 * hit.any(1, keepdim=True).float())


class SequenceMemoriser(nn.Module):
    """A causal LM that predicts the next token of the sequences it memorised."""

    def __init__(self, memorised, vocab=20):
        super().__init__()
        self.register_buffer("memorised", memorised.clone())
        self.vocab = vocab
        self.scale = nn.Parameter(torch.tensor(5.0))

    def forward(self, ids, attention_mask=None):
        b, t = ids.shape
        hit = (ids[:, None, :] == self.memorised[None]).all(-1).any(1)  # [B]
        nxt = torch.roll(ids, -1, dims=1)
        logits = torch.zeros(b, t, self.vocab)
        value = (self.scale * hit.float())[:, None, None].expand(b, t, 1)
        return logits.scatter(2, nxt[..., None], value)


class Broken(nn.Module):
    """A model built for other inputs."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(5, 4)

    def forward(self, x):
        return self.layer(x)


def _data(n, seed, width=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_on_placebos_the_set_test_says_shown_in_at_most_alpha_of_runs():
    rng = np.random.default_rng(0)
    shown = sum(set_test(rng.standard_t(3, 30), rng.standard_t(3, 120), permutations=199,
                         seed=run)[1] <= 0.05 for run in range(400))
    assert shown <= 30, f"{shown} of 400 placebo sets were 'shown'"  # 5 % is 20; sd 4.4


def test_end_to_end_a_model_that_saw_neither_side_shows_nothing_beyond_alpha():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    shown = 0
    for run in range(60):
        x, y = _data(120, seed=run)
        shown += audit(model, (x[:40], y[:40]), (x[40:], y[40:]), permutations=199,
                       seed=run).shown
    assert shown <= 8, f"{shown} of 60 placebo audits were 'shown'"  # 5 % is 3


def test_memorised_suspects_are_shown_and_ranked_first():
    x, y = _data(300, seed=1)
    suspects, non_members = (x[:50], y[:50]), (x[100:], y[100:])
    half = Memoriser(x[:25], y[:25])  # the first 25 suspects were trained on
    result = audit(half, suspects, non_members, permutations=999)
    assert result.verdict == "shown" and result.p_value <= 0.002
    assert 0.6 < result.effect_auc_low <= result.effect_auc <= result.effect_auc_high
    assert set(result.ranking()[:25].tolist()) == set(range(25))
    assert (result.suspect_p_values[:25] < 0.01).all()
    assert result.suspect_p_values[25:].min() > 0.01
    unseen = audit(Memoriser(x[50:75], y[50:75]), suspects, non_members, permutations=999)
    assert unseen.verdict == "not shown"


def test_per_suspect_p_values_are_valid_under_the_null():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    small = []
    for run in range(20):
        x, y = _data(240, seed=100 + run)
        r = audit(model, (x[:40], y[:40]), (x[40:], y[40:]), permutations=99, seed=run)
        small.append((r.suspect_p_values <= 0.1).mean())
    assert float(np.mean(small)) <= 0.13  # at most 10 % in expectation


def test_known_members_give_few_shot_scores_log_mia_and_an_epsilon_bound():
    x, y = _data(400, seed=2)
    trained = Memoriser(torch.cat([x[:30], x[100:140]]), torch.cat([y[:30], y[100:140]]))
    result = audit(trained, (x[:60], y[:60]), (x[200:], y[200:]), members=(x[100:140],
                   y[100:140]), permutations=999, random_inclusion=True)
    assert result.members == 40 and result.shown
    assert result.log_mia is not None and result.log_mia.strict > result.log_mia.chance_strict
    assert result.log_mia.significant
    assert result.epsilon_lower_bound > 0
    assert set(result.ranking()[:30].tolist()) == set(range(30))
    assert "known members: Log-MIA strict" in result.summary()
    # the set-level scores stay on the non-members' scale, apart from the few-shot ones
    assert len(result.suspect_set_scores) == 60
    assert not np.allclose(result.suspect_set_scores, result.suspect_scores)
    plain = audit(trained, (x[:60], y[:60]), (x[200:], y[200:]), members=(x[100:140],
                  y[100:140]), permutations=999)
    assert math.isnan(plain.epsilon_lower_bound)  # members not drawn by coins: no claim
    few = audit(trained, (x[:60], y[:60]), (x[200:], y[200:]), members=(x[100:110],
                y[100:110]), permutations=99)
    assert few.log_mia is None  # 10 members are too few for the probe's episodes


def test_token_sequences_are_audited_like_samples():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 20, (200, 12), generator=g)
    lm = SequenceMemoriser(ids[:40])
    shown = audit(lm, ids[:40], ids[100:], permutations=999, vocab_size=20)
    assert shown.shown and shown.signals == ("log_prob", "min_k", "zlib")
    assert audit(lm, ids[40:80], ids[100:], permutations=999, vocab_size=20).verdict == (
        "not shown")
    as_lists = audit(lm, ids[:40].tolist(), ids[100:].tolist(), permutations=999, vocab_size=20)
    assert as_lists.p_value == shown.p_value


def test_the_audit_leaves_the_model_and_random_streams_untouched():
    x, y = _data(200, seed=4)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    state = torch.get_rng_state()
    audit(model, (x[:50], y[:50]), (x[50:], y[50:]), permutations=99)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_the_result_serialises_without_the_data():
    x, y = _data(200, seed=6)
    result = audit(Memoriser(x[:20], y[:20]), (x[:40], y[:40]), (x[50:], y[50:]),
                   permutations=99)
    d = result.as_dict()
    assert d["verdict"] == result.verdict and len(d["suspect_scores"]) == 40
    assert len(d["non_member_scores"]) == 150 and d["suspect_set_scores"] == d["suspect_scores"]
    assert sorted(d["ranking"]) == list(range(40))
    text = repr(d)
    assert str(round(float(x[0, 0]), 4)) not in text  # no input values in the output


@pytest.mark.parametrize("call, error, message", [
    (lambda x, y: audit(nn.Linear(6, 4), (x[:2], y[:2]), (x[2:4], y[2:4])), fh.CanaryError,
     "with 2 suspect(s) and 2 non-member(s) no test can reach p <= 0.05"),
    (lambda x, y: audit(nn.Linear(6, 4), (x[:20], y[:20]), (x[10:40], y[10:40])), fh.CanaryError,
     "10 sample(s) appear among both suspects and non-members"),
    (lambda x, y: audit(Broken(), (x[:20], y[:20]), (x[20:40], y[20:40])), fh.ProbeError,
     "the model failed on the samples (RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    (lambda x, y: audit(nn.Linear(6, 4), (x[:20], y[:20]), (x[20:40], y[20:40]), decode=3),
     fh.ConfigurationError, "`decode` must be callable, got int"),
    (lambda x, y: audit(nn.Linear(6, 4), (x[:20], y[:20]), (x[20:40, :3], y[20:40])),
     fh.CanaryError, "same sample shape"),
    (lambda x, y: audit("model", (x[:20], y[:20]), (x[20:40], y[20:40])), fh.ConfigurationError,
     "`model` must be a torch.nn.Module, got str"),
    (lambda x, y: audit(nn.Linear(6, 4), (x[:20], y[:20]), (x[20:40], y[20:40]), alpha=2),
     fh.ConfigurationError, "alpha"),
    (lambda x, y: audit(nn.Linear(6, 4), (x[:20], y[:20]), (x[20:40], y[20:40]), kind="images"),
     fh.ConfigurationError, "kind"),
    (lambda x, y: audit(nn.Linear(6, 4), 3.0, (x[20:40], y[20:40])), fh.ConfigurationError,
     "could not tell what kind of data this is"),
    (lambda x, y: audit(nn.Linear(6, 4), (x[:30], y[:30]), (x[30:31], y[30:31]),
                        members=(x[40:60], y[40:60])), fh.CanaryError,
     "need at least 2 non-members"),
])
def test_bad_inputs_get_clear_errors(call, error, message):
    x, y = _data(100, seed=7)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(x, y)


def test_large_sets_are_audited_without_overflow():
    x, y = _data(1300, seed=8)
    torch.manual_seed(0)
    result = audit(nn.Linear(6, 4), (x[:600], y[:600]), (x[600:1200], y[600:1200]),
                   permutations=99)
    assert result.suspects == 600 and 0 < result.p_value <= 1


def test_random_inclusion_without_members_is_refused():
    x, y = _data(100, seed=9)
    with pytest.raises(fh.ConfigurationError, match="no `members` were given"):
        audit(nn.Linear(6, 4), (x[:30], y[:30]), (x[30:], y[30:]), random_inclusion=True)


def test_a_test_that_would_run_for_hours_is_refused_with_what_to_do():
    with pytest.raises(fh.ConfigurationError, match="lower `permutations` \\(at most 1,000 here"):
        set_test(np.zeros(10**6), np.zeros(10**6))


def test_huge_sets_get_a_normal_interval_quickly():
    rng = np.random.default_rng(0)
    auc, p, low, high = set_test(rng.normal(0.1, 1, 5000), rng.normal(0, 1, 5000),
                                 permutations=99)
    assert low < auc < high and high - low < 0.05 and p == 0.01


def test_a_failing_dataset_is_told_without_its_values():
    from torch.utils.data import Dataset

    class Failing(Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            raise ValueError("cannot decode sample zanzibar 987.25")

    x, y = _data(100, seed=10)
    with pytest.raises(fh.CanaryError) as caught:
        audit(nn.Linear(6, 4), Failing(), (x, y))
    assert "reading a sample of the Dataset failed" in str(caught.value)
    assert "zanzibar" not in str(caught.value) and "987" not in str(caught.value)
