"""Exact dedup (hash of a normalised form) and near-dup detection (MinHash + LSH, datasketch).

Signatures are computed per document where the documents are (in the parallel per-shard pass); the
index runs once over all signatures in a fixed order, so the first occurrence of a cluster is kept and
the result does not depend on how many workers ran. Clustering is one pass, not transitive: a document is compared
with the documents kept so far only, so in a chain A ~ B ~ C with A !~ C, B is dropped as A's copy and C is kept
(datatrove's union-find clustering would drop C too).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
import unicodedata
import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

from data.filters import CJK_RANGES, _marks, tokens
from data.seeds import check_field_types, check_seed


@functools.cache
def _not_word() -> re.Pattern:
    """Runs of characters that are neither word characters nor combining marks, and underscores. Python's \\w
    leaves marks out, so `[\\W_]+` split Devanagari / Thai words at every vowel sign, and 'लड़का ... जाता' (the
    boy ... goes) folded to the same key as 'लड़की ... जाती' (the girl ... goes)."""
    cps = sorted(_marks())
    ranges, start = [], cps[0]
    for a, b in zip(cps, cps[1:] + [None]):
        if b != a + 1:
            ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(a))}")
            start = b
    return re.compile(rf"(?:[^\w{''.join(ranges)}]|_)+")


# Invisible default-ignorable characters that NFKC and data.normalize keep: U+034F combining grapheme joiner, ZWNJ /
# ZWJ, Mongolian variation selectors, variation selectors (VS16 makes '❤' the emoji '❤️') and their supplement.
# Deleted before folding: as marks, a VS16 after a folded symbol was a one-character word, so '❤️ ❤️' and '☺️ ☺️'
# had one exact key (a duplicate dropped) while '❤️' and '❤' did not; as separators, a ZWJ split the word it sat in.
# Not the tags (U+E0000-E007F): they spell which flag a black flag is (Scotland's, England's, Wales's), and deleted,
# emoji-only posts of different flags had one key. (A regex: str.translate with a table cost ~40 ns a character,
# this ~4.)
_IGNORABLE = re.compile("[\u034f\u200c\u200d\u180b-\u180f\ufe00-\ufe0f\U000e0100-\U000e01ef]")

# A space beside a Han / kana / bopomofo character (CJK_RANGES less hangul: Korean spaces its words) is layout: those
# scripts put none between words, so a hard-wrapped Chinese article and its unwrapped copy had two exact keys
_UNSPACED = CJK_RANGES.replace("\uac00-\ud7af", "").replace("\uffa1-\uffdc", "")
_UNSPACED_GAP = re.compile(rf"(?<=[{_UNSPACED}]) | (?=[{_UNSPACED}])")


def _visible(text: str) -> str:
    """`text` as keys and shingles compare it: the `_IGNORABLE` characters deleted, then its NFKC folding
    (form="NFC" keeps full-width letters and half-width katakana, and a full-width copy of a post had another exact
    key and Jaccard 0 to it; NFKC text is itself). In that order: a joiner between 'e' and a combining acute blocks
    NFKC's composition, and deleted after it left 'cafe\u0301', another key than 'café'."""
    text = _IGNORABLE.sub("", text)
    if not text.isascii() and not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    return text


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """exact: drop documents whose normalised text (case, punctuation, whitespace folded) hashes equal.
    threshold: documents whose estimated Jaccard similarity of `shingle`-token shingles (CJK-aware tokens)
        is at least this are near duplicates. `num_perm` MinHash permutations; the LSH bands are chosen so a
        pair exactly at `threshold` becomes a candidate with probability >= `recall_target`, and a candidate
        is confirmed when its estimated Jaccard is within `confirm_sigmas` standard errors of `threshold`
        (the estimate of a pair at the threshold falls below it half the time). The default favours recall:
        at 0.8 and 128 permutations the cut is 0.73 (`confirm_at()`), so pairs of true Jaccard 0.70-0.80 are
        removed too (measured: ~10% at 0.65-0.70, ~45% at 0.70-0.75, ~85% at 0.75-0.80, 99% at 0.80-0.85);
        confirm_sigmas=0 cuts at the threshold itself, with errors both ways.
    """

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    shingle: int = 5
    recall_target: float = 0.95
    confirm_sigmas: float = 2.0
    seed: int = 1

    def __post_init__(self):
        check_field_types(self)  # before the range checks: NaN passes `not lo <= x`, 'no' is truthy
        # datasketch seeds numpy's RandomState with it: another seed failed in every worker's first signature
        object.__setattr__(self, "seed", check_seed(self.seed, "DedupConfig.seed", 2**32))
        if not 0 < self.threshold <= 1:
            raise ValueError(f"DedupConfig.threshold={self.threshold} must be a Jaccard similarity in (0, 1]")
        if self.num_perm < 16:
            raise ValueError(f"DedupConfig.num_perm={self.num_perm} is too few permutations; use >= 16 (128 typical)")
        if self.shingle < 1:
            raise ValueError(f"DedupConfig.shingle={self.shingle} must be >= 1 token")
        if not self.confirm_sigmas >= 0:
            raise ValueError(f"DedupConfig.confirm_sigmas={self.confirm_sigmas} must be >= 0")
        if not 0 < self.recall_target < 1:
            raise ValueError(f"DedupConfig.recall_target={self.recall_target} must be in (0, 1)")
        b, r = self.bands()
        if self.near and (reach := 1 - (1 - self.threshold ** r) ** b) < self.recall_target:
            # bands() fell back to one row per band, short of the target: 0.81 at 0.1 and 16 permutations, in silence
            raise ValueError(f"DedupConfig.threshold={self.threshold} with num_perm={self.num_perm}: no banding "
                             f"makes a pair at the threshold a candidate with probability >= recall_target="
                             f"{self.recall_target} (at most {reach:.2f}, {b} bands of 1 row); raise num_perm or "
                             "the threshold, or lower recall_target")

    def bands(self) -> tuple[int, int]:
        """(bands b, rows r): the largest r whose S-curve 1-(1-t^r)^b reaches recall_target at t=threshold, of at
        least 2 bands: datasketch's LSH refuses one, and thresholds from ~0.9993 (128 permutations) to the documented
        1 failed in NearDupIndex ("The number of bands are too small"), naming no field."""
        best = (self.num_perm, 1)
        for r in range(1, self.num_perm // 2 + 1):
            b = self.num_perm // r
            if b and 1 - (1 - self.threshold ** r) ** b >= self.recall_target:
                best = (b, r)
        return best

    def confirm_at(self) -> float:
        """Estimated-Jaccard cut for confirming a candidate pair."""
        t = self.threshold
        return t - self.confirm_sigmas * math.sqrt(t * (1 - t) / self.num_perm)


def _no_words(text: str) -> str:
    """A text without word characters (symbols, emoji) with only its whitespace folded: folding its punctuation too
    would make every such document the empty string, all duplicates of each other."""
    return "\x00" + " ".join(text.casefold().split())


def exact_key(text: str) -> bytes:
    """16-byte hash of the text with case, punctuation and whitespace folded away (whitespace only for a text
    with no word characters). Case folds by str.casefold: str.lower left 'Straße' apart from 'STRASSE'. Invisible
    joiners and variation selectors (`_IGNORABLE`) are deleted, and so are spaces and line breaks beside Chinese or
    Japanese characters (`_UNSPACED_GAP`; as the shingles, one token a character, ignore them). Compatibility forms
    fold as NFKC folds them (`_visible`)."""
    text = _visible(text)
    folded = _not_word().sub(" ", text.casefold()).strip()
    if not folded.isascii():
        folded = _UNSPACED_GAP.sub("", folded)
    return hashlib.blake2b((folded or _no_words(text)).encode(), digest_size=16).digest()


def shingles(text: str, n: int) -> set[bytes]:
    """Case-folded CJK-aware word n-grams, punctuation dropped (one shingle of all words when fewer than n; of the
    whitespace-folded text when it has no word); invisible joiners and variation selectors
    deleted and compatibility forms folded as in `exact_key`."""
    text = _visible(text)
    toks = tokens(_not_word().sub(" ", text.casefold()))
    if not toks:
        return {_no_words(text).encode()}
    if len(toks) <= n:
        return {" ".join(toks).encode()}
    return {" ".join(toks[i:i + n]).encode() for i in range(len(toks) - n + 1)}


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int):
    # datasketch draws the permutations per MinHash object; drawing them once per config is ~30% of the time
    return MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations


