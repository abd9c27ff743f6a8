"""Tests for ``flashfn.data``."""

from __future__ import annotations

import gzip
from importlib import resources

import pytest
import torch

from flashfn.data import (
    ByteLMDataset,
    byte_splits,
    fashion_mnist_available,
    held_out_batches,
    load_corpus,
    load_fashion_mnist,
)

# --------------------------------------------------------------------------- #
# Corpus
# --------------------------------------------------------------------------- #


def test_corpus_size_and_text() -> None:
    data = load_corpus()
    assert isinstance(data, bytes)
    assert 900_000 <= len(data) <= 1_100_000
    text = data.decode("utf-8")  # must be valid UTF-8
    assert data.isascii()
    for expected in ("ROMEO", "HAMLET", "MACBETH", "To be, or not to be", "Juliet"):
        assert expected in text
    assert "gutenberg" not in text.lower()  # licence boilerplate stripped
    assert "\r" not in text


def test_corpus_resource_is_gzip() -> None:
    blob = resources.files("flashfn.data").joinpath("shakespeare.txt.gz").read_bytes()
    assert blob[:2] == b"\x1f\x8b"
    assert len(blob) < len(load_corpus())
    assert gzip.decompress(blob) == load_corpus()


def test_make_corpus_strips_gutenberg_boilerplate() -> None:
    from flashfn.data.make_corpus import strip_gutenberg

    raw = (
        "The Project Gutenberg EBook of Hamlet\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
        "ACT I\r\n"
        "<<THIS ELECTRONIC VERSION IS PROVIDED BY PROJECT GUTENBERG\r\n"
        "ETC.>>\r\n"
        "Scene I.\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
        "licence text\r\n"
    )
    assert strip_gutenberg(raw) == "ACT I\nScene I.\n"
    with pytest.raises(ValueError, match="Gutenberg"):
        strip_gutenberg("Scene I.\nProduced by Project Gutenberg volunteers\n")


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #


def test_byte_splits_deterministic_and_disjoint() -> None:
    data = load_corpus()
    train, val = byte_splits(data, val_fraction=0.1)
    train2, val2 = byte_splits(data, val_fraction=0.1)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert train.dtype == torch.long and val.dtype == torch.long
    assert train.dim() == 1 and val.dim() == 1
    assert train.numel() + val.numel() == len(data)
    assert val.numel() == int(len(data) * 0.1)
    # Disjoint: train is the prefix, val the suffix, and together they rebuild the data.
    assert bytes(train.to(torch.uint8).tolist()) == data[: train.numel()]
    assert bytes(val.to(torch.uint8).tolist()) == data[train.numel() :]
    assert int(train.min()) >= 0 and int(train.max()) <= 255


def test_byte_splits_small() -> None:
    train, val = byte_splits(b"abcdefghij", val_fraction=0.3)
    assert train.tolist() == list(b"abcdefg")
    assert val.tolist() == list(b"hij")


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_byte_splits_bad_fraction(frac: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        byte_splits(b"abcdefghij", val_fraction=frac)


def test_byte_splits_bad_data() -> None:
    with pytest.raises(ValueError, match="data"):
        byte_splits("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data"):
        byte_splits(b"ab", val_fraction=0.1)  # held-out part would be empty


# --------------------------------------------------------------------------- #
# ByteLMDataset
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def train_tokens() -> torch.Tensor:
    return byte_splits(load_corpus())[0]


def test_dataset_items(train_tokens: torch.Tensor) -> None:
    ds = ByteLMDataset(train_tokens, seq_len=64, num_samples=10, seed=0)
    assert len(ds) == 10
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"input_ids", "labels"}
        assert item["input_ids"].shape == (64,)
        assert item["input_ids"].dtype == torch.long
        assert item["labels"].dtype == torch.long
        assert torch.equal(item["input_ids"], item["labels"])
        # Windows are contiguous slices of the token stream.
        start = int(ds.starts[i])
        assert torch.equal(item["input_ids"], train_tokens[start : start + 64])
    # labels is a separate tensor: editing it must not touch input_ids.
    item = ds[0]
    item["labels"][0] = -100
    assert int(item["input_ids"][0]) != -100
    assert torch.equal(ds[-1]["input_ids"], ds[9]["input_ids"])
    with pytest.raises(IndexError):
        ds[10]


def test_dataset_deterministic_for_seed(train_tokens: torch.Tensor) -> None:
    a = ByteLMDataset(train_tokens, seq_len=32, num_samples=50, seed=123)
    torch.manual_seed(999)  # global RNG must not matter
    b = ByteLMDataset(train_tokens, seq_len=32, num_samples=50, seed=123)
    c = ByteLMDataset(train_tokens, seq_len=32, num_samples=50, seed=124)
    assert torch.equal(a.starts, b.starts)
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(50))
    assert not torch.equal(a.starts, c.starts)
    # Repeated access returns the same window.
    assert torch.equal(a[7]["input_ids"], a[7]["input_ids"])


