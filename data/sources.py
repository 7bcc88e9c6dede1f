"""Input shards: JSON Lines, Parquet, and plain text files (JSONL and text optionally .gz / .bz2 / .xz), read
with bounded memory.

`discover(paths)` groups inputs into shards (one JSONL/Parquet file each, up to `text_files_per_shard` text files
each; a text shard takes its place when it fills or at the end, so with text files among the inputs shard order is
not the order listed, and dedup, which keeps a document's first copy in shard order, may keep another copy).
`read_records(files)` yields `(doc, None, nbytes)` or `(None, reason, nbytes)` for every record it meets, so every
malformed line, oversized document or unreadable file is counted, never skipped.
JSON Lines: `.jsonl`, `.ndjson` and `.json` (what Spark and most exporters write). Text is UTF-8; a plain text file
may also be UTF-16 / UTF-32 with a byte-order mark (Windows "Unicode" text). `discover` refuses, before any
work, what would be misread: a JSON array or a pretty-printed document in a JSON Lines file, or one in UTF-16 / 32,
with bare-CR line ends, or compressed without a suffix saying so (or plain, named .gz / .bz2 / .xz), zstd / lz4 /
deflate (Spark) / lzma / lzo / .Z / .gzip / archive files, Parquet compressed whole (`.parquet.gz`), CSV and
Arrow-family files, and files whose names are not UTF-8. Directory walks skip Hadoop / Spark side files (names
starting with `_` or `.`: `_SUCCESS`, `.part-0.crc`; hidden and `_temporary` directories), which hold no records;
a file named explicitly is read. A JSONL / Parquet record's other fields travel with its
document as metadata, except those the stages write (`lang`, `lang_score`, `signals`, `quality`, `domains`,
`augmented`), which they overwrite (without a langid stage, labelling keeps a record's own `lang` and `lang_score`),
as the document's text overwrites a `text` field (so with another `--text-field`, inputs whose first records have
one are refused before any work: `check_text_field`).
"""

from __future__ import annotations

import bz2
import codecs
import dataclasses
import gzip
import io
import json
import lzma
import math
import os
import pathlib
import stat
import sys
import zlib
from collections.abc import Iterator, Sequence

from data.normalize import NormalizeConfig, count_surrogates, decode, is_binary, replace_surrogates
from data.seeds import check_field_types

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
# formats read as one text document each (a .zst shard was one `binary` drop, a CSV one document): refused up front
_UNREAD = {".zst": "decompress it (zstd -d) or recompress as .gz", ".zstd": "decompress it (zstd -d)",
           ".gzip": "rename it to end in .gz",
           ".lz4": "decompress it (lz4 -d)", ".snappy": "decompress it", ".br": "decompress it (brotli -d)",
           # Spark's `compression deflate` (Hadoop's DeflateCodec writes zlib streams), LZMA-alone, compress(1), lzop
           ".deflate": "decompress it (zlib-flate -uncompress < IN > OUT) or write it as .gz (Spark: compression gzip)",
           ".lzma": "decompress it (xz -d)", ".z": "decompress it (gzip -d)", ".lzo": "decompress it (lzop -d)",
           ".zip": "unpack it", ".tar": "unpack it", ".tgz": "unpack it", ".tbz2": "unpack it", ".txz": "unpack it",
           ".7z": "unpack it",
           ".csv": "convert it to JSON Lines or Parquet", ".tsv": "convert it to JSON Lines or Parquet",
           ".arrow": "write it as Parquet", ".feather": "write it as Parquet", ".avro": "convert it to Parquet",
           ".orc": "convert it to Parquet", ".tfrecord": "convert it to JSON Lines",
           ".array_record": "it is already a tier (data.loader.Source reads it)"}


class _Streams(io.RawIOBase):
    """A .bz2 / .xz file read as bz2.open / lzma.open read it, one stream after another (pbzip2 writes one per block,
    `cat a.bz2 b.bz2` two), but raising where what follows a stream is not a valid one: they stop there silently, as
    at the file's end, so a damaged stream's records and all after it were in no count (gzip.open raises)."""

    def __init__(self, path: str, new):
        self._file, self._new, self._dec = open(path, "rb"), new, new()

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._file.close()
        super().close()

    def readinto(self, buf) -> int:
        while True:
            if self._dec.eof:
                block = self._dec.unused_data or self._file.read(1 << 16)
                if not block:
                    return 0
                self._dec = self._new()  # the next stream: its first bytes raise where they are not one
            elif self._dec.needs_input:
                block = self._file.read(1 << 16)
                if not block:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
            else:
                block = b""
            if data := self._dec.decompress(block, len(buf)):
                buf[:len(data)] = data
                return len(data)


def _streams(new):
    return lambda path, mode="rb": io.BufferedReader(_Streams(path, new))


# compression, by the file's last suffix
_OPENERS = {".gz": gzip.open, ".bz2": _streams(bz2.BZ2Decompressor), ".xz": _streams(lzma.LZMADecompressor)}
# compressors of whole files, by suffix (Parquet compresses its own pages, so it is never read through them)
_WHOLE_FILE = {".gz": "gzip -d", ".bz2": "bzip2 -d", ".xz": "xz -d", ".zst": "zstd -d", ".zstd": "zstd -d",
               ".lz4": "lz4 -d", ".br": "brotli -d", ".deflate": "zlib-flate -uncompress", ".lzma": "xz -d",
               ".z": "gzip -d", ".lzo": "lzop -d"}
