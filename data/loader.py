"""grain pipelines for language modelling: cleaned ArrayRecord tiers → packed, sharded device batches.

    source (ArrayRecord) → this process's documents → seeded shuffle (reshuffled each epoch) → weighted mix
    (of documents) → tokenize → [worker processes] → concat-then-split packing (grain) → LM rows → batch → device arrays

Rows follow the trainer's batch format (experiments/lm_step.py), all [B, T]: `inputs`, `targets` int32,
`segment_ids` int32 (1, 2, ... per document in the row, 0 = padding), `positions` int32 (restart at 0 with
each document piece), `weights` float32 (1 on real targets, 0 on padding). Targets are shifted inside each
document before packing, so no target ever crosses a document boundary. With an EOS token a document is
`[eos] + text + [eos]` and every text token and the closing EOS are targets exactly once; without one
(the plain byte tokenizer) every token but the first is.

Documents are split across processes before shuffling (`[process_index::process_count]`), so each
process packs its own share and yields `global_batch_size // process_count` rows per step; together
they cover every document exactly once per epoch of each share. The shares' epochs are their own: a share of
fewer tokens ends its epoch in fewer steps, so with num_epochs=None its documents come round again sooner
(read more often than the others' by the ratio of the shares' tokens: 1.26x for the tiny preset's 69 training
documents on 2 processes, 512k vs 647k tokens; near 1 for many documents). The iterator state (`get_state` /
`set_state`) is a small JSON-serialisable dict; restoring it reproduces the following batches exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import numbers
import os
import re
import types
from collections.abc import Iterable, Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader
from grain.experimental import ConcatThenSplitIterDataset

from data.seeds import check_field_types, read_once
from data.shards import decode_doc, id_text, read_digest, read_json, tier_shards
from data.tokenizer import TOKENS_MAGIC


@dataclasses.dataclass(frozen=True)
class Source:
    """A cleaned tier directory (or explicit ArrayRecord files, or a `data.tokenizer.pretokenize` output)
    and its mixture weight.

    Weights are shares of documents, not of tokens: sources of weights 1 and 1 give as many documents each,
    whatever their lengths (9-byte and 99-byte documents: the short source has 50 % of the documents and 9 % of
    the tokens, 10 of 110 with their EOS). For a token share r_k, give each source weight r_k / (its mean tokens
    per document)."""

    path: str | tuple[str, ...]
    weight: float = 1.0

    def __post_init__(self):
        # files given as a generator were used up by the checks below and stored empty: a source of no shards
        object.__setattr__(self, "path", read_once(self.path))
        if isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real) or not (
                0 < self.weight < math.inf):
            raise ValueError(f"Source.weight={self.weight!r} for {self.path!r} must be a positive finite number")
        if not isinstance(self.path, str | os.PathLike | Iterable):  # None failed in iteration, naming nothing
            raise ValueError(f"Source.path={self.path!r} must be a tier directory or a tuple of shard files")
        if not isinstance(self.path, str | os.PathLike):
            dirs = [str(f) for f in self.path if os.path.isdir(f)]
            if dirs:
                raise ValueError(f"Source.path: {dirs} is a directory; pass a tier directory as Source(path), files "
                                 "as a tuple of shard-*.array_record paths")
        paths = [self.path] if isinstance(self.path, str | os.PathLike) else list(self.path)
        others = [str(f) for f in paths if os.path.isfile(f) and not str(f).endswith(".array_record")]
        if others:
            raise ValueError(f"Source.path: {others} are not ArrayRecord shards; clean raw text first (python -m "
                             "data.pipeline IN --out DIR) and pass one of its tiers, e.g. DIR/augmented")
        if not paths:  # (a glob that matched nothing) an IndexError in the first record's check followed
            raise ValueError(f"Source.path={self.path!r} names no shard files; pass a tier directory or its "
                             "shard-*.array_record files")
        # a shard named twice (or once more through a link) was read twice per epoch, its documents trained on twice
        real = [os.path.realpath(f) for f in paths]
        seen = collections.Counter(real)
        if twice := sorted({str(f) for f, r in zip(paths, real) if seen[r] > 1}):
            raise ValueError(f"Source.path: {twice} name the same shard more than once; list each file once (to "
                             "read some shards more often, give them a Source of their own with a larger weight)")

    def check_tokenizer(self, tokenizer) -> None:
        """A pre-tokenized source (data.tokenizer.pretokenize) must be read with the tokenizer that made it: its
        `tokenizer.json` sits beside the shards (the directory, or the files' own); pre-tokenized shards without one
        (given as files, or a pretokenize run that stopped before writing it) are refused."""
        files = self.files()
        if isinstance(self.path, str | os.PathLike) and os.path.isdir(self.path):
            folders = {str(self.path): files}
        else:  # files given: each folder they come from (one tuple may join tiers of different tokenizers)
            folders = {}
            for f in files:
                folders.setdefault(os.path.dirname(os.path.abspath(f)), []).append(f)
        for folder, fs in folders.items():
            self._check_folder(folder, fs, tokenizer)

    def _check_folder(self, folder: str, files: list[str], tokenizer) -> None:
        meta_path = os.path.join(folder, "tokenizer.json")
        meta = read_json(meta_path) if os.path.isfile(meta_path) else None
        # pretokenize's meta, not a `tokenizers` JSON of the same name saved beside the text (its vocab_size a KeyError)
        if not (isinstance(meta, dict) and {"vocab_size", "eos_id"} <= meta.keys()):
            if any((_first_record(f) or b"").startswith(TOKENS_MAGIC) for f in files):
                raise ValueError(f"Source {self.path!r} holds pre-tokenized ids but no {meta_path} says which "
                                 "tokenizer made them (an unfinished data.tokenizer.pretokenize run, or a tokenizer "
                                 "saved over it?); pretokenize again, or read the cleaned tier it came from")
        else:
            if (meta["vocab_size"], meta["eos_id"]) != (tokenizer.vocab_size, tokenizer.eos_id):
                raise ValueError(f"Source {self.path!r} was pre-tokenized with vocab_size={meta['vocab_size']}, "
                                 f"eos_id={meta['eos_id']}; pass that tokenizer, or pretokenize again")
            # two BPEs of one vocab size share (vocab_size, eos_id) but not ids: compare the content hash
            # (absent from data pre-tokenized before it was recorded, and from tokenizers without one). The ids do
            # not hold the BOS / EOS the loader adds, so pretokenize records the BPE's own (`ids_fingerprint`); metas
            # written before it hold the whole `fingerprint`, EOS / BOS choice included
            theirs = meta.get("fingerprint")
            ours = [f for f in (getattr(tokenizer, a, None) for a in ("ids_fingerprint", "fingerprint")) if f]
            if theirs is not None and ours and theirs not in ours:
                raise ValueError(f"Source {self.path!r} was pre-tokenized with another tokenizer (fingerprint "
                                 f"{theirs}, this one is {ours[0]}); pass that tokenizer, or pretokenize again")

    def first_record(self) -> bytes | None:
        """The raw first record of the first shard (None: it is empty)."""
        return _first_record(self.files()[0])

    def files(self) -> list[str]:
        """The ArrayRecord shard paths this source reads (a tier directory's shards, in order, or the files given)."""
        if isinstance(self.path, str | os.PathLike) and os.path.isdir(self.path):
            return tier_shards(self.path)
        files = [self.path] if isinstance(self.path, str | os.PathLike) else list(self.path)
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"Source.path: {missing} do not exist; pass a tier directory of a cleaning "
                                    "run or its shard-*.array_record files")
        return [str(f) for f in files]


def _first_record(path: str) -> bytes | None:
    """The raw first record of one ArrayRecord shard (None: it is empty); a file that is not one is named."""
    try:
        reader = ArrayRecordReader(path)
        try:
            first = reader.read([0])[0] if reader.num_records() else None
        finally:
            reader.close()  # (where the reader of a file that is not one says so)
        return first
    except (RuntimeError, OSError) as e:  # e.g. "ArrayRecord file should be at least 64KB big", naming no file
        raise ValueError(f"{path} is not an ArrayRecord shard ({e}); a Source reads the shard-*.array_record files "
                         "of a cleaning run (or data.tokenizer.pretokenize) only") from None


def _data_source(files: list[str]):
    """grain's ArrayRecordDataSource over `files`; a file that is not a shard is named (grain names none)."""
    try:
        return grain.sources.ArrayRecordDataSource(files)
    except (RuntimeError, OSError):
        for f in files:
            _first_record(f)  # raises naming the bad one
        raise


MAX_SEED = (2**32 - 1) // 1000 - 1  # one source on one process shuffles with seed·1000: grain's seeds are 32 bits


def _shuffle_seed(seed: int, k: int, p: int, n: int, n_sources: int) -> int:
    """Source k's shuffle seed on process p of n. grain shuffles epoch e with seed + e, and every process shuffles
    its own slice [p::n]: with seed·1000 + k for all, the processes read neighbouring documents in lockstep and
    source k's epoch 1 repeated source k + 1's epoch 0. Unrelated 32-bit seeds per (seed, k, p, n) cannot meet
    (one source on one process keeps seed·1000, so its saved states still resume)."""
    if n == 1 and n_sources == 1:
        return seed * 1000
    return int(np.random.SeedSequence([seed, k, p, n]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """seq_len: T of every row. global_batch_size: rows per step over all processes. num_epochs: None
    repeats forever (a mixture's weights, shares of documents, not tokens: see `Source`, then to about 1 %:
    grain's mix scales them to integers, the smallest to 100; with a finite count the weights are exact up to the
    last round, and it ends when the next document would come from a source already read to its end: that source
    whole, the others in proportion to the weights, up to one round of grain's interleave past it: 3:1 over 50
    documents gave 152:50). With several processes a finite count yields a different number of batches
    per process (each packs its own documents into rows); `LMLoader` stops every process at the first that runs
    out and counts what the others leave unread, so to read every document bound the run by steps with
    num_epochs=None, as experiments/train_lm.py does. worker_count: grain worker processes for reading and
    tokenizing (0 = in this process). drop_remainder: drop a last partial batch (`LMLoader` counts it in
    `dropped`; False: keep it; an `LMLoader` on a mesh pads it with rows of weight 0 to the full batch)."""

    seq_len: int = 256
    global_batch_size: int = 8
    seed: int = 0
    num_epochs: int | None = None
    shuffle: bool = True
    text_field: str = "text"
    worker_count: int = 0
    worker_buffer_size: int = 16
    tokenize_batch: int = 16
    drop_remainder: bool = True

    def __post_init__(self):
        for f in ("seq_len", "global_batch_size", "seed", "worker_count", "worker_buffer_size", "tokenize_batch"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"LoaderConfig.{f}={v!r} must be an int")
        if self.seq_len < 1:
            raise ValueError(f"LoaderConfig.seq_len={self.seq_len} must be >= 1")
        if self.global_batch_size < 1:
            raise ValueError(f"LoaderConfig.global_batch_size={self.global_batch_size} must be >= 1")
        if self.num_epochs is not None and (isinstance(self.num_epochs, bool) or not isinstance(
                self.num_epochs, numbers.Integral)):
            raise ValueError(f"LoaderConfig.num_epochs={self.num_epochs!r} must be an int, or None to repeat forever")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"LoaderConfig.num_epochs={self.num_epochs} must be >= 1, or None to repeat forever")
        if self.worker_count < 0:
            raise ValueError(f"LoaderConfig.worker_count={self.worker_count} must be >= 0")
        if self.worker_buffer_size < 1:
            raise ValueError(f"LoaderConfig.worker_buffer_size={self.worker_buffer_size} must be >= 1")
        if self.tokenize_batch < 1:
            raise ValueError(f"LoaderConfig.tokenize_batch={self.tokenize_batch} must be >= 1")
        if not 0 <= self.seed <= MAX_SEED:  # one source on one process shuffles with seed·1000; grain takes 32 bits
            raise ValueError(f"LoaderConfig.seed={self.seed} must be in [0, {MAX_SEED}]")
        check_field_types(self)  # the flags: shuffle='no' shuffled, drop_remainder=None kept a partial batch


def _check_text_field(src: Source, field: str) -> None:
    """The first document of `src` has `field` (before the iterator starts: inside it, a KeyError names nothing)."""
    first = src.first_record()
    try:
        doc = None if first is None or first.startswith(TOKENS_MAGIC) else decode_doc(first)
    except ValueError as e:  # (decode_doc names no file)
        raise ValueError(f"Source {src.path!r}: {e}") from None
    if doc is not None and field not in doc:
        raise ValueError(f"LoaderConfig.text_field={field!r} is not a field of {src.path!r}'s documents (they have "
                         f"{sorted(doc)}); set text_field to the one holding the text")


class Tokenize:
    """A list of doc records → a list of `{"inputs": ids[:-1], "targets": ids[1:]}`, ids = [bos] + text + [eos]
    when the tokenizer has a BOS, else [eos] + text + [eos] when it has an EOS, else the text's ids. Lists,
    because `encode_batch` tokenizes them in parallel threads. Picklable, for grain worker processes."""

    def __init__(self, tokenizer, text_field: str = "text"):
        self.tokenizer, self.text_field = tokenizer, text_field

    def __call__(self, records: list[bytes]) -> list[dict[str, np.ndarray]]:
        # pre-tokenized records (data.tokenizer.pretokenize) carry their ids; documents are tokenized here
        todo = [k for k, r in enumerate(records) if not r.startswith(TOKENS_MAGIC)]
        all_ids = [np.frombuffer(r, np.int32, offset=len(TOKENS_MAGIC)) if r.startswith(TOKENS_MAGIC) else None
                   for r in records]
        # ids read back are trusted by nothing downstream: one >= vocab_size gathered NaN under jit (the trainer then
        # skipped every step as a non-finite loss, naming no token), a negative one wrapped as an input
        vocab = self.tokenizer.vocab_size
        for ids in (x for x in all_ids if x is not None and x.size):
            if (lo := int(ids.min())) < 0 or (hi := int(ids.max())) >= vocab:
                raise ValueError(f"a pre-tokenized record holds token id {lo if lo < 0 else hi} outside [0, "
                                 f"vocab_size={vocab}) of the tokenizer it is read with (a damaged shard, or ids of "
                                 "another tokenizer under this one's meta); pretokenize the tier again with it")
        if todo:
            docs = [decode_doc(records[k]) for k in todo]
            if missing := next((d for d in docs if self.text_field not in d), None):
                raise ValueError(f"LoaderConfig.text_field={self.text_field!r} is not a field of the documents "
                                 f"(one has {sorted(missing)}); set text_field to the one holding the text")
            texts = [d[self.text_field] for d in docs]
            if bad := next((d for d, t in zip(docs, texts) if not isinstance(t, str)), None):
                raise ValueError(f"LoaderConfig.text_field={self.text_field!r}: a document (id "
                                 f"{id_text(bad.get('id'))!r}) holds {type(bad[self.text_field]).__name__} there, "
                                 "not text; clean the tier with data.pipeline (it drops such records as bad_text_type) "
                                 "or fix the field")
            if hasattr(self.tokenizer, "encode_batch"):
                encoded = self.tokenizer.encode_batch(texts)
            else:
                encoded = [self.tokenizer.encode(t) for t in texts]
            for k, ids in zip(todo, encoded):
                all_ids[k] = ids
        eos, bos, out = self.tokenizer.eos_id, getattr(self.tokenizer, "bos_id", None), []
        for ids in all_ids:
            if bos is not None:  # [bos] text [eos]: the first token is learnt after BOS, as the model was pretrained
                ids = np.concatenate([[bos], ids, [] if eos is None else [eos]]).astype(np.int32)
            elif eos is not None:
                ids = np.concatenate([[eos], ids, [eos]]).astype(np.int32)
            out.append({"inputs": ids[:-1], "targets": ids[1:]})
        return out


class _MixUntilExhausted(grain.MapDataset):
    """Finite sources interleaved by weight (at each index the source furthest behind its share) until the next
    document would come from a source already read to its end: that source is read whole, the others in
    proportion (grain's MapDataset.mix stops up to a round earlier). `unread`: each source's documents (epochs
    included) the mixture ends before."""

    def __init__(self, parents, weights):
        super().__init__(parents)
        # the order cannot change (saved loader states index into it), and no sort key gives it: each pick depends on
        # the picks before. Python floats do the same float64 arithmetic as an np.argmax per document, ~10x faster;
        # the (source, position) pairs as two arrays, not a list of tuples (800k documents: 6.4 s and 80 MiB before)
        total = float(sum(weights))
        if not math.isfinite(total):  # weights near the float limit summed to inf: every share 0, picked 1:1 in turn
            weights = _by_largest(weights)  # (finite sums keep their bits: saved states)
            total = float(sum(weights))
        w = (np.asarray(weights, np.float64) / total).tolist()
        sizes, taken, picks, t = [len(p) for p in parents], [0] * len(parents), [], 0
        while True:
            t += 1
            i, best = 0, t * w[0] - taken[0]
            for k in range(1, len(w)):  # the first of equal deficits, as np.argmax
                if (d := t * w[k] - taken[k]) > best:
                    i, best = k, d
            if taken[i] == sizes[i]:
                break
            picks.append(i)
            taken[i] += 1
        self._source = np.array(picks, np.int32)
        self.unread = [size - t for size, t in zip(sizes, taken)]
        self._position = np.zeros(len(picks), np.int64)
        for k in range(len(w)):
            mine = self._source == k
            self._position[mine] = np.arange(taken[k])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parents[int(self._source[index])][int(self._position[index])]


def _as_list(record) -> list:
    return [record]


class _Unbatch:
    """Tokenized lists back to single documents; a document of < 2 tokens has no target and is skipped (the cleaning
    pipeline's min_chars makes that impossible for cleaned tiers; a tokenizer without EOS meets it on one-token
    documents), counted by `_UnbatchIterator`. With `no_targets` (no EOS, no epoch limit), `stall_after` documents
    skipped in a row call it once: if no document has a target, it raises (grain would otherwise read the sources
    forever without a batch)."""

    def __init__(self, no_targets=None, stall_after: int = 0):
        self._no_targets, self._stall_after, self._skipped = no_targets, stall_after, 0

    def __call__(self, docs: list[dict]) -> list[dict]:
        kept = [d for d in docs if len(d["targets"])]
        if self._no_targets is not None:
            self._skipped = 0 if kept else self._skipped + len(docs)
            if self._skipped >= self._stall_after:
                self._no_targets()
                self._no_targets = None  # some source has targets: they come, however rarely
        return kept


class _UnbatchIterDataset(grain.IterDataset):
    """grain's FlatMapIterDataset with a count of the documents `_Unbatch` skips, kept in the iterator's state: the
    packer checkpoints its parent's state and replays from it on restore, so a count held outside the state would
    count the replayed documents twice (or lose those before a restore)."""

    def __init__(self, parent: grain.IterDataset, unbatch: _Unbatch):
        super().__init__(parent)
        self._unbatch = unbatch

    def __iter__(self):
        return _UnbatchIterator(self._parent.__iter__(), self._unbatch)


class _UnbatchIterator(grain.DatasetIterator):
    def __init__(self, parent, unbatch: _Unbatch):
        super().__init__(parent)
        self._unbatch, self._buffer, self._next_index = unbatch, [], 0
        self.skipped = 0  # documents without a target read so far
        # the state: the parent's before the buffered list, the skips before it, the index in it (as grain's flat map)
        self._last_parent_state, self._skipped_before = self._parent.get_state(), 0

    def __next__(self):
        while self._next_index >= len(self._buffer):
            self._last_parent_state, self._skipped_before = self._parent.get_state(), self.skipped
            docs = next(self._parent)  # raises StopIteration at the end
            self._buffer, self._next_index = self._unbatch(docs), 0
            self.skipped += len(docs) - len(self._buffer)
        self._next_index += 1
        return self._buffer[self._next_index - 1]

    def get_state(self) -> dict:
        return {"parent": self._last_parent_state, "next_index_in_buffer": self._next_index,
                "skipped": self._skipped_before}

    def set_state(self, state: dict) -> None:
        # (a state saved before the count has none: it counts from the restore on)
        self._last_parent_state, self._next_index = state["parent"], state["next_index_in_buffer"]
        self.skipped = self._skipped_before = state.get("skipped", 0)
        self._parent.set_state(state["parent"])
        try:  # the buffered list again, counted again (its skips are not in "skipped")
            docs = next(self._parent)
            self._buffer = self._unbatch(docs)
            self.skipped += len(docs) - len(self._buffer)
        except StopIteration:  # restored at the end
            self._buffer, self._next_index = [], 0


class _NoTargets:
    """Raises naming the sources when none of this process's documents of any has 2 tokens or more (one
    tokenize pass over them, only when a whole stream's worth were skipped in a row)."""

    def __init__(self, sources, tokenizer, cfg: LoaderConfig, p: int, n: int):
        self.sources, self.tokenize, self.cfg, self.p, self.n = sources, Tokenize(tokenizer, cfg.text_field), cfg, p, n

    def __call__(self):
        empty = []
        for src in self.sources:
            ds = grain.MapDataset.source(_data_source(src.files()))[self.p::self.n]
            step = self.cfg.tokenize_batch
            if any(len(d["targets"]) for i in range(0, len(ds), step)
                   for d in self.tokenize([ds[j] for j in range(i, min(i + step, len(ds)))])):
                return
            empty.append(f"{src.path!r} ({len(ds)} documents)")
        raise ValueError(f"Source {', '.join(empty)}: every document has fewer than 2 tokens, so none has a target "
                         "(a tokenizer without EOS trains on tokens 2..n of each), and num_epochs=None would read "
                         "them forever without a batch; use a tokenizer with an EOS (ByteTokenizer(add_eos=True)), "
                         "or longer documents (data.pipeline's min_chars)")


def _lm_row(packed: dict) -> dict[str, np.ndarray]:
    seg = packed["inputs_segment_ids"].astype(np.int32)
    return {"inputs": packed["inputs"].astype(np.int32), "targets": packed["targets"].astype(np.int32),
            "positions": packed["inputs_positions"].astype(np.int32), "segment_ids": seg,
            "weights": (seg > 0).astype(np.float32)}


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    # a float or str said "slice indices must be integers" from inside grain; True was read as process 1
    for name, v in (("process_index", process_index), ("process_count", process_count)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name}={v!r} must be an int (this process's index, and the number of processes)")
    if process_count < 1:  # (said "process_index=0 must be in [0, process_count=0)", blaming the index)
        raise ValueError(f"process_count={process_count} must be >= 1 (the number of processes reading the data)")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    return process_index, process_count


def documents(sources: Sequence[Source], tokenizer, cfg: LoaderConfig = LoaderConfig(),
              process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
    """This process's tokenized documents in loader order (before packing): `{"inputs", "targets"}` int32 [n].
    What it leaves out is counted by `LMLoader.skipped` only (documents of fewer than 2 tokens, which have no target;
    those a finite mixture ends before)."""
    if isinstance(sources, Source | str | os.PathLike) or not all(isinstance(x, Source) for x in sources):
        raise ValueError(f"sources must be a list of data.loader.Source, e.g. [Source(tier_dir)], got {sources!r}")
    if not sources:
        raise ValueError("sources is empty; pass at least one data.loader.Source(tier_dir)")
    if missing := [a for a in ("encode", "vocab_size", "eos_id") if not hasattr(tokenizer, a)]:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no {missing}; pass a data.tokenizer.BPETokenizer "
                        "(BPETokenizer.load(path), not its .tok) or ByteTokenizer")
    p, n = _process(process_index, process_count)
    parts, sizes = [], []  # sizes: this process's documents of each source
    for k, src in enumerate(sources):
        src.check_tokenizer(tokenizer)
        _check_text_field(src, cfg.text_field)
        ds = grain.MapDataset.source(_data_source(src.files()))
        if len(ds) < n:
            raise ValueError(f"Source {src.path!r} has {len(ds)} document{'s' * (len(ds) != 1)}, fewer than the {n} "
                             "processes that each read their own share" if len(ds)
                             else f"Source {src.path!r} holds no documents")
        ds = ds[p::n]
        sizes.append(len(ds))
        if cfg.shuffle:
            ds = ds.shuffle(seed=_shuffle_seed(cfg.seed, k, p, n, len(sources)))  # the same permutation every run
        parts.append(ds.repeat(cfg.num_epochs))
    if len(parts) == 1:
        ds = parts[0]
    elif cfg.num_epochs is None:
        ds = grain.MapDataset.mix(parts, _endless_weights(sources))
    else:  # grain's mix ends up to a round before the first source runs out, leaving some of it unread
        ds = _MixUntilExhausted(parts, [s.weight for s in sources])
    # grain's batch of 1 over an endless (sys.maxsize) dataset overflows computing its length: wrap records instead
    ds = ds.batch(cfg.tokenize_batch, batch_fn=list) if cfg.tokenize_batch > 1 else ds.map(_as_list)
    ds = ds.map(Tokenize(tokenizer, cfg.text_field))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if cfg.worker_count:
        _absl_flags_parsed()
        # workers read + tokenize; packing stays in this process, so its output does not depend on
        # the worker count (grain hands worker outputs back in index order)
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    stall = None if cfg.num_epochs is not None or tokenizer.eos_id is not None else _NoTargets(
        sources, tokenizer, cfg, p, n)  # with an EOS every document has a target; with an epoch limit the stream ends
    return _UnbatchIterDataset(ds, _Unbatch(stall, sum(sizes)))


def _by_largest(weights) -> list:
    """Mixture weights divided by the largest: the same ratios, summed or scaled without passing the float range."""
    top = float(max(weights))
    return [float(x) / top for x in weights]


def _endless_weights(sources: Sequence[Source]) -> list:
    """The weights for grain's endless mix, which scales them by 100 / the smallest and truncates to ints: weights as
    small as 1e-310 (100 / them is inf) are scaled to the largest first; a ratio past the float range is named (grain
    raised a bare "cannot convert float infinity to integer")."""
    fits = lambda w: min(w) > 0 and all(math.isfinite(x * (100 / min(w))) for x in w)  # noqa: E731
    if fits(w := [s.weight for s in sources]):
        return w  # as given: rescaled weights may truncate to other ints, and saved states index into the mix
    if fits(w := _by_largest(w)):  # (a ratio past the float range underflows to 0 here)
        return w
    raise ValueError(f"Source.weight: the weights {[float(s.weight) for s in sources]} are too far apart for grain's "
                     "mix, which scales the smallest to 100 (the largest passes the float range, and the smallest "
                     "source would never be read); drop that source, or give weights within a ratio of 1e300")


def lm_dataset(sources: Sequence[Source], tokenizer, cfg: LoaderConfig = LoaderConfig(),
               process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
    """Packed, batched host rows for this process: dicts of [global_batch_size // process_count, seq_len]. What it
    leaves out is counted by `LMLoader` only (`skipped`, and `dropped`: here drop_remainder drops a finite stream's
    last, partial batch uncounted)."""
    p, n = _process(process_index, process_count)
    if cfg.global_batch_size % n:
        raise ValueError(f"LoaderConfig.global_batch_size={cfg.global_batch_size} is not divisible by "
                         f"process_count={n}; make it a multiple")
    ds = documents(sources, tokenizer, cfg, p, n)
    ds = ConcatThenSplitIterDataset(ds, length_struct={"inputs": cfg.seq_len, "targets": cfg.seq_len})
    return ds.map(_lm_row).batch(cfg.global_batch_size // n, drop_remainder=cfg.drop_remainder)


def _jax_process_count() -> int:
    import jax

    return jax.process_count()


def _absl_flags_parsed():
    """grain 0.2.18's mp_prefetch reads an absl flag, which raises outside an absl app until flags are
    parsed (google/grain#1355, fixed upstream later): mark them parsed, keeping every default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _no_counts() -> tuple[dict, dict]:
    """LMLoader's `dropped` and `unread` before a finite stream ends."""
    return {"batches": 0, "rows": 0, "tokens": 0, "documents": 0}, {"batches": 0, "rows": 0, "tokens": 0}


class LMLoader:
    """Iterator of LM batches; with a `mesh`, global device arrays sharded by `parallel.batch_sharding`.

    `get_state()` → JSON-serialisable dict to save next to a checkpoint; `set_state(state)` resumes so the
    following batches are identical to an uninterrupted run.

    With a finite `num_epochs` over several JAX processes each process packs its own documents, so one may run
    out a step or more before the others: every step the processes agree whether all still have a batch, and
    all stop together at the first that does not (instead of the others waiting forever in a collective).
    What the others had left is counted in `unread` (batches, rows and real tokens) and warned about.

    With `drop_remainder=True` and a finite `num_epochs` the last, partial batch is dropped; it is counted in
    `dropped` (batches, rows, real tokens, and the documents with a target in it: one continued from the batch
    before counts too; without an EOS or BOS, which tell a document's start, each piece counts) and warned about.

    `skipped` counts this process's documents that no batch holds, by reason: "no_target", those of fewer than 2
    tokens (one-token documents with a tokenizer without EOS), read so far (from the start of the stream, across
    `set_state`), warned about at the first; "mixture_end", those a finite mixture ends before (the sources not read
    to their end: see `LoaderConfig`), known and warned about at the start.
    """

    def __init__(self, sources: Sequence[Source], tokenizer, cfg: LoaderConfig = LoaderConfig(), mesh=None,
                 process_index: int | None = None, process_count: int | None = None):
        self.cfg, self.mesh = cfg, mesh
        if mesh is not None:  # at the first next() this was jax's IndivisibleError, naming no setting
            import jax

            from parallel.sharding import batch_sharding

            if not isinstance(mesh, jax.sharding.Mesh):  # an AttributeError in parallel/rules.py followed
                raise TypeError(f"LMLoader: mesh must be a jax Mesh or None, got {mesh!r}; LMLoader(sources, "
                                "tokenizer, cfg, 0, 1) puts 0 here: pass process_index=0, process_count=1 by keyword")

            try:
                batch_sharding(mesh, 2, shape=(cfg.global_batch_size, cfg.seq_len))
            except ValueError as e:
                raise ValueError(f"LoaderConfig.global_batch_size={cfg.global_batch_size} / seq_len={cfg.seq_len} "
                                 f"do not split over the mesh: {e}") from None
            jp = (jax.process_index(), jax.process_count())
            if (process_index is not None and process_index != jp[0]) or (
                    process_count is not None and process_count != jp[1]):  # rows would be global, or duplicated
                raise ValueError(f"LMLoader: process_index={process_index} / process_count={process_count} with a "
                                 f"mesh, but this is JAX process {jp[0]} of {jp[1]}; leave them None with a mesh "
                                 "(they are for reading one process's share without devices)")
            if not cfg.drop_remainder and jp[1] > 1:  # one global shape per step on every process, or a hang
                raise ValueError("LoaderConfig.drop_remainder=False on several processes: each process's last "
                                 "batch would have its own size, and their collectives would not match; use "
                                 "drop_remainder=True (or bound the run by steps)")
        self._p, n = _process(process_index, process_count)
        # a finite stream ends in a partial batch: grain would drop it uncounted, so it is kept here and dropped in
        # __next__, counted (the same batches: grain's batch state is its parent's, whatever drop_remainder)
        self._drop_last = cfg.drop_remainder and cfg.num_epochs is not None
        self.dataset = lm_dataset(sources, tokenizer, dataclasses.replace(cfg, drop_remainder=False)
                                  if self._drop_last else cfg, process_index, process_count)
        self._it = iter(self.dataset)
        self._unbatched = _find(self._it, _UnbatchIterator, lambda n: getattr(n, "_parents", ()))  # counts the skips
        if self._unbatched is None:  # (a grain that renamed _parents)
            raise TypeError(f"LMLoader: no _UnbatchIterator under {self._it}")
        self._warned_skip = False
        mix = _find(self.dataset, _MixUntilExhausted, lambda n: n.parents)
        self._mixture_end = sum(mix.unread) if mix is not None else 0
        if self._mixture_end:
            import warnings

            left = ", ".join(f"{n} of {src.path!r}" for src, n in zip(sources, mix.unread) if n)
            warnings.warn(f"LMLoader: process {self._p}'s finite mixture (num_epochs={cfg.num_epochs}) ends when its "
                          f"first source is read to its end, leaving {left} documents unread (the weights are shares "
                          "of documents), counted in LMLoader.skipped['mixture_end']; num_epochs=None and a bound on "
                          "steps reads on", stacklevel=2)
        self._rows = cfg.global_batch_size // n  # this process's rows per step (n: the JAX processes, with a mesh)
        self._starts = {i for i in (tokenizer.eos_id, getattr(tokenizer, "bos_id", None)) if i is not None}
        self._files = [src.files() for src in sources]  # (listed once: a tier of 100k shards is a long listing)
        self._stream = _stream(sources, self._files, tokenizer, cfg, self._p, n)
        self._agree = cfg.num_epochs is not None and n > 1 and _jax_process_count() == n
        self.dropped, self.unread = _no_counts()

    def __iter__(self):
        return self

    @property
    def skipped(self) -> dict:
        """{"no_target": documents of fewer than 2 tokens read so far, "mixture_end": documents a finite mixture
        leaves unread}, this process's."""
        return {"no_target": self._unbatched.skipped, "mixture_end": self._mixture_end}

    def __next__(self):
        batch = next(self._it, None)
        if self._unbatched.skipped and not self._warned_skip:
            import warnings

            self._warned_skip = True
            warnings.warn(f"LMLoader: process {self._p} skips documents of fewer than 2 tokens (no target: a "
                          "tokenizer without EOS, one-token documents), counted in LMLoader.skipped "
                          f"({self._unbatched.skipped} so far); ByteTokenizer(add_eos=True) or data.pipeline's "
                          "min_chars keeps every document", stacklevel=2)
        if self._drop_last and batch is not None and len(batch["weights"]) < self._rows:
            self._count_dropped(batch)
            batch = None
        if self._agree:
            from parallel.distributed import any_process

            if any_process(batch is None):
                if batch is not None:
                    self._count_unread(batch)
                raise StopIteration
        if batch is None:
            raise StopIteration
        if self.mesh is None:
            return batch
        rows = self.cfg.global_batch_size // _jax_process_count()
        if len(batch["weights"]) < rows:  # drop_remainder=False: the last, partial batch, padded with rows of
            # weight 0 (segment 0: padding) to the step's one shape, which the mesh divides
            batch = {k: np.concatenate([v, np.zeros((rows - len(v), *v.shape[1:]), v.dtype)]) for k, v in
                     batch.items()}
        return to_device(batch, self.mesh)

    def _count_dropped(self, batch, stacklevel: int = 3):
        """Count the dropped last batch [rows, T]: its documents are its pieces (segments) less those that go on
        from the row before inside it (a piece continues a document when it does not start with an EOS / BOS)."""
        import warnings

        seg, first = batch["segment_ids"], batch["inputs"][:, 0]
        pieces = int(seg.max(axis=1).sum())
        go_on = sum(int(s[0] > 0 and f not in self._starts) for s, f in zip(seg[1:], first[1:])) if self._starts else 0
        self.dropped = {"batches": 1, "rows": len(seg), "tokens": int(batch["weights"].sum()),
                        "documents": pieces - go_on}
        rows, tokens, docs = self.dropped["rows"], self.dropped["tokens"], self.dropped["documents"]
        warnings.warn(f"LMLoader: process {self._p} drops the last, partial batch (drop_remainder=True): {rows} "
                      f"row{'s' * (rows != 1)}, {tokens} token{'s' * (tokens != 1)} of {docs} "
                      f"document{'s' * (docs != 1)} in 1 batch, counted in LMLoader.dropped; drop_remainder=False "
                      "keeps it",
                      stacklevel=stacklevel)

    def _count_unread(self, batch):
        import warnings

        while batch is not None:
            if self._drop_last and len(batch["weights"]) < self._rows:  # the remainder: dropped, not left unread
                self._count_dropped(batch, stacklevel=4)
            else:
                self.unread["batches"] += 1
                self.unread["rows"] += len(batch["weights"])
                self.unread["tokens"] += int(batch["weights"].sum())
            batch = next(self._it, None)
        warnings.warn(f"LMLoader: process {self._p} stops with {self.unread} unread, because another process's "
                      "loader ran out first (finite num_epochs: each process packs its own documents). Bound the "
                      "run by steps with num_epochs=None to read every document", stacklevel=3)

    def get_state(self) -> dict:
        """{"grain": the iterator's position, "stream": what made the batch sequence (sources, tokenizer, the
        LoaderConfig fields that order or cut it, the process), and, once a finite stream has ended, "counts": its
        `dropped` and `unread`}: `set_state` refuses a state of another stream."""
        # (the stream through _jsonable too: LoaderConfig takes numpy ints, which json.dumps refuses)
        state = {"grain": _jsonable(self._it.get_state()), "stream": _jsonable(self._stream)}
        # counted at the next() that ended the stream, which a restored iterator never replays: a state saved after
        # the end restored a loader that reported nothing dropped (or unread)
        if any(self.dropped.values()) or any(self.unread.values()):
            state["counts"] = {"dropped": dict(self.dropped), "unread": dict(self.unread)}
        return state

    def set_state(self, state: dict) -> None:
        """Resume at a `get_state()` position; a state of another stream (or that does not fit this loader) raises
        StreamMismatch, naming what differs. The batches do not depend on worker_count, but grain's state does:
        resume with the worker_count it was saved with (0 and > 0 differ, and fewer workers than saved fail)."""
        counts = None
        if isinstance(state, dict) and set(state) in ({"grain", "stream"}, {"grain", "stream", "counts"}):
            # (older states: grain's alone)
            if differ := self.stream_changes(state["stream"]):
                edited = any(k.startswith("digests") for k in differ)
                raise StreamMismatch("LMLoader.set_state: the state was saved by a loader over another stream ("
                                 + "; ".join(differ)
                                 + "); its position would point elsewhere in this one. "
                                 + ("Put back the shards it was saved over (with their .digest.json beside them), "
                                    "or start this loader fresh (a new run) on the edited ones" if edited else
                                    "Restore with the sources, tokenizer and LoaderConfig it was saved with, or start "
                                    "this loader fresh"))
            state, counts = state["grain"], state.get("counts")
        try:
            self._it.set_state(_restore_tuples(state))
        except (KeyError, TypeError, IndexError) as e:
            raise StreamMismatch(f"LMLoader.set_state: the state does not fit this loader ({type(e).__name__}: {e}); "
                             "it was saved by a loader with another LoaderConfig (worker_count, tokenize_batch) "
                             "or other sources: restore with the config it was saved with") from e
        self.dropped, self.unread = (dict(counts["dropped"]), dict(counts["unread"])) if counts else _no_counts()

    @property
    def stream(self) -> dict:
        """The JSON-able key of this loader's batch sequence (`get_state()["stream"]`; readable after `close`)."""
        return _jsonable(self._stream)

    def stream_changes(self, saved: dict, parts: Sequence[str] | None = None) -> list[str]:
        """'part: saved X, now Y' for each part of a saved stream key (`stream`) that differs from this loader's;
        a shard whose content digest differs is named ("digests: DIR/shard-00001.array_record was rewritten ...").
        Digests differ where either key has them (a state saved before digests, over shards that have one now:
        they were written again since; one saved with digests, over shards whose sidecars are gone).
        `parts`: compare only these (e.g. ("sources", "digests"): the documents, not how they are batched)."""
        out, key = [], dict(self._stream)
        if "digests" in saved and "digests" not in key:  # the shards' sidecars gone since (not copied with them?)
            key["digests"] = [" ".join("-" * len(files)) for files in self._files]
        for k, now in key.items():
            was = saved.get(k)
            if parts is not None and k not in parts or _same_stream(k, was, now):
                continue
            if k == "digests" and isinstance(was, list) and len(was) == len(now):
                out += [f"digests: {line}" for files, a, b in zip(self._files, was, now)
                        for line in _digest_changes(files, a, b)]
            else:
                out.append(f"{k}: saved {was}, now {now}")
        return out

    def close(self):
        """Stops grain's worker processes (worker_count > 0) and lets go of the batches they had in flight: shared
        memory that was otherwise held until the loader is collected (at interpreter exit: grain's "Exception
        ignored in SharedMemoryArray.__del__" errors and a "leaked shared_memory" warning). With 2 or more workers
        grain 0.2.18's own shutdown may still leave a few segments to the resource tracker, which unlinks them at
        exit with that warning (google/grain#1031; one worker frees all). `skipped`, `dropped` and `unread` stay
        readable; reading on raises."""
        it, self._it = self._it, _Closed()
        self._unbatched = types.SimpleNamespace(skipped=self._unbatched.skipped)
        if hasattr(it, "close"):
            it.close()
        if self.cfg.worker_count:  # a finite stream that ended holds its last worker arrays in reference cycles (the
            # StopIteration's frames): freed only at the next gc, at exit a "leaked shared_memory" warning
            import gc

            gc.collect()


class _Closed:
    """A closed LMLoader's iterator."""

    def _refuse(self, *_):
        raise ValueError("LMLoader is closed (LMLoader.close() was called): make a new LMLoader to read on")

    __next__ = get_state = set_state = _refuse

    def close(self):
        pass


STREAM_FIELDS = ("seq_len", "global_batch_size", "seed", "num_epochs", "shuffle", "text_field", "tokenize_batch",
                 "drop_remainder")  # LoaderConfig fields that order or cut the batches (not the worker settings)


class StreamMismatch(ValueError):
    """`LMLoader.set_state` was given the state of another stream: a config error, not a damaged checkpoint."""


def _same_stream(key: str, saved, now) -> bool:
    if key == "sources" and isinstance(saved, list) and len(saved) == len(now):  # states saved before the record
        norm = lambda x: re.sub(r"weight (\S+)", lambda m: f"weight {float(m.group(1))!r}", x)  # noqa: E731
        return all(norm(a) == (b if " records " in a else b.split(" records ")[0])  # counts (and weight 2 == 2.0)
                   for a, b in zip(saved, now))
    return saved == now


def _digest_changes(files: list[str], saved: str, now: str) -> list[str]:
    """Lines naming the shards of one source (`files`) whose digests differ between two "digests" entries."""
    a, b = saved.split(), now.split()
    if len(a) != len(b):  # (shards added or removed: the "sources" part says so too)
        return [f"saved {len(a)} shard digests, now {len(b)}"]
    out = []
    for f, x, y in zip(files, a, b):
        if x == y:
            continue
        if y == "-":
            out.append(f"{f} has no content digest beside it (saved {x}): copied without its sidecar? copy the "
                       "shard-*.digest.json files with the shards")
        elif x == "-":
            out.append(f"{f} was written again since the state was saved (it had no content digest; now {y})")
        else:
            out.append(f"{f} was rewritten since the state was saved (content digest saved {x}, now {y})")
    return out


def _stream(sources: Sequence[Source], files: list[list[str]], tokenizer, cfg: LoaderConfig, p: int, n: int) -> dict:
    """A readable key of a loader's batch sequence (`files`: each source's `files()`). Shards are known by name,
    size, record count and the bytes of the first and last record, not location: a corpus copied to another disk
    resumes. (ArrayRecord files grow in 64 KiB steps: a tier cleaned again with a few documents more or less keeps
    its sizes, and another tier of the same run its record count.) Where shards have a content digest
    (`data.shards.read_digest`: what DocWriter wrote, read from its sidecar, not the shard), "digests" holds 8 hex
    digits of each, in shard order ("-": none), so a middle record edited to the same size, or a tier cleaned again
    with other documents of the same count and ends, is another stream. Shards written before digests add no
    "digests": the key their states were saved with."""
    def shards(src: Source, paths: list[str]) -> str:
        sizes = [(os.path.basename(f), os.path.getsize(f)) for f in paths]
        ds = _data_source(paths)
        ends = hashlib.sha256(b"".join(ds[i] for i in sorted({0, len(ds) - 1}) if len(ds))).hexdigest()[:8]
        return (f"{len(sizes)} shards {hashlib.sha256(repr(sizes).encode()).hexdigest()[:12]} weight "
                f"{float(src.weight)!r} records {len(ds)} ends {ends}")

    key = {"sources": [shards(s, paths) for s, paths in zip(sources, files)],
           "config": {f: getattr(cfg, f) for f in STREAM_FIELDS},
           "tokenizer": getattr(tokenizer, "fingerprint", None) or f"vocab {tokenizer.vocab_size}",
           "process": f"{p} of {n}"}
    if cfg.shuffle and not (n == 1 and len(sources) == 1):  # states of the seed·1000 + k order: another stream
        key["order"] = "per-process seeds"
    # one small sidecar read per shard (the shard's footer is opened above anyway); 9 bytes a shard in each state
    digests = [[read_digest(f) for f in paths] for paths in files]
    if any(d is not None for ds in digests for d in ds):
        key["digests"] = [" ".join("-" if d is None else d[:8] for d in ds) for ds in digests]
    return key


def to_device(batch: dict[str, np.ndarray], mesh) -> dict:
    """This process's rows → global arrays on `mesh`, batch dim over the mesh's batch axes."""
    import jax

    from parallel.sharding import batch_sharding, check_fits_x32

    if jax.process_count() == 1:  # one transfer call for the whole batch; same result, ~4x less overhead
        for k, v in batch.items():  # (several processes: global_batch_from_local checks them)
            if isinstance(v, np.ndarray):
                check_fits_x32(v, f"to_device: batch[{k!r}]")
        try:
            shardings = {k: batch_sharding(mesh, v.ndim, shape=v.shape) for k, v in batch.items()}
        except ValueError as e:  # a partial last batch (drop_remainder=False) the batch axes do not divide
            raise ValueError(f"to_device: a batch of {len(next(iter(batch.values())))} rows does not split over "
                             f"the mesh ({e}); with LoaderConfig.drop_remainder=False the last batch is partial: "
                             "use drop_remainder=True on a mesh") from None
        return jax.device_put(batch, shardings)
    from parallel.distributed import global_batch_from_local

    return global_batch_from_local(batch, mesh)  # checks that each process owns its rows


def _find(root, cls, children):
    """The node of class `cls` in the graph under `root` (grain's iterators: children = their `_parents`; datasets:
    `.parents`), or None."""
    todo = [root]
    while todo:
        node = todo.pop()
        if isinstance(node, cls):
            return node
        todo.extend(children(node))
    return None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return {"__tuple__": [_jsonable(v) for v in x]}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):  # numpy ints and bools (an np.int64 seq_len) as Python ones
        return x.item()
    if isinstance(x, bytes):
        return {"__bytes__": x.hex()}
    return x


def _restore_tuples(x):
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(_restore_tuples(v) for v in x["__tuple__"])
        if set(x) == {"__bytes__"}:
            return bytes.fromhex(x["__bytes__"])
        return {k: _restore_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_restore_tuples(v) for v in x]
    return x
