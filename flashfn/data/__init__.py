"""Small, offline datasets for flashfn examples, tests and benchmarks.

Two sources are provided:

* An embedded ~1 MB byte-level language-modelling corpus (eight public-domain
  Shakespeare plays, see ``SOURCE.md``), exposed through :func:`load_corpus`,
  :func:`byte_splits`, :class:`ByteLMDataset` and :func:`held_out_batches`.
* Fashion-MNIST read from the Debian package ``dataset-fashion-mnist``
  (:func:`fashion_mnist_available`, :func:`load_fashion_mnist`); it is not
  embedded because of its size.

Invalid arguments raise ``ValueError`` naming the argument (wrong types
included), so callers have a single exception type to catch.

Example:
    >>> from flashfn.data import ByteLMDataset, byte_splits, load_corpus
    >>> train, val = byte_splits(load_corpus())
    >>> ds = ByteLMDataset(train, seq_len=128, num_samples=1000, seed=0)
    >>> ds[0]["input_ids"].shape
    torch.Size([128])
"""

from __future__ import annotations

import functools
import gzip
import operator
import os
import struct
from importlib import resources
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = [
    "FASHION_MNIST_DIR",
    "ByteLMDataset",
    "byte_splits",
    "fashion_mnist_available",
    "held_out_batches",
    "load_corpus",
    "load_fashion_mnist",
]

_CORPUS_FILE = "shakespeare.txt.gz"

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


# --------------------------------------------------------------------------- #
# Argument validation helpers
# --------------------------------------------------------------------------- #


def _positive_int(value: object, name: str) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer, else raise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive int, got {value!r}")  # noqa: TRY004
    try:
        ivalue = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a positive int, got {value!r}") from None
    if ivalue <= 0:
        raise ValueError(f"{name} must be a positive int, got {ivalue}")
    return ivalue


def _token_tensor(tokens: object, name: str = "tokens") -> torch.Tensor:
    """Return ``tokens`` as a 1-D int64 tensor, or raise ``ValueError``."""
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(  # noqa: TRY004
            f"{name} must be a torch.Tensor, got {type(tokens).__name__}"
        )
    if tokens.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tokens.shape)}")
    if (
        tokens.dtype == torch.bool
        or tokens.dtype.is_floating_point
        or tokens.is_complex()
    ):
        raise ValueError(f"{name} must have an integer dtype, got {tokens.dtype}")
    return tokens.long()


# --------------------------------------------------------------------------- #
# Byte-level language-modelling corpus
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=1)
def load_corpus() -> bytes:
    """Return the embedded Shakespeare corpus as raw bytes.

    The text (pure ASCII, ~1.04 MB) is stored gzip-compressed inside the
    package and read with :mod:`importlib.resources`, so it also works from an
    installed wheel or zip.

    Returns:
        The uncompressed corpus bytes.

    Example:
        >>> data = load_corpus()
        >>> data[:16]
        b'ROMEO AND JULIET'
    """
    blob = resources.files(__name__).joinpath(_CORPUS_FILE).read_bytes()
    return gzip.decompress(blob)


