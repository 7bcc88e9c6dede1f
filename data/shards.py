"""Documents in ArrayRecord shards: one JSON object (UTF-8, standard JSON: no NaN / Infinity) per record, written
atomically.

A tier directory holds `shard-00000.array_record` + `shard-00000.stats.json` per input shard; a shard
counts as done once its stats file exists, because the stats are written last (after the data files
were renamed into place). Every shard `DocWriter` writes has its content digest beside it,
`shard-00000.digest.json` (`read_digest`): the loader keys a stream by it, so a shard edited since a checkpoint
(same size, count and ends) is told from the one it was saved over without reading the corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import pathlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from array_record.python.array_record_module import ArrayRecordReader

# array_record is imported where a shard is opened: write_atomically here is also the benchmarks' result write, and
# the H200 image that benchmarks/train_step_gpu.py runs on has neither grain nor array_record

# one record per chunk: grain reads records at random, and larger groups would decode a whole group per read
WRITER_OPTIONS = "group_size:1"
TIERS = ("raw", "filtered", "cleaned", "labeled", "augmented")


def shard_name(i: int) -> str:
    """'shard-00007' for i = 7 (the file stem of a shard)."""
    return f"shard-{i:05d}"


def encode_doc(doc: dict) -> bytes:
    """One document as a compact UTF-8 JSON record. Values JSON has no form for are stored as portable ones: a NaN /
    ±inf float (a Parquet float column's missing value) as null (Python wrote NaN / Infinity, which strict JSON
    readers and other languages refuse), numpy scalars and arrays as the numbers / lists they hold. Any other value
    (a set, bytes, a datetime) raises a TypeError naming its field."""
    try:  # the common case at full speed: only a document that fails this is walked
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):  # a value JSON cannot hold (json named no field), or a NaN / inf
        try:
            portable = _portable(doc)
        except RecursionError:  # a document that holds itself: json's "Circular reference detected"
            raise ValueError("the document is nested too deep or holds itself (a circular reference)") from None
        text = json.dumps(portable, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


_FIXES = {set: "convert it to a list (sorted(...))", frozenset: "convert it to a list (sorted(...))",
          bytes: "decode it to text (.decode('utf-8'), or .hex())"}


def _portable(v, where: str = ""):
    """`v` with non-finite floats as None and numpy values as Python ones, at any depth; a TypeError naming the
    field (e.g. "['meta']['tags']") of any value JSON cannot hold."""
    if isinstance(v, float):  # (np.float64 too)
        return float(v) if math.isfinite(v) else None
    if v is None or isinstance(v, str | int):  # (bool is an int)
        return v
    if isinstance(v, np.generic | np.ndarray):  # np.int64 / float32 / bool_ and arrays: json refused every one
        return _portable(v.tolist(), where)
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            k = k.item() if isinstance(k, np.generic) else k
            if not (k is None or isinstance(k, str | int) or isinstance(k, float) and math.isfinite(k)):
                raise TypeError(f"field {where}[{k!r}] (the key) is a {type(k).__name__}, which a JSON key cannot be; "
                                "use a str key")
            out[k] = _portable(x, f"{where}[{k!r}]")
        return out
    if isinstance(v, list | tuple):
        return [_portable(x, f"{where}[{i}]") for i, x in enumerate(v)]
    fix = next((f for t, f in _FIXES.items() if isinstance(v, t)), "store a str, number, bool, None, list or dict")
    raise TypeError(f"field {where} holds a {type(v).__name__} ({v!r:.60}), which JSON cannot hold; {fix}")


def loggable_id(record_id):
    """A record's id as the drop logs and stats hold it: the JSON value itself, so a list / dict / number / bool id
    reads back as the input had it (str() logged "['a', 1]" and "True", which no JSON reader takes back and the input
    does not hold); one JSON cannot hold (a custom stage's numpy int is its number) as its str."""
    if record_id is None or isinstance(record_id, str):
        return record_id
    try:
        return _portable(record_id)
    except (TypeError, ValueError, RecursionError):
        return str(record_id)


def id_text(record_id) -> str:
    """A record's id as listings and messages print it: a str as itself, any other id as JSON (["a", 1], true)."""
    v = loggable_id(record_id)
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


_NOT_A_DOC = ("shards hold one JSON object per record (DocWriter.write({'text': ...}), a cleaning run's tiers); "
              "raw text goes through the cleaning pipeline first (python -m data.pipeline IN --out DIR)")


def decode_doc(record: bytes) -> dict:
    """The inverse of `encode_doc`. A record that is not a JSON object is refused: raw text (another tool's shards)
    said a bare 'Expecting value', and a JSON string (`write(text)`) was read as a document whose fields were its
    letters."""
    try:
        doc = json.loads(record)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        from data.tokenizer import TOKENS_MAGIC

        if record.startswith(TOKENS_MAGIC):
            raise ValueError("the record holds token ids (data.tokenizer.pretokenize's output), not a document; "
                             "pass the cleaned tier it was made from") from None
        raise ValueError(f"a record is not a document (not JSON: {e}; {bytes(record[:40])!r}); {_NOT_A_DOC}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"a record is a JSON {type(doc).__name__}, not a document (a JSON object): "
                         f"{bytes(record[:40])!r}; {_NOT_A_DOC}")
    return doc


DIGEST_VERSION = 1  # of the `.digest.json` format: bumped if what is hashed changes (a reader refuses newer ones)


def digest_path(path: str | os.PathLike) -> pathlib.Path:
    """The content digest sidecar of the shard at `path`: shard-00007.array_record → shard-00007.digest.json."""
    path = pathlib.Path(path)
    stem = path.name.removesuffix(".array_record")
    return path.with_name(f"{stem}.digest.json")


def read_digest(path: str | os.PathLike) -> str | None:
    """The SHA-256 (hex) of the shard's records that `DocWriter` recorded when it wrote the shard at `path`, or None
    where it has no sidecar (shards written before digests were, or by another writer). Reads the sidecar only, never
    the shard: a shard rewritten by another writer than DocWriter keeps the digest of what DocWriter wrote."""
    side = digest_path(path)
    try:
        meta = read_json(side)
    except FileNotFoundError:
        return None
    except ValueError as e:  # (a cut copy): named, not a bare JSONDecodeError
        raise ValueError(f"{side}: not a readable digest sidecar ({e}); copy it again with its shard, or delete it "
                         "(the shard is then keyed by name, size, record count and end records only)") from None
    if not isinstance(meta, dict) or meta.get("version") != DIGEST_VERSION or not isinstance(meta.get("sha256"), str):
        v = meta.get("version") if isinstance(meta, dict) else None
        raise ValueError(f"{side}: digest format version {v!r}, this code reads {DIGEST_VERSION} (written by a newer "
                         "data.shards?); read the shard with the code that wrote it")
    return meta["sha256"]


class DocWriter:
    """Writes docs to `<path>.tmp` and renames to `path` on `commit()`; a crash leaves no partial shard. The commit
    also writes the records' content digest beside the shard (`digest_path`: {"version", "records", "sha256": of
    each record's 8-byte little-endian length and bytes}), the old one removed before the new shard goes in place."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        from array_record.python.array_record_module import ArrayRecordWriter

        self._w = ArrayRecordWriter(str(self._tmp), WRITER_OPTIONS)
        self.count = 0
        self._sha = hashlib.sha256()  # (~1 GB/s: a small share of a cleaning run's time per byte)

    def write(self, doc: dict) -> int:
        """Append one document; returns its serialised size in bytes. A value JSON cannot hold (`encode_doc`) is
        refused naming this record and the field; the shard stays writable."""
        if not isinstance(doc, dict):  # a str was written as a JSON string, which no reader takes for a document
            raise TypeError(f"DocWriter.write: a document must be a dict, e.g. {{'text': text}}, got "
                            f"{type(doc).__name__}")
        try:
            rec = encode_doc(doc)
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" from a JSON escape): it named no record or field
            where = _surrogate_at(doc) or "?"
            raise ValueError(f"DocWriter.write: record {self.count} (id {id_text(doc.get('id'))!r}) of {self.path}: "
                             f"field {where} holds a lone UTF-16 surrogate, which UTF-8 cannot store; replace them "
                             "with data.normalize.replace_surrogates (the cleaning pipeline does)") from None
        except (TypeError, ValueError) as e:  # json's "Object of type set is not JSON serializable" named neither
            raise type(e)(f"DocWriter.write: record {self.count} (id {id_text(doc.get('id'))!r}) of {self.path}: "
                          f"{e}") from None
        return self.write_record(rec)

    def write_record(self, rec: bytes) -> int:
        self._w.write(rec)
        # length-prefixed: records ["ab", "c"] and ["a", "bc"] hash apart
        self._sha.update(len(rec).to_bytes(8, "little"))
        self._sha.update(rec)
        self.count += 1
        return len(rec)

    def commit(self):
        self._w.close()
        side = digest_path(self.path)
        # removed first: a kill between the rename and the new digest leaves a shard without one (another stream to a
        # saved state), never the old shard's digest beside new records
        side.unlink(missing_ok=True)
        os.replace(self._tmp, self.path)
        write_json(side, {"version": DIGEST_VERSION, "records": self.count, "sha256": self._sha.hexdigest()})

    def abort(self):
        """Close and delete the partial file (a failed shard leaves nothing behind)."""
        try:
            self._w.close()
        except (RuntimeError, OSError):  # array_record raises a failed write's error (a full disk) from every close
            pass  # (the error that failed the shard is the one raised)
        self._tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def aborting(*writers: DocWriter):
    """Abort every writer (deleting its partial `.tmp`) if the block raises, then re-raise: a shard that failed part-way
    (a stage raising, Ctrl-C) left its `.tmp` files beside the tier's shards for good. Safe after a `commit()` (its
    `.tmp` is gone by then)."""
    try:
        yield
    except BaseException:
        for w in writers:
            w.abort()
        raise


def _surrogate_at(v, where: str = "") -> str | None:
    """The path (e.g. "['meta']['title']") of the first key or string in `v` holding a lone surrogate, else None."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list | tuple) else ()
    for k, x in items:
        if isinstance(k, str) and _surrogate_at(k) is not None:
            return f"{where}[{k!r}] (the key)"
        if (found := _surrogate_at(x, f"{where}[{k!r}]")) is not None:
            return found
    return None


