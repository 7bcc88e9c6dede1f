"""Composable per-document stages and their counters.

A stage is a picklable object with a `name` and `__call__(doc) -> (doc, reason)`: reason None keeps the
returned document, a reason string drops it (the returned doc may carry annotations, e.g. the detected
language, for counting). A stage may also bump counters via `count(stats, doc, dropped)`. `run_stages`
threads one document through a list of stages, updating one `StageStats` per stage, so every drop is
attributed to exactly one stage and reason, and `docs_in == docs_out + sum(dropped)` holds by construction.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

from data.filters import QualityConfig, quality_filter
from data.label import REPETITION_FAMILIES, SCORED_SIGNALS, LabelConfig, domain_tags, quality_score
from data.langid import LangID, LangIDConfig
from data.normalize import NormalizeConfig, normalize_counted
from data.shards import id_text, loggable_id

# signals kept on the document for the labelling stage (the full set is ~30 floats)
KEPT_SIGNALS = ("words", "cjk_chars", "mean_word_len", "symbol_ratio", "special_char_ratio", "digit_ratio",
                "hash_ellipsis_ratio", "dup_lines", "dup_line_chars", "dup_paragraphs", "url_density", "top_2gram",
                "dup_5gram", "boilerplate_lines", "markup_ratio", "mojibake_rate")


def nbytes(doc: dict) -> int:
    """UTF-8 size of a document's text."""
    return len(doc["text"].encode("utf-8"))


EXAMPLES = 3  # ids of dropped records kept per reason and stage (in shard order after merging)


