"""CanarySet: accepted inputs, constructors, caching and every validation error."""

import warnings

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


# ---------------------------------------------------------------------- storage, dtypes
PLANT = 987.25  # a canary value that must never appear in a message


def planted(n=10, d=4, seed=0):
    x, y = data(n, d, seed=seed)
    x[:, 0] = PLANT
    return x, y


def no_value_in(message):
    return "987" not in message and "0.25" not in message


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (lambda x: torch.empty(5, 4, device="meta"),
         r"^members inputs are on the 'meta' device, which holds no data: give tensors with "
         r"real values$"),
        (lambda x: (x[:5], torch.empty(5, dtype=torch.long, device="meta")),
         r"^members labels are on the 'meta' device"),
        (lambda x: x[:5].to_sparse(),
         r"^members inputs are a sparse tensor \(torch.sparse_coo\), which is not supported: "
         r"call .to_dense\(\)$"),
        (lambda x: x[:5].to_sparse_csr(), r"sparse tensor \(torch.sparse_csr\).*\.to_dense\(\)"),
        (lambda x: (x[:5], torch.zeros(5, dtype=torch.long).to_sparse()),
         r"^members labels are a sparse tensor"),
        (lambda x: torch.quantize_per_tensor(x[:5], 0.5, 0, torch.qint8),
         r"^members inputs are a quantized tensor \(torch.qint8\).*\.dequantize\(\)$"),
        (lambda x: x[:5].to(torch.complex64),
         r"^members inputs are complex \(torch.complex64\), which is not supported: give "
         r"real-valued inputs$"),
        (lambda x: x[:5].to(torch.float8_e4m3fn),
         r"^members inputs are torch.float8_e4m3fn, which is not supported"),
        (lambda x: x[:5].numpy().astype(object),
         r"^members inputs must be a tensor, an array or a sequence of numbers, got ndarray of "
         r"dtype object$"),
        (lambda x: x[:5].numpy().astype(str), r"got ndarray of dtype <U\d+$"),
        (lambda x: torch.empty(5, 0), r"^members samples must hold at least one value each, got "
                                      r"samples of shape \(0,\)$"),
    ],
    ids=["meta", "meta-labels", "sparse", "csr", "sparse-labels", "quantized", "complex",
         "float8", "object", "str", "empty-samples"],
)
def test_inputs_without_dense_real_values_are_refused_up_front(members, message):
    x, y = planted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that sparse CSR tensors are in beta
        side = members(x)
    non_members = (x[5:], y[5:]) if isinstance(side, tuple) else x[5:]
    with pytest.raises(fh.CanaryError, match=message) as info:
        fh.CanarySet(members=side, non_members=non_members)
    assert no_value_in(str(info.value))


def test_sequence_canaries_refuse_the_same_storage():
    ids = torch.randint(1, 9, (3, 5), generator=torch.Generator().manual_seed(0))
    for members, message in [
        (ids.to("meta"), r"^members token ids are on the 'meta' device"),
        (ids.to_sparse(), r"^members token ids are a sparse tensor \(torch.sparse_coo\)"),
        ({"input_ids": ids, "attention_mask": torch.ones_like(ids, device="meta")},
         r"^members attention_mask are on the 'meta' device"),
        ([ids[0].to("meta")], r"^members token ids are on the 'meta' device"),
        (ids.numpy().astype(object), r"got ndarray of dtype object$"),
    ]:
        with pytest.raises(fh.CanaryError, match=message):
            fh.SequenceCanarySet(members, ids + 10)


