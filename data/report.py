"""The funnel of a cleaning run: per stage documents/bytes in and out, drops by reason, language mix.

    python -m data.report DIR                    # exits 1 if any count fails to reconcile
    python -m data.report DIR --drops too_short  # every record dropped for that reason (or "all"): id, tier, stage
                                                 # (none: exits 1, naming the reasons the run has); a duplicate
                                                 # also names the document kept in its place (and
                                                 # says so if a labeler dropped that one since)
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
from collections.abc import Iterator

from data.cli import cli_parser, path_arg, run_main
from data.shards import TIERS, id_text, read_json
from data.stages import StageStats


def funnel(out_dir) -> list[tuple[str, StageStats]]:
    """`(tier, stage stats)` for every stage of the run in order, summed over shards."""
    out = pathlib.Path(out_dir)
    rows = []
    for tier in TIERS:
        path = out / tier / "stats.json"
        if not (out / "manifest.json").exists():
            raise FileNotFoundError(f"{out} holds no cleaning run (no manifest.json); pass the --out directory of "
                                    "`python -m data.pipeline`")
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the run under {out} is unfinished; re-run "
                                    "`python -m data.pipeline` with the same inputs and --out to resume it")
        rows += [(tier, StageStats.from_json(s)) for s in read_json(path)["stages"]]
    return rows


def drops(out_dir, reason: str | None = None) -> Iterator[dict]:
    """Every record the run dropped, `{"id", "tier", "stage", "reason"}`, tier by tier and shard by shard (from each
    shard's `drops.jsonl` log); only those of `reason` when given. Ids are the records' `id`, except a record
    dropped as it was read (tier raw, stage ingest), named by where it was (`path:line`) even if it has one. A
    duplicate (`exact_dup`, `near_dup`, and `..._reference`) also has the kept document's `duplicate_of` (its id),
    `duplicate_at` (where it is in the filtered tier of its run: the dedup_against run for `..._reference`) and, if
    the survivor was found by MinHash, `jaccard` (the estimated similarity); a run from before they were logged
    has none. One of this run's whose survivor a labeler dropped later (dedup runs first) has `survivor_dropped`:
    true, as the final corpus holds neither."""
    out = pathlib.Path(out_dir)
    funnel(out)  # a finished run, or the error saying what is missing
    labeler_dropped = _labeler_dropped(out)
    for tier in TIERS:
        for stats in sorted((out / tier).glob("shard-*.stats.json")):
            log = stats.with_name(stats.name.replace(".stats.json", ".drops.jsonl"))
            if not log.exists():
                raise FileNotFoundError(f"{log} is missing: the run under {out} predates drop logs; clean into a "
                                        "new --out to have every drop listed (its stats.json still counts them)")
            with open(log, encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    if reason is None or row["reason"] == reason:
                        if "duplicate_at" in row and not row["reason"].endswith("_reference"):
                            shard, j = row["duplicate_at"].removeprefix("filtered/").split(".array_record:")
                            if int(j) in labeler_dropped(shard):
                                row["survivor_dropped"] = True
                        yield {"id": row["id"], "tier": tier, **row}


def _labeler_dropped(out: pathlib.Path):
    """`shard name -> {its filtered rows the labelers dropped}` (the labeled tier's stats record them), read once a
    shard."""
    @functools.cache
    def rows(shard: str) -> frozenset:
        path = out / "labeled" / f"{shard}.stats.json"
        return frozenset(read_json(path).get("dropped", ())) if path.exists() else frozenset()
    return rows


def _kept_instead(row: dict) -> str:
    """A duplicate's listing column naming its survivor: id, where it is (in which run), similarity."""
    if "duplicate_of" not in row:
        return ""
    run = "the dedup_against run's " if row["reason"].endswith("_reference") else ""
    sim = f", Jaccard ~{row['jaccard']:.2f}" if "jaccard" in row else ""
    gone = ", itself dropped by a labeler since" if row.get("survivor_dropped") else ""
    return f"\tduplicate of {id_text(row['duplicate_of'])} ({run}{row['duplicate_at']}{sim}){gone}"


def reconcile(rows) -> list[str]:
    """Every broken count identity, as a sentence (empty when all hold): per stage
    in = out + Σ dropped, and each stage's in = the previous stage's out."""
    problems = []
    for k, (tier, s) in enumerate(rows):
        if not s.reconciles():
            problems.append(f"{tier}/{s.name}: {s.docs_in} in != {s.docs_out} out + {sum(s.dropped.values())} dropped")
        if k and rows[k - 1][1].docs_out != s.docs_in:
            prev = rows[k - 1][1]
            problems.append(f"{tier}/{s.name}: {s.docs_in} in != {prev.name}'s {prev.docs_out} out")
    return problems


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _mix(counters, prefix: str) -> str:
    docs = {k[len(prefix) + 1:]: v for k, v in counters.items() if k.startswith(prefix + ":")}
    byts = {k[len(prefix) + 7:]: v for k, v in counters.items() if k.startswith(prefix + "_bytes:")}
    total = sum(docs.values()) or 1
    return ", ".join(f"{lang} {n:,} doc{'s' * (n != 1)} ({n / total:.1%}, {_size(byts.get(lang, 0))})"
                     for lang, n in sorted(docs.items(), key=lambda kv: -kv[1])) or "none"


def report(out_dir) -> str:
    """A cleaning run's funnel as a printable table: per tier and stage, documents and bytes in / out and the
    drop reasons. Bytes are the documents' text, in UTF-8, in every column (a record ingest dropped counts its size
    in the input: its text is unknown); the input's own size, metadata included, is on a line of its own."""
    rows = funnel(out_dir)
    lines = [f"cleaning run {out_dir}", "",
             f"{'tier':<10} {'stage':<10} {'docs in':>10} {'docs out':>10} {'kept':>7} {'bytes in':>10} "
             f"{'bytes out':>10}  dropped"]
    for tier, s in rows:
        drops = ", ".join(f"{r} {n:,}" for r, n in s.dropped.most_common()) or "-"
        kept = s.docs_out / s.docs_in if s.docs_in else 1.0
        lines.append(f"{tier:<10} {s.name:<10} {s.docs_in:>10,} {s.docs_out:>10,} {kept:>7.1%} "
                     f"{_size(s.bytes_in):>10} {_size(s.bytes_out):>10}  {drops}")
    first, last = rows[0][1], rows[-1][1]
    # text against text: the records read, and those dropped as read at their size in the input. (Runs before
    # `input_bytes` counted ingest's bytes in as the input's, metadata included: this sum holds for both.)
    read = first.bytes_out + sum(first.dropped_bytes.values())
    lines.append(f"overall: {last.docs_out:,} of {first.docs_in:,} records kept "
                 f"({_size(last.bytes_out)} of {_size(read)} of text)")
    if "input_bytes" in first.counters:
        lines.append(f"input read: {_size(first.counters['input_bytes'])} (JSON Lines records whole, metadata "
                     "included; compressed files decompressed; Parquet: the text column)")
    lines.append("bytes: the documents' text (UTF-8); a record dropped by ingest, as it was in the input")
    by_name = {s.name: s for _, s in rows}
    lines.append("")
    if by_name.get("normalize") and (fixed := by_name["normalize"].counters["mojibake_repaired_docs"]):
        seqs = by_name["normalize"].counters["mojibake_repaired_sequences"]
        lines.append(f"mojibake repaired in {fixed:,} document{'s' * (fixed != 1)} "
                     f"({seqs:,} sequence{'s' * (seqs != 1)}; kept, not dropped)")
    if "langid" in by_name:
        lines.append("languages kept by langid:    " + _mix(by_name["langid"].counters, "lang"))
        lines.append("languages dropped by langid: " + _mix(by_name["langid"].counters, "dropped_lang"))
    # the last stage counts what the final tier holds; a run (or shards) from before it did, or a last stage
    # that counts no languages, falls back to the label stage's counts, named as such. (Not only under a label
    # stage: with labelers=() the augment stage counted langid's languages, and the report left them out.)
    final = last if sum(v for k, v in last.counters.items() if k.startswith("lang:")) == last.docs_out else None
    if final is not None or "label" in by_name:
        counted = final or by_name["label"]
        lines.append(("language mix of the final corpus: " if final else "language mix labelled (the label stage's "
                      "documents, before later stages): ") + _mix(counted.counters, "lang"))
        tags = {k[7:]: v for k, v in counted.counters.items() if k.startswith("domain:")}
        if tags or "label" in by_name:  # (no stage tagging domains: no line saying there are none)
            lines.append("domain tags: " + (", ".join(f"{t} {n:,}" for t, n in
                                                      sorted(tags.items(), key=lambda kv: -kv[1])) or "none"))
    examples = [f"  {tier}/{s.name} {r}: {', '.join(map(id_text, ids))}" for tier, s in rows
                for r, ids in sorted(s.examples.items()) if ids]
    if examples:
        lines += ["", "dropped records, the first few per reason (ids: path:line, path:row, or a text file's path):",
                  *examples]
    problems = reconcile(rows)
    lines.append("")
    lines.append("counts reconcile: " + ("yes (every stage: in = out + dropped; out feeds the next stage)"
                                        if not problems else "NO\n  " + "\n  ".join(problems)))
    lines += unread_warning(rows)
    return "\n".join(lines)


def unread_warning(rows) -> list[str]:
    """Lines warning of input files not read to their end: each counts as one drop, but how many records it held
    past the damage is unknown, so they are in no count (empty when every file was read whole)."""
    rest = sum(s.dropped.get("unreadable_rest", 0) for _, s in rows)
    whole = sum(s.dropped.get("unreadable_file", 0) for _, s in rows)
    if not rest + whole:
        return []
    parts = [f"{rest:,} read only up to damage or truncation (unreadable_rest)"] if rest else []
    parts += [f"{whole:,} not readable at all (unreadable_file)"] if whole else []
    first = "unreadable_rest" if rest else "unreadable_file"
    return ["", f"WARNING: input files not read to their end: {'; '.join(parts)}. Each counts as one dropped record; "
            f"the records they held past the damage are in no count. `python -m data.report DIR --drops {first}` "
            "lists them (with where reading stopped); re-fetch or repair them and clean again."]


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("dir", type=path_arg, help="the --out directory of a cleaning run")
    ap.add_argument("--drops", metavar="REASON", default=None,
                    help="list every record dropped for REASON ('all': every drop) as id, tier/stage, reason (and for "
                         "a duplicate, the copy kept: its id, where it is, the estimated Jaccard similarity)")
    args = ap.parse_args(argv)
    try:
        if args.drops is not None:
            listed = 0
            for row in drops(args.dir, None if args.drops == "all" else args.drops):
                print(f"{id_text(row['id'])}\t{row['tier']}/{row['stage']}\t{row['reason']}{_kept_instead(row)}")
                listed += 1
            if not listed and args.drops != "all":  # a mistyped reason printed nothing and exited 0, like a clean one
                reasons = sorted({r for _, s in funnel(args.dir) for r in s.dropped})
                raise SystemExit(f"error: no record of {args.dir} was dropped for {args.drops!r}; its drop reasons: "
                                 f"{', '.join(reasons) or 'none'} (or 'all')")
            return
        print(report(args.dir))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    sys.exit(1 if reconcile(funnel(args.dir)) else 0)


if __name__ == "__main__":
    run_main(main)