# what a damaged file raises mid-read: one counted `unreadable_file` / `unreadable_rest`, never a crash
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """text_field: the JSONL/Parquet field holding the document text (other fields are kept as metadata).
    max_doc_bytes: larger records are dropped as `too_large` without being decoded (a JSONL line is read
    at most this far, and its line end, which does not count). text_files_per_shard: plain text files (one
    document each) grouped per shard."""

    text_field: str = "text"
    max_doc_bytes: int = 1_000_000
    text_files_per_shard: int = 64

    def __post_init__(self):
        check_field_types(self)  # before the range checks: NaN passes `not x < lo`, 1.5 is no count
        if not self.text_field:
            raise ValueError("SourceConfig.text_field must name the field that holds the text, e.g. 'text'")
        if self.max_doc_bytes < 1:
            raise ValueError(f"SourceConfig.max_doc_bytes={self.max_doc_bytes} must be positive")
        if self.text_files_per_shard < 1:
            raise ValueError(f"SourceConfig.text_files_per_shard={self.text_files_per_shard} must be >= 1")


def _opener(path: str):
    return _OPENERS.get(os.path.splitext(path.lower())[1], open)


def _kind(path: str) -> str:
    p = path.lower()
    if _opener(p) is not open:
        p = os.path.splitext(p)[0]  # data.jsonl.gz is JSONL, notes.txt.gz text
    if p.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if p.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _side_file(rel: pathlib.Path) -> bool:
    """Hadoop / Spark bookkeeping, not data: `_SUCCESS`, `.part-0.crc`, and whatever sits in a hidden directory or
    Spark's `_temporary/` (a user's `_en/` folder is data)."""
    *dirs, name = rel.parts
    return name.startswith(("_", ".")) or any(d.startswith(".") or d == "_temporary" for d in dirs)


def _walk(root: pathlib.Path) -> list[pathlib.Path]:
    """Every non-directory under `root`, following links to directories (pathlib's rglob does not: the files under
    `corpus/wiki -> /mnt/wiki` went unread and in no count); a directory reached twice (a link back up) is walked
    once, under its first name in sorted order (in listing order, `aa/` or its link `zz/` named the files by how the
    file system listed them). A directory that cannot be listed raises a ValueError naming it: passed over (as rglob
    does), its files were in no count. Hidden / Spark side directories, whose files are not read, are not walked."""
    found, seen, unlisted = [], {os.path.realpath(root)}, []
    for d, dirs, names in os.walk(root, followlinks=True, onerror=unlisted.append):
        walk = []
        for name in sorted(dirs):
            # a side directory is not walked (its files are not read): marked seen first ('.' sorts before letters),
            # a link `.latest -> data`, or a hidden store that `data` links into, left the data's files in no count
            if _side_file(pathlib.Path(d, name, "f").relative_to(root)):
                continue
            if (real := os.path.realpath(os.path.join(d, name))) not in seen:
                seen.add(real)
                walk.append(name)
        dirs[:] = walk
        found += [pathlib.Path(d, name) for name in names]
    if unlisted:
        n = len(unlisted)
        raise ValueError(f"{n} director{'y' if n == 1 else 'ies'} under {root} could not be listed "
                         f"({unlisted[0].strerror}): "
                         f"{', '.join(e.filename for e in unlisted[:5])}{' ...' if n > 5 else ''}; their "
                         "files would be in no count: make them readable (e.g. chmod -R a+rX DIR), or pass the "
                         "readable files / folders themselves")
    return found


