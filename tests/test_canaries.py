"""CanarySet: accepted inputs, constructors, caching and every validation error."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import fesmia_hooks as fh


def data(n=40, d=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_accepts_tensors_arrays_and_datasets_alike():
    x, y = data()
    a = fh.CanarySet(members=(x[:20], y[:20]), non_members=(x[20:], y[20:]))
    b = fh.CanarySet(
        members=(x[:20].numpy(), y[:20].numpy()), non_members=(x[20:].numpy(), y[20:].numpy())
    )
    c = fh.CanarySet(
        members=TensorDataset(x[:20], y[:20]), non_members=TensorDataset(x[20:], y[20:])
    )
    for other in (b, c):
        assert torch.equal(a.inputs, other.inputs)
        assert torch.equal(a.labels, other.labels)
    assert a.is_member.tolist() == [True] * 20 + [False] * 20


def test_split_keeps_members_in_training_and_drops_non_members():
    x, y = data(100)
    (x_train, y_train), canaries = fh.CanarySet.split((x, y), size=10, seed=3)
    assert len(x_train) == 90 and canaries.num_members == canaries.num_non_members == 10
    train_rows = {tuple(r.tolist()) for r in x_train}
    members = canaries.inputs[:10]
    non_members = canaries.inputs[10:]
    assert all(tuple(r.tolist()) in train_rows for r in members)
    assert not any(tuple(r.tolist()) in train_rows for r in non_members)


def test_split_of_a_dataset_returns_a_subset():
    x, y = data(60)
    train, canaries = fh.CanarySet.split(TensorDataset(x, y), size=5)
    assert isinstance(train, torch.utils.data.Subset) and len(train) == 55
    assert len(canaries) == 10


def test_split_is_seeded():
    x, y = data(60)
    _, a = fh.CanarySet.split((x, y), size=5, seed=1)
    _, b = fh.CanarySet.split((x, y), size=5, seed=1)
    _, c = fh.CanarySet.split((x, y), size=5, seed=2)
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)


def test_from_datasets_draws_each_side_from_its_set():
    train, holdout = data(50, seed=1), data(30, seed=2)
    canaries = fh.CanarySet.from_datasets(train, holdout, size=12)
    train_rows = {tuple(r.tolist()) for r in train[0]}
    assert all(tuple(r.tolist()) in train_rows for r in canaries.inputs[:12])
    assert not any(tuple(r.tolist()) in train_rows for r in canaries.inputs[12:])


def test_moved_once_and_cached():
    x, y = data()
    canaries = fh.CanarySet(members=(x[:20], y[:20]), non_members=(x[20:], y[20:]))
    first = canaries.on("cpu")
    assert canaries.on(torch.device("cpu"))[0] is first[0]


def test_repr_never_shows_data():
    x, y = data()
    x[0, 0] = 123.456
    canaries = fh.CanarySet(members=(x[:20], y[:20]), non_members=(x[20:], y[20:]))
    assert "123.4" not in repr(canaries) and "members=20" in repr(canaries)


@pytest.mark.parametrize(
    "members, non_members, kwargs, message",
    [
        ((torch.zeros(0, 3), torch.zeros(0)), (torch.ones(2, 3), torch.zeros(2)), {},
         "members must hold at least one sample, got none"),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long)),
         (torch.randn(4, 5), torch.zeros(4, dtype=torch.long)), {},
         r"same sample shape, got \(3,\) and \(5,\)"),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long)),
         (torch.randn(4, 3).double(), torch.zeros(4, dtype=torch.long)), {},
         "same dtype, got torch.float32 and torch.float64"),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), torch.randn(4, 3), {},
         "labels for both members and non_members, or for neither"),
        ((torch.tensor([[float("nan"), 0, 0]] + [[1.0, 2, 3]] * 3), torch.zeros(4, dtype=torch.long)),
         (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), {},
         "members inputs must be finite, got 1 sample"),
        ((torch.randn(4, 3), torch.zeros(4)), (torch.randn(4, 3), torch.zeros(4)), {},
         "labels must be integer class indices, got torch.float32"),
        ((torch.randn(4, 3), torch.tensor([0, 1, 2, 9])),
         (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), {"num_classes": 3},
         r"labels must lie in \[0, 3\), got 1 label\(s\) outside it"),
        ((torch.randn(4, 3), torch.zeros(3, dtype=torch.long)),
         (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), {},
         r"one class index per sample \(4\), got shape \(3,\)"),
    ],
)
def test_validation_errors(members, non_members, kwargs, message):
    with pytest.raises(fh.CanaryError, match=message):
        fh.CanarySet(members=members, non_members=non_members, **kwargs)


def test_overlap_is_found_by_hashing():
    x, y = data()
    with pytest.raises(fh.CanaryError, match="2 sample\\(s\\) appear among both members"):
        fh.CanarySet(members=(x[:20], y[:20]), non_members=(x[18:38], y[18:38]))


def test_too_few_canaries_for_the_probe():
    x, y = data()
    canaries = fh.CanarySet(members=(x[:10], y[:10]), non_members=(x[10:], y[10:]))
    with pytest.raises(fh.CanaryError, match="needs at least 20 members and 20 non-members"):
        fh.FeSMIA(shots=5, queries=15).check_canaries(canaries)
    with pytest.raises(fh.CanaryError, match="needs at least 20 members"):
        fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(shots=5, queries=15))


def test_constructor_errors():
    x, y = data(20)
    with pytest.raises(fh.CanaryError, match=r"split\(size=15\) needs at least 30 samples, got 20"):
        fh.CanarySet.split((x, y), size=15)
    with pytest.raises(fh.ConfigurationError, match="`size` must be a positive int, got 0"):
        fh.CanarySet.split((x, y), size=0)
    with pytest.raises(fh.CanaryError, match="needs 15 holdout samples, got 10"):
        fh.CanarySet.from_datasets((x, y), (x[:10] + 5, y[:10]), size=15)
    with pytest.raises(fh.CanaryError, match="inputs and labels must have one length, got 20 and 19"):
        fh.CanarySet.split((x, y[:19]), size=2)
    with pytest.raises(fh.CanaryError, match="must be a tensor, an array"):
        fh.CanarySet(members=(object(), object()), non_members=(x, y))


def test_numpy_labels_become_long():
    x, y = data()
    canaries = fh.CanarySet(
        members=(x[:20].numpy(), y[:20].numpy().astype(np.int32)),
        non_members=(x[20:].numpy(), y[20:].numpy().astype(np.int32)),
    )
    assert canaries.labels.dtype == torch.long


def test_crafted_canaries_carry_wrong_labels_and_members_are_the_inserts():
    x, y = data(100, classes=4)
    (x_in, y_in), canaries = fh.CanarySet.crafted((x, y), num_classes=4, size=10, seed=2)
    original = {tuple(r.tolist()): int(label) for r, label in zip(x, y, strict=True)}
    every = torch.cat([canaries.inputs]), canaries.labels
    for row, label in zip(*every, strict=True):
        assert original[tuple(row.tolist())] != int(label)  # certainly wrong
    assert torch.equal(canaries.inputs[:10], x_in) and torch.equal(canaries.labels[:10], y_in)
    _, again = fh.CanarySet.crafted(TensorDataset(x, y), num_classes=4, size=10, seed=2)
    assert torch.equal(again.inputs, canaries.inputs) and torch.equal(again.labels, canaries.labels)
    with pytest.raises(fh.CanaryError, match=r"crafted\(size=60\) needs at least 120 samples"):
        fh.CanarySet.crafted((x, y), num_classes=4, size=60)
    with pytest.raises(fh.ConfigurationError, match="`num_classes` must be an int >= 2, got 1"):
        fh.CanarySet.crafted((x, y), num_classes=1)


def test_crafted_canaries_expose_memorisation_on_a_clean_model():
    from sklearn.datasets import load_digits

    from fesmia_hooks.demos.digits import digits_mlp

    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
    images = torch.tensor(digits.data / 16.0, dtype=torch.float32)[order]
    labels = torch.tensor(digits.target)[order]
    held_out = images[300:364], labels[300:364]  # never trained on with any label
    (x_in, y_in), canaries = fh.CanarySet.crafted(held_out, num_classes=10, size=32)
    x = torch.cat([images[:300], x_in])  # a clean training set plus the mislabeled members
    y = torch.cat([labels[:300], y_in])
    torch.manual_seed(0)
    model = digits_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        for idx in torch.randperm(len(x)).split(32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    report = fh.FeSMIA(shots=5, queries=15, episodes=50, permutations=199).evaluate(
        model, canaries)
    assert report.significant and report.strict > 0.75 and report.auc > 0.95


def test_negative_labels_are_refused_even_without_a_class_count():
    x, y = data()
    with pytest.raises(fh.CanaryError, match=r"class indices >= 0, got 20 negative label\(s\)"):
        fh.CanarySet(members=(x[:20], y[:20] - 5), non_members=(x[20:], y[20:]))


# ---------------------------------------------------------------------- one-hot labels
def one_hot(y, classes=3, dtype=torch.float32):
    return torch.nn.functional.one_hot(y, classes).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.uint8,
                                   torch.bool])
def test_one_hot_labels_are_read_as_class_indices(dtype):
    x, y = data()
    indices = fh.CanarySet(members=(x[:20], y[:20]), non_members=(x[20:], y[20:]))
    hot = one_hot(y, dtype=dtype)
    for members, non_members in [
        ((x[:20], hot[:20]), (x[20:], hot[20:])),
        ((x[:20].numpy(), hot[:20].numpy()), (x[20:].numpy(), hot[20:].numpy())),
        (TensorDataset(x[:20], hot[:20]), TensorDataset(x[20:], hot[20:])),
        ((x[:20], hot[:20]), (x[20:], y[20:])),  # one side one-hot, the other indices
    ]:
        canaries = fh.CanarySet(members=members, non_members=non_members, num_classes=3)
        assert canaries.labels.dtype == torch.long and canaries.labels.shape == (40,)
        assert torch.equal(canaries.labels, indices.labels)
        assert canaries.fingerprint() == indices.fingerprint()


def test_a_column_of_class_indices_is_read_as_indices():
    x, y = data()  # keras.datasets give labels as [n, 1] integer columns
    column = fh.CanarySet(members=(x[:20], y[:20, None].numpy().astype(np.uint8)),
                          non_members=(x[20:], y[20:, None]))
    assert torch.equal(column.labels, y)


def test_split_and_crafted_take_one_hot_data():
    x, y = data(100, classes=4)
    hot = one_hot(y, 4)
    (x_train, y_train), canaries = fh.CanarySet.split((x, hot), size=10, seed=3)
    _, by_index = fh.CanarySet.split((x, y), size=10, seed=3)
    assert y_train.shape == (90, 4)  # the training part stays one-hot, for Keras
    assert torch.equal(canaries.labels, by_index.labels)

    (x_in, y_in), crafted = fh.CanarySet.crafted((x, hot), num_classes=4, size=10, seed=2)
    (_, y_index), by_index = fh.CanarySet.crafted((x, y), num_classes=4, size=10, seed=2)
    assert y_in.shape == (10, 4) and y_in.dtype == hot.dtype  # to train on: one-hot too
    assert torch.equal(y_in.argmax(1), y_index)
    assert torch.equal(crafted.labels, by_index.labels)


SECRET = 0.7315  # a label value that must never appear in a message


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        (lambda hot: torch.where(torch.arange(20)[:, None] < 3, hot * SECRET + 0.05, hot), {},
         r"^members labels of shape \(20, 3\) are read as one-hot rows \(a single 1, every "
         r"other entry 0\), but 3 of the 20 rows are not \(soft or multi-hot labels\); the probe "
         r"needs one class per sample: give integer class indices \(shape \(20,\)\) or one-hot "
         r"rows$"),
        (lambda hot: torch.cat([torch.ones(2, 3), hot[2:]]), {},
         r"but 2 of the 20 rows are not \(soft or multi-hot labels\)"),
        (lambda hot: torch.zeros(20, 3), {}, r"but 20 of the 20 rows are not"),
        (lambda hot: hot.masked_fill(torch.arange(20)[:, None] == 0, float("nan")), {},
         r"but 1 of the 20 rows are not"),
        (lambda hot: hot, {"num_classes": 4},
         r"^members labels are one-hot rows of width 3, but num_classes is 4$"),
        (lambda hot: hot[:, :1].float(), {}, r"one class index per sample \(20\), got shape "
                                              r"\(20, 1\)"),
        (lambda hot: hot[:, :, None], {}, r"one class index per sample \(20\), got shape "
                                          r"\(20, 3, 1\)"),
    ],
    ids=["soft", "multi-hot", "no-class", "nan", "width", "float-column", "3-d"],
)
def test_labels_that_are_not_one_hot_are_refused_without_their_values(labels, kwargs, message):
    x, y = data()
    bad = labels(one_hot(y[:20]))
    with pytest.raises(fh.CanaryError, match=message) as info:
        fh.CanarySet(members=(x[:20], bad), non_members=(x[20:], y[20:]), **kwargs)
    assert str(SECRET)[:4] not in str(info.value) and "0.78" not in str(info.value)