def iter_docs(path: str | os.PathLike, chunk: int = 256) -> Iterator[dict]:
    """Stream the documents of one shard in order, `chunk` records in memory at a time."""
    _check_chunk("iter_docs", chunk)
    reader = _open_shard(path)
    try:
        n = reader.num_records()
        for start in range(0, n, chunk):
            try:
                recs = reader.read(start, min(start + chunk, n))
            except (RuntimeError, OSError) as e:  # a chunk damaged past a readable footer
                raise _damaged(path, e) from None
            yield from _decoded(path, recs)
    finally:
        try:
            reader.close()
        except (RuntimeError, OSError) as e:  # where a reader of a damaged file says so, even after reading
            raise _damaged(path, e) from None


def read_docs(path: str | os.PathLike, indices: list[int], chunk: int = 256) -> Iterator[dict]:
    """The documents at `indices` (positions in the shard, in the order given) of one shard, read at random
    (records are stored one a chunk), `chunk` in memory at a time. A position outside the shard raises a ValueError
    naming it."""
    _check_chunk("read_docs", chunk)
    # array_record's options for random access (its defaults read ahead 16 MB a thread, for sequential reads)
    reader = _open_shard(path, "readahead_buffer_size:0,max_parallelism:0")
    try:
        # a position past the end was said to be a damaged shard ('a truncated copy?'), a negative one a pybind11
        # 'incompatible function arguments'
        n = reader.num_records()
        if bad := sorted({int(i) for i in indices if not 0 <= i < n}):
            raise ValueError(f"read_docs: positions {bad[:5]}{' ...' if len(bad) > 5 else ''} are not in {path}, "
                             f"which holds {n} records ({f'0 to {n - 1}' if n else 'none'}); positions count from 0 (a "
                             "pipeline run's: the shard was replaced since; copy or clean it again)")
        for start in range(0, len(indices), chunk):
            try:
                recs = reader.read(list(indices[start:start + chunk]))
            except (RuntimeError, OSError, IndexError) as e:  # damaged, or shorter than the run's decisions say
                raise _damaged(path, e) from None
            yield from _decoded(path, recs)
    finally:
        reader.close()