def discover(paths: Sequence[str | os.PathLike], cfg: SourceConfig = SourceConfig(),
             skip: str | os.PathLike | None = None) -> list[tuple[str, ...]]:
    """Files under `paths` (directories walked recursively, links to directories followed, sorted; nothing under
    `skip`, the run's own output; a file named twice, or linked to, read once, where it first appears) grouped into
    shards. Raises a ValueError naming files of a format that would be misread (compressed with zstd / lz4 / deflate,
    archives, Parquet compressed whole, CSV, Arrow, a JSON array or a pretty-printed JSON document in a JSON Lines
    file, JSON Lines in UTF-16 / 32, with bare-CR line ends, or compressed, or not, other than its suffix says), or
    whose names are not UTF-8, inputs that are not regular files (a FIFO, a socket, a device), and directories it
    cannot list."""
    files: list[str] = []
    skip = pathlib.Path(skip).resolve() if skip is not None else None
    for p in paths:
        p = pathlib.Path(p)
        if p.is_dir() and skip is not None and p.resolve().is_relative_to(skip):  # all of it skipped: "no input files"
            raise ValueError(f"input {p} is the run's output directory {skip} or inside it; write the run elsewhere, "
                             f"e.g. --out {p.resolve().parent / (p.resolve().name + '-clean')}")
        if p.is_dir():
            found = [f for f in _walk(p) if not _side_file(f.relative_to(p))
                     and not (skip is not None and f.resolve().is_relative_to(skip))]
            runs = sorted({str(f.parent) for f in found if f.name == "manifest.json" and (f.parent / "raw").is_dir()})
            if runs:
                raise ValueError(f"input {p} holds the output of an earlier pipeline run: {', '.join(runs[:3])} "
                                 "(its manifest.json and tiers); move it out of the input directory, or pass the "
                                 "input files / folders themselves")
            broken = sorted(str(f) for f in found if f.is_symlink() and not f.exists())
            if broken:
                raise FileNotFoundError(f"{len(broken)} inputs under {p} are broken symbolic links: "
                                        f"{', '.join(broken[:5])}; fix or remove them")
            # a FIFO, a socket or a device was passed over, in no count (reading a FIFO waits for a writer)
            special = sorted(f"{f} ({what})" for f in found if (what := _special(f)))
            if special:
                raise ValueError(f"{len(special)} inputs under {p} are not regular files: {', '.join(special[:5])}"
                                 f"{' ...' if len(special) > 5 else ''}; the pipeline reads files (each more than "
                                 "once): remove them, or pass the files / folders themselves")
            files += sorted(str(f) for f in found if f.is_file())  # (as strings: shard order of earlier runs)
        elif p.is_file():
            files.append(str(p))
        elif what := _special(p):  # (`<(zcat a.jsonl.gz)`, said not to exist)
            raise ValueError(f"input {p} is {what}, not a regular file; the pipeline reads each input more than once "
                             "(and stamps its size to resume): write it to a file first, e.g. cat IN > in.jsonl")
        else:
            raise FileNotFoundError(f"input {p} does not exist; pass JSONL/Parquet/text files or directories")
    # a file named twice (a folder and a file in it, or a link to another input) was read twice: its records counted
    # twice in ingest and, without exact dedup, kept twice; each file is read once, where it first appears
    first: dict[str, str] = {}
    for f in files:
        first.setdefault(os.path.realpath(f), f)
    files = list(first.values())
    # a name that is not UTF-8 (latin-1 bytes: Python holds them as lone surrogates) cannot be written to the
    # manifest, ids or drop logs: the run crashed after the walk with a UnicodeEncodeError naming no file
    undecodable = [os.fsencode(f).decode("utf-8", "backslashreplace") for f in files if _not_utf8(f)]
    if undecodable and codecs.lookup(sys.getfilesystemencoding()).name != "utf-8":
        # this Python decodes every non-ASCII name, UTF-8 ones too, as lone surrogates: re-encoding them from
        # latin-1, as below advises, would garble names that were right
        raise ValueError(f"{len(undecodable)} input file names are not ASCII and this Python reads file names as "
                         f"{sys.getfilesystemencoding()} (a C / POSIX locale with PYTHONUTF8=0): run it with "
                         f"PYTHONUTF8=1 or under a UTF-8 locale (LC_ALL=C.UTF-8); {', '.join(undecodable[:5])}"
                         f"{' ...' if len(undecodable) > 5 else ''}")
    if undecodable:
        raise ValueError(f"{len(undecodable)} input file names are not UTF-8: {', '.join(undecodable[:5])}"
                         f"{' ...' if len(undecodable) > 5 else ''}; rename them, e.g. convmv -f latin1 -t utf8 "
                         "--notest -r DIR (or mv each)")
    unread = [f"{f} ({why})" for f in files if (why := _unread(f))]
    unread += [f"{f} ({why})" for f in files if _kind(f) == "jsonl" and (why := _not_json_lines(f, cfg.max_doc_bytes))]
    if unread:
        raise ValueError(f"{len(unread)} input files are in a format this pipeline would misread: "
                         f"{'; '.join(unread[:5])}{' ...' if len(unread) > 5 else ''}. Inputs are JSON Lines, "
                         "Parquet or plain text (JSON Lines and text optionally .gz / .bz2 / .xz)")
    shards, texts = [], []
    for f in files:
        if _kind(f) == "text":
            texts.append(f)
            if len(texts) == cfg.text_files_per_shard:
                shards.append(tuple(texts))
                texts = []
        else:
            shards.append((f,))
    if texts:
        shards.append(tuple(texts))
    return shards


