"""The cleaning pipeline: input shards → tiers raw → filtered → cleaned → labeled → augmented.

    python -m data.pipeline INPUT... --out DIR [--workers 2]      # then: python -m data.report DIR

INPUT: files or directories of JSON Lines (`.jsonl`, `.ndjson`, `.json`), Parquet, or plain text (one document per
file); JSON Lines and text may be `.gz` / `.bz2` / `.xz` compressed (`data.sources`).

Three passes, each resumable shard by shard (a shard is skipped when its stats file exists); a second run on an --out
a running one holds is refused (data.run_lock):
  1. per shard, in parallel: read records (ingest drops malformed ones) → `raw/`; normalise, quality
     filters, language ID → `filtered/`, plus the shard's exact-dup keys and MinHash signatures;
  2. once, over all signatures in shard order: exact and near-dup decisions → `cleaned/dedup.json` (with
     `--dedup-against RUN`, also against the documents another run kept: a held-out set against its training set);
  3. per shard, in parallel: drop the duplicates → `cleaned/`; label → `labeled/`; augment → `augmented/`.
Every tier holds `shard-NNNNN.array_record` (one JSON document per record), `shard-NNNNN.stats.json` (per stage:
documents and their text's bytes in/out, drops by reason with the ids of the first three; ingest counts a dropped
record's bytes as it was in the input, and all it read as `input_bytes`), `shard-NNNNN.drops.jsonl` (every dropped
record: id, stage, reason), `shard-NNNNN.digest.json` (the SHA-256 of its records, `data.shards.read_digest`: the
loader keys a stream by it, so a shard edited by hand since a checkpoint does not resume it) and `stats.json` summed
over shards (`python -m data.report OUT` prints it). A duplicate's line (`exact_dup`, `near_dup`,
`exact_dup_reference`, `near_dup_reference`) also names the copy kept: `duplicate_of`, its id; `duplicate_at`,
"filtered/shard-NNNNN.array_record:ROW" (from 0), where it is in its run's filtered tier (the dedup_against run's for
`..._reference`), as ids may repeat, or be where a record without one was; `jaccard`, the MinHash-estimated
similarity, when MinHash found it (an exact copy of a near duplicate too).
Memory is bounded by one document per worker plus one shard's signatures, and in pass 2 by the table of every
document's exact key (about 150 B per document pass 1 kept, the reference run's survivors included; all that
exact-only dedup holds), the LSH index of the near-dup cluster representatives (about 6 kB each at the default 128
permutations) and the decisions (about 0.2 kB per duplicate, and the id of each survivor one names).

From Python, `run(inputs, out_dir, PipelineConfig(...))`: with workers > 1 the passes run in spawned processes,
which import your script again, so call it under `if __name__ == "__main__":`. Inputs changed since a run began
(size or modification time) are refused on resume, as are other settings and a `dedup_against` run cleaned
again since.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import dataclasses
import errno
import hashlib
import json
import multiprocessing
import os
import pathlib
import pickle
import threading
import time
import warnings
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from data.augment import DomainGlossary
from data.cli import at_least, cli_parser, local_path, path_arg, run_main, undecoded
from data.dedup import DedupConfig, NearDupIndex, exact_key, signature
from data.filters import QualityConfig
from data.label import LabelConfig
from data.langid import LangIDConfig
from data.normalize import NormalizeConfig
from data.run_lock import DirLocked, RunLock
from data.seeds import check_field_types
from data.shards import DocWriter, aborting, iter_docs, read_docs, read_json, shard_name, write_atomically, write_json
from data.sources import SourceConfig, check_text_field, discover, file_stamps, read_records
from data.stages import Augment, Label, LanguageFilter, Normalize, QualityFilter, StageStats, nbytes, run_stages

# Bumped when the code changes what a setting produces (a resumed run would mix shards of both versions, and a
# cached corpus would keep the old texts): 2 = boilerplate removal keeps text normalised, quality signals all kept,
# a record's own `augmented` field dropped; 3 = dedup folds case with str.casefold, the labelled tier scores quality
# under the quality filter that ran, a glossary block is not appended twice, CJK domain keywords count mid-text,
# dup_{n}gram right for n >= 128, mojibake repaired in normalisation, HTML markup and unrepaired mojibake dropped
# (`markup`, `mojibake`); 4 = an accented letter before two marks beside a word ("allé\xa0»") is not repaired as
# mojibake, generics' type parameters and struct / object literals are not markup, a folded language (zh) does not
# win on no evidence (dates, numbers, symbols: `und`); 5 = the labelling stage identifies a document without `lang`
# under PipelineConfig.langid (it used the defaults), dedup_against skips what the reference run's labelers dropped;
# 6 = headings / comments / directives are not hashtags, the breadcrumb rule spares code (`score_home > x`),
# full-width letters and digits are words, an ellipsis is one symbol, "lorem ipsum" drops the page (blocklist);
# 7 = dedup keys and shingles delete variation selectors and invisible joiners (emoji-only posts were one duplicate),
# glossary terms beginning or ending in punctuation match ('C++', 'C#', '.NET'); 8 = mojibake_rate does not count a
# word's accented last letter before marks beside it (French "allé\xa0»" under NFC, German "Spaß“" were dropped as
# `mojibake`); 9 = top_{n}gram of n-grams tied for most frequent measures the longest (it took the first in hash
# order: reordered paragraphs measured 0.034-0.096), a boilerplate rule written with capitals matches (it never did),
# and one anchored with ^ / $ matches at every line's ends (only at the text's, before); 10 = a record's "lang": null
# is identified by the labelling stage (it stayed null), the augment stage counts the final tier's languages and tags;
# 11 = exact dedup keys fold spaces and line breaks beside Chinese / Japanese characters (a hard-wrapped copy differed),
# blank lines a boilerplate rule matches (^$, C4's "no end punctuation") are not counted as boilerplate lines, and a
# glossary term outside ASCII matches lower-cased and as a whole word ('Ökonomie' never matched, 'énergie' matched in
# 'bioénergie'); 12 = a glossary term matches beside text in scripts written without spaces ('我用Python写代码',
# Thai 'สมการ' in 'แก้สมการนี้'), and not inside a word that goes on in a combining mark ('गणित' in 'गणितीय'); 13 = an
# accented letter before a closing mark and Spanish ¡ / ¿ ("está…¡") is not repaired as mojibake nor counted as it,
# normalisation deletes the Arabic letter mark U+061C (a bidi control), language ID judges text's NFKC folding
# (full-width English kept by form="NFC" was zh), a domain keyword starting with a letter counts right after CJK
# text ("调用self.fit()"), a JSON line's invalid UTF-8 is judged in its text alone (as Parquet's), and a directory
# reached also through a link is named by its first name in sorted order; 14 = top_{n}gram counts overlapping
# occurrences' characters once (a post laughing 哈 12 times measured 0.29 and was dropped; a "fraction" reached 1.98),
# the ideographic space and no-break spaces that form="NFC" keeps are whitespace, not words or symbols, and a
# held-out run (dedup_against) indexes every document the training run kept (one near another under a lower threshold
# here was left out, and a held-out near copy of it kept); 15 = a JSON Lines line of records joined by bare CRs (Mac
# line ends after LF-ended lines: `cat unix.jsonl mac.jsonl`) is read record by record (it was one malformed_json
# drop; and, past --max-doc-bytes in all, one too_large drop), and a blank id is no id (named path:line, as null is);
# 16 = normalisation keeps ZWNJ (U+200C: Persian and Indic scripts spell words with it); 17 = an id of ±Infinity
# (a JSON line's Infinity, a Parquet float column's inf) is no id, named path:line as NaN is (it was stored as null);
# 18 = a Parquet map column is metadata as a JSON object ({"lang": "en"}; it was a list of [key, value] pairs);
# 19 = text without a letter (emoji, digits) is language `und` (some emoji were the zh fold, kept as Chinese), and
# boilerplate rules, promo phrases and the blocklist match full-width letters kept by form="NFC" (NFKC folding);
# 20 = line-start domain keywords match as written ("From Monday" opening two paragraphs made news `code`, glossed
# with Python definitions, as docstrings' "Return the ..."; `docs` lists its sections in both cases), and a glossary
# term spelled in two cases across domains is defined once; 21 = a UTF-16 text file's bad units are repaired as bad
# UTF-8 bytes are (one past the last whole unit, or a lone surrogate, was a `binary` drop), UTF-32 is read as UTF-32,
# and a no-break space misread ("Â\xa0") is repaired (NFKC left a stray "Â "); 22 = domain tags' keyword density
# counts CJK text in words (QualityConfig.cjk_chars_per_word characters each; a Chinese report's was half its English
# translation's); 23 = the per-character quality rules (min_chars, symbol / special-character / digit / markup ratios)
# count a CJK character as QualityConfig.cjk_char_weight (3) characters: Chinese short-line dialogue measured
# symbol_ratio 0.385 (dropped) against its English translation's 0.181, a stock report digit_ratio 0.277 (dropped)
# against 0.110, and 90-character Cantonese was too_short where its 347-character translation was kept (text without
# CJK characters measures as before); 24 = url_density counts CJK text in words (as promo density does: per
# character a Chinese page was allowed twice the URLs of its English translation); 25 = a JSON string's text is
# `binary` by its UTF-8 bytes (its escaped controls passed the line's test), and nested mojibake is repaired to the end;
# 26 = dedup keys and shingles fold compatibility forms as NFKC does (form="NFC" kept a full-width copy of a post and
# its ASCII original apart, Jaccard 0: both kept; NFKC text, the default, has the keys it had but where a joiner or
# variation selector stood between a letter and its combining mark: 'cafe\u200c\u0301' is 'café'), and the ASCII file /
# group / record separators (0x1C-0x1E) are line breaks (deleted, they glued the words either side into one).
# 27 = a domain tag's overlapping substring keywords count once ("解方程组" was 解方程 and 方程组: 2 hits, tagged math),
# and the math keywords' plurals count ("theorems", "proofs", ... tagged nothing).
# 28 = the other tags' plurals count too ("hypotheses", "ministers", "liabilities", "investments", ... tagged nothing).
# 29 = 々 〆 〇 and the Hangzhou numerals are CJK characters (a Japanese page with 12 々 measured mean word length 1.0:
# dropped); latin phrases glued to CJK, Thai, Lao, Myanmar or Khmer text are whole words ("购买viagra请",
# "ซื้อviagraที่นี่" passed the blocklist; a Thai page's "ทฤษฎีtheorem" counted no math keyword); invisible joiners
# and variation selectors inside a phrase no longer hide it from the blocklist, promo and boilerplate rules.
# Not bumped for what changes no document, decision nor count: the drop logs' `duplicate_of` / `duplicate_at` /
# `jaccard` (a resumed run's shards logged before name no survivor; its pass 3 names them for the shards left), nor
# the logs' ids as the JSON values the input holds (str() of them before: 7 as "7"; older shards keep theirs).
OUTPUT_VERSION = 29


# how to switch off what a settings group configures (None is no setting)
_SWITCH_OFF = {"normalize": "; filters=() runs no filter stage", "quality": "; filters=() runs no filter stage",
               "dedup": "; DedupConfig(exact=False, near=False) drops no duplicate",
               "label": "; labelers=() runs no labelling stage"}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Every knob of the cleaning run. `augment` is the augmentation hook (picklable `doc -> doc`, or None
    for a pass-through tier). `workers` processes run the per-shard passes (1 = in this process).

    Stages compose: `filters` / `labelers` replace the default stage lists of the `filtered` and `labeled`
    tiers (None: `default_filters()` = normalise, quality, langid; `[Label]`). Any picklable object with a
    `name` and `__call__(doc) -> (doc, reason)` is a stage (see data.stages), e.g.
    `filters=(*cfg.default_filters(), MyStage())`; a labeler may drop documents too (counted in the
    `labeled` tier's stats). Make stages frozen dataclasses: only then are their settings part of
    `fingerprint` (a plain class is known by its name).

    dedup_against: a finished cleaning run's directory (e.g. the training set's, when cleaning its held-out set):
    documents duplicating one that run kept (in its labelled tier: neither a duplicate nor dropped by its labelers)
    drop as `exact_dup_reference` / `near_dup_reference` (the same dedup settings are required: the signatures must
    be comparable). Without it, separate runs never compare.
    """

    source: SourceConfig = SourceConfig()
    normalize: NormalizeConfig = NormalizeConfig()
    langid: LangIDConfig = LangIDConfig()
    quality: QualityConfig = QualityConfig()
    dedup: DedupConfig = DedupConfig()
    label: LabelConfig = LabelConfig()
    augment: object = DomainGlossary()
    filters: tuple | None = None
    labelers: tuple | None = None
    workers: int = 2
    dedup_against: str | None = None

    def __post_init__(self):
        # workers=2.5 failed starting the pool, after the manifest was written; True ran as 1
        check_field_types(self)
        # None for a settings group (as augment=None switches augmenting off) failed once the run had begun, `label`
        # after passes 1 and 2 had cleaned and deduplicated every shard, as "'NoneType' object has no attribute ..."
        for k, kind in (("source", SourceConfig), ("normalize", NormalizeConfig), ("langid", LangIDConfig),
                        ("quality", QualityConfig), ("dedup", DedupConfig), ("label", LabelConfig)):
            if not isinstance(v := getattr(self, k), kind):
                raise ValueError(f"PipelineConfig.{k}={v!r:.80} must be a {kind.__name__} ({kind.__name__}() for the "
                                 f"defaults){_SWITCH_OFF.get(k, '')}")
        if self.workers < 1:
            raise ValueError(f"PipelineConfig.workers={self.workers} must be >= 1 (1 runs in this process)")
        # one stage, or a name, in place of a tuple of stages failed mid-run naming no field ("'Normalize' object is
        # not iterable"; filters='normalize' ran the stages 'n', 'o', ...)
        for k in ("filters", "labelers"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, tuple | list) and all(callable(s) and hasattr(s, "name")
                                                                           for s in v)):
                raise ValueError(f"PipelineConfig.{k}={v!r:.120} must be a tuple of stages (objects with a `name` and "
                                 "`__call__(doc) -> (doc, reason)`), e.g. (Normalize(),) for one, () for none, or "
                                 "None for the defaults")
            # a stage named None (or 3) ran the whole corpus, then `data.report` failed formatting its name
            for st in v or ():
                if not (isinstance(st.name, str) and st.name):
                    raise ValueError(f"PipelineConfig.{k}: stage {st!r:.80} has name={st.name!r}; a stage's name must "
                                     "be a non-empty str (it names the stage's row in the report and its drops)")
        if self.augment is not None and not callable(self.augment):  # None: the tier copies `labeled`
            raise ValueError(f"PipelineConfig.augment={self.augment!r} must be a callable doc -> doc, or None")
        if self.workers > 1:  # worker processes receive the hooks pickled: a lambda failed only with 2+ shards
            for k in ("augment", "filters", "labelers"):
                try:
                    pickle.dumps(getattr(self, k))
                except (pickle.PicklingError, TypeError, AttributeError) as e:
                    raise ValueError(f"PipelineConfig.{k} cannot be sent to worker processes ({e}); define it at "
                                     "module level (not a lambda or a local function), or set workers=1") from None

    def default_filters(self) -> tuple:
        # quality before language ID: the rules are CJK-aware rather than per language, and language ID
        # then runs only on survivors (and does not guess languages for fragments like "Too short.")
        return Normalize(self.normalize), QualityFilter(self.quality), LanguageFilter(self.langid)

    def filter_stages(self):
        return list(self.filters if self.filters is not None else self.default_filters())

    def label_stages(self):
        # scored under the limits of the quality filter that ran (a custom one in `filters`; the last one sets the
        # signals), not `quality`'s: with a custom filter the labelled tier scored against limits nothing checked.
        # A document without `lang` (no langid stage ran) is identified under `langid`, not the default settings.
        ran = [s.cfg for s in self.filter_stages() if isinstance(s, QualityFilter)]
        return list(self.labelers if self.labelers is not None
                    else (Label(self.label, (ran or [self.quality])[-1], langid=self.langid),))

    def augment_stages(self):
        return [Augment(self.augment)]

    def fingerprint(self) -> str:
        """Changes whenever a setting that shapes the output changes (`workers` does not). A hook or stage
        that is not a dataclass is named by its qualified name (its repr holds a memory address, which
        differs in every process, so a resumed run would look like a different one); its settings are
        then not compared — make it a frozen dataclass to have them checked."""
        return hashlib.sha1(f"{repr(self._stable_copy())} v{OUTPUT_VERSION}".encode()).hexdigest()[:16]

    def settings(self) -> dict[str, str]:
        """The fingerprinted settings, flat: {'quality.max_markup_ratio': '0.05', ...} (values as repr), so that a
        refused resume can name what changed."""
        return _flat(self._stable_copy(), "")

    def _stable_copy(self) -> PipelineConfig:
        same = copy.copy(self)  # not dataclasses.replace: __post_init__ would refuse a name as the hook
        stable = {"workers": 1, "augment": _stable(self.augment),
                  **{k: tuple(map(_stable, getattr(self, k))) for k in ("filters", "labelers")
                     if getattr(self, k) is not None}}
        for k, v in stable.items():
            object.__setattr__(same, k, v)
        return same


