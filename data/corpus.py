"""An embedded corpus that exists on any machine with Python: the standard library's own sources.

Byte-level tokens (0..255) need no tokenizer training, so the demo and tests run offline.
"""

from __future__ import annotations

import fractions
import math
import numbers
import pathlib
import sysconfig

import numpy as np

from data.seeds import check_seed

BYTE_VOCAB = 256


def stdlib_text(max_bytes: int = 4_000_000, seed: int = 0) -> str:
    """Concatenated text of stdlib `.py` files (sorted, then a seeded shuffle; the build's `_sysconfigdata*` left
    out), up to `max_bytes` characters (the name is historical: a few non-ASCII characters make the UTF-8 a little
    longer, 4,000,102 bytes by default)."""
    if isinstance(max_bytes, bool | np.bool_) or not isinstance(max_bytes, numbers.Integral) or max_bytes < 0:
        # -1 sliced from the end (a whole file less its last character), 1.5 failed in the slice naming nothing
        raise ValueError(f"stdlib_text: max_bytes={max_bytes!r} must be an int >= 0 (a count of characters)")
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    np.random.default_rng(check_seed(seed, "stdlib_text seed")).shuffle(files)  # seed=True ran as 1
    parts, total = [], 0
    for p in files:
        # this build's settings (install prefix, compiler flags): another machine's text under the same seed (seed 1
        # held it at the default max_bytes). Skipped after the shuffle, so every other file keeps its place.
        if p.name.startswith("_sysconfigdata"):
            continue
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
    """UTF-8 bytes of `text` as int32 tokens 0..255: [len(bytes)]."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode_bytes(tokens) -> str:
    """Byte tokens back to text; ids outside 0..255 (EOS, padding) are skipped, broken UTF-8 becomes U+FFFD."""
    return bytes(int(t) for t in tokens if 0 <= int(t) < 256).decode("utf-8", errors="replace")


class ByteWindows:
    """Random windows of `seq_len + 1` byte tokens from a split of the corpus.

    `batch(step)` is a pure function of (seed, step), so a resumed run sees the same data. Window starts are drawn
    from [0, len - seq_len - 1): the last start (and so the corpus's last token as a target) is never drawn. Kept as
    is: drawing from one more start would change every window of the documented ladder and μP runs.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0):
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"ByteWindows {name}={v!r} must be an int >= 1")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"corpus of {len(tokens)} token{'s' * (len(tokens) != 1)} is shorter than one window "
                             f"of seq_len + 1 = {seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed = check_seed(seed, "ByteWindows seed")  # seed=True ran as 1, a float failed at the first batch

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """{"inputs", "targets"}: int32 [batch_size, seq_len], targets shifted by one token; step >= 0."""
        # numpy's seed said "expected non-negative integer" (or "seed must be integer" for 1.5), naming nothing;
        # step=True served step 1
        if isinstance(step, bool | np.bool_) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"ByteWindows.batch: step={step!r} must be an int >= 0 (a batch is named by its step "
                             f"from 0)")
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, max(1, len(self.tokens) - self.seq_len - 1), size=self.batch_size)
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def train_eval_split(tokens: np.ndarray, eval_fraction: float = 0.05):
    """(train, eval) token arrays: the last `eval_fraction` of the stream is held out, in one piece: its last
    ceil(n · eval_fraction) tokens of n (at least one)."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"train_eval_split: eval_fraction={eval_fraction} must be in (0, 1)")
    # the fraction as written (0.07 is 7/100): in floats int(1000 * (1 - 0.07)) is 929, one token too many held out;
    # by its own digits, not a double's: np.float32(0.1) is 0.100000001 as a double, and held out 101 of 1,000
    held = math.ceil(len(tokens) * fractions.Fraction(str(eval_fraction)))
    cut = len(tokens) - held
    return tokens[:cut], tokens[cut:]


# --- the embedded corpus as documents, for the cleaning pipeline and the grain loader -----------------


def _stdlib_files(max_files: int | None = None) -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    return files[:max_files] if max_files else files


def _docstrings(source: str, module: str) -> str | None:
    """The module's docstrings as one prose document: module docstring, then `name: docstring` per
    class / function (their API documentation), breadth first as `ast.walk` goes: top-level definitions, then
    methods (the corpus's cached order)."""
    import ast

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts = [ast.get_docstring(tree) or ""]
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(f"{module}.{node.name}: {doc}")
    text = "\n\n".join(p for p in parts if p)
    return text or None


def stdlib_documents(max_files: int | None = None):
    """Documents of the standard library's top-level modules, in sorted order: for each module its source
    (`kind` "code") and its docstrings (`kind` "docs"), with `id` and `source` metadata. Bytes are decoded here
    with errors='replace': an undecodable byte reaches the pipeline as U+FFFD in valid text, so ingest's
    `invalid_utf8` check (NormalizeConfig) never sees it; the normalise stage counts such documents
    (`with_replacement_char`). (Python 3.11's top-level modules all decode: 168 of 168.)"""
    for p in _stdlib_files(max_files):
        raw = p.read_bytes()
        yield {"id": f"stdlib/{p.name}", "source": str(p), "kind": "code", "text": raw.decode("utf-8", "replace")}
        doc = _docstrings(raw.decode("utf-8", "replace"), p.stem)
        if doc:
            yield {"id": f"stdlib/{p.name}#docs", "source": str(p), "kind": "docs", "text": doc}


def write_stdlib_jsonl(out_dir, num_shards: int = 4, max_files: int | None = None) -> list[str]:
    """Write `stdlib_documents()` round-robin into `num_shards` JSONL files under `out_dir`; returns paths."""
    import json

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"stdlib-{k:03d}.jsonl" for k in range(num_shards)]
    files = [p.open("w", encoding="utf-8") for p in paths]
    try:
        for i, doc in enumerate(stdlib_documents(max_files)):
            files[i % num_shards].write(json.dumps(doc, ensure_ascii=False) + "\n")
    finally:
        for f in files:
            f.close()
    return [str(p) for p in paths]