def _minhash(cfg: DedupConfig, hashvalues=None) -> MinHash:
    # CRC-32 fingerprints the shingles (a C builtin, ~20x faster than datasketch's SHA-1 wrapper); the
    # random affine permutations on top are what make the minima min-wise independent
    return MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme="affine32", hashvalues=hashvalues,
                   permutations=_permutations(cfg.num_perm, cfg.seed), hashfunc=zlib.crc32)


def signature(text: str, cfg: DedupConfig = DedupConfig()) -> np.ndarray:
    """MinHash signature [num_perm] uint32 of the document's shingles."""
    m = _minhash(cfg)
    sh = list(shingles(text, cfg.shingle))
    for i in range(0, len(sh), 8192):  # update_batch materialises [batch, num_perm] uint64: keep it small
        m.update_batch(sh[i:i + 8192])
    return m.hashvalues.astype(np.uint32)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """MinHash estimate of the Jaccard similarity of two signatures [num_perm] of the same config."""
    if np.shape(a) != np.shape(b) or np.ndim(a) != 1:  # broadcast, [num_perm] against [N, num_perm] was one mean
        raise ValueError(f"jaccard compares two signatures [num_perm] of one DedupConfig.num_perm; got shapes "
                         f"{np.shape(a)} and {np.shape(b)} (one row of a stack each, `signature(text, cfg)`)")
    return float(np.mean(a == b))