def _flat(obj, prefix: str) -> dict[str, str]:
    out = {}
    for f in (f for f in dataclasses.fields(obj) if f.repr):  # what the fingerprint's repr holds
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out.update(_flat(v, f"{prefix}{f.name}."))
        elif f.name != "workers" or prefix:
            out[prefix + f.name] = repr(v)
    return out


def _setting_changes(old: dict, new: dict) -> list[str]:
    """'name: old → new' for each setting that differs (present in either)."""
    short = lambda v: v if len(v) <= 60 else v[:57] + "..."  # noqa: E731  (a glossary's repr runs to 2,000 chars)
    return [f"{k}: {short(old.get(k, '(absent)'))} → {short(new.get(k, '(absent)'))}"
            for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def _input_changes(old: list, new: list) -> str:
    """Which files a run's inputs lost or gained: the same files named another way (an absolute path, from another
    directory) said only "different inputs"."""
    was, now = ({f for files in shards for f in files} for shards in (old, new))
    listed = lambda fs: ", ".join(sorted(fs)[:3]) + (f" and {len(fs) - 3} more" if len(fs) > 3 else "")  # noqa: E731
    changes = ([f"not among these inputs: {listed(was - now)}"] if was - now else []) + (
        [f"new to it: {listed(now - was)}"] if now - was else [])
    return "; ".join(changes) or "the same files, in another order or grouping into shards"


def _stable(obj):
    """`obj` if its repr is its settings (a dataclass instance, or None), else its qualified name."""
    if obj is None or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        return obj
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _stats_path(out: pathlib.Path, tier: str, i: int) -> pathlib.Path:
    return out / tier / f"{shard_name(i)}.stats.json"


def _write_tier_stats(out, tier, i, stages: list[StageStats], **extra):
    """The shard's stats file (written last: it marks the shard done) and its drop log, `shard-NNNNN.drops.jsonl`:
    one line {"id", "stage", "reason"} per record this tier's stages dropped (the stats name only three per
    reason; `python -m data.report OUT --drops REASON` lists them all), a duplicate's with the fields naming the
    copy kept (the module docstring). `extra`: more top-level fields."""
    def write_log(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for st in stages:
                for record_id, reason, *detail in st.log:
                    row = {"id": record_id, "stage": st.name, "reason": reason, **(detail[0] if detail else {})}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_atomically(out / tier / f"{shard_name(i)}.drops.jsonl", write_log)
    write_json(_stats_path(out, tier, i), {"tier": tier, "shard": i, "stages": [s.to_json() for s in stages], **extra})


def _docs_out(out: pathlib.Path, i: int, *tiers: str) -> int:
    """Documents shard i holds after the last stage of the first of `tiers` that has one (a tier configured
    with no stages, e.g. filters=(), passes on what the tier before it held)."""
    for tier in tiers:
        if stages := read_json(_stats_path(out, tier, i))["stages"]:
            return stages[-1]["docs_out"]
    raise ValueError(f"no stage statistics for shard {i} in tiers {tiers}")


def _filtered_count(out: pathlib.Path, i: int) -> int:
    return _docs_out(out, i, "filtered", "raw")


def _pass1(i: int, files: Sequence[str], out: pathlib.Path, cfg: PipelineConfig) -> int:
    """Ingest + filter one input shard. Returns the number of documents it kept."""
    if _stats_path(out, "filtered", i).exists():
        return _filtered_count(out, i)
    name = shard_name(i)
    raw_w = DocWriter(out / "raw" / f"{name}.array_record")
    filt_w = DocWriter(out / "filtered" / f"{name}.array_record")
    ingest = StageStats("ingest")
    stages = cfg.filter_stages()
    stats = [StageStats(s.name) for s in stages]
    keys, sigs = [], []
    with aborting(raw_w, filt_w):  # a stage or a write that raised left both shards' .tmp in the tiers for good
        for doc, reason, n, record_id in read_records(files, cfg.source, cfg.normalize, with_ids=True):
            # bytes in and out are the text's, like every other stage's: a JSON Lines line's metadata is no loss (its
            # whole line counted in, its text out, made a run that kept everything look like it lost two thirds). A drop
            # counts what it took up in the input (its text is unknown); `input_bytes` is all that was read
            ingest.counters["input_bytes"] += n
            if doc is None:
                ingest.take(n)
                ingest.drop(reason, n, record_id)
                continue
            ingest.take(nbytes(doc))
            ingest.keep(nbytes(doc))
            raw_w.write(doc)
            doc = run_stages(doc, stages, stats)
            if doc is None:
                continue
            filt_w.write(doc)
            keys.append(exact_key(doc["text"]))
            sigs.append(signature(doc["text"], cfg.dedup) if cfg.dedup.near else np.zeros(0, np.uint32))
        raw_w.commit()
        filt_w.commit()
    sig_arr = np.stack(sigs) if sigs else np.zeros((0, cfg.dedup.num_perm), np.uint32)
    # (the tmp name ends in .npz: savez appends one to a name without it)
    write_atomically(out / "filtered" / f"{name}.dedup.npz",
                     lambda tmp: np.savez(tmp, keys=np.array(keys, dtype="S16").reshape(-1), sigs=sig_arr),
                     tmp=out / "filtered" / f"{name}.dedup.tmp.npz")
    _write_tier_stats(out, "raw", i, [ingest])
    _write_tier_stats(out, "filtered", i, stats)  # last: marks the shard done
    return filt_w.count


def _pass2(out: pathlib.Path, n_shards: int, cfg: PipelineConfig, progress: bool) -> dict:
    """Global exact + near dedup in shard order; the first document of each cluster survives."""
    path = out / "cleaned" / "dedup.json"
    if path.exists():
        return read_json(path)
    seen: dict[bytes, str] = {}
    index = NearDupIndex(cfg.dedup) if cfg.dedup.near else None
    if cfg.dedup_against is not None:  # the reference run's survivors come first: "earlier" than any of ours
        for key, k, sig in _reference_survivors(pathlib.Path(cfg.dedup_against), cfg):
            seen.setdefault(k, key)
            # inserted, not added: `add` left out a survivor near an earlier one under a lower threshold here, and a
            # held-out near copy of it alone was kept
            if index is not None:
                index.insert(key, sig)
    ref = lambda rep, reason: f"{reason}_reference" if rep.startswith(REF) else reason  # noqa: E731
    drops: dict[str, dict[str, list]] = {}
    total = sum(_filtered_count(out, i) for i in range(n_shards))
    bar = tqdm(total=total, desc="dedup", unit="doc", disable=not progress)
    for i in range(n_shards):
        z = np.load(out / "filtered" / f"{shard_name(i)}.dedup.npz")
        keys, sigs = z["keys"], z["sigs"]
        shard_drops = {}
        for j in range(len(keys)):
            key = f"{i}:{j}"
            k = bytes(keys[j])
            if cfg.dedup.exact and k in seen:
                rep, *sim = seen[k] if isinstance(seen[k], tuple) else (seen[k],)
                shard_drops[str(j)] = [ref(rep, "exact_dup"), rep, *sim]
            elif index is not None and (found := index.add_scored(key, sigs[j]))[0] is not None:
                rep, sim = found[0], round(found[1], 4)
                shard_drops[str(j)] = [ref(rep, "near_dup"), rep, sim]
                # a later byte-identical copy is an exact duplicate of the same survivor, as similar to it (its
                # text is not that survivor's: the audit trail says so with the similarity)
                seen.setdefault(k, (rep, sim))
            else:
                seen.setdefault(k, key)
            bar.update()
        drops[str(i)] = shard_drops
    bar.close()
    result = {"drops": drops, "representatives": len(index) if index is not None else None,
              "dedup": dataclasses.asdict(cfg.dedup),  # what a later run deduplicating against this one needs
              "survivors": _survivor_ids(out, drops, cfg)}
    write_json(path, result)
    return result


REF = "reference:"  # the keys of a reference run's documents: `reference:shard:index`


def _survivor_ids(out: pathlib.Path, drops: dict, cfg: PipelineConfig) -> dict[str, object]:
    """{survivor's key: its record's id, as the drop logs write ids} for every document a duplicate in `drops` (pass
    2's decisions) names, read from its run's filtered tier (the reference run's for `reference:` keys). Only those
    records are read (the shards are read at random): no per-document table, one entry per survivor named."""
    rows: dict[tuple[str, int], list[int]] = {}
    for shard in drops.values():
        for _, rep, *_ in shard.values():
            i, j = map(int, rep.removeprefix(REF).split(":"))
            rows.setdefault((rep[:len(REF)] if rep.startswith(REF) else "", i), []).append(j)
    ids = {}
    for (prefix, i), js in sorted(rows.items()):
        run_dir = pathlib.Path(cfg.dedup_against) if prefix else out
        js = sorted(set(js))
        for j, doc in zip(js, read_docs(run_dir / "filtered" / f"{shard_name(i)}.array_record", js)):
            ids[f"{prefix}{i}:{j}"] = doc.get("id")  # (read back from JSON: as StageStats.drop logs it)
    return ids


def _duplicate_of(decision: list, survivors: dict) -> dict:
    """A dedup drop's audit fields (see the module docstring) from its decision [reason, survivor key, Jaccard?]."""
    _, rep, *sim = decision
    i, j = rep.removeprefix(REF).split(":")
    return {"duplicate_of": survivors[rep], "duplicate_at": f"filtered/{shard_name(int(i))}.array_record:{j}",
            **({"jaccard": sim[0]} if sim else {})}


def check_reference(ref: pathlib.Path, cfg: PipelineConfig, warn: bool = False) -> int:
    """The number of shards of `ref`, a finished cleaning run made with the same dedup settings; a ValueError
    naming `dedup_against` and what is wrong otherwise."""
    done = ref / "cleaned" / "dedup.json"
    if not (ref / "manifest.json").exists() or not done.exists():
        raise ValueError(f"PipelineConfig.dedup_against={str(ref)!r} is not a finished cleaning run (no "
                         f"manifest.json and cleaned/dedup.json); pass the --out of a completed data.pipeline run")
    saved = read_json(done).get("dedup")  # (None: a run from before it was recorded)
    want = {k: getattr(cfg.dedup, k) for k in ("num_perm", "shingle", "seed")}  # what makes the signatures
    if saved is not None and (differ := sorted(k for k in want if saved.get(k) != want[k])):
        raise ValueError(f"PipelineConfig.dedup_against={str(ref)!r} was deduplicated with other settings "
                         f"({', '.join(f'{k}: {saved.get(k)!r} there, {want[k]!r} here' for k in differ)}); its "
                         "signatures would not compare: use the same DedupConfig.num_perm / shingle / seed")
    # a run without near dedup saved empty signatures: pass 2 crashed on them ("num_perm must be positive")
    if cfg.dedup.near and saved is not None and not saved.get("near", True):
        raise ValueError(f"PipelineConfig.dedup_against={str(ref)!r} was deduplicated with DedupConfig.near=False, "
                         "so it holds no MinHash signatures to find near duplicates of its documents by; clean it "
                         "again with near=True, or set near=False here to drop exact duplicates of it only")
    manifest = read_json(ref / "manifest.json")
    version = manifest.get("version", 2)  # (runs before version 3 stored no version)
    # the versions that changed its exact keys: 3 (casefold), 7 (variation selectors, joiners), 11 (spaces beside
    # Chinese / Japanese). Before 11 each Chinese or Japanese text with a space or punctuation had another key than
    # here, so with near=False none of its exact copies was dropped (measured: 52 of 52 keys differed); and 26 (NFKC
    # folding) for a run whose text was not NFKC: under form="NFD" a held-out copy of a French training document had
    # another exact key and shingles, and was kept
    form = manifest.get("settings", {}).get("normalize.form")  # (repr; None: not recorded)
    if warn and version < 26 and (version < 11 or form != repr("NFKC")):
        why = ([] if version >= 11 else
               ["its exact keys keep the spaces and line breaks beside Chinese / Japanese characters, these fold them: "
                "exact copies of such documents go unnoticed unless near dedup finds them"])
        if form != repr("NFKC"):
            why.insert(0, f"its exact keys and shingles are of its text as NormalizeConfig.form="
                          f"{form or '(not recorded)'} left it, these of its NFKC folding (full-width letters, "
                          "ligatures, decomposed accents): copies of documents holding such characters go unnoticed")
        if version < 7:
            why.insert(0, "its exact keys and shingles keep the variation selectors and invisible joiners of emoji "
                          "('❤️' / '❤'), these delete them: copies that differ in such marks go unnoticed")
        if version < 3:
            why.insert(0, "its exact keys and shingles fold case with str.lower, these with str.casefold: copies "
                          "that differ in such letters (Straße / STRASSE) go unnoticed")
        warnings.warn(f"PipelineConfig.dedup_against={str(ref)!r} was cleaned by an older cleaning code (version "
                      f"{version}; {'; '.join(why)}); clean it again to compare them all", stacklevel=3)
    return len(manifest["shards"])


def _reference_stamp(ref: pathlib.Path) -> str | None:
    """A hash of a reference run's manifest and dedup decisions (None: it has neither): a held-out run resumed after
    the training run was cleaned again kept its old decisions, and the training documents new to it, silently."""
    try:
        raw = (ref / "manifest.json").read_bytes() + (ref / "cleaned" / "dedup.json").read_bytes()
    except FileNotFoundError:
        return None
    return hashlib.sha1(raw).hexdigest()[:16]


def _reference_survivors(ref: pathlib.Path, cfg: PipelineConfig):
    """(key, exact key, signature) of every document the reference run kept, in its shard order: neither a duplicate
    nor dropped by its labelers (those were compared too, so a held-out copy of a document the training set does not
    hold was dropped). A shard whose labelled tier is unfinished, or written before its drops were recorded there,
    counts what its dedup kept."""
    drops = read_json(ref / "cleaned" / "dedup.json")["drops"]
    for i in range(check_reference(ref, cfg)):
        # each z[name] reads the member from the archive again: once a shard, not once a document (quadratic)
        z = np.load(ref / "filtered" / f"{shard_name(i)}.dedup.npz")
        keys, sigs = z["keys"], z["sigs"]
        gone = set(drops.get(str(i), {}))
        if (labeled := _stats_path(ref, "labeled", i)).exists():
            gone |= {str(j) for j in read_json(labeled).get("dropped", [])}
        for j in range(len(keys)):
            if str(j) not in gone:
                yield f"{REF}{i}:{j}", bytes(keys[j]), sigs[j]


def _pass3(i: int, out: pathlib.Path, cfg: PipelineConfig, drops: dict, survivors: dict) -> int:
    """Dedup, label and augment one shard; returns documents in the augmented tier. drops: pass 2's decisions for
    this shard; survivors: the ids of the documents they name (`_survivor_ids`)."""
    if _stats_path(out, "augmented", i).exists():
        return _docs_out(out, i, "augmented", "labeled", "cleaned")
    name = shard_name(i)
    writers = {t: DocWriter(out / t / f"{name}.array_record") for t in ("cleaned", "labeled", "augmented")}
    dedup = StageStats("dedup")
    lab_stages, aug_stages = cfg.label_stages(), cfg.augment_stages()
    lab_stats, aug_stats = [StageStats(s.name) for s in lab_stages], [StageStats(s.name) for s in aug_stages]
    lab_dropped = []  # positions in `filtered` (and dedup.npz): a run deduplicating against this one skips them
    with aborting(*writers.values()):  # (as in _pass1)
        for j, doc in enumerate(iter_docs(out / "filtered" / f"{name}.array_record")):
            n = nbytes(doc)
            dedup.take(n)
            if (decision := drops.get(str(j))) is not None:
                dedup.drop(decision[0], n, doc.get("id"), **_duplicate_of(decision, survivors))
                continue
            dedup.keep(n)
            writers["cleaned"].write(doc)
            # a custom labeler (or augmentation stage) may drop a document: run_stages has counted it under its
            # stage and reason, and it goes no further
            doc = run_stages(doc, lab_stages, lab_stats)
            if doc is None:
                lab_dropped.append(j)
                continue
            writers["labeled"].write(doc)
            doc = run_stages(doc, aug_stages, aug_stats)
            if doc is None:
                continue
            writers["augmented"].write(doc)
        for w in writers.values():
            w.commit()
    _write_tier_stats(out, "cleaned", i, [dedup])
    _write_tier_stats(out, "labeled", i, lab_stats, dropped=lab_dropped)
    _write_tier_stats(out, "augmented", i, aug_stats)  # last: marks the shard done
    return writers["augmented"].count


def _exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Pool initializer: end this worker once its parent is gone (a SIGKILLed parent cannot shut the pool down,
    and a worker would otherwise clean its shard to the end, writing into a run nobody is watching)."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _map_shards(fn, jobs: list[tuple], pool, desc: str, progress: bool) -> list:
    """Run `fn(*job)` for every job, in `pool` (None: in this process), with a progress bar."""
    bar = tqdm(total=len(jobs), desc=desc, unit="shard", disable=not progress)
    results = [None] * len(jobs)
    if pool is None:
        for k, job in enumerate(jobs):
            results[k] = fn(*job)
            bar.update()
            bar.set_postfix(docs=sum(r for r in results if r))
    else:
        futures = {pool.submit(fn, *job): k for k, job in enumerate(jobs)}
        for fut in cf.as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update()
            bar.set_postfix(docs=sum(r for r in results if r))
    bar.close()
    return results


def _aggregate(out: pathlib.Path, tier: str, n_shards: int) -> dict:
    merged: list[StageStats] | None = None
    for i in range(n_shards):
        stages = [StageStats.from_json(s) for s in read_json(_stats_path(out, tier, i))["stages"]]
        merged = stages if merged is None else [a.merge(b) for a, b in zip(merged, stages)]
    result = {"tier": tier, "shards": n_shards, "stages": [s.to_json() for s in merged or []]}
    write_json(out / tier / "stats.json", result)
    return result


def run(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, cfg: PipelineConfig = PipelineConfig(),
        progress: bool = True) -> dict:
    """Clean `inputs` (files or directories) into tiers under `out_dir`; returns `{tier: stats}`.

    Re-running with the same inputs and config resumes: finished shards are skipped. A directory holding a
    run of different inputs or settings raises a ValueError instead of mixing the two.
    """
    out = pathlib.Path(local_path(out_dir))  # a URL: a local gs:/ folder, written in silence
    shards = discover(inputs, cfg.source, skip=out)
    if not shards:
        raise ValueError(f"no input files under {list(map(str, inputs))}")
    # one cleaning run per out_dir (data.run_lock), before any input is read: two at once wrote each shard to the
    # same temporary file (one failed renaming it, naming only that file; the other's tiers could hold a mix)
    with RunLock(out, "data.pipeline"):
        return _run(shards, out, cfg, progress)


def _run(shards: list, out: pathlib.Path, cfg: PipelineConfig, progress: bool) -> dict:
    """`run` under the output directory's lock."""
    manifest = {"shards": [list(s) for s in shards], "config": cfg.fingerprint(), "files": file_stamps(shards),
                "version": OUTPUT_VERSION, "settings": cfg.settings()}  # (these two: to name what changed)
    if cfg.dedup_against is not None:  # the reference as it is: cleaned again since, it keeps other documents
        manifest["reference"] = _reference_stamp(pathlib.Path(cfg.dedup_against))
    mpath = out / "manifest.json"
    if mpath.exists():
        old = read_json(mpath)
        old.setdefault("files", manifest["files"])  # (runs begun before files were stamped)
        named = "settings" in old  # runs begun before settings were stored name no setting
        for k in ("version", "settings"):
            old.setdefault(k, manifest[k])
        if "reference" in manifest:
            old.setdefault("reference", manifest["reference"])  # (runs begun before references were stamped)
        if old != manifest:
            changed = [f"{f} changed since the run began (size, mtime {v} → {manifest['files'].get(f)})"
                       for f, v in old["files"].items() if v != manifest["files"].get(f)]
            diff = _setting_changes(old["settings"], manifest["settings"]) if named else []
            if old["version"] != manifest["version"]:
                diff.append(f"cleaning-code version (data.pipeline.OUTPUT_VERSION): {old['version']} → "
                            f"{manifest['version']}")
            what = (f"inputs ({_input_changes(old['shards'], manifest['shards'])})"
                    if old["shards"] != manifest["shards"] else
                    f"settings ({'; '.join(diff[:5])}{'; ...' if len(diff) > 5 else ''})"
                    if old["config"] != manifest["config"] and diff else
                    "settings (or cleaning-code version)" if old["config"] != manifest["config"] else
                    "dedup_against: it was cleaned again since (its dedup decisions here are stale)"
                    if old.get("reference") != manifest.get("reference") else "inputs: " + ", ".join(changed[:3]))
            raise ValueError(f"{out} holds a cleaning run with different {what}; use a new --out directory "
                             "(or delete it) rather than mixing two runs")
    else:
        check_text_field(shards, cfg.source)
        if cfg.dedup_against is not None:
            check_reference(pathlib.Path(cfg.dedup_against), cfg, warn=True)
        write_json(mpath, manifest)
    workers = min(cfg.workers, len(shards))
    # spawned, not forked: the parent may hold JAX's threads; one pool serves both parallel passes
    pool = (cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_exit_with_parent, initargs=(os.getpid(),)) if workers > 1 else None)
    try:
        _map_shards(_pass1, [(i, files, out, cfg) for i, files in enumerate(shards)], pool, "clean", progress)
        decided = _pass2(out, len(shards), cfg, progress)
        drops = decided["drops"]
        # (a run whose pass 2 ran before survivors were recorded: read now, the decisions are the same)
        survivors = decided["survivors"] if "survivors" in decided else _survivor_ids(out, drops, cfg)
        jobs = [(i, out, cfg, drops[str(i)], {d[1]: survivors[d[1]] for d in drops[str(i)].values()})
                for i in range(len(shards))]
        _map_shards(_pass3, jobs, pool, "label", progress)
    finally:
        if pool is not None:  # on Ctrl-C or a failed shard, stop: the queued shards ran to the end of the pass first
            pool.shutdown(cancel_futures=True)
    return {tier: _aggregate(out, tier, len(shards)) for tier in ("raw", "filtered", "cleaned", "labeled", "augmented")}


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("inputs", nargs="+", type=path_arg,
                    help="JSON Lines / Parquet / text files (JSONL and text may be .gz, .bz2, .xz) or directories")
    ap.add_argument("--out", type=path_arg, required=True)
    ap.add_argument("--workers", type=at_least(1), default=2)
    ap.add_argument("--keep-langs", default="en,zh",
                    help="comma-separated ISO 639-1 codes to keep (default en,zh); others drop as lang_other")
    ap.add_argument("--text-field", default="text", help="the JSONL / Parquet field holding the text (default text)")
    ap.add_argument("--near-dup-threshold", type=float, default=0.8,
                    help="MinHash-estimated Jaccard of word 5-gram shingles; a candidate is confirmed at "
                         "threshold - confirm_sigmas standard errors (0.8, 128 permutations, 2 sigmas: estimates >= "
                         "0.73, so about half of the pairs at true 0.70-0.75 are removed too)")
    ap.add_argument("--near-dup-confirm-sigmas", type=float, default=2.0,
                    help="0: confirm at the threshold itself (estimation errors cut both ways: about half the pairs "
                         "at exactly the threshold kept); 2: recall >= 0.9 just above it")
    ap.add_argument("--max-doc-bytes", type=at_least(1), default=1_000_000)
    ap.add_argument("--dedup-against", type=path_arg, default=None, metavar="RUN",
                    help="a finished cleaning run (e.g. the training set's --out when cleaning held-out data): "
                         "documents duplicating one it kept drop as exact_dup_reference / near_dup_reference")
    args = ap.parse_args(argv)
    try:  # a bad setting names the flag it came from (the configs name their own fields)
        cfg = PipelineConfig(source=SourceConfig(text_field=args.text_field, max_doc_bytes=args.max_doc_bytes),
                             langid=LangIDConfig(keep=tuple(args.keep_langs.split(","))),
                             dedup=DedupConfig(threshold=args.near_dup_threshold,
                                               confirm_sigmas=args.near_dup_confirm_sigmas), workers=args.workers,
                             dedup_against=args.dedup_against)
    except ValueError as e:
        msg = str(e)
        flag = next((f for field, f in FLAGS.items() if msg.startswith(field)), None)
        ap.error(f"argument {flag}: {msg}" if flag else msg)
    for flag, path in (("--out", args.out), ("--dedup-against", args.dedup_against)):
        if path is not None and (problem := undecoded(os.path.abspath(path))):  # ArrayRecord's traceback, later
            ap.error(f"argument {flag}: {problem}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"argument --out: {args.out} is a file; name a directory for the run")
    # checked, not made (a refused run leaves no directory): mkdir's NotADirectoryError / PermissionError was a
    # traceback once the inputs had been walked
    there = pathlib.Path(os.path.abspath(args.out))
    while not there.exists() and not there.is_symlink():  # (a link to nothing stops it: mkdir's FileExistsError)
        there = there.parent
    if not there.is_dir() or not os.access(there, os.W_OK | os.X_OK):
        what = (f"a link to {os.readlink(there)}, which does not exist" if not there.exists() else
                "a file" if not there.is_dir() else "not writable")
        ap.error(f"argument --out: cannot make the directory {args.out}: {there} is {what}; name a directory you "
                 "can write")
    # where mkdir fails anyway (as root: /sys, /proc), a directory made and removed: the first the run makes (or,
    # the directory there, one in it, as the run makes its tiers)
    want = pathlib.Path(os.path.abspath(args.out))
    probe = there / want.relative_to(there).parts[0] if there != want else want / f".probe-{os.getpid()}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        what = f"make directories in {args.out}" if there == want else f"make the directory {args.out}"
        where = f"{probe}: " if there != want and probe != want else ""
        ap.error(f"argument --out: cannot {what}: {where}{e.strerror}; name a directory you can write")
    try:  # bad inputs as one line, like the trainer's config errors
        stats = run(args.inputs, args.out, cfg)
    except DirLocked as e:
        raise SystemExit(f"error: argument --out: {e}") from None
    except (ValueError, FileNotFoundError) as e:  # a check made only now (--dedup-against's run) names its flag too
        flag = next((f for field, f in FLAGS.items() if str(e).startswith(field)), None)
        raise SystemExit(f"error: {f'argument {flag}: ' if flag else ''}{e}") from None
    except (OSError, RuntimeError) as e:  # a full disk: array_record's writer raises a RuntimeError ('write() failed')
        if not (str(e).startswith("write() failed") if isinstance(e, RuntimeError) else  # (an unreadable input:
                e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)):  # its own traceback, naming it)
            raise
        raise SystemExit(f"error: writing the run in {args.out} failed ({e}); its tiers are incomplete: mend the "
                         "cause (a full disk: free space there) and rerun the same command") from None
    from data.report import report

    print(report(args.out))
    ingest = stats["raw"]["stages"][0]
    if ingest["docs_out"] == 0:  # an empty corpus is a failed run, not a finished one
        drops = ", ".join(f"{k} {v:,}" for k, v in sorted(ingest["dropped"].items())) or "the inputs hold none"
        raise SystemExit(f"error: no record was read ({drops})"
                         + (f"; is {args.text_field!r} the field holding the text? (--text-field)"
                            if ingest["dropped"].get("missing_text") else ""))
    if stats["augmented"]["stages"][-1]["docs_out"] == 0:  # records read, none kept: nothing to train on
        n = ingest["docs_out"]
        raise SystemExit(f"error: {f'all {n:,} records read were' if n != 1 else 'the 1 record read was'} dropped "
                         "(the stages above say why); "
                         "the tiers are empty")


# the config field each flag sets, as the configs' errors name them
FLAGS = {"PipelineConfig.workers": "--workers", "SourceConfig.text_field": "--text-field",
         "SourceConfig.max_doc_bytes": "--max-doc-bytes", "LangIDConfig.keep": "--keep-langs",
         "DedupConfig.threshold": "--near-dup-threshold", "DedupConfig.confirm_sigmas": "--near-dup-confirm-sigmas",
         "PipelineConfig.dedup_against": "--dedup-against"}


if __name__ == "__main__":
    run_main(main)
