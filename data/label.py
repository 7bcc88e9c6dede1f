"""Labels for the `labeled` tier: a quality score, the language, and domain tags.

The quality score is the mean headroom of a document's quality signals under the filter thresholds it
already passed: 1.0 means no symbols, digits, repeated lines / paragraphs / n-grams or URLs at all, 0.0 means
every signal sits at its limit (`SCORED_SIGNALS`, and the n-gram repetition of `REPETITION_FAMILIES`).
It orders documents *within* the kept set (e.g. for up-sampling), it is not a second filter.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable

from data.filters import _LATIN_WORD_CHAR, CJK_RANGES, UNSPACED_RANGES, QualityConfig, word_units, words
from data.seeds import check_field_types

# (signal, QualityConfig field holding its limit); symbols without punctuation, which would rank Chinese prose
# below English of the same quality
SCORED_SIGNALS = (("special_char_ratio", "max_symbol_ratio"), ("digit_ratio", "max_digit_ratio"),
                  ("hash_ellipsis_ratio", "max_hash_ellipsis_ratio"), ("dup_lines", "max_dup_lines"),
                  ("dup_line_chars", "max_dup_line_chars"), ("dup_paragraphs", "max_dup_paragraphs"),
                  ("dup_paragraph_chars", "max_dup_paragraph_chars"), ("url_density", "max_url_density"))
# n-gram repetition (Gopher): each family counts once, by its signal closest to its limit (a run of repeated
# 5-grams is also one of 6-grams ...: averaging the n would weigh repetition six times over)
REPETITION_FAMILIES = (("top_{n}gram", "top_ngram_max"), ("dup_{n}gram", "dup_ngram_max"))

# docstring section headers (Google, NumPy style), matched as written and lower-cased (an attribute list's "args:")
_DOC_SECTIONS = ("Args:", "Arguments:", "Parameters:", "Returns:", "Raises:", "Yields:", "Parameters\n---",
                 "Returns\n---")

# (tag, keywords): plain words match whole lower-cased words, with punctuation split off ("theorem." and
# "lemma," count); anything else (CJK, punctuation such as "self.") matches as a substring, and a keyword that
# starts with a newline matches at the start of a line, after its indentation, and as written, case and all: it names
# syntax ("\nimport " is a statement, "import tariffs" mid-sentence is not, nor a line's "Import duties rose": prose
# capitalises a line's first word: "From Monday" opening two paragraphs made news code, and docstrings' "Return the
# ..." made them code). A substring keyword that starts with a letter starts a word ("self." is
# not in "himself." nor "my_self.", but is in "调用self.fit()"). Counting is one word count plus a few substring
# tests (and, where they find a keyword, one regex counting the tag's, overlapping ones once: "解方程组" is one hit),
# so it costs far less than a regex per tag. `docs` means API documentation:
# docstring sections and field lists, not the English words they use ("returns", "default" and "raises" are finance
# news as often). A CJK keyword needs no word start: Chinese has no spaces ("勾股定理" holds "定理").
DEFAULT_DOMAINS = (
    ("code", ("\ndef ", "\nclass ", "\nimport ", "\nfrom ", "\nreturn ", "self.", "#include", "=>", "function(",
              "();", "\nelif ")),
    ("math", ("theorem", "theorems", "lemma", "lemmas", "proof", "proofs", "equation", "equations", "integral",
              "integrals", "matrix", "matrices", "∑", "∫", "√", "≤", "≥", "定理",
              "证明：", "证明:", "方程组", "解方程", "方程式的")),
    ("science", ("experiment", "experiments", "hypothesis", "hypotheses", "molecule", "molecules", "protein",
                 "proteins", "physics", "enzyme", "enzymes", "实验", "研究人员")),
    ("news", ("reported", "announced", "government", "governments", "minister", "ministers", "president",
              "spokesperson", "记者", "报道", "政府")),
    ("legal", ("pursuant", "herein", "license", "licenses", "licence", "licences", "liability", "liabilities",
               "warranty", "warranties", "copyright", "法律", "条款")),
    ("finance", ("inflation", "stocks", "investment", "investments", "investors", "revenue", "revenues",
                 "interest rates", "central bank", "股票", "利率")),
    ("docs", (*(f"\n{s}" for s in _DOC_SECTIONS), *(f"\n{s.lower()}" for s in _DOC_SECTIONS), ":param ",
              ":returns:", ":rtype:", "@param ", "@return ")),
)


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """domains: `(tag, keywords)` pairs; a document gets a tag when its keywords occur at least
    `min_hits` times and at least `min_hits_per_1k_words` per thousand words (so one stray keyword in
    a long text does not tag it)."""

    domains: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_DOMAINS
    min_hits: int = 2
    min_hits_per_1k_words: float = 1.0

    def __post_init__(self):
        check_field_types(self)  # before the range checks: NaN passes `not x < lo`, 1.5 is no count
        for entry in self.domains:  # a bare (tag, keywords) pair or a string failed in unpacking, naming no field
            if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise ValueError(f"LabelConfig.domains entry {entry!r:.120} must be a (tag, (keyword, ...)) pair, e.g. "
                                 "(('code', ('def ', 'import ')),) for one domain")
            tag, keywords = entry
            # an empty keyword is found in every text (it tagged every document), a number failed in str methods
            if isinstance(keywords, str) or not isinstance(keywords, Iterable) or not keywords or not all(
                    isinstance(k, str) and k for k in keywords):
                raise ValueError(f"LabelConfig.domains[{tag!r}] must be a non-empty tuple of non-empty keywords, "
                                 f"not {keywords!r}")
        # a tag given twice was added twice to a document (and counted twice in the report's domain tags)
        if dup := sorted({t for t, _ in self.domains if [u for u, _ in self.domains].count(t) > 1}):
            raise ValueError(f"LabelConfig.domains names the tags {dup} more than once; give each tag one entry with "
                             "all its keywords")
        # stored as tuples, as QualityConfig: the same domains as lists (a JSON config's) were another config, so a
        # run resumed with them was refused ("different settings"), and the config was unhashable
        object.__setattr__(self, "domains", tuple((tag, tuple(kws)) for tag, kws in self.domains))
        if self.min_hits < 1:
            raise ValueError(f"LabelConfig.min_hits={self.min_hits} must be >= 1")
        if self.min_hits_per_1k_words < 0:
            raise ValueError(f"LabelConfig.min_hits_per_1k_words={self.min_hits_per_1k_words} must be >= 0 "
                             "(0: min_hits alone decides)")
        # line-start keywords as written (see DEFAULT_DOMAINS), the rest lower-cased
        # the substring keywords of a tag counted by one alternation, longest first, so overlapping ones count once:
        # counted each, "解方程组" (one mention) was both 解方程 and 方程组, 2 hits, and a Chinese diary tagged math
        split = tuple((tag, frozenset(k.lower() for k in kws if _PLAIN_WORD.fullmatch(k)),
                       tuple(k for k in kws if k.startswith("\n")),
                       subs := tuple(k.lower() for k in kws if not _PLAIN_WORD.fullmatch(k) and not k.startswith("\n")),
                       re.compile("|".join(rf"(?<!{_LATIN_WORD_CHAR}){re.escape(k)}"
                                           if k[:1].isalnum() and not _CJK_START.match(k) else re.escape(k)
                                           for k in sorted(subs, key=len, reverse=True))) if subs else None)
                      for tag, kws in self.domains)
        object.__setattr__(self, "_split", split)


_PLAIN_WORD = re.compile(r"[a-z0-9]+", re.I)
_CJK_START = re.compile(rf"[{CJK_RANGES}]")
# letters and digits of one script run; characters of scripts written without spaces (CJK; Thai, Lao, Myanmar, Khmer,
# as _LATIN_WORD_CHAR) split runs ("定理theorem", "ทฤษฎีtheorem" hold "theorem")
_WORD_PART = re.compile(rf"[^\W_{UNSPACED_RANGES}]+")
_DEFAULT_QUALITY = QualityConfig()
_DEFAULT_LABEL = LabelConfig()


def quality_score(signals: dict, qcfg: QualityConfig = _DEFAULT_QUALITY) -> float:
    """Mean headroom in [0, 1] of the signals present: each of `SCORED_SIGNALS` under its `qcfg` limit, and each
    n-gram repetition family of `REPETITION_FAMILIES` by its n nearest its limit (the signals `data.filters.analyze`
    returns; headroom 1 - value / limit, clipped at 0)."""

    def head(value, limit):
        return 1.0 - min(value / limit, 1.0) if limit > 0 else float(value <= 0)

    heads = [head(signals[name], getattr(qcfg, field)) for name, field in SCORED_SIGNALS if name in signals]
    for pattern, field in REPETITION_FAMILIES:
        family = [head(signals[pattern.format(n=n)], limit) for n, limit in getattr(qcfg, field)
                  if pattern.format(n=n) in signals]
        if family:
            heads.append(min(family))
    return round(sum(heads) / len(heads), 4) if heads else 0.0


def domain_tags(text: str, cfg: LabelConfig = _DEFAULT_LABEL, qcfg: QualityConfig = _DEFAULT_QUALITY) -> list[str]:
    """Tags whose keywords occur often enough (see LabelConfig). Words are counted as the quality filter's promo
    density counts them: CJK text `qcfg.cjk_chars_per_word` characters to a word."""
    low = text.lower()
    counts = collections.Counter(_WORD_PART.findall(low))
    # a CJK character is not a word: counted one, 2 news keywords in a ~3,000-character Chinese report tagged nothing
    n_words = word_units(words(low), qcfg)
    lines = None  # lines without their indentation, each after a newline, as written: for the line-start keywords
    tags = []
    for tag, plain, line_starts, subs, subs_rx in cfg._split:
        hits = sum(counts[w] for w in plain)
        for k in line_starts:
            lines = lines if lines is not None else "".join("\n" + ln.lstrip() for ln in text.split("\n"))
            hits += lines.count(k)
        if any(k in low for k in subs):
            hits += len(subs_rx.findall(low))
        if hits >= cfg.min_hits and hits * 1000 / n_words >= cfg.min_hits_per_1k_words:
            tags.append(tag)
    return tags