def test_wide_unsigned_labels_are_read_as_class_indices():
    x, y = data()
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        canaries = fh.CanarySet(members=(x[:20], y[:20].to(dtype)),
                                non_members=(x[20:], y[20:].to(dtype)), num_classes=3)
        assert torch.equal(canaries.labels, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sides_on_two_devices_are_refused():
    x, y = data()
    with pytest.raises(fh.CanaryError, match=r"inputs must be on one device, got cuda:0 and cpu"):
        fh.CanarySet(members=(x[:20].cuda(), y[:20]), non_members=(x[20:], y[20:]))


# ---------------------------------------------------------------------- overlaps
def test_negative_zero_equals_zero_in_the_overlap_check():
    x, y = planted(4)
    x[:, 1] = 0.0
    other = x[:2].clone()
    other[:, 1] = -0.0  # equal values, other bytes
    assert torch.equal(other, x[:2]) and other.numpy().tobytes() != x[:2].numpy().tobytes()
    with pytest.raises(fh.CanaryError, match=r"^2 sample\(s\) appear among both") as info:
        fh.CanarySet(members=(x[:2], y[:2]), non_members=(other, y[:2]))
    assert no_value_in(str(info.value))
    half = other.half(), x[:2].half()
    with pytest.raises(fh.CanaryError, match=r"^2 sample\(s\) appear among both"):
        fh.CanarySet(members=half[0], non_members=half[1])


def test_from_datasets_refuses_the_training_set_as_holdout():
    x, y = planted(60)
    for train in [(x, y), TensorDataset(x, y)]:
        with pytest.raises(fh.CanaryError, match=r"^from_datasets: `holdout` is the training "
                                                 r"set itself, so its samples are trained on"):
            fh.CanarySet.from_datasets(train, train, size=10)
        with pytest.raises(fh.CanaryError, match="training set itself"):  # even unchecked
            fh.CanarySet.from_datasets(train, train, size=10, check_overlap=False)
    with pytest.raises(fh.CanaryError, match="training set itself"):
        fh.CanarySet.from_datasets((x, y), (x, y.clone()), size=10)


@pytest.mark.parametrize("form", ["pair", "dataset"])
def test_from_datasets_refuses_non_members_found_in_train(form):
    x, y = planted(60)
    holdout_x = torch.randn(30, 4, generator=torch.Generator().manual_seed(9))
    holdout_x[:, 0] = PLANT
    holdout_x[:30:3] = x[40:50]  # 10 of the 30 held-out samples are training samples
    holdout_x[0, 1:] = 0.0
    x[40, 1:] = -0.0  # equal all the same
    wrap = (lambda a, b: (a, b)) if form == "pair" else TensorDataset
    with pytest.raises(fh.CanaryError) as info:
        fh.CanarySet.from_datasets(wrap(x, y), wrap(holdout_x, y[:30]), size=30, seed=1)
    message = str(info.value)
    assert message == (
        "from_datasets: 10 of the 30 non-member(s) drawn from `holdout` equal a sample of "
        "`train`, so they are trained on: draw non-members from data held out from training "
        "(deduplicate `holdout` against `train`)"
    )
    assert no_value_in(message)
    copies = wrap(x.clone(), y)  # another object, the very same samples
    with pytest.raises(fh.CanaryError, match=r"30 of the 30 non-member\(s\)"):
        fh.CanarySet.from_datasets(wrap(x, y), copies, size=30)
    # check_overlap=False skips the hashing (here the members still meet some copies)
    with pytest.raises(fh.CanaryError, match=r"appear among both members and non_members"):
        fh.CanarySet.from_datasets(wrap(x, y), copies, size=30, check_overlap=False)
    with pytest.raises(fh.ConfigurationError, match="`check_overlap` must be True or False"):
        fh.CanarySet.from_datasets(wrap(x, y), copies, size=30, check_overlap=1)


def duplicated(n=40, size=5, seed=0):
    """Data with one copy of a drawn non-member where split keeps it in the training part."""
    x, y = planted(n)
    x[:, 1] = 0.0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    x[order[-1]] = x[order[size]]  # order[size] is the first non-member, order[-1] is kept
    x[order[-1], 1] = -0.0  # a copy all the same
    return x, y, order


@pytest.mark.parametrize("form", ["pair", "dataset"])
def test_split_refuses_a_non_member_whose_copy_stays_in_training(form):
    x, y, order = duplicated()
    dataset = (x, y) if form == "pair" else TensorDataset(x, y)
    with pytest.raises(fh.CanaryError) as info:
        fh.CanarySet.split(dataset, size=5)
    message = str(info.value)
    assert message == (
        "split: 1 of the 5 drawn non-member(s) have an exact duplicate left in the training "
        "part (the dataset holds the same sample more than once), so they would be trained "
        "on: deduplicate the data first, or pass check_overlap=False to accept it"
    )
    assert no_value_in(message)
    # Opting out gives the plain split, copy included.
    train, canaries = fh.CanarySet.split(dataset, size=5, check_overlap=False)
    assert len(train[0] if form == "pair" else train) == 35
    assert canaries.num_non_members == 5
    # A copy among the members is caught with this message too.
    x[order[0]] = x[order[6]]  # member 0 copies non-member 2
    with pytest.raises(fh.CanaryError, match=r"^split: 2 of the 5 drawn non-member\(s\)"):
        fh.CanarySet.split((x, y) if form == "pair" else TensorDataset(x, y), size=5)


def test_split_of_data_without_duplicates_is_unchanged():
    x, y = data(100)
    (x_train, y_train), canaries = fh.CanarySet.split((x, y), size=10, seed=3)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor(sorted(set(range(100)) - set(order[10:20].tolist())))
    assert torch.equal(x_train, x[keep]) and torch.equal(y_train, y[keep])
    assert torch.equal(canaries.inputs, x[order[:20]])
    assert torch.equal(canaries.labels, y[order[:20]])
    # the duplicates of one non-member among themselves are no training copy
    x[order[19]] = x[order[18]]
    _, canaries = fh.CanarySet.split((x, y), size=10, seed=3)
    assert canaries.num_non_members == 10


def test_a_numpy_pad_token_id_is_taken():
    import numpy as np

    canary_set = fh.SequenceCanarySet([[1, 2, 3], [4, 5, 6, 7]], [[7, 6, 5], [3, 2, 1, 1]],
                                      pad_token_id=np.int64(0), vocab_size=9)
    assert canary_set.pad_token_id == 0 and type(canary_set.pad_token_id) is int
