"""Cleaning throughput: data.pipeline vs datatrove running the equivalent filters, same input, same run.

    python -m benchmarks.clean_throughput [--synthetic 4000] [--workers 2]

Input: the stdlib corpus (module sources + docstrings) and seeded synthetic en/zh documents, as JSONL
shards. Both sides run with the same number of worker processes over the same shards:

  ours       ingest → mojibake repair + NFKC normalise → boilerplate lines + Gopher quality/repetition + HTML markup
             and mojibake + spam rules →
             py3langid (keep en, zh) → exact + MinHash-LSH near dedup → label → augment, ArrayRecord tiers
  datatrove  JsonlReader → the same normalise function (as a formatter) → C4QualityFilter (line-level
             boilerplate) → GopherRepetitionFilter → GopherQualityFilter → py3langid (LambdaFilter:
             datatrove's LanguageFilter downloads its fastText model, impossible offline) → RegexFilter
             (blocklist) → JsonlWriter + MinhashDedupSignature; MinhashDedupBuckets; MinhashDedupCluster;
             JsonlReader → MinhashDedupFilter → JsonlWriter. Same 5-token shingles and 18 x 7 bands.

Both word-tokenize with the same CJK-aware regex (datatrove's English tokenizer needs NLTK's punkt data,
a download). datatrove has no URL-density / promo rules and no labelling or augmentation tiers, so ours
does strictly more work per document. Prints one markdown table row per side.
"""

from __future__ import annotations

import functools
import json
import pathlib
import resource
import shutil
import tempfile
import time

from data.cli import cli_parser, run_main
from data.corpus import stdlib_documents
from data.filters import DEFAULT_BLOCKLIST, tokens
from data.normalize import normalize_text
from data.synthetic import documents as synthetic_documents
from experiments.config import at_least

try:
    from datatrove.pipeline.formatters.base import BaseFormatter
    from datatrove.utils.word_tokenizers import WordTokenizer
except ImportError:  # datatrove is a `bench` extra
    BaseFormatter = WordTokenizer = object


class CJKWordTokenizer(WordTokenizer):
    """datatrove WordTokenizer over data.filters.tokens (picklable: datatrove ships steps to workers)."""

    def __init__(self):
        super().__init__("xx")

    def word_tokenize(self, text):
        return tokens(text)

    def sent_tokenize(self, text):
        return [s for s in text.split("\n") if s.strip()]

    def span_tokenize(self, text):
        spans, start = [], 0
        for line in text.split("\n"):
            spans.append((start, start + len(line)))
            start += len(line) + 1
        return spans


class Normalize(BaseFormatter):
    name = "normalize"

    def format(self, text):
        return normalize_text(text)


@functools.lru_cache(maxsize=1)
def _langid():
    from data.langid import LangID

    return LangID()


def keep_en_zh(doc) -> bool:
    return _langid().detect(doc.text)[0] in ("en", "zh")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children: unlike wall time, it does not
    grow when other jobs share the machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def write_input(root: pathlib.Path, n_synthetic: int, shards: int = 8) -> tuple[list[str], int, int]:
    docs = list(stdlib_documents()) + synthetic_documents(n_synthetic, seed=0)
    root.mkdir(parents=True)
    files = [open(root / f"part-{k:02d}.jsonl", "w", encoding="utf-8") for k in range(shards)]
    n_bytes = 0
    for i, d in enumerate(docs):
        line = json.dumps(d, ensure_ascii=False) + "\n"
        n_bytes += len(line.encode())
        files[i % shards].write(line)
    for f in files:
        f.close()
    return sorted(str(p) for p in root.glob("*.jsonl")), len(docs), n_bytes


def run_ours(inputs, out, workers):
    from data.pipeline import PipelineConfig, run

    stats = run(inputs, out, PipelineConfig(workers=workers), progress=False)
    return stats["augmented"]["stages"][-1]["docs_out"]


def run_datatrove(in_dir, out, workers, shards):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LambdaFilter,
        RegexFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    tok = CJKWordTokenizer()
    mh = MinhashConfig(n_grams=5, num_buckets=18, hashes_per_bucket=7)
    blocklist = "|".join(DEFAULT_BLOCKLIST)
    stages = [
        [JsonlReader(str(in_dir)), Normalize(),
         C4QualityFilter(filter_no_terminal_punct=False, min_num_sentences=-1, filter_curly_bracket=False,
                         remove_citations=False),
         GopherRepetitionFilter(language=tok), GopherQualityFilter(language=tok, min_stop_words=None),
         LambdaFilter(keep_en_zh), RegexFilter(blocklist),
         JsonlWriter(f"{out}/filtered", compression=None),
         MinhashDedupSignature(f"{out}/sigs", config=mh, language=tok)],
        [MinhashDedupBuckets(f"{out}/sigs", f"{out}/buckets", config=mh)],
        [MinhashDedupCluster(f"{out}/buckets", f"{out}/remove_ids", config=mh)],
        [JsonlReader(f"{out}/filtered"), MinhashDedupFilter(f"{out}/remove_ids"),
         JsonlWriter(f"{out}/final", compression=None)],
    ]
    # tasks per stage as in datatrove's minhash example: one per shard, one per bucket, one to cluster
    for k, (pipeline, tasks) in enumerate(zip(stages, (shards, mh.num_buckets, 1, shards))):
        # spawned workers are children of this process, so their CPU time is counted like ours
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=f"{out}/logs/{k}",
                              skip_completed=False, start_method="spawn").run()
    return sum(1 for p in pathlib.Path(out, "final").glob("*.jsonl") for _ in open(p, encoding="utf-8"))


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--synthetic", type=at_least(0), default=4000, help="synthetic en/zh documents added to the stdlib")
    ap.add_argument("--workers", type=at_least(1), default=2)
    ap.add_argument("--shards", type=at_least(1), default=8)
    args = ap.parse_args(argv)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="clean-bench-"))
    try:
        inputs, n_docs, n_bytes = write_input(tmp / "in", args.synthetic, args.shards)
        print(f"input: {n_docs:,} documents, {n_bytes / 1e6:.1f} MB in {args.shards} JSONL "
              f"shard{'s' * (args.shards != 1)}; "
              f"{args.workers} worker process{'es' * (args.workers != 1)}")
        print("| pipeline | wall s | docs/s | MB/s | CPU s | MB per CPU-s | docs kept |")
        print("|---|---|---|---|---|---|---|")
        sides = [("data.pipeline (ours)", lambda: run_ours(inputs, tmp / "ours", args.workers))]
        try:
            import datatrove  # noqa: F401

            sides.append(("datatrove 0.10.1", lambda: run_datatrove(tmp / "in", tmp / "dt", args.workers, args.shards)))
        except ImportError:
            print("| datatrove | not installed (pip install -e '.[bench]') |")
        for name, fn in sides:
            t0, c0 = time.perf_counter(), cpu_seconds()
            kept = fn()
            dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            print(f"| {name} | {dt:.1f} | {n_docs / dt:,.0f} | {n_bytes / 1e6 / dt:.2f} | {cpu:.1f} | "
                  f"{n_bytes / 1e6 / cpu:.2f} | {kept:,} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