@dataclasses.dataclass
class StageStats:
    """Documents and text bytes into and out of one stage; drops (count and bytes) by reason, and the ids of the
    first `EXAMPLES` records dropped for each reason (which file was 'binary'?); free counters (e.g. languages
    kept, boilerplate lines removed)."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    counters: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)
    # every drop as (id, reason), for the per-shard drop logs the pipeline writes (not part of the stats file)
    log: list = dataclasses.field(default_factory=list, compare=False, repr=False)

    def take(self, n: int):
        self.docs_in += 1
        self.bytes_in += n

    def keep(self, n: int):
        self.docs_out += 1
        self.bytes_out += n

    def drop(self, reason: str, n: int, record_id=None, **detail):
        """record_id: logged as the JSON value it is (`loggable_id`). detail: more fields for the drop's line in the
        log (a duplicate's survivor)."""
        self.dropped[reason] += 1
        self.dropped_bytes[reason] += n
        record_id = loggable_id(record_id)
        self.log.append((record_id, reason) + ((detail,) if detail else ()))
        ids = self.examples.setdefault(reason, [])
        if record_id is not None and len(ids) < EXAMPLES:
            ids.append(record_id)

    def reconciles(self) -> bool:
        return self.docs_in == self.docs_out + sum(self.dropped.values())

    def to_json(self) -> dict:
        return {"name": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "dropped": dict(sorted(self.dropped.items())),
                "dropped_bytes": dict(sorted(self.dropped_bytes.items())),
                "counters": dict(sorted(self.counters.items())),
                "examples": {r: ids for r, ids in sorted(self.examples.items()) if ids}}

    @classmethod
    def from_json(cls, d: dict) -> StageStats:
        return cls(d["name"], d["docs_in"], d["docs_out"], d["bytes_in"], d["bytes_out"],
                   collections.Counter(d["dropped"]), collections.Counter(d["dropped_bytes"]),
                   collections.Counter(d["counters"]), dict(d.get("examples", {})))  # (none before they were kept)

    def merge(self, other: StageStats) -> StageStats:
        if other.name != self.name:
            raise ValueError(f"cannot merge stats of stage {other.name!r} into {self.name!r}")
        return StageStats(self.name, self.docs_in + other.docs_in, self.docs_out + other.docs_out,
                          self.bytes_in + other.bytes_in, self.bytes_out + other.bytes_out,
                          _summed(self.dropped, other.dropped), _summed(self.dropped_bytes, other.dropped_bytes),
                          _summed(self.counters, other.counters),
                          {r: (self.examples.get(r, []) + other.examples.get(r, []))[:EXAMPLES]
                           for r in self.examples.keys() | other.examples.keys()})


def _summed(a: collections.Counter, b: collections.Counter) -> collections.Counter:
    """`a + b` keeping keys at 0: Counter's + drops them, so a counter every shard had at 0 (boilerplate_lines_removed)
    or a drop of no bytes (a null text's `empty`) was in a one-shard run's stats.json and not in a split corpus's."""
    out = collections.Counter(a)
    out.update(b)
    return out


def run_stages(doc: dict, stages, stats: list[StageStats]) -> dict | None:
    """Thread `doc` through `stages`; returns the surviving document or None (drop recorded)."""
    n = nbytes(doc)
    for stage, st in zip(stages, stats):
        st.take(n)
        try:
            res = stage(doc)
            out, reason = _checked(stage, res)
            if reason is not None:
                st.drop(reason, n, doc.get("id"))
                if hasattr(stage, "count"):
                    stage.count(st, out if out is not None else doc, dropped=True)
                return None
            doc, n = out, nbytes(out)
            st.keep(n)
            if hasattr(stage, "count"):
                stage.count(st, doc, dropped=False)
        except Exception as e:  # a custom stage's KeyError('meta') named neither the stage nor the record
            e.add_note(f"in stage {stage.name!r} on record {id_text(doc.get('id'))!r} (data.stages.run_stages)")
            raise
    return doc


def _checked(stage, res) -> tuple[dict | None, str | None]:
    """`res` as (doc, reason), or a TypeError naming the stage: (doc, False) dropped every document as reason
    False (logged as false, counted as 'false', so `--drops` found neither), and a kept str or a dict without
    'text' failed later as "string indices must be integers" / KeyError('text')."""
    fix = ("a stage returns (doc, None) to keep a document or (doc, 'reason') to drop it, so every drop is counted "
           "by reason")
    if not (isinstance(res, tuple) and len(res) == 2) or (res[0] is None and res[1] is None):
        raise TypeError(f"stage {stage.name!r} returned {res!r:.200}; {fix}")
    out, reason = res
    if reason is not None and not (isinstance(reason, str) and reason):
        raise TypeError(f"stage {stage.name!r} returned the reason {reason!r}: it must be None (keep) or a "
                        f"non-empty str (drop); {fix}")
    if reason is None and not (isinstance(out, dict) and isinstance(out.get("text"), str)):
        raise TypeError(f"stage {stage.name!r} kept {out!r:.200}, not a document dict with a str 'text'; {fix}")
    return out, reason


# Normalize's repair count on its way to `count`: not a str, so no record's own field (JSON keys are str) is it
_REPAIRED = ("normalize", "mojibake_repaired")


@dataclasses.dataclass(frozen=True)
class Normalize:
    """Pipeline stage: `normalize_text` (mojibake, Unicode form, line breaks, invisible characters, whitespace); drops
    documents left empty (reason 'empty'); counts those carrying U+FFFD, and those with mojibake repaired (and the
    sequences repaired)."""

    cfg: NormalizeConfig = NormalizeConfig()
    name: str = "normalize"

    def __call__(self, doc):
        text, fixed = normalize_counted(doc["text"], self.cfg)
        if not text:
            return doc, "empty"
        # the count travels to `count` on the document, which takes it off before the next stage sees it
        return {**doc, "text": text, **({_REPAIRED: fixed} if fixed else {})}, None

    def count(self, st, doc, dropped):
        if fixed := doc.pop(_REPAIRED, 0):
            st.counters["mojibake_repaired_docs"] += 1
            st.counters["mojibake_repaired_sequences"] += fixed
        if not dropped and "\ufffd" in doc["text"]:
            st.counters["with_replacement_char"] += 1


@dataclasses.dataclass(frozen=True)
class LanguageFilter:
    """Sets `lang`, `lang_score`; drops languages outside the keep set as `lang_other`."""

    cfg: LangIDConfig = LangIDConfig()
    name: str = "langid"

    def __call__(self, doc):
        lang, score = _langid(self.cfg).detect(doc["text"])
        doc = {**doc, "lang": lang, "lang_score": round(score, 4)}
        return doc, (None if lang in self.cfg.keep else "lang_other")

    def count(self, st, doc, dropped):
        # the language mix of what was dropped, too: the report shows both
        st.counters[f"{'dropped_' if dropped else ''}lang:{doc['lang']}"] += 1
        st.counters[f"{'dropped_' if dropped else ''}lang_bytes:{doc['lang']}"] += nbytes(doc)


_LANGID_CACHE: dict = {}


def _langid(cfg: LangIDConfig) -> LangID:
    if cfg not in _LANGID_CACHE:
        _LANGID_CACHE[cfg] = LangID(cfg)
    return _LANGID_CACHE[cfg]


@functools.cache
def _kept_signals(cfg: QualityConfig) -> frozenset:
    """KEPT_SIGNALS and every signal the labelling stage's quality_score reads under `cfg` (with dup_paragraph_chars,
    top_3gram ... missing, the labelled tier scored a document with a repeated passage up to 0.06 too high)."""
    return frozenset(KEPT_SIGNALS) | {n for n, _ in SCORED_SIGNALS} | {
        p.format(n=n) for p, f in REPETITION_FAMILIES for n, _ in getattr(cfg, f)}


@dataclasses.dataclass(frozen=True)
class QualityFilter:
    """Strips boilerplate lines, then applies every `QualityConfig` rule; keeps the signals labelling reads."""

    cfg: QualityConfig = QualityConfig()
    name: str = "quality"

    def __call__(self, doc):
        text, reason, signals = quality_filter(doc["text"], self.cfg)
        keep = _kept_signals(self.cfg)
        kept = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in signals.items() if k in keep}
        return {**doc, "text": text, "signals": kept}, reason

    def count(self, st, doc, dropped):
        if not dropped:
            st.counters["boilerplate_lines_removed"] += doc["signals"]["boilerplate_lines"]