def _check_chunk(where: str, chunk) -> None:
    # chunk=-1 read nothing (range() counts down from 0): a shard of documents gave none, in silence
    if isinstance(chunk, bool | np.bool_) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"{where}: chunk={chunk!r} (records held in memory at a time) must be an int >= 1, "
                         "e.g. 256")


def _decoded(path, recs) -> Iterator[dict]:
    """The documents of a shard's raw records, a bad one's error naming the shard."""
    for rec in recs:
        try:
            yield decode_doc(rec)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _open_shard(path, options: str = "") -> ArrayRecordReader:
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        return ArrayRecordReader(str(path), options)
    except (RuntimeError, OSError) as e:
        raise _damaged(path, e) from None


def _damaged(path, e: Exception) -> ValueError:
    """array_record's errors ('ArrayRecord file should be at least 64KB big', 'Invalid Riegeli/records file') name no
    file: in a tier of thousands of shards, the truncated copy or stray file was not found."""
    return ValueError(f"{path} is not a readable ArrayRecord shard ({e}); a truncated copy or another tool's file? "
                      "copy it again, or clean its input again (python -m data.pipeline IN --out DIR)")


def tier_shards(tier_dir: str | os.PathLike) -> list[str]:
    """The completed ArrayRecord shards of a tier directory, in shard order.

    Raises a FileNotFoundError naming the directory when it holds none, or when it is a tier of a cleaning run that
    has not finished (no `stats.json`, written once every shard is): its shards so far were read as the whole tier."""
    d = pathlib.Path(tier_dir)
    # as given and as the run wrote it: "." inside a tier, or a link to one, was not checked (it was read)
    tier = next((p for p in (d.absolute(), d.resolve()) if p.name in TIERS and (p.parent / "manifest.json").exists()),
                None)
    if tier is not None and not (d / "stats.json").exists():
        raise FileNotFoundError(f"{d} is a tier of an unfinished cleaning run (no {d / 'stats.json'}): its shards so "
                                f"far are part of the corpus; resume the run (python -m data.pipeline with the same "
                                f"inputs and --out {tier.parent}) and read it once it has finished")
    # by length, then name: shard_name pads to 5 digits, so past shard-99999 a name sort misplaces the longer names
    files = sorted((str(p) for p in d.glob("shard-*.array_record")), key=lambda f: (len(f), f))
    if not files:
        if (d / TIERS[-1]).is_dir():  # a cleaning run's own directory, not one of its tiers
            raise FileNotFoundError(f"{d} is a cleaning run, not a tier: pass one of its tiers, e.g. "
                                    f"{d / TIERS[-1]} (the training tier; tiers {TIERS})")
        raise FileNotFoundError(f"no shard-*.array_record files in {d}; run the cleaning pipeline "
                                "(python -m data.pipeline IN... --out DIR) and point at one of its tiers "
                                f"{TIERS}")
    return files


def write_atomically(path: str | os.PathLike, write, tmp: str | os.PathLike | None = None) -> None:
    """write(tmp) to `tmp` (default `<path>.tmp`), then rename it over `path`: a kill leaves the old file or none.
    A write that raised (a full disk, Ctrl-C) has its partial `tmp` removed: it was left in the tier for good."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp") if tmp is None else pathlib.Path(tmp)
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomic JSON write (tmp + rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike):
    """The JSON value in the file at `path`."""
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