def stdlib_config(workers: int = 2):
    """The cleaning settings for the stdlib corpus: the defaults, with the repetition limits raised
    because source code and API docs repeat n-grams and lines far more than prose does (at the
    defaults about half of the modules fail `dup_5gram`); the worst offenders are still dropped. The markup
    limit too: a module that writes HTML holds it in its string literals (cgitb: 13% of its characters)."""
    from data.filters import QualityConfig
    from data.pipeline import PipelineConfig

    quality = QualityConfig(max_dup_lines=0.45, max_dup_line_chars=0.35, max_mean_word_len=15.0,
                            max_hash_ellipsis_ratio=0.2, top_ngram_max=((2, 0.25), (3, 0.25), (4, 0.25)),
                            dup_ngram_max=((5, 0.6), (6, 0.58), (7, 0.56), (8, 0.54), (9, 0.52), (10, 0.5)),
                            max_markup_ratio=0.25)
    return PipelineConfig(quality=quality, workers=workers)


def default_corpus(work_dir=None, num_shards: int = 4, max_files: int | None = None, workers: int = 2,
                   progress: bool = True, tier: str = "augmented") -> str:
    """The embedded corpus cleaned by the same pipeline as any other: stdlib sources + docstrings →
    JSONL → `data.pipeline.run` (stdlib preset). Returns the directory of `tier`, ready for
    `data.loader` or `data.tokenizer.train_bpe`. Cached: a finished run under `work_dir` (default
    `~/.cache/jaxscale/stdlib-corpus-...`) is reused, an interrupted one resumed."""
    import sys

    from data.pipeline import run
    from data.run_lock import RunLock
    from data.shards import TIERS

    if tier not in TIERS:  # a misspelt tier cleaned the whole corpus, then named a directory no run writes
        raise ValueError(f"default_corpus: tier={tier!r} is not a tier of the cleaning run; use one of {TIERS}")
    cfg = stdlib_config(workers=workers)
    # the cache key holds the settings' fingerprint: changed filters never reuse a stale run
    work = pathlib.Path(work_dir or pathlib.Path.home() / ".cache" / "jaxscale" /
                        f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{max_files or 'all'}-"
                        f"{num_shards}-{cfg.fingerprint()[:8]}")
    # a cache: a second process building it waits for the first, then reuses its run (the pipeline's own lock on
    # tiers/ refused it while the first cleaned, and two builders wrote one input.tmp)
    with RunLock(work, "data.corpus.default_corpus", wait=True):
        raw = work / "input"
        if not raw.exists():
            import shutil

            shutil.rmtree(work / "input.tmp", ignore_errors=True)
            write_stdlib_jsonl(work / "input.tmp", num_shards, max_files)
            (work / "input.tmp").rename(raw)  # atomic: a half-written input never looks finished
        out = work / "tiers"
        if not (out / tier / "stats.json").exists():
            run([raw], out, cfg, progress=progress)
    return str(out / tier)