@dataclasses.dataclass(frozen=True)
class Label:
    """Adds `quality` (score in [0, 1]), `domains` (tags; keyword density with CJK counted in words as `quality`
    counts them) and, if the document has no `lang` (the langid stage did not run, and the record had none of its own,
    or null), `lang`, detected under `langid` (the pipeline passes its PipelineConfig.langid: its fold and
    min_confidence, not the defaults)."""

    cfg: LabelConfig = LabelConfig()
    quality: QualityConfig = QualityConfig()
    name: str = "label"
    langid: LangIDConfig = LangIDConfig()

    def __call__(self, doc):
        out = {**doc, "quality": quality_score(doc.get("signals", {}), self.quality),
               "domains": domain_tags(doc["text"], self.cfg, self.quality)}
        if out.get("lang") is None:  # a record's "lang": null (a JSONL export's missing value) is no language either
            out["lang"], _ = _langid(self.langid).detect(doc["text"])
        return out, None

    def count(self, st, doc, dropped):
        for tag in doc["domains"]:
            st.counters[f"domain:{tag}"] += 1
        st.counters[f"lang:{doc['lang']}"] += 1
        st.counters[f"lang_bytes:{doc['lang']}"] += nbytes(doc)


@dataclasses.dataclass(frozen=True)
class Augment:
    """Runs an augmentation hook (`doc -> doc`, see data.augment; None passes documents through); never drops. Counts
    the documents the hook augmented, and the final tier's languages (documents, bytes) and domain tags."""

    hook: object = None
    name: str = "augment"

    def __call__(self, doc):
        # `augmented` says what this stage added: a record's own field (its source's metadata) stayed on documents
        # the hook left alone, and `count` took them for augmented ones
        doc = {k: v for k, v in doc.items() if k != "augmented"} if "augmented" in doc else doc
        if self.hook is None:
            return doc, None
        out = self.hook(doc)
        if not isinstance(out, dict) or not isinstance(out.get("text"), str):
            raise TypeError(f"augmentation hook {self.hook!r} must return the document dict with a str 'text'")
        return out, None

    def count(self, st, doc, dropped):
        if doc.get("augmented"):
            st.counters["augmented_docs"] += 1
        # the final corpus's language mix and tags (the report's): the label stage's counted documents a later
        # labeler dropped, and their bytes before the glossary this stage appends
        if isinstance(lang := doc.get("lang"), str):
            st.counters[f"lang:{lang}"] += 1
            st.counters[f"lang_bytes:{lang}"] += nbytes(doc)
        if isinstance(tags := doc.get("domains"), list | tuple):
            for tag in tags:
                st.counters[f"domain:{tag}"] += 1