class NearDupIndex:
    """Streaming near-dup index: `add(key, sig)` returns the key of an earlier near duplicate, or None
    (then the document is indexed as a new cluster representative); `insert(key, sig)` indexes one unasked."""

    def __init__(self, cfg: DedupConfig = DedupConfig()):
        self.cfg = cfg
        self._lsh = MinHashLSH(num_perm=cfg.num_perm, params=cfg.bands())
        self._sigs: dict = {}
        self._order: dict = {}
        self._cut = cfg.confirm_at()

    def add(self, key, sig: np.ndarray):
        """The key of the most similar earlier representative at or above the confirm cut, or None (then `key`
        becomes a representative). sig: the document's MinHash signature [num_perm] (`signature`)."""
        return self.add_scored(key, sig)[0]

    def add_scored(self, key, sig: np.ndarray) -> tuple:
        """`add`'s answer and the estimated Jaccard similarity to that representative (None with None): the audit
        trail names how similar a dropped near duplicate was, at no cost (the comparison made it)."""
        m = _minhash(self.cfg, self._checked(sig).astype(np.uint64))
        best, best_j = None, -1.0
        # the LSH answers in set order (it varies with PYTHONHASHSEED): candidates in insertion order, so a tie
        # goes to the earliest representative in every process
        for other in sorted(self._lsh.query(m), key=self._order.__getitem__):
            j = jaccard(sig, self._sigs[other])
            if j > best_j:
                best, best_j = other, j
        if best is not None and best_j >= self._cut:
            return best, best_j
        self._insert(key, m, sig)
        return None, None

    def insert(self, key, sig: np.ndarray):
        """Index `key` as a representative whatever it is similar to (a document kept elsewhere, e.g. by the run a
        held-out set is deduplicated against, under its own threshold). sig: [num_perm] (`signature`)."""
        self._insert(key, _minhash(self.cfg, self._checked(sig).astype(np.uint64)), sig)

    def _checked(self, sig: np.ndarray) -> np.ndarray:
        # datasketch's "Numbers of hash values and permutations mismatch" named neither the signature nor the setting
        if np.shape(sig) != (self.cfg.num_perm,):
            raise ValueError(f"NearDupIndex: a signature of shape {np.shape(sig)}, the index's DedupConfig.num_perm="
                             f"{self.cfg.num_perm} wants ({self.cfg.num_perm},): make it with `signature(text, cfg)` "
                             "under the index's DedupConfig")
        return sig

    def _insert(self, key, m: MinHash, sig: np.ndarray):
        self._lsh.insert(key, m)
        self._sigs[key] = sig.copy()  # a row of a shard's signatures kept the whole shard's alive
        self._order[key] = len(self._order)

    def __len__(self):
        return len(self._sigs)
