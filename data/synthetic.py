"""Seeded synthetic documents (English and Chinese word salad from the langid sample vocabulary) for
tests and benchmarks: real words, so language ID and the quality filters see plausible text, and random
order, so documents neither repeat themselves nor each other unless a test makes them."""

from __future__ import annotations

import numbers
import re

import numpy as np

from data.langid_samples import EN_LONG, ZH_LONG
from data.seeds import check_seed

EN_VOCAB = sorted({w.lower() for s in EN_LONG for w in re.findall(r"[A-Za-z]+", s)})
ZH_CHARS = sorted({c for s in ZH_LONG for c in s if "\u4e00" <= c <= "\u9fff"})


def _check_lengths(where: str, n_name: str, n, sentence) -> None:
    # sentence=-1 wrote '' for the words asked (an empty range), 0 was range()'s bare "arg 3 must not be zero"
    for name, v, low in ((n_name, n, 0), ("sentence", sentence, 1)):
        if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"{where}: {name}={v!r} must be an int >= {low}")


def en_text(rng: np.random.Generator, n_words: int = 120, sentence: int = 12) -> str:
    """`n_words` random English words in capitalised sentences of `sentence` words."""
    _check_lengths("en_text", "n_words", n_words, sentence)
    ws = list(rng.choice(EN_VOCAB, n_words))
    return " ".join(" ".join(ws[i:i + sentence]).capitalize() + "." for i in range(0, n_words, sentence))


def zh_text(rng: np.random.Generator, n_chars: int = 240, sentence: int = 16) -> str:
    """`n_chars` random Chinese characters in sentences of `sentence` characters."""
    _check_lengths("zh_text", "n_chars", n_chars, sentence)
    cs = list(rng.choice(ZH_CHARS, n_chars))
    return "".join("".join(cs[i:i + sentence]) + "。" for i in range(0, n_chars, sentence))


def documents(n: int, seed: int = 0, zh_fraction: float = 0.3) -> list[dict]:
    """`n` clean documents, about `zh_fraction` of them Chinese, with `id` and `lang_true` metadata (the language
    they were written in, to check language ID against)."""
    # n=-1 returned [] and True one document, silently; 2.5 failed as range()'s bare TypeError
    if isinstance(n, bool | np.bool_) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"documents: n={n!r} must be an int >= 0")
    if isinstance(zh_fraction, bool | np.bool_) or not isinstance(zh_fraction, numbers.Real) or not (
            0 <= zh_fraction <= 1):  # True ran as 1, '0.3' failed as a bare comparison TypeError; NaN fails both
        raise ValueError(f"documents: zh_fraction={zh_fraction!r} must be a fraction in [0, 1]")
    rng = np.random.default_rng(check_seed(seed, "documents seed"))  # seed=True ran as 1
    out = []
    for i in range(n):
        if rng.random() < zh_fraction:
            out.append({"id": f"syn-{i}", "lang_true": "zh", "text": zh_text(rng, int(rng.integers(150, 600)))})
        else:
            out.append({"id": f"syn-{i}", "lang_true": "en", "text": en_text(rng, int(rng.integers(60, 400)))})
    return out
