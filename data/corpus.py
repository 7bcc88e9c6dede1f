"""An embedded corpus that exists on any machine with Python: the standard library's own sources.

Byte-level tokens (0..255) need no tokenizer training, so the demo and tests run offline.
"""

from __future__ import annotations

import pathlib
import sysconfig

import numpy as np

BYTE_VOCAB = 256


def stdlib_text(max_bytes: int = 4_000_000, seed: int = 0) -> str:
    """Concatenated text of stdlib `.py` files (sorted, then a seeded shuffle), up to `max_bytes`."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    np.random.default_rng(seed).shuffle(files)
    parts, total = [], 0
    for p in files:
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(t)
        total += len(t)
        if total >= max_bytes:
            break
    if not parts:
        raise FileNotFoundError(f"no readable .py files under {root}")
    return "\n\n".join(parts)[:max_bytes]


def encode_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode_bytes(tokens) -> str:
    return bytes(int(t) for t in tokens if 0 <= int(t) < 256).decode("utf-8", errors="replace")


class ByteWindows:
    """Random windows of `seq_len + 1` byte tokens from a split of the corpus.

    `batch(step)` is a pure function of (seed, step), so a resumed run sees the same data.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0):
        if len(tokens) <= seq_len + 1:
            raise ValueError(f"corpus of {len(tokens)} tokens is shorter than seq_len + 1 = {seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def train_eval_split(tokens: np.ndarray, eval_fraction: float = 0.05):
    cut = int(len(tokens) * (1 - eval_fraction))
    return tokens[:cut], tokens[cut:]