def test_dataset_default_num_samples_and_bounds() -> None:
    tokens = torch.arange(100)
    ds = ByteLMDataset(tokens, seq_len=10)
    assert len(ds) == 10
    full = ByteLMDataset(tokens, seq_len=100, num_samples=3)
    for i in range(3):
        assert torch.equal(full[i]["input_ids"], tokens)
    # Every window stays inside the stream.
    many = ByteLMDataset(tokens, seq_len=7, num_samples=500, seed=1)
    assert int(many.starts.min()) >= 0 and int(many.starts.max()) <= 100 - 7


def test_dataset_works_with_dataloader(train_tokens: torch.Tensor) -> None:
    ds = ByteLMDataset(train_tokens, seq_len=16, num_samples=8)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["input_ids"].shape == (4, 16)
    assert torch.equal(batch["input_ids"], batch["labels"])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": -5}, "seq_len"),
        ({"seq_len": 2.5}, "seq_len"),
        ({"seq_len": True}, "seq_len"),
        ({"seq_len": 101}, "seq_len"),
        ({"seq_len": 8, "num_samples": 0}, "num_samples"),
        ({"seq_len": 8, "num_samples": -1}, "num_samples"),
        ({"seq_len": 8, "seed": "x"}, "seed"),
        ({"seq_len": 8, "tokens": [1, 2, 3] * 10}, "tokens"),
        ({"seq_len": 8, "tokens": torch.zeros(100)}, "tokens"),
        ({"seq_len": 8, "tokens": torch.zeros(10, 10, dtype=torch.long)}, "tokens"),
    ],
)
def test_dataset_bad_args(kwargs: dict, name: str) -> None:
    kwargs = {"tokens": torch.arange(100), **kwargs}
    with pytest.raises(ValueError, match=name):
        ByteLMDataset(**kwargs)


# --------------------------------------------------------------------------- #
# held_out_batches
# --------------------------------------------------------------------------- #


def test_held_out_batches() -> None:
    tokens = torch.arange(1000)
    batches = held_out_batches(tokens, seq_len=10, batch_size=4, num_batches=3)
    assert len(batches) == 3
    for b in batches:
        assert set(b) == {"input_ids", "labels"}
        assert b["input_ids"].shape == (4, 10)
        assert b["input_ids"].dtype == torch.long
        assert torch.equal(b["input_ids"], b["labels"])
    # Contiguous, in order, non-overlapping.
    flat = torch.cat([b["input_ids"].reshape(-1) for b in batches])
    assert torch.equal(flat, tokens[:120])
    assert flat.unique().numel() == flat.numel()
    again = held_out_batches(tokens, seq_len=10, batch_size=4, num_batches=3)
    assert all(
        torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again)
    )


def test_held_out_batches_on_corpus() -> None:
    _, val = byte_splits(load_corpus())
    batches = held_out_batches(val, seq_len=256, batch_size=8, num_batches=4)
    assert len(batches) == 4 and batches[0]["input_ids"].shape == (8, 256)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_batches": -1}, "num_batches"),
        ({"num_batches": 100}, "num_batches"),  # more than fit
        ({"tokens": torch.zeros(1000)}, "tokens"),
    ],
)
def test_held_out_batches_bad_args(kwargs: dict, name: str) -> None:
    args = {
        "tokens": torch.arange(1000),
        "seq_len": 10,
        "batch_size": 4,
        "num_batches": 3,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        held_out_batches(**args)


# --------------------------------------------------------------------------- #
# Fashion-MNIST
# --------------------------------------------------------------------------- #


def test_fashion_mnist_missing_message(tmp_path) -> None:
    assert not fashion_mnist_available(tmp_path)
    with pytest.raises(
        FileNotFoundError, match="apt-get install dataset-fashion-mnist"
    ):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_loader() -> None:
    if not fashion_mnist_available():
        pytest.skip(
            "Fashion-MNIST files not installed in /usr/share/datasets/fashion-mnist "
            "(apt-get install dataset-fashion-mnist)"
        )
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert float(x_train.min()) >= 0.0 and float(x_train.max()) <= 1.0
    assert float(x_train.max()) == 1.0
    for y in (y_train, y_test):
        assert int(y.min()) == 0 and int(y.max()) == 9
        assert torch.bincount(y, minlength=10).numel() == 10
    # Fashion-MNIST is balanced: 6000 / 1000 examples per class.
    assert torch.bincount(y_train).tolist() == [6000] * 10
    assert torch.bincount(y_test).tolist() == [1000] * 10