def byte_splits(
    data: bytes, val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split bytes into train and held-out token tensors.

    The held-out part is the last ``int(len(data) * val_fraction)`` bytes, so
    the split is deterministic and the two parts are disjoint and contiguous.

    Args:
        data: Raw bytes (e.g. from :func:`load_corpus`).
        val_fraction: Fraction of bytes kept for the held-out split, in (0, 1).

    Returns:
        ``(train, val)``: 1-D ``torch.long`` tensors of byte values 0..255.

    Raises:
        ValueError: If ``data`` is not bytes-like or too short, or
            ``val_fraction`` is outside (0, 1).

    Example:
        >>> train, val = byte_splits(b"abcdefghij", val_fraction=0.3)
        >>> train.tolist(), val.tolist()
        ([97, 98, 99, 100, 101, 102, 103], [104, 105, 106])
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes, got {type(data).__name__}")  # noqa: TRY004
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise ValueError(  # noqa: TRY004
            f"val_fraction must be a float in (0, 1), got {val_fraction!r}"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(data)
    n_val = int(n * val_fraction)
    if n_val < 1 or n_val >= n:
        raise ValueError(
            f"data ({n} bytes) is too short for val_fraction={val_fraction}: "
            "both splits must be non-empty"
        )
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return tokens[: n - n_val].clone(), tokens[n - n_val :].clone()


class ByteLMDataset(Dataset):
    """Fixed, seeded random windows over a token stream for causal LM training.

    Window start positions are drawn once, in ``__init__``, from a
    ``torch.Generator`` seeded with ``seed``; the same arguments therefore
    always give the same samples in the same order, independent of the global
    RNG state.

    Each item is ``{"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len]}``
    with ``labels`` equal to ``input_ids`` (Hugging Face causal-LM convention:
    the model shifts labels internally).

    Args:
        tokens: 1-D integer tensor (e.g. the train split of :func:`byte_splits`).
        seq_len: Window length; must be positive and ``<= len(tokens)``.
        num_samples: Number of windows; defaults to ``len(tokens) // seq_len``.
        seed: Seed for the window positions.

    Raises:
        ValueError: If an argument is invalid (the message names it).

    Example:
        >>> ds = ByteLMDataset(torch.arange(100), seq_len=4, num_samples=2, seed=0)
        >>> len(ds), ds[0]["input_ids"].shape
        (2, torch.Size([4]))
        >>> torch.equal(ds[0]["input_ids"], ds[0]["labels"])
        True
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        tokens = _token_tensor(tokens)
        seq_len = _positive_int(seq_len, "seq_len")
        if seq_len > tokens.numel():
            raise ValueError(
                f"seq_len ({seq_len}) exceeds len(tokens) ({tokens.numel()})"
            )
        if num_samples is None:
            num_samples = tokens.numel() // seq_len
        else:
            num_samples = _positive_int(num_samples, "num_samples")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")  # noqa: TRY004

        self.tokens = tokens
        self.seq_len = seq_len
        self.num_samples = num_samples
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        high = tokens.numel() - seq_len + 1
        self.starts = torch.randint(0, high, (num_samples,), generator=generator)

    def __len__(self) -> int:
        """Return the number of windows."""
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Return window ``index`` as ``{"input_ids", "labels"}``.

        Args:
            index: Sample index in ``[-len(self), len(self))``.

        Returns:
            Dict of two independent ``LongTensor[seq_len]`` with equal values.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        index = operator.index(index)
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(
                f"index {index} out of range for {self.num_samples} samples"
            )
        start = int(self.starts[index])
        window = self.tokens[start : start + self.seq_len]
        return {"input_ids": window.clone(), "labels": window.clone()}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_tokens={self.tokens.numel()}, seq_len={self.seq_len}, "
            f"num_samples={self.num_samples}, seed={self.seed})"
        )


def held_out_batches(
    tokens: torch.Tensor,
    seq_len: int,
    batch_size: int,
    num_batches: int,
) -> list[dict[str, torch.Tensor]]:
    """Cut deterministic evaluation batches from a token stream.

    Windows are contiguous and non-overlapping, taken in order from the start
    of ``tokens``: window ``k`` covers ``tokens[k * seq_len : (k + 1) * seq_len]``
    and batch ``b`` holds windows ``b * batch_size`` ... ``(b + 1) * batch_size - 1``.

    Args:
        tokens: 1-D integer tensor (e.g. the held-out split of :func:`byte_splits`).
        seq_len: Tokens per window.
        batch_size: Windows per batch.
        num_batches: Number of batches; needs
            ``num_batches * batch_size * seq_len <= len(tokens)``.

    Returns:
        List of ``num_batches`` dicts ``{"input_ids", "labels"}``, each a
        ``LongTensor[batch_size, seq_len]``, with ``labels`` equal to ``input_ids``.

    Raises:
        ValueError: If an argument is invalid or ``tokens`` is too short.

    Example:
        >>> batches = held_out_batches(torch.arange(24), 3, 2, 2)
        >>> batches[1]["input_ids"].tolist()
        [[6, 7, 8], [9, 10, 11]]
    """
    tokens = _token_tensor(tokens)
    seq_len = _positive_int(seq_len, "seq_len")
    batch_size = _positive_int(batch_size, "batch_size")
    num_batches = _positive_int(num_batches, "num_batches")
    needed = num_batches * batch_size * seq_len
    if needed > tokens.numel():
        max_batches = tokens.numel() // (batch_size * seq_len)
        raise ValueError(
            f"num_batches={num_batches} needs {needed} tokens but tokens has "
            f"{tokens.numel()} (at most {max_batches} batches fit for "
            f"batch_size={batch_size}, seq_len={seq_len})"
        )
    windows = tokens[:needed].view(num_batches, batch_size, seq_len)
    return [{"input_ids": w.clone(), "labels": w.clone()} for w in windows]


# --------------------------------------------------------------------------- #
# Fashion-MNIST
# --------------------------------------------------------------------------- #


def _missing_fashion_files(root: str | os.PathLike[str]) -> list[str]:
    """Return the Fashion-MNIST file names absent from ``root``."""
    base = Path(root)
    return [name for name in _FASHION_FILES.values() if not (base / name).is_file()]


def fashion_mnist_available(root: str | os.PathLike[str] = FASHION_MNIST_DIR) -> bool:
    """Tell whether the four Fashion-MNIST idx ``.gz`` files are present.

    Args:
        root: Folder holding the files.

    Returns:
        ``True`` if all four files exist in ``root``.

    Example:
        >>> fashion_mnist_available("/nonexistent")
        False
    """
    return not _missing_fashion_files(root)


def _read_idx(path: Path, expected_ndim: int) -> torch.Tensor:
    """Read a gzip-compressed idx file of unsigned bytes into a uint8 tensor."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: file too short for an idx header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
        raise ValueError(
            f"{path}: bad idx header (dtype 0x{dtype_code:02x}, ndim {ndim}); "
            f"expected unsigned-byte data with {expected_ndim} dims"
        )
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for dim in shape:
        count *= dim
    if len(raw) - header != count:
        raise ValueError(
            f"{path}: expected {count} data bytes for shape {shape}, got {len(raw) - header}"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(*shape)


def load_fashion_mnist(
    root: str | os.PathLike[str] = FASHION_MNIST_DIR,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Load Fashion-MNIST from its idx ``.gz`` files.

    The default ``root`` is where the Debian package ``dataset-fashion-mnist``
    installs the files (``apt-get install dataset-fashion-mnist``).

    Args:
        root: Folder with ``train-images-idx3-ubyte.gz``,
            ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
            ``t10k-labels-idx1-ubyte.gz``.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: images as ``float32``
        tensors of shape ``[N, 784]`` scaled to [0, 1], labels as ``int64``
        tensors of shape ``[N]`` with values 0..9 (60000 train, 10000 test).

    Raises:
        FileNotFoundError: If any of the four files is missing.
        ValueError: If a file is not a valid idx file or counts disagree.

    Example:
        >>> if fashion_mnist_available():
        ...     (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
        ...     print(tuple(x_train.shape), tuple(y_test.shape))
        ... else:
        ...     print((60000, 784), (10000,))
        (60000, 784) (10000,)
    """
    missing = _missing_fashion_files(root)
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {os.fspath(root)!r} (missing: {', '.join(missing)}). "
            "Install the Debian package with `sudo apt-get install dataset-fashion-mnist` "
            f"(it puts the files in {FASHION_MNIST_DIR}), or pass root= pointing to a "
            "folder holding the four idx .gz files."
        )
    base = Path(root)

    def split(images_key: str, labels_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = _read_idx(base / _FASHION_FILES[images_key], expected_ndim=3)
        labels = _read_idx(base / _FASHION_FILES[labels_key], expected_ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{_FASHION_FILES[images_key]} has {images.shape[0]} images but "
                f"{_FASHION_FILES[labels_key]} has {labels.shape[0]} labels"
            )
        x = images.reshape(images.shape[0], -1).to(torch.float32).div_(255.0)
        return x, labels.to(torch.int64)

    return split("train_images", "train_labels"), split("test_images", "test_labels")