def _special(path: pathlib.Path) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a directory (links followed): 'a FIFO', ..."""
    try:
        mode = path.stat().st_mode
    except OSError:  # (gone, or a broken link: named elsewhere)
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")


def _unread(path: str) -> str | None:
    """What to do with a file of a format read wrongly (None: it is read right). The suffix under .gz / .bz2 / .xz
    counts too: a corpus.tar.gz or table.csv.gz was read as one text document (a `binary` drop for a tar)."""
    p = path.lower()
    stem, ext = os.path.splitext(p)
    # pyarrow reads no whole-file compression: a .parquet.gz was one `unreadable_file` drop, however many rows
    if stem.endswith(PARQUET_SUFFIXES) and ext in _WHOLE_FILE:
        return f"Parquet compressed whole, which pyarrow cannot read: decompress it ({_WHOLE_FILE[ext]})"
    inner = os.path.splitext(stem)[1] if _opener(p) is not open else ""
    return _UNREAD.get(ext) or _UNREAD.get(inner)


def _not_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_DECOMPRESS = {".gz": "gzip -dc", ".bz2": "bzip2 -dc", ".xz": "xz -dc"}  # (the _OPENERS', as shell commands)


def _not_json_lines(path: str, limit: int) -> str | None:
    """Why a `.json(l)` file is not JSON Lines, from its first bytes, read on to the first LF (at most past `limit`,
    the longest line read; None: it may be), with a command that converts it (IN: the file, read through its
    decompressor when compressed: iconv / tr / jq read no .gz)."""
    why = _why_not_json_lines(path, limit)
    dec = _DECOMPRESS.get(os.path.splitext(path.lower())[1])
    if why is None or dec is None or "e.g. " not in why:
        return why
    head, cmd = why.split("e.g. ", 1)
    return f"{head}e.g. {dec} IN | " + cmd.replace(" < IN > ", " > ").replace(" IN > ", " > ", 1)


# compressed data's first bytes, and the tool that decompresses it
_MAGICS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))

# a UTF-16 / UTF-32 JSON Lines file's first bytes: a byte-order mark, or a first "{" and its NULs. UTF-32 first: its
# begin as UTF-16LE's do, and converted as UTF-16LE (the advice it got) its text kept a NUL after each character
_WIDE_STARTS = (("UTF-32LE", (b"\xff\xfe\x00\x00", b"{\x00\x00\x00")),
                ("UTF-32BE", (b"\x00\x00\xfe\xff", b"\x00\x00\x00{")),
                ("UTF-16LE", (b"\xff\xfe", b"{\x00")), ("UTF-16BE", (b"\xfe\xff", b"\x00{")))


def _why_not_json_lines(path: str, limit: int) -> str | None:
    try:
        with _opener(path)(path, "rb") as f:
            head = f.read(1 << 12)
            # a first record past the head (most documents) hid a file's bare-CR line ends: all its records were one
            # malformed_json drop. A CR before the first LF may be JSON whitespace: only one with no LF after it counts
            chunk, n, cr = head, len(head), False
            while chunk and b"\n" not in chunk and n <= limit:
                cr = cr or b"\r" in chunk
                chunk = f.read(1 << 16)
                n += len(chunk)
            bare_cr = b"\n" not in chunk and (cr or b"\r" in chunk)
    except _READ_ERRORS:  # counted as `unreadable_file` when read, unless it is plain JSON Lines named as compressed
        return _misnamed(path)
    # a compressed file not named so (a download that lost its .gz): its bytes were read as lines, 50 records a few
    # `binary` drops. No JSON text begins with these magic numbers
    if tool := next((tool for magic, tool in _MAGICS if head.startswith(magic)), None):
        return f"{tool}-compressed, though not named so: decompress it, e.g. {tool} -dc < IN > OUT.jsonl"
    # UTF-16 (PowerShell 5's `>`, Windows "Unicode"): every line was a `binary` drop, and a character whose code
    # holds a 0x0A byte (上 is 0A 4E) split a record in two, so even the count was wrong
    if enc := next((enc for enc, starts in _WIDE_STARTS if head.startswith(starts)), None):
        return f"{enc} text, not UTF-8: convert it, e.g. iconv -f {enc} -t UTF-8 IN > OUT.jsonl"
    # classic Mac line ends: all its records were one malformed_json drop
    if bare_cr:
        return "lines end in a bare CR, so it reads as one line: convert them, e.g. tr '\\r' '\\n' < IN > OUT.jsonl"
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"["):
        return _array_fix(path, limit)
    if head.split(b"\n", 1)[0].strip() == b"{":
        return ("a pretty-printed JSON document, not one object per line: write it with jq -c, e.g. jq -c . IN > "
                "OUT.jsonl")
    return None


def _misnamed(path: str) -> str | None:
    """Why a `.json(l).gz / .bz2 / .xz` file its decompressor cannot read is refused: it holds plain JSON Lines (a
    server that decompressed the download, `gunzip -c a.gz > a.gz.new` moved back), all its records one
    `unreadable_file` drop, the report advising to re-fetch it. None: it is damaged (counted when read)."""
    ext = os.path.splitext(path)[1]
    if _opener(path) is open:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
        return f"plain JSON Lines, not compressed, though named {ext}: rename it without the {ext}"
    return None


def _array_fix(path: str, limit: int) -> str:
    """How to convert a `.json(l)` file that begins with a JSON array: one big array of records splits with jq -c
    '.[]', but that split a file of one array per line (a table's rows) into its cells, none of them a record."""
    try:
        with _opener(path)(path, "rb") as f:
            lines = (line for line in iter(lambda: f.readline(limit + 1), b"") if line.strip())
            first, second = next(lines, b""), next(lines, b"")
        rows = json.loads(first.removeprefix(b"\xef\xbb\xbf"))
    except (*_READ_ERRORS, ValueError, RecursionError):  # a pretty-printed array (its first line "["): one big one
        rows = None
    per_line = isinstance(rows, list) and second.lstrip().startswith(b"[")
    one = rows[0] if isinstance(rows, list) and rows else None

    def at(row: list) -> int:  # where the text is in a row: its longest string, a guess the advice names as one
        return max(range(len(row)), key=lambda k: len(row[k]) if isinstance(row[k], str) else -1)

    if per_line and one is not None and not isinstance(one, dict):
        k = at(rows)
        return (f"one JSON array per line (a table's rows), not one object: make each an object with its text in a "
                f"field, e.g. jq -c '{{text: .[{k}]}}' IN > OUT.jsonl (.[{k}]: where the text is in each row; add the "
                "columns you keep, e.g. id: .[0])")
    if per_line:
        return "one JSON array per line, not one object: convert them, e.g. jq -c '.[]' IN > OUT.jsonl"
    if isinstance(one, str):
        return "a JSON array of texts, not one object per line: convert it, e.g. jq -c '.[] | {text: .}' IN > OUT.jsonl"
    if isinstance(one, list) and one:
        return (f"a JSON array of rows, not one object per line: convert it, e.g. jq -c '.[] | {{text: .[{at(one)}]}}' "
                "IN > OUT.jsonl (where the text is in each row)")
    return "a JSON array, not one object per line: convert it, e.g. jq -c '.[]' IN > OUT.jsonl"


def file_stamps(shards: Sequence[tuple[str, ...]]) -> dict[str, list[int]]:
    """{path: [size, mtime_ns]} of every input file: a resumed run refuses inputs changed since it began."""
    return {f: [(st := os.stat(f)).st_size, st.st_mtime_ns] for files in shards for f in files}


def check_text_field(shards: Sequence[tuple[str, ...]], cfg: SourceConfig, n: int = 100) -> None:
    """Raise a ValueError when the first JSON Lines / Parquet input has `cfg.text_field` in none of its first `n`
    records (a wrong field drops every record as `missing_text`: named before any work, with the fields seen), or,
    with another text_field, a field named `text` (the tiers' text field) in the first `n` records of any input."""
    paths = [f for files in shards for f in files if _kind(f) != "text"]
    if not paths:
        return
    # every input's, not only the first's: a later file's own "text" (its titles) was replaced in silence
    for k, path in enumerate(paths if cfg.text_field != "text" else paths[:1]):
        fields = _first_fields(path, cfg, n)
        one = len(fields) == 1  # (it read "none of the first 1 records", "1 of the first 1 records ... also have")
        first = "the first record" if one else f"the first {len(fields)} records"
        if k == 0 and fields and not any(cfg.text_field in f for f in fields):
            seen = sorted(set().union(*fields))[:12]
            raise ValueError(f"SourceConfig.text_field={cfg.text_field!r} is {'not in' if one else 'in none of'} "
                             f"{first} of {path} ({'it has' if one else 'they have'} {seen}); pass the field that "
                             "holds the text (--text-field)")
        # the tiers hold the document's text under "text": a record's own "text" (a title, a summary) was replaced
        if cfg.text_field != "text" and (clash := sum("text" in f for f in fields)):
            raise ValueError(f"SourceConfig.text_field={cfg.text_field!r}: {first if one else f'{clash} of {first}'} "
                             f"of {path} also ha{'s' if clash == 1 else 've'} a 'text' field, which the cleaned "
                             "documents hold their text under (it would be lost); rename that field first, e.g. jq -c "
                             "'.title = .text | del(.text)'")


def _first_fields(path: str, cfg: SourceConfig, n: int) -> list[set]:
    """The field names of the first `n` records of a JSON Lines file (unparsable lines passed over), or a Parquet
    file's columns as one record's; [] for a file that cannot be read (counted when it is read)."""
    if _kind(path) == "parquet":
        import pyarrow.parquet as pq

        try:
            return [set(pq.ParquetFile(path).schema_arrow.names)]
        except Exception:  # noqa: BLE001 - an unreadable file is counted when read
            return []
    fields = []
    try:
        with _opener(path)(path, "rb") as f:
            for line, _ in _lines(f, cfg.max_doc_bytes):
                try:
                    obj = json.loads(line.removeprefix(b"\xef\xbb\xbf")) if line and line.strip() else None
                # as the reader: a line nested too deep to parse is one malformed_json drop, not a failed run
                except (ValueError, RecursionError):
                    continue
                if isinstance(obj, dict):
                    fields.append(set(obj))
                    if len(fields) == n:
                        break
    except _READ_ERRORS:
        return []
    return fields


def _lines(f, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """Lines of a binary file, at most `limit` bytes held; a longer line is skipped and yields (None, size)."""
    while True:
        # a record and its line end, as the reader sizes it (`_sized`): a readline of limit + 1 stopped at the CR of a
        # record of `limit` bytes ended by CR LF, and skipped a record the reader keeps
        line = f.readline(limit + 2)
        if not line:
            return
        if _sized(line) > limit:
            n = len(line)
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
                n += len(line)
            yield None, n
        else:
            yield line, len(line)


def _clean_meta(v):
    """Metadata with lone surrogates (JSON escapes like "\\ud83d" in a title) replaced by U+FFFD, at any depth:
    they cannot be written as UTF-8, and a record is not dropped for its metadata."""
    if isinstance(v, str):
        return replace_surrogates(v) if count_surrogates(v) else v
    if isinstance(v, list):
        return [_clean_meta(x) for x in v]
    if isinstance(v, dict):
        return {_clean_meta(k): _clean_meta(x) for k, x in v.items()}
    return v


def _text_doc(text, meta: dict, cfg: SourceConfig, ncfg: NormalizeConfig) -> tuple[dict | None, str | None]:
    if isinstance(text, bytes):
        text, reason = decode(text, ncfg)
        if reason:
            return None, reason
    # a JSON string's controls are escapes ("\u0000"), so its line passed decode's binary test: a blob stored as JSON
    # text was kept (and the quality stage's to drop, as mean_word_len), where the same bytes in Parquet were `binary`
    elif isinstance(text, str) and is_binary(text.encode("utf-8", "surrogatepass"), ncfg):
        return None, "binary"
    if text is None:
        return None, "empty"
    if not isinstance(text, str):
        return None, "bad_text_type"
    bad = count_surrogates(text)
    if bad and (ncfg.invalid_utf8 == "reject" or bad / len(text) > ncfg.max_invalid_fraction):
        return None, "invalid_utf8"
    if bad:
        text = replace_surrogates(text)
    if not text.strip():
        return None, "empty"
    try:
        meta = _clean_meta(meta)
    except RecursionError:  # metadata nested past the recursion limit (JSON 500 deep on Python 3.11, 1,000 on 3.12)
        return None, "malformed_json"  # the reader's reason for a line nested too deep to parse
    return {**meta, "text": text}, None


def _cr_records(line: bytes | None, n: int) -> list[tuple[bytes | None, int]]:
    """A JSON Lines line's records: the line, or, where it parses only split at its bare CRs, the pieces, with the
    line's `n` bytes shared out. Classic Mac line ends after LF-ended lines (`cat unix.jsonl mac.jsonl`) pass the
    bare-CR check, which reads a file's first line: all the Mac part's records were one malformed_json drop. A JSON
    string holds no raw CR, so a line whose pieces all parse is those records; any other stays one."""
    body = b"" if line is None else line.removesuffix(b"\n").removesuffix(b"\r")
    if b"\r" not in body:
        return [(line, n)]
    pieces = body.split(b"\r")
    if _parses(line) or not all(_parses(p) for p in pieces if p.strip()):  # (CRs as JSON whitespace: one record)
        return [(line, n)]
    sizes = [len(p) + 1 for p in pieces]  # each piece and its CR; the last, what ends the line
    sizes[-1] = n - sum(sizes[:-1])
    return list(zip(pieces, sizes))


def _jsonl_records(f, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line index from 0, record or None where longer than `limit`, its bytes) of a JSON Lines file: each line's
    records (`_cr_records`), or, for a line longer than `limit`, its CR-ended pieces each held and judged alone
    (`_long_line`): a Mac part of 1.6 MB whose records each fit was one too_large drop. (Such a line is split at
    every CR, unlike a shorter one, which splits only where all its pieces parse: it cannot be held whole to tell,
    and whole it would be one too_large drop.)"""
    # (limit + 2: a record of `limit` bytes and its CR LF; compared with `limit` the record alone, `_sized`)
    for k, line in enumerate(iter(lambda: f.readline(limit + 2), b"")):
        long = _sized(line) > limit
        yield from ((k, *r) for r in (_long_line(f, line, limit) if long else _cr_records(line, len(line))))


def _long_line(f, buf: bytes, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """The pieces of a line longer than `limit` whose first bytes `buf` are, split after each bare CR (records joined
    by classic Mac line ends), at most `limit` bytes held: (piece, size), or (None, size) for a piece longer than
    `limit`, passed over unread; a line with no CR is one (None, size), as `_lines` skips it. A CR LF ends the line
    (its last piece's end, no piece of its own)."""
    skip = 0  # bytes of the current piece passed over: it is longer than `limit`
    while True:
        cut = buf.find(b"\r") + 1
        if cut == len(buf) > 0:  # a CR last: whether an LF follows it is in the next byte
            buf += f.read(1)
        if cut:
            cut += buf[cut:cut + 1] == b"\n"
            piece, buf = buf[:cut], buf[cut:]
            yield (None, skip + cut) if skip or _sized(piece) > limit else (piece, cut)
            skip = 0
            if piece.endswith(b"\n"):
                return
            continue
        end = buf.endswith(b"\n")
        if _sized(buf) > limit:
            skip, buf = skip + len(buf), b""
        more = b"" if end else f.readline(1 << 20 if skip else limit + 1 - len(buf))
        if not more:  # the line's (or the file's) end
            if buf or skip:
                yield (None, skip + len(buf)) if skip or _sized(buf) > limit else (buf, len(buf))
            return
        buf += more


def _sized(piece: bytes) -> int:
    """A record's bytes, its line end (LF, CR LF or a bare CR) left out: counted in, a record of max_doc_bytes was
    too_large ended by CR LF (or, joined to others by bare CRs, by any end) and kept ended by LF."""
    return len(piece) - (2 if piece.endswith(b"\r\n") else piece.endswith((b"\n", b"\r")))


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return False
    return True


def _read_jsonl(path: str, cfg: SourceConfig, ncfg: NormalizeConfig):
    # bad bytes are judged in the text alone, as a Parquet value's are (over the whole line, one in a short record's
    # title dropped its text, and long metadata let a text past the limit): the line is only checked for binary here
    line_cfg = dataclasses.replace(ncfg, invalid_utf8="reject")
    with _opener(path)(path, "rb") as f:
        # (a line of records joined by bare CRs yields each, under the line's number)
        for lineno, line, n in _jsonl_records(f, cfg.max_doc_bytes):
            if line is not None and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors) is
                line = line[3:]  # no part of a record: on any line, as `cat a.jsonl b.jsonl` puts b's mid-file
            if line is None:
                yield None, "too_large", n, lineno + 1
                continue
            if not line.strip():
                yield None, "empty", n, lineno + 1
                continue
            raw, reason = decode(line, line_cfg)
            if bad_bytes := reason == "invalid_utf8":  # each bad byte a lone surrogate, kept apart from the rest
                raw, reason = line.decode("utf-8", "surrogateescape"), None
            if reason:
                yield None, reason, n, lineno + 1
                continue
            try:
                obj = json.loads(raw)
            # ValueError, not only JSONDecodeError: an integer of over 4,300 digits is valid JSON that Python's int
            # conversion limit refuses with a plain ValueError, and one such line stopped the run
            except (ValueError, RecursionError):
                yield None, "malformed_json", n, lineno + 1
                continue
            if not isinstance(obj, dict):  # valid JSON, but no field to read the text from
                yield None, "not_an_object", n, lineno + 1
                continue
            if cfg.text_field not in obj:
                yield None, "missing_text", n, lineno + 1
                continue
            text = obj.pop(cfg.text_field)
            if bad_bytes and isinstance(text, str) and count_surrogates(text):
                try:  # back to its bytes, for decode() to repair or drop; a metadata value's get U+FFFD (_clean_meta)
                    text = text.encode("utf-8", "surrogateescape")
                except UnicodeEncodeError:  # it also holds a lone surrogate escape: judged with them by _text_doc
                    pass
            # the path as discovered (en/part-0 and zh/part-0 differ) and the line as editors and `grep -n` number it;
            # also for "id": null, which the drop logs listed as None
            if _no_id(obj.get("id")):
                obj["id"] = f"{path}:{lineno + 1}"
            doc, reason = _text_doc(text, obj, cfg, ncfg)
            yield doc, reason, n, lineno + 1


def _read_parquet(path: str, cfg: SourceConfig, ncfg: NormalizeConfig):
    import pyarrow.parquet as pq  # only needed for Parquet inputs

    try:
        # read in 1 MB pieces: pyarrow's default pre_buffer loads a row group's whole column chunks first (a file
        # pyarrow wrote with up to 1Mi rows is one group: an 88 MB file held 91 MB of Arrow memory, this 9 MB)
        pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except Exception:  # noqa: BLE001 - any unreadable file is one counted drop, not a crash
        yield None, "unreadable_file", os.path.getsize(path)
        return
    if cfg.text_field not in pf.schema_arrow.names:  # one drop per row (the footer counts them), the file's bytes
        rows, size = pf.metadata.num_rows, os.path.getsize(path)  # shared out: one drop for all hid the rows lost
        for row in range(rows):
            yield None, "missing_text", size // rows + (row < size % rows)
        return
    maps = {f.name: f.type for f in pf.schema_arrow if _has_map(f.type)}
    row, batches = 0, pf.iter_batches(batch_size=256)
    while True:
        try:
            batch = next(batches, None)
        except Exception:  # noqa: BLE001 - a corrupt page: the rest of the file is one counted drop
            yield None, "unreadable_rest" if row else "unreadable_file", 0
            return
        if batch is None:
            return
        for obj in _pylist(batch, cfg.text_field):
            text = obj.pop(cfg.text_field)
            n = (len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else
                 len(text) if isinstance(text, bytes) else 0)  # another type is counted as bad_text_type below
            obj = {k: _jsonable(_map_dicts(v, maps[k]) if k in maps else v) for k, v in obj.items()}
            if _no_id(obj.get("id")):  # (a null in an id column too)
                obj["id"] = f"{path}:{row}"
            row += 1
            if n > cfg.max_doc_bytes:
                yield None, "too_large", n
                continue
            doc, reason = _text_doc(text, obj, cfg, ncfg)
            yield doc, reason, n


def _pylist(batch, text_field: str) -> list[dict]:
    """`batch.to_pylist()`, but a string column holding invalid UTF-8 (pyarrow does not check it when reading, nor do
    all writers when writing) read as bytes: the text field's bad values stay bytes, decoded as a JSON line's are
    (repaired, or dropped as `invalid_utf8` / `binary`), a metadata field's get U+FFFD. to_pylist raised
    UnicodeDecodeError, and one such value ended the run."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    import pyarrow as pa

    cols = {}
    for name, col in zip(batch.schema.names, batch.columns):
        # string, large / view, dictionary-encoded (a category); a binary column stays bytes (as _jsonable takes it)
        if not pa.types.is_large_binary(col.type) and _as_binary(col.type) == pa.large_binary():
            cols[name] = [v if v is None else _utf8(v, keep_bytes=name == text_field)
                          for v in col.cast(pa.large_binary()).to_pylist()]
            continue
        try:
            cols[name] = col.to_pylist()
        except UnicodeDecodeError:  # strings in a list / struct / map: read as bytes, a bad one's with U+FFFD
            cols[name] = _utf8_nested(col.cast(_as_binary(col.type)).to_pylist())
    return [dict(zip(cols, row)) for row in zip(*cols.values())]


def _listlike(t) -> bool:
    import pyarrow as pa

    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _has_map(t) -> bool:
    """Whether Arrow type `t` holds a map at any depth."""
    import pyarrow as pa

    if pa.types.is_map(t):
        return True
    if _listlike(t):
        return _has_map(t.value_type)
    return pa.types.is_struct(t) and any(_has_map(f.type) for f in t)


def _map_dicts(v, t):
    """`v`, a value of Arrow type `t` as to_pylist gives it, with each map in it a dict: to_pylist gives a map's
    (key, value) pairs, and [["lang", "en"]] was the metadata where the same records as JSON Lines hold {"lang": "en"}.
    A map whose keys repeat (as JSON keys, str) stays pairs: no JSON object holds it."""
    import pyarrow as pa

    if v is None:
        return v
    if pa.types.is_map(t):
        pairs = [(k, _map_dicts(x, t.item_type)) for k, x in v]
        keys = {str(k) for k, _ in pairs}  # (as _jsonable writes them)
        return dict(pairs) if len(keys) == len(pairs) else [list(p) for p in pairs]
    if _listlike(t):
        return [_map_dicts(x, t.value_type) for x in v]
    if pa.types.is_struct(t):
        return {k: _map_dicts(x, t.field(k).type) if _has_map(t.field(k).type) else x for k, x in v.items()}
    return v


def _as_binary(t):
    """Arrow type `t` with every string type in it made binary (read without a UTF-8 check)."""
    import pyarrow as pa

    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.large_binary()
    if pa.types.is_dictionary(t):  # (pandas categories, pyarrow's own dictionaries): to_pylist failed on these too
        return _as_binary(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return (pa.list_ if pa.types.is_list(t) else pa.large_list)(t.value_field.with_type(_as_binary(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_as_binary(f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(_as_binary(t.key_type), _as_binary(t.item_type))
    return t


def _utf8_nested(v):
    if isinstance(v, bytes):
        return _utf8(v, keep_bytes=False)
    if isinstance(v, list | tuple):
        return [_utf8_nested(x) for x in v]
    if isinstance(v, dict):
        return {k: _utf8_nested(x) for k, x in v.items()}
    return v


def _utf8(v: bytes, keep_bytes: bool) -> str | bytes:
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        return v if keep_bytes else v.decode("utf-8", "replace")


def _no_id(v) -> bool:
    """Whether a record's `id` is missing: None, NaN (pandas writes an integer id column with gaps as floats with
    NaN for each gap; such records were all stored with id null, and named 'nan' when dropped) or ±inf (stored as
    null too: `data.shards.encode_doc`), or a blank str (an export's missing string: a later stage's drop was logged
    with id "", which names nothing)."""
    return v is None or isinstance(v, float) and not math.isfinite(v) or isinstance(v, str) and not v.strip()


def _jsonable(v):
    """A Parquet value as JSON metadata, at any depth: timestamps, decimals and the like as strings, bytes as
    UTF-8 text (or hex). Kept rather than dropped; a nested one used to crash the run when written."""
    if v is None or isinstance(v, str | int | float | bool):
        return v
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return v.hex()
    return str(v)


# byte-order marks of Windows "Unicode" text files (UTF-16) and UTF-32, the longer first: UTF-32LE's begins with
# UTF-16LE's, and read as UTF-16 its text kept a NUL after each character (deleted: U+1F600 became U+F600, and each
# CR LF a blank line)
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
         (b"\xfe\xff", "utf-16"))


def _decode_wide(raw: bytes, enc: str) -> str | bytes:
    """A UTF-16 / UTF-32 file's text, a lone surrogate kept and each byte past its last whole code unit (`echo >>`
    appends one LF) a lone surrogate too: `_text_doc` repairs them to U+FFFD or drops the file as `invalid_utf8`,
    under the limits bad UTF-8 has (one such unit was a `binary` drop of the whole file). `raw` itself where it
    is not that encoding (a UTF-32 value past U+10FFFF): judged as bytes."""
    size = 4 if enc == "utf-32" else 2
    whole = len(raw) - len(raw) % size
    try:
        return raw[:whole].decode(enc, "surrogatepass") + "".join(chr(0xDC00 + b) for b in raw[whole:])
    except UnicodeDecodeError:
        return raw


def _read_text(path: str, cfg: SourceConfig, ncfg: NormalizeConfig):
    opener = _opener(path)
    if opener is open and os.path.getsize(path) > cfg.max_doc_bytes:
        yield None, "too_large", os.path.getsize(path)
        return
    with opener(path, "rb") as f:
        raw = f.read(cfg.max_doc_bytes + 1)  # compressed: the size that counts is the decompressed one
        n = len(raw)
        if n > cfg.max_doc_bytes:
            n += sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))
            yield None, "too_large", n
            return
    if enc := next((e for bom, e in _BOMS if raw.startswith(bom)), None):
        raw = _decode_wide(raw, enc)
    else:  # a UTF-8 byte-order mark (Notepad's "UTF-8 with BOM") is no part of the text, as a UTF-16 one is not: the
        raw = raw.removeprefix(b"\xef\xbb\xbf")  # raw tier held U+FEFF first, the same text from JSON Lines did not
    doc, reason = _text_doc(raw, {"id": path, "source": path}, cfg, ncfg)
    yield doc, reason, n


_DEFAULT_NORMALIZE = NormalizeConfig()


def read_records(files: Sequence[str], cfg: SourceConfig = SourceConfig(),
                 ncfg: NormalizeConfig = _DEFAULT_NORMALIZE, with_ids: bool = False) -> Iterator[tuple]:
    """Every record of a shard's files: `(doc, None, nbytes)` or `(None, drop_reason, nbytes)`; with `with_ids`,
    a fourth item names the record. A kept one by its `id`: the record's own, else `path:line` (lines numbered from
    1 as editors and `grep -n` do) / `path:row` (rows from 0 as pyarrow does), a text file's path. A dropped one by
    where it was, `path:line` / `path:row`, even when it has an id of its own (most drops, e.g. malformed_json or
    too_large, have none to read, and the place finds it in the input); the path alone for a whole file dropped
    at once.

    Reasons: too_large, empty (also a null text), binary, invalid_utf8 (a UTF-16 / UTF-32 text file's bad units
    too), malformed_json (also nested too deep to read), not_an_object (a JSON line that is an array, a number, ...),
    missing_text, bad_text_type (a number, list or object), unreadable_file (nothing of it read), unreadable_rest (a
    truncated or damaged file, read up to the damage: the records after it are in no count, as their number is
    unknown; `data.report` warns of both). Its id is where reading stopped.
    """
    readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "text": _read_text}
    for path in files:
        kind, k = _kind(path), -1
        try:
            # a JSONL line from 1 (the reader's: a line of records joined by bare CRs is one), a Parquet row from 0
            for k, (doc, reason, n, *line) in enumerate(readers[kind](path, cfg, ncfg)):
                if not with_ids:
                    yield doc, reason, n
                    continue
                whole = kind == "text" or reason == "unreadable_file"
                where = f"{path}:{line[0] if line else k}"
                yield doc, reason, n, doc["id"] if doc is not None else path if whole else where
        except _READ_ERRORS:
            if k < 0:
                yield (None, "unreadable_file", 0) + ((path,) if with_ids else ())
            else:  # the line after the last one read (a text file is one record: read whole or not at all)
                yield (None, "unreadable_rest", 0) + ((f"{path}:{line[0] + 1 if line else k + 2}",) if with_ids else ())
