"""The cleaning pipeline end to end on a corpus with injected malformed records: every drop counted with its
reason, counts reconcile tier by tier, tiers readable, resumable per shard, independent of worker count."""

import collections
import dataclasses
import gzip
import json
import os
import pathlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import report as report_mod
from data.dedup import DedupConfig
from data.pipeline import PipelineConfig, run
from data.shards import iter_docs, tier_shards
from data.synthetic import en_text, zh_text

EXPECTED_DROPS = {
    "ingest": {"malformed_json": 1, "not_an_object": 1, "missing_text": 1, "bad_text_type": 1, "empty": 5,
               "invalid_utf8": 1, "binary": 2, "too_large": 1},
    "normalize": {},
    "quality": {"promo_spam": 1, "blocklist": 1, "dup_lines": 1, "too_short": 1},
    "langid": {"lang_other": 1},
    "dedup": {"exact_dup": 1, "near_dup": 1},
    "label": {},
    "augment": {},
}
EXPECTED_KEPT = 15
FRENCH = ("Le comité publiera son rapport final sur le projet de prolongement ferroviaire au printemps prochain. "
          "Elle ouvrit le tiroir, trouva les vieilles lettres et les lut lentement près de la fenêtre. "
          "Les chercheurs ont mesuré la vitesse à laquelle l'enzyme décompose l'amidon à différentes températures. "
          "Nos voisins ont planté des tomates, des haricots et une rangée de tournesols le long de la clôture. "
          "Le musée a rouvert après deux ans de travaux avec une nouvelle aile consacrée à l'histoire maritime.")


def make_corpus(root: pathlib.Path) -> list[str]:
    """JSONL + a directory of text files + Parquet, with every kind of bad record the issue names."""
    rng = np.random.default_rng(0)
    en = [en_text(rng, 300 if i == 1 else 120) for i in range(6)]
    zh = [zh_text(rng, 300) for _ in range(3)]
    ws = en[1].split()
    for i in (10, 100, 200):
        ws[i] = "changed"
    good_line = lambda text, **meta: json.dumps({"text": text, **meta}, ensure_ascii=False).encode() + b"\n"
    lines = [good_line(t, source="web") for t in en + zh]
    lines += [
        good_line(en_text(rng, 40) + "\n" + zh_text(rng, 120) + "\n" + en_text(rng, 40)),  # mixed en/zh: kept
        good_line("  " + en[0].upper().replace(" ", "   ") + "  "),  # exact duplicate after folding
        good_line(" ".join(ws)),  # near duplicate of en[1] (Jaccard ~0.9)
        good_line(FRENCH),  # dropped by language ID
        good_line(en_text(rng, 100) + " Buy now! Click here and buy now. BUY NOW."),
        good_line(en_text(rng, 100) + " Cheap viagra."),
        good_line("\n".join([en_text(rng, 10)] * 12)),
        good_line("Too short."),
        b'{"text": "unterminated\n',  # malformed JSON
        b"[1, 2, 3]\n",  # valid JSON, not an object
        b'{"title": "no text field"}\n',
        b'{"text": 42}\n',
        b'{"text": ""}\n',
        b'{"text": "   \\n  "}\n',
        b"\n",  # blank line
        b'{"text": "' + b"\xff\xfe" * 100 + b'"}\n',  # mostly invalid UTF-8
        b'{"text": "binary\x00\x01\x02blob"}\n',
        b'{"text": "' + b"a" * 10_000_000 + b'"}\n',  # a 10 MB document
        # one invalid byte in a long document: repaired (U+FFFD) and kept
        good_line(en_text(rng, 120)).replace(b". ", b". \xff ", 1),
        # a lone surrogate escape: repaired and kept
        json.dumps({"text": en_text(rng, 120) + " \ud800 end."}).encode() + b"\n",
    ]
    (root / "in").mkdir()
    (root / "in" / "a.jsonl").write_bytes(b"".join(lines))
    texts = root / "in" / "texts"
    texts.mkdir()
    (texts / "good.txt").write_text(en_text(rng, 150) + "\nAll rights reserved.\n" + en_text(rng, 30))
    (texts / "blob.bin").write_bytes(bytes(rng.integers(0, 256, 4096, dtype=np.uint8)))
    (texts / "empty.txt").write_text("")
    table = pa.table({"text": [en_text(rng, 120), None, zh_text(rng, 300)], "url": ["u1", "u2", "u3"]})
    pq.write_table(table, root / "in" / "c.parquet")
    return [str(root / "in" / "a.jsonl"), str(texts), str(root / "in" / "c.parquet")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


@pytest.fixture(scope="module")
def cleaned(corpus):
    root, inputs = corpus
    out = root / "out1"
    stats = run(inputs, out, PipelineConfig(workers=1), progress=False)
    return out, stats


def all_docs(tier_dir):
    return [d for path in tier_shards(tier_dir) for d in iter_docs(path)]


def test_every_drop_counted_with_its_reason_and_counts_reconcile(cleaned):
    out, _ = cleaned
    rows = report_mod.funnel(out)
    assert [s.name for _, s in rows] == list(EXPECTED_DROPS)
    for _, s in rows:
        assert dict(s.dropped) == EXPECTED_DROPS[s.name], s.name
        assert s.docs_in == s.docs_out + sum(s.dropped.values())
    assert report_mod.reconcile(rows) == []
    ingest = rows[0][1]
    # JSONL: 17 documents, 10 bad records, 2 repairable; 3 text files; 3 Parquet rows
    assert ingest.docs_in == 17 + 10 + 2 + 3 + 3
    assert rows[-1][1].docs_out == EXPECTED_KEPT


def test_dropped_records_are_named_by_reason(cleaned, corpus, capsys):
    """The first few ids of each reason's drops (the report gave counts only: which file was 'binary'?), as
    `path:line` for JSON Lines, the path of a text file; in the report too."""
    out, _ = cleaned
    jsonl, texts = corpus[1][0], corpus[1][1]
    ex = {s.name: s.examples for _, s in report_mod.funnel(out)}
    line = lambda k: f"{jsonl}:{k + 1}"  # noqa: E731 - record k (0-based, as make_corpus counts) is line k + 1
    assert ex["ingest"]["malformed_json"] == [line(17)] and ex["ingest"]["not_an_object"] == [line(18)]
    assert ex["ingest"]["empty"] == [line(21), line(22), line(23)]  # 5 dropped, 3 named
    assert ex["ingest"]["binary"] == [line(25), f"{texts}/blob.bin"]
    assert ex["ingest"]["too_large"] == [line(26)]
    assert ex["quality"]["promo_spam"] == [line(13)] and ex["langid"]["lang_other"] == [line(12)]
    assert ex["dedup"] == {"exact_dup": [line(10)], "near_dup": [line(11)]}
    for name, drops in EXPECTED_DROPS.items():  # every reason named, never more than EXAMPLES ids
        assert {r: min(n, 3) for r, n in drops.items()} == {r: len(ids) for r, ids in ex[name].items()}, name
    print(report_mod.report(out))
    assert f"  raw/ingest binary: {line(25)}, {texts}/blob.bin" in capsys.readouterr().out
    lines = pathlib.Path(jsonl).read_text(encoding="utf-8", errors="replace").split("\n")
    fold = lambda ln: " ".join(json.loads(ln)["text"].lower().split())  # noqa: E731
    assert fold(lines[int(line(10).rsplit(":", 1)[1]) - 1]) == fold(lines[0])  # the duplicate, where editors show it


def test_a_binary_blob_in_a_json_string_is_a_binary_drop_as_its_raw_bytes_are(tmp_path):
    """A JSON writer escapes control characters ("\\u0000"), so a blob stored as a JSON string passed the line's binary
    test and was kept (for the quality stage to drop as mean_word_len), where its raw bytes, or a Parquet value, were
    `binary`. Escaped tabs, line breaks and a form feed in text stay text."""
    from data.sources import read_records

    blob = bytes(range(256)).decode("latin-1") * 4
    text = "A page of text.\tTabbed.\r\nNext line.\fA new page. " * 5
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                              for i, t in enumerate([blob, "nul\x00inside", text])))
    got = [(d and d["id"], reason) for d, reason, _ in read_records([str(tmp_path / "a.jsonl")])]
    assert got == [(None, "binary"), (None, "binary"), (2, None)]


def test_a_utf16_text_file_is_read_as_text(tmp_path):
    """Windows' "Unicode" text files (UTF-16 with a byte-order mark) were dropped as `binary` (their NULs)."""
    from data.sources import read_records

    text = "Grüße aus 北京: a UTF-16 file."
    for enc in ("utf-16", "utf-16-be"):
        path = tmp_path / f"{enc}.txt"
        path.write_bytes(text.encode(enc) if enc == "utf-16" else ("\ufeff" + text).encode(enc))  # BOM: LE / BE
        [(doc, reason, n, rid)] = read_records([str(path)], with_ids=True)
        assert reason is None and doc["text"] == text and rid == str(path)
    (tmp_path / "odd.txt").write_bytes(b"\xff\xfe" + b"\x00\xd8")  # a BOM, then a lone surrogate: all bad text
    assert list(read_records([str(tmp_path / "odd.txt")])) == [(None, "invalid_utf8", 4)]


def test_a_utf16_file_with_a_bad_unit_is_repaired_as_bad_utf8_is_and_utf32_is_read_as_utf32(tmp_path):
    """A UTF-16 file with a byte past its last whole unit (`echo >> notes.txt` appends an LF) or a lone surrogate
    (a cut emoji) was a `binary` drop of the whole file; a UTF-32LE one was read as UTF-16 (its byte-order mark
    begins with UTF-16LE's): an emoji became U+F600 and each CR LF a blank line, and UTF-32BE was `binary`."""
    from data.sources import read_records

    text = "Notes from the meeting: the café opens at nine 😀\r\n" * 20
    cases = {"echo.txt": (text.encode("utf-16") + b"\n", text + "\ufffd"),
             "cut.txt": (text.encode("utf-16") + "😀".encode("utf-16-le")[:2], text + "\ufffd"),
             "le32.txt": (text.encode("utf-32-le"), text), "be32.txt": (text.encode("utf-32-be"), text)}
    for name, (raw, want) in cases.items():
        raw = {"le32.txt": b"\xff\xfe\x00\x00", "be32.txt": b"\x00\x00\xfe\xff"}.get(name, b"") + raw
        (tmp_path / name).write_bytes(raw)
        assert list(read_records([str(tmp_path / name)]))[0][1:] == (None, len(raw)), name
        assert list(read_records([str(tmp_path / name)]))[0][0]["text"] == want, name


def test_a_utf8_byte_order_mark_is_no_part_of_a_text_files_text(tmp_path):
    """Notepad's "UTF-8 with BOM": the text file's document began with U+FEFF in the raw tier, where the same text
    in a UTF-16 text file or a JSON Lines record (its mark stripped by the readers) did not."""
    from data.sources import read_records

    text = "Notes from the meeting: the café opens at nine.\r\n"
    (tmp_path / "sig.txt").write_bytes(text.encode("utf-8-sig"))
    (tmp_path / "u16.txt").write_bytes(text.encode("utf-16"))
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": text}).encode() + b"\n")
    for name in ("sig.txt", "u16.txt", "a.jsonl"):
        (doc, reason, n), = read_records([str(tmp_path / name)])
        assert (doc["text"], reason, n) == (text, None, (tmp_path / name).stat().st_size), name


def test_a_utf16_json_lines_file_or_one_with_bare_cr_line_ends_is_refused_before_any_work(tmp_path):
    """PowerShell 5's `>` writes UTF-16: its 2 records were 4 `binary` drops (上 is the bytes 0A 4E, a line break);
    with classic Mac line ends (CR alone) they were one `malformed_json` drop. UTF-32 is named as such: LE was advised
    to convert from UTF-16LE (a NUL after each character), BE was read (every record `binary`)."""
    from data.sources import discover

    text = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in ("上海 report", "a second one"))
    for enc, name in (("utf-16", "UTF-16LE"), ("utf-16-le", "UTF-16LE"), ("utf-16-be", "UTF-16BE"),
                      ("utf-32", "UTF-32LE"), ("utf-32-le", "UTF-32LE"), ("utf-32-be", "UTF-32BE")):
        path = tmp_path / f"{enc}.jsonl"
        path.write_bytes(text.encode(enc))  # utf-16: a byte-order mark first; the others none
        with pytest.raises(ValueError, match=re.escape(f"{path} ({name} text, not UTF-8: convert it, e.g. iconv -f "
                                                       f"{name} -t UTF-8")):
            discover([path])
    (tmp_path / "cr.jsonl").write_bytes(text.replace("\r\n", "\r").encode())
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'cr.jsonl'} (lines end in a bare CR")):
        discover([tmp_path / "cr.jsonl"])
    (tmp_path / "ok.jsonl").write_text(text, encoding="utf-8")  # CRLF: JSON whitespace, read record by record
    assert discover([tmp_path / "ok.jsonl"]) == [(str(tmp_path / "ok.jsonl"),)]
    line = json.dumps({"text": "x" * 4083})  # 4095 bytes: its CR is the last byte of the 4 KiB read, its LF after
    (tmp_path / "long.jsonl").write_bytes((line + "\r\n" + line + "\r\n").encode())
    assert len(line) == 4095 and discover([tmp_path / "long.jsonl"]) == [(str(tmp_path / "long.jsonl"),)]


def test_a_compressed_json_lines_file_not_named_so_is_refused_before_any_work(tmp_path):
    """A download that lost its .gz (or was saved as .gzip): its 50 records were read as the compressed bytes' lines,
    3 `binary` drops (or one for the whole .gzip file), and the other records in no count."""
    import bz2
    import lzma

    from data.sources import discover

    body = "".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(50)).encode()
    for tool, data in (("gzip", gzip.compress(body)), ("bzip2", bz2.compress(body)), ("xz", lzma.compress(body)),
                       ("zstd", b"\x28\xb5\x2f\xfd" + bytes(40))):
        path = tmp_path / f"{tool}.jsonl"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(f"{path} ({tool}-compressed, though not named so: decompress "
                                                       f"it, e.g. {tool} -dc < IN > OUT.jsonl)")):
            discover([path])
    (tmp_path / "a.jsonl.gzip").write_bytes(gzip.compress(body))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'a.jsonl.gzip'} (rename it to end in .gz)")):
        discover([tmp_path / "a.jsonl.gzip"])
    (tmp_path / "ok.jsonl.gz").write_bytes(gzip.compress(body))
    assert discover([tmp_path / "ok.jsonl.gz"]) == [(str(tmp_path / "ok.jsonl.gz"),)]
    # the other way round (a server decompressed the download): one `unreadable_file` drop for its 50 records
    for suffix in (".gz", ".bz2", ".xz"):
        path = tmp_path / f"plain.jsonl{suffix}"
        path.write_bytes(body)
        with pytest.raises(ValueError, match=re.escape(f"{path} (plain JSON Lines, not compressed, though named "
                                                       f"{suffix}: rename it without the {suffix})")):
            discover([path])
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(body)[:5])  # damaged: counted when read, as before
    assert discover([tmp_path / "cut.jsonl.gz"]) == [(str(tmp_path / "cut.jsonl.gz"),)]


def test_bare_cr_line_ends_are_refused_when_the_first_record_is_past_4_kib(tmp_path):
    """Only the first 4 KiB were looked at: with a first record longer (most web documents), a file of bare-CR line
    ends passed and all its records were one `malformed_json` drop. The line end is read on to; an LF file with a
    long first record, or a CR as JSON whitespace before its LF, still passes."""
    from data.sources import discover

    lines = [json.dumps({"text": "x" * 5000})] + [json.dumps({"text": f"record {i}"}) for i in range(9)]
    (tmp_path / "cr.jsonl.gz").write_bytes(gzip.compress("\r".join(lines).encode() + b"\r"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'cr.jsonl.gz'} (lines end in a bare CR")):
        discover([tmp_path / "cr.jsonl.gz"])
    (tmp_path / "lf.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "ws.jsonl").write_bytes(b'{"id": 1,\r"text": "' + b"x" * 5000 + b'"}\n')
    for ok in ("lf.jsonl", "ws.jsonl"):
        assert discover([tmp_path / ok]) == [(str(tmp_path / ok),)]


def test_shards_read_back_every_record_in_order_and_tiers_list_shards_in_order(tmp_path):
    """Past one read chunk (256 records) and with more than ten shards, created out of order."""
    from data.shards import DocWriter, shard_name

    for i in reversed(range(12)):
        w = DocWriter(tmp_path / f"{shard_name(i)}.array_record")
        for j in range(300 if i == 0 else 1):
            w.write({"text": f"doc {i}.{j}", "id": f"{i}.{j}"})
        w.commit()
    shards = tier_shards(tmp_path)
    assert [pathlib.Path(p).name for p in shards] == [f"{shard_name(i)}.array_record" for i in range(12)]
    assert [d["id"] for d in iter_docs(shards[0])] == [f"0.{j}" for j in range(300)]
    # past shard-99999 the names grow a digit: still in number order (a name sort put shard-100000 before shard-99999)
    for i in (100000, 99999):
        (tmp_path / f"{shard_name(i)}.array_record").touch()
    assert [pathlib.Path(p).name for p in tier_shards(tmp_path)[-3:]] == [
        f"{shard_name(i)}.array_record" for i in (11, 99999, 100000)]


def test_a_shard_written_has_its_content_digest_beside_it(tmp_path):
    """The writer knows every record it writes: `shard-NNNNN.digest.json` holds the SHA-256 of the records (each
    8-byte little-endian length, then the bytes), so a loader can tell a hand-edited shard of the same size, count
    and ends from the one a checkpoint was saved over without reading it. Checked against a digest of the records
    read back; a rewrite replaces it, an aborted one keeps the old shard's."""
    import hashlib

    from array_record.python.array_record_module import ArrayRecordReader

    from data.shards import DocWriter, read_digest, read_json

    path = tmp_path / "shard-00000.array_record"

    def write(texts, abort=False):
        w = DocWriter(path)
        for t in texts:
            w.write({"text": t})
        w.abort() if abort else w.commit()

    def reference():
        r = ArrayRecordReader(str(path))
        recs = r.read(0, r.num_records()) if r.num_records() else []
        r.close()
        h = hashlib.sha256()
        for rec in recs:
            h.update(len(rec).to_bytes(8, "little") + rec)
        return h.hexdigest(), len(recs)

    write(["a b c", "d e f", "g h"])
    side = read_json(tmp_path / "shard-00000.digest.json")
    assert side == {"version": 1, "records": 3, "sha256": reference()[0]}
    assert read_digest(path) == reference()[0]
    write(["a b c", "d e g", "g h"])
    assert read_digest(path) == reference()[0] != side["sha256"]
    edited = read_digest(path)
    write(["x"], abort=True)
    assert read_digest(path) == edited
    write([])
    assert read_json(tmp_path / "shard-00000.digest.json")["records"] == 0
    assert read_digest(path) == reference()[0] == hashlib.sha256().hexdigest()
    assert read_digest(tmp_path / "shard-00001.array_record") is None  # (written before digests: none)
    (tmp_path / "shard-00000.digest.json").write_text('{"version": 2, "records": 0, "sha256": "00"}')
    with pytest.raises(ValueError, match=r"shard-00000.digest.json: digest format version 2, .*newer"):
        read_digest(path)


def test_a_document_with_a_lone_surrogate_is_refused_naming_the_record_and_field(tmp_path):
    """DocWriter.write of a document holding a lone surrogate (a JSON "\\ud800" escape, written without the cleaning
    pipeline) raised a bare UnicodeEncodeError naming neither the record nor the field; the shard stays writable."""
    from data.shards import DocWriter

    w = DocWriter(tmp_path / "shard-00000.array_record")
    w.write({"id": "a", "text": "fine"})
    for doc, field in [({"id": "b", "text": "x \ud800 y"}, r"\['text'\]"),
                       ({"id": "c", "text": "ok", "meta": {"tags": ["t", "\udfff"]}}, r"\['meta'\]\['tags'\]\[1\]")]:
        with pytest.raises(ValueError, match=rf"record 1 \(id '{doc['id']}'\) of .*shard-00000.array_record: field "
                                             rf"{field} holds a lone UTF-16 surrogate.*replace_surrogates"):
            w.write(doc)
    w.write({"id": "d", "text": "also fine"})
    w.commit()
    assert [d["id"] for d in iter_docs(tmp_path / "shard-00000.array_record")] == ["a", "d"]


def test_a_document_written_formats_its_id_only_for_an_error(tmp_path, monkeypatch):
    """DocWriter.write formatted every record's id for its error messages, written or not: for an int id 2 us of a
    write's 9 (CPU, 50k documents of 400 words), in every tier a document reaches."""
    from data import shards

    def formatted(record_id):
        raise AssertionError(f"id {record_id!r} formatted for a document written")

    monkeypatch.setattr(shards, "id_text", formatted)
    w = shards.DocWriter(tmp_path / "shard-00000.array_record")
    w.write({"id": 7, "text": "fine", "x": np.int64(1)})  # (a numpy value too: encode_doc's slow path)
    w.commit()
    assert list(iter_docs(tmp_path / "shard-00000.array_record")) == [{"id": 7, "text": "fine", "x": 1}]


def test_a_stats_write_that_raises_keeps_the_old_file_and_leaves_no_temporary(tmp_path, full_disk):
    """data.shards.write_json (shard stats, the mark of a finished shard): a write that raised part-way (a full
    disk) kept the previous file but left its partial `<name>.tmp` in the tier for good."""
    from data.shards import read_json, write_json

    path = tmp_path / "shard-00000.stats.json"
    write_json(path, {"docs": 1})

    full_disk(path.name)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"docs": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name] and read_json(path) == {"docs": 1}


def test_documents_with_values_json_has_no_form_for_are_stored_portably_or_refused_by_record_and_field(tmp_path):
    """A Parquet float column's NaN / inf was written as the non-standard NaN / Infinity tokens strict JSON readers
    refuse; a labeler's numpy int64 crashed the run with a bare "Object of type int64 is not JSON serializable"
    (and a set or bytes the same, naming no record or field). NaN / inf are stored as null, numpy values as the numbers
    and lists they hold; a value JSON has no form for is refused naming the record and the field."""
    from array_record.python.array_record_module import ArrayRecordReader

    from data.shards import DocWriter

    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"text": [en_text(rng, 120) for _ in range(3)], "score": [float("nan"), -np.inf, 0.5]}),
                   tmp_path / "in.parquet")
    out = tmp_path / "out"
    run([str(tmp_path / "in.parquet")], out, PipelineConfig(workers=1, labelers=(NumpyLabel(),)), progress=False)
    reader = ArrayRecordReader(str(out / "augmented" / "shard-00000.array_record"))

    def strict(token):
        raise ValueError(f"non-standard JSON token {token}")

    docs = [json.loads(r, parse_constant=strict) for r in reader.read_all()]
    reader.close()
    assert [d["score"] for d in docs] == [None, None, 0.5]
    n_words = [len(d["text"].split()) for d in docs]
    assert [(d["n_words"], d["ratio"], d["long"], d["sizes"]) for d in docs] == [
        (n, pytest.approx(n / 120), n > 10, [n, 1]) for n in n_words]
    assert all(type(d["n_words"]) is int and type(d["long"]) is bool for d in docs)

    w = DocWriter(tmp_path / "w" / "shard-00000.array_record")
    w.write({"id": "a", "text": "fine", "x": np.float32("nan"), "y": np.arange(2)})
    for doc, field, fix in [({"id": "b", "text": "t", "meta": {"tags": {"x"}}}, r"\['meta'\]\['tags'\]", "set.*list"),
                            ({"id": "c", "text": "t", "raw": [b"\x00"]}, r"\['raw'\]\[0\]", "bytes.*decode"),
                            ({"id": "d", "text": "t", (1, 2): 1}, r"\[\(1, 2\)\] \(the key\)", "str key")]:
        with pytest.raises(TypeError, match=rf"DocWriter.write: record 1 \(id '{doc['id']}'\) of .*shard-00000"
                                            rf".array_record: field {field} .*{fix}"):
            w.write(doc)
    w.write({"id": "e", "text": "t", "x": float("nan"), "y": [float("-inf")]})  # Python floats only: json's own path
    w.commit()
    assert list(iter_docs(tmp_path / "w" / "shard-00000.array_record")) == [
        {"id": "a", "text": "fine", "x": None, "y": [0, 1]}, {"id": "e", "text": "t", "x": None, "y": [None]}]


class NumpyLabel:
    """A labeler computing with numpy, as one would: its values are numpy scalars and arrays."""

    name = "numpy_label"

    def __call__(self, doc):
        n = np.int64(len(doc["text"].split()))
        return {**doc, "n_words": n, "ratio": np.float32(n / 120), "long": n > 10, "sizes": np.array([n, 1])}, None


def test_a_shard_that_fails_part_way_leaves_no_temporary_files(tmp_path, monkeypatch):
    """A stage that raised mid-shard (or Ctrl-C) left the shard's `.array_record.tmp` in every tier it was writing,
    and a write that raised (a full disk) left `.dedup.tmp.npz` / `.drops.jsonl.tmp`, all for good (only a rerun of
    the same shard overwrote them). Every one is removed; the run then resumes to the same tiers as a clean one."""
    from data import pipeline

    inputs = small_corpus(tmp_path)
    leftovers = lambda out: sorted(str(p.relative_to(out)) for p in out.rglob("*tmp*"))  # noqa: E731
    with pytest.raises(RuntimeError, match="boom"):  # pass 1 (raw + filtered)
        run(inputs, tmp_path / "a", PipelineConfig(workers=1, filters=(FailOnThird(),)), progress=False)
    with pytest.raises(RuntimeError, match="boom"):  # pass 3 (cleaned + labeled + augmented)
        run(inputs, tmp_path / "b", PipelineConfig(workers=1, labelers=(FailOnThird(),)), progress=False)

    def half_then_full(file, *a, **k):
        pathlib.Path(file).write_bytes(b"PK")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", half_then_full)
    with pytest.raises(OSError, match="No space"):
        run(inputs, tmp_path / "c", PipelineConfig(workers=1), progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "open", half_then_full, raising=False)  # the drop log's (builtins' for the rest)
    with pytest.raises(OSError, match="No space"):
        run(inputs, tmp_path / "d", PipelineConfig(workers=1), progress=False)
    monkeypatch.undo()
    assert {d: leftovers(tmp_path / d) for d in "abcd"} == {d: [] for d in "abcd"}
    run(inputs, tmp_path / "d", PipelineConfig(workers=1), progress=False)
    run(inputs, tmp_path / "e", PipelineConfig(workers=1), progress=False)
    assert all_docs(tmp_path / "d" / "augmented") == all_docs(tmp_path / "e" / "augmented") != []


def _shard_writes_fail_as_on_a_full_disk(monkeypatch):
    """array_record's writer as on a full disk: it keeps a failed write's error and raises it from close()."""
    from array_record.python import array_record_module

    real = array_record_module.ArrayRecordWriter

    class FullDisk:
        def __init__(self, path, options):
            self._w = real(path, options)

        def write(self, rec):
            self._w.write(rec)

        def close(self):
            self._w.close()
            raise RuntimeError("write() failed: No space left on device; Failed to close chunk_writer")

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", FullDisk)


def test_a_shard_whose_writer_fails_on_a_full_disk_leaves_no_temporary_files(tmp_path, monkeypatch):
    """array_record keeps a failed write's error and raises it from every close(): the commit's close raised on a full
    disk, then the abort's again before it deleted the `.array_record.tmp` (a partial shard left on the full disk, and
    the other writers of the shard not aborted)."""
    _shard_writes_fail_as_on_a_full_disk(monkeypatch)
    with pytest.raises(RuntimeError, match="No space left"):
        run(small_corpus(tmp_path), tmp_path / "out", PipelineConfig(workers=1), progress=False)
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "out").rglob("*tmp*")) == []


def test_the_cli_on_a_full_disk_says_it_in_one_line(tmp_path, monkeypatch):
    """A full disk under --out ended `python -m data.pipeline` with a 25-line traceback (array_record's RuntimeError
    from the shard writer's close; an OSError from the other writes); now one line naming --out, the cause and that
    the tiers are incomplete."""
    from data import pipeline

    inputs = [str(p) for p in small_corpus(tmp_path)]
    out = tmp_path / "out"
    _shard_writes_fail_as_on_a_full_disk(monkeypatch)
    with pytest.raises(SystemExit, match=rf"^error: writing the run in {re.escape(str(out))} failed \(write\(\) "
                                         r"failed: No space left on device; .*\); its tiers are incomplete"):
        pipeline.main([*inputs, "--out", str(out), "--workers", "1"])
    monkeypatch.undo()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(SystemExit, match=r"^error: writing the run in .* failed \(\[Errno 28\] No space left"):
        pipeline.main([*inputs, "--out", str(tmp_path / "out2"), "--workers", "1"])


class FailOnThird:
    """A stage that raises on the third document it sees."""

    name = "fail_on_third"

    def __init__(self):
        self.seen = 0

    def __call__(self, doc):
        self.seen += 1
        if self.seen == 3:
            raise RuntimeError("boom")
        return doc, None


def test_the_cleaned_tier_keeps_the_right_documents_by_id(cleaned):
    """Which records survive, by id (file:line, file:row), from make_corpus's own comments: the counts alone did not
    show dedup dropping the record after each duplicate's position (the mixed en/zh line 9 lost, the near duplicate
    line 11 kept: same counts) or every Parquet row named row 0."""
    out, _ = cleaned
    ids = sorted(d["id"].rsplit("/", 1)[-1] for d in all_docs(out / "cleaned"))
    # a.jsonl's records (0-based; ids are 1-based lines, as grep -n shows them): 6 en + 3 zh (0-8), mixed en/zh
    # (9); 10 exact and 11 near duplicates, 12-26 dropped by language, quality or decoding; 27 and 28 repaired.
    # c.parquet: rows 0 and 2 (row 1 has no text). good.txt.
    want = [f"a.jsonl:{i + 1}" for i in [*range(10), 27, 28]] + ["c.parquet:0", "c.parquet:2", "good.txt"]
    assert ids == sorted(want)


def test_tiers_hold_the_counted_documents_and_bytes(cleaned):
    out, stats = cleaned
    for tier in ("raw", "filtered", "cleaned", "labeled", "augmented"):
        docs = all_docs(out / tier)
        last = stats[tier]["stages"][-1]
        assert len(docs) == last["docs_out"], tier
        assert sum(len(d["text"].encode()) for d in docs) == last["bytes_out"], tier
    final = all_docs(out / "augmented")
    assert {d["lang"] for d in final} == {"en", "zh"}
    assert all(0 <= d["quality"] <= 1 and isinstance(d["domains"], list) for d in final)
    # metadata travels with the text; repaired documents carry U+FFFD instead of the bad byte / surrogate
    assert sum(d.get("source") == "web" for d in final) == 9  # 6 en + 3 zh; their duplicates came later
    assert sum("\ufffd" in d["text"] for d in final) == 2
    assert {d["url"] for d in final if "url" in d} == {"u1", "u3"}
    # the boilerplate line of good.txt was removed and counted
    good = next(d for d in final if d["id"].endswith("good.txt"))
    assert "rights reserved" not in good["text"].lower()
    quality = next(s for s in stats["filtered"]["stages"] if s["name"] == "quality")
    assert quality["counters"]["boilerplate_lines_removed"] == 1
    normalize = next(s for s in stats["filtered"]["stages"] if s["name"] == "normalize")
    assert normalize["counters"] == {"with_replacement_char": 2}  # the two repaired records


def test_stage_stats_merge_field_by_field():
    """Shards' stats sum field by field (a merge that added `dropped` into `dropped_bytes` passed every test: the
    pipeline's shards never both dropped the same reason)."""
    import collections

    from data.stages import StageStats

    C = collections.Counter
    a = StageStats("quality", 10, 7, 1000, 700, C(short=2, spam=1), C(short=50, spam=250), C(boilerplate=1))
    b = StageStats("quality", 5, 4, 400, 300, C(short=1), C(short=100), C(boilerplate=2))
    m = a.merge(b)
    assert (m.docs_in, m.docs_out, m.bytes_in, m.bytes_out) == (15, 11, 1400, 1000)
    assert m.dropped == C(short=3, spam=1) and m.dropped_bytes == C(short=150, spam=250)
    assert m.counters == C(boilerplate=3) and m.reconciles()
    with pytest.raises(ValueError, match="cannot merge stats of stage 'langid' into 'quality'"):
        a.merge(StageStats("langid"))
    a.examples, b.examples = {"short": ["a:1", "a:2"], "spam": ["a:3"]}, {"short": ["b:1", "b:2"]}
    assert a.merge(b).examples == {"short": ["a:1", "a:2", "b:1"], "spam": ["a:3"]}  # in shard order, 3 at most
    assert b.merge(a).examples == {"short": ["b:1", "b:2", "a:1"], "spam": ["a:3"]}  # a reason only the 2nd shard has
    c = StageStats("quality")
    for k in range(5):
        c.drop("short", 10, f"c:{k}")
    assert c.examples == {"short": ["c:0", "c:1", "c:2"]} and len(c.log) == 5  # one shard's first 3; every drop logged
    c.drop("binary", 10)  # a record without an id: logged, but no example, and no empty list in the stats file
    assert c.log[-1] == (None, "binary") and c.to_json()["examples"] == {"short": ["c:0", "c:1", "c:2"]}


def test_stats_json_is_the_same_whether_a_corpus_is_one_file_or_split_into_several(tmp_path):
    """stats.json sums its shards key by key, zeros too: a counter every shard had at 0 (boilerplate_lines_removed)
    and a drop of no bytes (a Parquet null text's `empty`) were in one shard's stats.json but left out of a split
    corpus's (Counter's + drops keys summing to 0), so the same records cleaned from two files had other stats."""
    rng = np.random.default_rng(0)
    rows = [("d0", en_text(rng, 120)), ("d1", en_text(rng, 120)), ("null0", None),
            ("d2", en_text(rng, 120)), ("d3", en_text(rng, 120)), ("null1", None)]
    stats = {}
    for n_files in (1, 2):
        root = tmp_path / f"in{n_files}"
        root.mkdir()
        for k in range(n_files):
            part = rows[k * 6 // n_files:(k + 1) * 6 // n_files]
            pq.write_table(pa.table({"id": [r[0] for r in part], "text": [r[1] for r in part]}),
                           root / f"part-{k}.parquet")
        out = run([str(root)], tmp_path / f"out{n_files}", PipelineConfig(workers=1), progress=False)
        stats[n_files] = {t: [{k: v for k, v in st.items() if k != "examples"} for st in s["stages"]]
                          for t, s in out.items()}
    assert stats[2]["filtered"][1]["counters"] == {"boilerplate_lines_removed": 0}
    assert stats[2]["raw"][0]["dropped_bytes"] == {"empty": 0}
    assert stats[1] == stats[2]


def test_report_prints_funnel_and_language_mix(cleaned, capsys):
    out, _ = cleaned
    with pytest.raises(SystemExit) as exit_:
        report_mod.main([str(out)])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "malformed_json 1" in text and "not_an_object 1" in text and "near_dup 1" in text and "lang_other 1" in text
    assert "languages kept by langid:" in text and "zh " in text and "en " in text
    assert "languages dropped by langid: fr 1 doc (" in text  # "1 docs"
    # each kept language's documents and bytes, as the filtered tier holds them
    docs = all_docs(out / "filtered")
    for lang in ("en", "zh"):
        mine = [d for d in docs if d["lang"] == lang]
        size = report_mod._size(sum(len(d["text"].encode()) for d in mine))
        assert re.search(rf"kept by langid:.* {lang} {len(mine)} docs \([0-9.]+%, {size}\)", text), (lang, size)
    assert "counts reconcile: yes" in text


def test_report_names_a_count_that_does_not_reconcile_and_exits_1(cleaned, tmp_path, capsys):
    """Every test fed reconcile() a consistent run: one that always said 'no problems' passed them all."""
    import json
    import shutil

    out = tmp_path / "run"
    shutil.copytree(cleaned[0], out)
    path = out / "filtered" / "stats.json"
    stats = json.loads(path.read_text())
    quality = next(s for s in stats["stages"] if s["name"] == "quality")
    quality["docs_out"] -= 1  # one document vanished without a reason
    path.write_text(json.dumps(stats))
    problems = report_mod.reconcile(report_mod.funnel(out))
    n_in, n_out = quality["docs_in"], quality["docs_out"]
    assert problems[0] == f"filtered/quality: {n_in} in != {n_out} out + {n_in - n_out - 1} dropped"
    assert any(p.endswith(f"!= quality's {n_out} out") for p in problems[1:]), problems  # the next stage's input
    with pytest.raises(SystemExit) as exit_:
        report_mod.main([str(out)])
    assert exit_.value.code == 1 and "counts reconcile: NO" in capsys.readouterr().out
    # the first link too: ingest's output is normalize's input
    raw = json.loads((out / "raw" / "stats.json").read_text())
    raw["stages"][0]["docs_out"] += 1
    (out / "raw" / "stats.json").write_text(json.dumps(raw))
    n = raw["stages"][0]["docs_out"]
    assert any(p.startswith("filtered/normalize: ") and p.endswith(f"!= ingest's {n} out")
               for p in report_mod.reconcile(report_mod.funnel(out)))


def test_resume_redoes_only_missing_shards_and_matches(cleaned, corpus):
    out, _ = cleaned
    _, inputs = corpus
    before = {t: all_docs(out / t) for t in ("cleaned", "augmented")}
    kept_shard = out / "augmented" / "shard-00000.array_record"
    mtime = kept_shard.stat().st_mtime_ns
    # simulate a crash in pass 3 of shard 2: its outputs and stats are gone; then one after its labeled tier was
    # written, before the augmented one (a resume marker read from the labeled tier skipped the shard)
    for lost in (("cleaned", "labeled", "augmented"), ("augmented",)):
        for tier in lost:
            for suffix in (".array_record", ".stats.json"):
                (out / tier / f"shard-00002{suffix}").unlink()
        run(inputs, out, PipelineConfig(workers=1), progress=False)
        assert kept_shard.stat().st_mtime_ns == mtime  # finished shards are not redone
        assert {t: all_docs(out / t) for t in before} == before
        assert report_mod.reconcile(report_mod.funnel(out)) == []
    # and a crash in pass 1 after shard 2's raw tier was done, before its filtered one (so pass 2 never ran): the raw
    # tier's stats are no resume marker for the filtered tier
    for tier in ("filtered", "cleaned", "labeled", "augmented"):
        for suffix in (".array_record", ".stats.json"):
            (out / tier / f"shard-00002{suffix}").unlink()
    (out / "filtered" / "shard-00002.dedup.npz").unlink()
    (out / "cleaned" / "dedup.json").unlink()
    run(inputs, out, PipelineConfig(workers=1), progress=False)
    assert {t: all_docs(out / t) for t in before} == before


def test_a_crash_between_a_shards_raw_and_filtered_stats_is_redone_on_resume(tmp_path, monkeypatch):
    """The filtered tier's stats mark pass 1 of a shard done, so they are written after the raw tier's: the other way
    round, a crash between the two left a shard counted done whose raw stats were missing."""
    from data import pipeline

    inputs, out, real = small_corpus(tmp_path), tmp_path / "out", pipeline._write_tier_stats
    calls = []

    def crash_on_the_second(*args, **kw):
        calls.append(args[1])
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "_write_tier_stats", crash_on_the_second)
    with pytest.raises(RuntimeError, match="killed"):
        run(inputs, out, PipelineConfig(workers=1), progress=False)
    monkeypatch.setattr(pipeline, "_write_tier_stats", real)
    run(inputs, out, PipelineConfig(workers=1), progress=False)
    rows = report_mod.funnel(out)
    assert report_mod.reconcile(rows) == [] and rows[0][1].docs_in == 4


def test_the_tiers_of_a_run_killed_part_way_are_refused_to_readers_until_it_is_resumed(tmp_path, monkeypatch):
    """A run killed in pass 3 had shard 0 in its final tier: the loader, tier_texts and tier_shards read that shard
    as the whole corpus (data.report alone said the run was unfinished)."""
    from data import pipeline
    from data.loader import Source
    from data.tokenizer import tier_texts

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rng = np.random.default_rng(0)
    for p in (a, b):
        p.write_text("".join(json.dumps({"text": en_text(rng, 120)}) + "\n" for _ in range(3)))
    out, real = tmp_path / "out", pipeline._pass3

    def killed_on_shard_1(i, *args):
        if i == 1:
            raise RuntimeError("killed")
        return real(i, *args)

    monkeypatch.setattr(pipeline, "_pass3", killed_on_shard_1)
    with pytest.raises(RuntimeError, match="killed"):
        run([str(a), str(b)], out, PipelineConfig(workers=1), progress=False)
    assert (out / "augmented" / "shard-00000.array_record").exists()
    for read in (tier_shards, lambda d: Source(str(d)).files(), lambda d: list(tier_texts(d))):
        with pytest.raises(FileNotFoundError, match=r"unfinished cleaning run .* resume the run"):
            read(out / "augmented")
    (tmp_path / "train").symlink_to(out / "augmented")  # a link to the tier, or "." inside it, was read
    monkeypatch.chdir(out / "augmented")
    for tier in (tmp_path / "train", "."):
        with pytest.raises(FileNotFoundError, match=rf"unfinished cleaning run .* --out {re.escape(str(out))}\)"):
            tier_shards(tier)
    monkeypatch.setattr(pipeline, "_pass3", real)
    run([str(a), str(b)], out, PipelineConfig(workers=1), progress=False)
    assert len(list(tier_texts(out / "augmented"))) == 6
    assert len(tier_shards(".")) == len(tier_shards(tmp_path / "train")) == 2


def test_parallel_workers_give_identical_tiers(cleaned, corpus):
    out1, _ = cleaned
    root, inputs = corpus
    run(inputs, root / "out2", PipelineConfig(workers=2), progress=False)
    for tier in ("raw", "filtered", "cleaned", "augmented"):
        assert all_docs(root / "out2" / tier) == all_docs(out1 / tier), tier
    assert list(report_mod.drops(root / "out2")) == list(report_mod.drops(out1))  # and name the same survivors


def test_a_directory_of_another_run_is_refused(cleaned, corpus):
    out, _ = cleaned
    _, inputs = corpus
    with pytest.raises(ValueError, match=r"different settings \(augment: \(absent\) → None; augment.glossaries: "):
        run(inputs, out, PipelineConfig(workers=1, augment=None), progress=False)
    # which files: the same files spelled another way (an absolute path, another cwd) said only "different inputs"
    with pytest.raises(ValueError, match=r"different inputs \(not among these inputs: .*\)"):
        run(inputs[:1], out, PipelineConfig(workers=1), progress=False)


def test_a_run_begun_by_another_version_of_the_cleaning_code_is_refused_on_resume(tmp_path, monkeypatch):
    """The fingerprint covers the settings and OUTPUT_VERSION: a run begun before a change to what the stages
    produce resumed, mixing shards of both versions (and the demo's cached corpus kept the old texts)."""
    from data import pipeline

    inputs = small_corpus(tmp_path)
    before = PipelineConfig(workers=1).fingerprint()
    monkeypatch.setattr(pipeline, "OUTPUT_VERSION", pipeline.OUTPUT_VERSION - 1)
    assert PipelineConfig(workers=1).fingerprint() != before
    run(inputs, tmp_path / "out", PipelineConfig(workers=1), progress=False)
    monkeypatch.undo()
    v = pipeline.OUTPUT_VERSION
    with pytest.raises(ValueError, match=rf"different settings \(cleaning-code version \(data.pipeline.OUTPUT_VERSION\)"
                                         rf": {v - 1} → {v}\)"):
        run(inputs, tmp_path / "out", PipelineConfig(workers=1), progress=False)


def test_a_refused_resume_names_the_settings_that_changed(tmp_path):
    """'holds a cleaning run with different settings' named none of them (the manifest held only their hash): the
    manifest keeps the settings too, and the refusal names each change. A manifest written before that resumes as
    it did, and a change to it gets the old, general refusal."""
    from data.dedup import DedupConfig
    from data.filters import QualityConfig

    inputs = small_corpus(tmp_path)
    out = tmp_path / "out"
    cfg = PipelineConfig(workers=1)
    run(inputs, out, cfg, progress=False)
    changed = PipelineConfig(workers=1, quality=QualityConfig(max_markup_ratio=0.1),
                             dedup=dataclasses.replace(cfg.dedup, threshold=0.7))
    assert isinstance(cfg.dedup, DedupConfig)
    with pytest.raises(ValueError, match=r"different settings \(dedup.threshold: 0.8 → 0.7; "
                                         r"quality.max_markup_ratio: 0.05 → 0.1\); use a new --out"):
        run(inputs, out, changed, progress=False)
    run(inputs, out, PipelineConfig(workers=2), progress=False)  # workers is no setting of the output: resumes
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["settings"], manifest["version"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    run(inputs, out, cfg, progress=False)  # an older run's manifest: resumes
    with pytest.raises(ValueError, match=r"different settings \(or cleaning-code version\); use a new --out"):
        run(inputs, out, changed, progress=False)


def test_inputs_changed_since_the_run_began_are_refused_on_resume(tmp_path):
    """A resumed run skipped its finished shards, so records appended to an input were never read (exit 0)."""
    rng = np.random.default_rng(0)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": en_text(rng, 120)}) + "\n" for _ in range(3)))
    cfg = PipelineConfig(workers=1)
    run([src], tmp_path / "out", cfg, progress=False)
    run([src], tmp_path / "out", cfg, progress=False)  # unchanged: resumes
    with open(src, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": en_text(rng, 120)}) + "\n")
    with pytest.raises(ValueError, match=r"different inputs: .*in.jsonl changed since the run began"):
        run([src], tmp_path / "out", cfg, progress=False)


def test_an_output_folder_inside_the_input_folder_resumes(tmp_path):
    """The walk read the run's own tiers and manifest as inputs, so the second run saw other inputs."""
    rng = np.random.default_rng(0)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": en_text(rng, 120)}) + "\n" for _ in range(3)))
    cfg = PipelineConfig(workers=1)
    first = run([tmp_path], tmp_path / "clean", cfg, progress=False)
    again = run([tmp_path], tmp_path / "clean", cfg, progress=False)
    assert first == again and first["raw"]["stages"][0]["docs_in"] == 3


def test_formats_that_would_be_misread_are_named_before_any_work(tmp_path):
    """A .zst shard was one `binary` drop, a JSON array one `malformed_json`, a CSV one document, exit 0."""
    rng = np.random.default_rng(0)
    recs = [{"text": en_text(rng, 50)} for _ in range(4)]
    (tmp_path / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cases = {"part-0.jsonl.zst": b"\x28\xb5\x2f\xfd" + bytes(40), "dump.json": json.dumps(recs).encode(),
             "pretty.json": json.dumps(recs[0], indent=1).encode(), "table.csv": b"text,url\nhello,u\n",
             "bom.json": b"\xef\xbb\xbf" + json.dumps(recs).encode(),  # a Windows tool's array, byte-order mark first
             # compressed archives and tables: a whole .tar.gz was one `binary` drop, a .csv.gz one document
             "docs.tar.gz": gzip.compress(b"docs/a.txt" + bytes(502)), "table.csv.gz": gzip.compress(b"text\nhi\n")}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=re.escape(name) + r" \((decompress|a JSON array|a pretty-p|conv|unp)"):
            run([tmp_path / "ok.jsonl", tmp_path / name], tmp_path / f"out-{name}", PipelineConfig(workers=1),
                progress=False)
        assert not (tmp_path / f"out-{name}").exists()


@pytest.mark.parametrize("name", ["part-00000-c000.json.deflate", "a.jsonl.lzma", "b.txt.Z", "c.jsonl.lzo"])
def test_a_shard_in_a_compression_this_reads_not_is_refused_not_one_drop(tmp_path, name):
    """Spark's `compression deflate` part files (Hadoop's DeflateCodec: zlib), .lzma, .Z and .lzo were read as one
    text document: a `binary` drop for the file, its records in no count, as a .zst shard was."""
    import zlib

    from data.sources import discover

    recs = b"".join(json.dumps({"text": f"record {i}"}).encode() + b"\n" for i in range(20))
    (tmp_path / name).write_bytes(zlib.compress(recs))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name} (decompress it")):
        discover([tmp_path])


def test_a_json_lines_file_of_arrays_is_refused_with_the_conversion_that_fits_it(tmp_path):
    """Every array was refused with jq -c '.[]', right for one big array of records, wrong for a file of one array per
    line (a table's rows): it split each row into its cells, one a line, none of them a record."""
    import shutil
    import subprocess

    from data.sources import discover

    recs = [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}]
    cases = {"big.json": (json.dumps(recs), "jq -c '.[]' IN"),
             "pretty.json": (json.dumps(recs, indent=1), "jq -c '.[]' IN"),
             "texts.json": (json.dumps(["one", "two"]), "jq -c '.[] | {text: .}' IN"),
             "table.json": (json.dumps([["a", "some text"], ["b", "more"]]), "jq -c '.[] | {text: .[1]}' IN"),
             "rows.jsonl": ('["a", "some text", 3]\n["b", "more text", 4]\n', "jq -c '{text: .[1]}' IN"),
             "batches.jsonl": (f"{json.dumps(recs)}\n{json.dumps(recs)}\n", "jq -c '.[]' IN"),
             # the text elsewhere than .[1] (the rows' longest string), and rows with nothing in them
             "last.jsonl": ('[7, "a", "the text of a row"]\n[8, "b", "more text"]\n', "jq -c '{text: .[2]}' IN"),
             "first.json": (json.dumps([["the text of a row", "a", 7]]), "jq -c '.[] | {text: .[0]}' IN"),
             "empty.json": ("[[], []]", "jq -c '.[]' IN")}
    for name, (raw, fix) in cases.items():
        (tmp_path / name).write_text(raw)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name} (") + r"[^)]*JSON array.*" + re.escape(fix)):
            discover([tmp_path / name])
    if shutil.which("jq"):  # the advised command makes records of the rows' texts
        for name in ("last.jsonl", "first.json"):
            out = tmp_path / f"{name}.out.jsonl"
            subprocess.run(["bash", "-c", f"{cases[name][1].replace('IN', str(tmp_path / name))} > {out}"], check=True)
            assert [json.loads(line)["text"] for line in out.read_text().splitlines()][0] == "the text of a row"


def test_the_conversion_of_a_compressed_file_reads_it_through_its_decompressor(tmp_path):
    """The advice for a .gz / .bz2 / .xz file that is not JSON Lines read IN directly (jq -c '.[]' IN > OUT.jsonl),
    which jq, tr and iconv cannot do: it reads the file through its decompressor, and the command works."""
    import bz2
    import gzip
    import lzma
    import shutil
    import subprocess

    from data.sources import discover

    recs = [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}]
    raw = {"array": json.dumps(recs).encode(), "cr": "".join(json.dumps(r) + "\r" for r in recs).encode(),
           "utf16": "".join(json.dumps(r) + "\n" for r in recs).encode("utf-16"),
           "pretty": "\n".join(json.dumps(r, indent=1) for r in recs).encode()}
    fixes = {"array": "jq -c '.[]' > OUT.jsonl", "cr": "tr '\\r' '\\n' > OUT.jsonl",
             "utf16": "iconv -f UTF-16LE -t UTF-8 > OUT.jsonl", "pretty": "jq -c . > OUT.jsonl"}
    # (an upper-case suffix is decompressed when read, as _opener lower-cases it)
    for suffix, (compress, dec) in {".gz": (gzip.compress, "gzip -dc"), ".bz2": (bz2.compress, "bzip2 -dc"),
                                    ".xz": (lzma.compress, "xz -dc"), ".GZ": (gzip.compress, "gzip -dc")}.items():
        for what, data in raw.items():
            path = tmp_path / f"{what}.jsonl{suffix}"
            path.write_bytes(compress(data))
            with pytest.raises(ValueError) as e:
                discover([path])
            cmd = re.search(r"e\.g\. (.*?> OUT\.jsonl)", str(e.value)).group(1)
            assert cmd == f"{dec} IN | {fixes[what]}", str(e.value)
            if all(shutil.which(tool) for tool in (dec.split()[0], cmd.split("| ")[1].split()[0])):
                out = tmp_path / f"{what}{suffix}.jsonl"
                subprocess.run(["bash", "-c", cmd.replace("IN", str(path)).replace("OUT.jsonl", str(out))],
                               check=True)
                assert discover([out]) == [(str(out),)]
                assert [json.loads(line) for line in out.read_text("utf-8-sig").splitlines()] == recs  # (BOM: read)


def test_hooks_that_cannot_reach_worker_processes_are_named():
    with pytest.raises(ValueError, match="PipelineConfig.augment cannot be sent to worker processes"):
        PipelineConfig(augment=lambda d: d, workers=2)
    assert PipelineConfig(augment=lambda d: d, workers=1).workers == 1


def test_a_settings_group_or_worker_count_of_the_wrong_type_is_named_before_any_work():
    """dedup=None (as augment=None switches augmenting off) failed at the first document, the manifest written,
    label=None only after passes 1 and 2 had run over every shard, as "'NoneType' object has no attribute ...";
    workers=2.5 failed starting the pool, after the manifest was written, naming no field; workers=True ran as 1."""
    for k in ("source", "normalize", "langid", "quality", "dedup", "label"):
        with pytest.raises(ValueError, match=rf"PipelineConfig\.{k}=None must be a \w+Config"):
            PipelineConfig(**{k: None})
    with pytest.raises(ValueError, match=r"PipelineConfig\.dedup=.*DedupConfig\(exact=False, near=False\)"):
        PipelineConfig(dedup=None)
    with pytest.raises(ValueError, match=r"PipelineConfig\.label=.*labelers=\(\)"):
        PipelineConfig(label=None)
    for bad in (2.5, True, "2", None):
        with pytest.raises(ValueError, match=r"PipelineConfig\.workers=.* must be an int"):
            PipelineConfig(workers=bad)
    with pytest.raises(ValueError, match=r"PipelineConfig\.workers=0 must be >= 1"):  # 0 would run as 1, silently
        PipelineConfig(workers=0)
    assert PipelineConfig(workers=np.int64(3)).workers == 3  # a numpy count stays accepted, as a plain int
    assert type(PipelineConfig(workers=np.int64(3)).workers) is int


@dataclasses.dataclass(frozen=True)
class DropMentions:
    """A custom stage: drops documents that mention `word`."""

    word: str
    name: str = "mentions"

    def __call__(self, doc):
        return doc, ("mentions_" + self.word if self.word in doc["text"].lower() else None)


def test_custom_stages_compose_and_are_counted(corpus, tmp_path):
    _, inputs = corpus
    base = PipelineConfig(workers=1)
    cfg = dataclasses.replace(base, filters=(*base.default_filters(), DropMentions("bridge")))
    run(inputs, tmp_path / "out", cfg, progress=False)
    rows = report_mod.funnel(tmp_path / "out")
    assert [s.name for _, s in rows][1:5] == ["normalize", "quality", "langid", "mentions"]
    custom = rows[4][1]
    assert custom.dropped["mentions_bridge"] > 0
    assert report_mod.reconcile(rows) == []
    assert not any("bridge" in d["text"].lower() for d in all_docs(tmp_path / "out" / "augmented"))


def test_the_labelled_tier_scores_quality_under_the_quality_filter_that_ran(tmp_path):
    """A custom QualityFilter in `filters` checked its own limits, but the labelled tier scored the documents under
    PipelineConfig.quality's (0.986 here, where the filter that ran gives them 0.959)."""
    from data.filters import QualityConfig, analyze
    from data.label import quality_score
    from data.stages import LanguageFilter, Normalize, QualityFilter

    q = QualityConfig(max_symbol_ratio=0.1, max_digit_ratio=0.05, max_dup_lines=0.1, top_ngram_max=((2, 0.05),),
                      dup_ngram_max=((5, 0.1),))
    cfg = PipelineConfig(workers=1, filters=(Normalize(), QualityFilter(q), LanguageFilter()))
    rng = np.random.default_rng(0)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"{en_text(rng, 120)}\nIn 2024 the rate rose 3.{i}% "
                                                                   f"to ${i + 1},250 (see #{i})."}) + "\n"
                                               for i in range(4)))
    run([str(tmp_path / "in.jsonl")], tmp_path / "out", cfg, progress=False)
    docs = all_docs(tmp_path / "out" / "labeled")
    assert len(docs) == 4
    for d in docs:
        want = quality_score(analyze(d["text"], q), q)
        assert d["quality"] == pytest.approx(want, abs=1e-3)
        assert abs(want - quality_score(analyze(d["text"]))) > 0.02  # the default limits score them apart


@dataclasses.dataclass(frozen=True)
class DropOdd:
    """A custom labeler that drops every other document."""

    name: str = "drop_odd"

    def __call__(self, doc):
        return doc, ("odd" if int(doc["id"].rsplit(":", 1)[1]) % 2 else None)


def small_corpus(root, n=4):
    rng = np.random.default_rng(0)
    path = root / "in.jsonl"
    path.write_text("".join(json.dumps({"text": en_text(rng, 120)}) + "\n" for _ in range(n)))
    return [str(path)]


def test_a_labeler_may_drop_documents_and_they_are_counted(tmp_path):
    from data.stages import Label

    out = tmp_path / "out"
    run(small_corpus(tmp_path), out, PipelineConfig(workers=1, labelers=(Label(), DropOdd())), progress=False)
    rows = report_mod.funnel(out)
    assert report_mod.reconcile(rows) == []
    drop = next(s for _, s in rows if s.name == "drop_odd")
    assert (drop.docs_in, drop.docs_out, dict(drop.dropped)) == (4, 2, {"odd": 2})
    assert sorted(d["id"][-1] for d in all_docs(out / "augmented")) == ["2", "4"]  # lines 2 and 4 (even)
    # a stage that returns no document and no reason would lose it uncounted: refused
    with pytest.raises(TypeError, match="stage 'lost' returned None"):
        run(small_corpus(tmp_path), tmp_path / "out2", PipelineConfig(workers=1, labelers=(Lost(),)),
            progress=False)


class Lost:
    name = "lost"

    def __call__(self, doc):
        return None


class Raises:
    name = "raises"

    def __call__(self, doc):
        return doc["meta"], None  # a record without `meta`: KeyError('meta')


class FalseReason:
    name = "flag"

    def __call__(self, doc):
        return doc, False  # "not dropped", as a flag would say it


class KeepsText:
    name = "keeps_text"

    def __call__(self, doc):
        return doc["text"], None


class Unnamed:
    name = None

    def __call__(self, doc):
        return doc, None


def test_a_custom_stage_that_raises_or_returns_a_wrong_type_is_named(tmp_path):
    """A stage's own KeyError('meta') named neither the stage nor the record; (doc, False) dropped every document for
    the reason False (counted 'false', logged false: `--drops false` found none of them); a kept str failed as
    'string indices must be integers'; a stage named None ran the whole corpus, then the report failed formatting
    its name."""
    from data.stages import StageStats, run_stages

    doc = {"text": "Some text.", "id": "in.jsonl:3"}
    with pytest.raises(KeyError, match="meta") as e:  # the stage's own error, with where it happened
        run_stages(dict(doc), [Raises()], [StageStats("raises")])
    assert "in stage 'raises' on record 'in.jsonl:3'" in "\n".join(e.value.__notes__)
    with pytest.raises(TypeError, match="stage 'flag' returned the reason False: it must be None"):
        run(small_corpus(tmp_path), tmp_path / "out", PipelineConfig(workers=1, labelers=(FalseReason(),)),
            progress=False)
    with pytest.raises(TypeError, match="stage 'keeps_text' kept 'Some text.', not a document dict"):
        run_stages(dict(doc), [KeepsText()], [StageStats("keeps_text")])

    class EmptyReason:  # '' is no reason either: counted and logged as '', which no `--drops` names
        name = "empty_reason"

        def __call__(self, doc):
            return doc, ""

    with pytest.raises(TypeError, match="stage 'empty_reason' returned the reason '': it must be None"):
        run_stages(dict(doc), [EmptyReason()], [StageStats("empty_reason")])
    with pytest.raises(ValueError, match="PipelineConfig.filters: stage .* has name=None"):
        PipelineConfig(workers=1, filters=(Unnamed(),))


def test_the_report_gives_the_language_mix_and_tags_of_the_final_tier(tmp_path):
    """The 'final corpus' line counted the label stage's documents: those a later labeler dropped stayed in it (en 4,
    zh 2 here, for en 2, zh 1 kept), and its bytes were the text before the glossary appended definitions."""
    import collections

    from data.stages import Label, nbytes

    rng = np.random.default_rng(0)
    code = "import os\nfrom x import y\nclass A:\n    def f(self):\n        return self.x\n"
    texts = [en_text(rng, 120), zh_text(rng, 300), zh_text(rng, 300), code + en_text(rng, 80) + " iterator generator.",
             en_text(rng, 120), en_text(rng, 120)]  # DropOdd keeps lines 2, 4 and 6: zh, en (glossed), en
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    out = tmp_path / "out"
    run([str(path)], out, PipelineConfig(workers=1, labelers=(Label(), DropOdd())), progress=False)
    final = all_docs(out / "augmented")
    assert sorted(d["lang"] for d in final) == ["en", "en", "zh"] and any(d.get("augmented") for d in final)
    mix = collections.Counter()
    for d in final:
        mix[f"lang:{d['lang']}"] += 1
        mix[f"lang_bytes:{d['lang']}"] += nbytes(d)
    tags = collections.Counter(t for d in final for t in d["domains"])
    lines = report_mod.report(out).splitlines()
    assert "language mix of the final corpus: " + report_mod._mix(mix, "lang") in lines
    assert "zh 1 doc (33.3%" in report_mod._mix(mix, "lang")  # "zh 1 docs"
    (tag_line,) = [ln.removeprefix("domain tags: ") for ln in lines if ln.startswith("domain tags: ")]
    assert {t: int(n) for t, n in (p.rsplit(" ", 1) for p in tag_line.split(", "))} == tags and tags
    # a run from before the last stage counted languages: the label stage's counts, named as what they are
    stats = json.loads((out / "augmented" / "stats.json").read_text())
    stats["stages"][-1]["counters"] = {}
    (out / "augmented" / "stats.json").write_text(json.dumps(stats))
    labelled = "language mix labelled (the label stage's documents, before later stages): en 4 docs"
    assert labelled in report_mod.report(out)


def test_the_report_gives_the_final_language_mix_without_a_label_stage(tmp_path):
    """labelers=() (no labelling stage): the augment stage counted the final tier's languages, but the report printed
    the line only when a stage was named 'label', so the final corpus's mix was missing."""
    rng = np.random.default_rng(0)
    path = tmp_path / "in.jsonl"
    texts = [en_text(rng, 120), en_text(rng, 120), zh_text(rng, 300)]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    out = tmp_path / "out"
    run([str(path)], out, PipelineConfig(workers=1, labelers=()), progress=False)
    assert sorted(d["lang"] for d in all_docs(out / "augmented")) == ["en", "en", "zh"]
    text = report_mod.report(out)
    assert "language mix of the final corpus: en 2 docs (66.7%" in text and ", zh 1 doc (33.3%" in text
    assert "domain tags" not in text  # no stage tagged domains: no line claiming there are none


class PlainStage:
    """A custom stage that is a plain class: its default repr holds a memory address."""

    name = "plain"

    def __call__(self, doc):
        return doc, None


def test_fingerprint_of_plain_class_stages_is_stable(tmp_path):
    base = PipelineConfig(workers=1)
    plain = lambda: dataclasses.replace(base, filters=(*base.default_filters(), PlainStage()),  # noqa: E731
                                        labelers=(PlainStage(),))
    assert plain().fingerprint() == plain().fingerprint()  # two instances, two addresses, as in two processes
    assert plain().fingerprint() != base.fingerprint()
    assert dataclasses.replace(base, workers=3).fingerprint() == base.fingerprint()  # workers do not shape the output
    # a plain function as the augmentation hook is named the same way (fingerprinting it used to raise)
    make = lambda: dataclasses.replace(plain(), augment=lambda doc: doc)  # noqa: E731
    assert make().fingerprint() == make().fingerprint() != plain().fingerprint()
    # a resumed run with fresh instances is the same run
    inputs = small_corpus(tmp_path)
    run(inputs, tmp_path / "out", make(), progress=False)
    run(inputs, tmp_path / "out", make(), progress=False)


def test_missing_input_and_unfinished_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run([tmp_path / "nope.jsonl"], tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="holds no cleaning run"):  # a typo said 'unfinished: re-run'
        report_mod.funnel(tmp_path)
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="unfinished"):
        report_mod.funnel(tmp_path / "started")
    with pytest.raises(ValueError, match="workers"):
        PipelineConfig(workers=0)
    # the command lines: one line naming the problem, not a traceback
    from data import pipeline

    with pytest.raises(SystemExit, match=r"^error: input .*nope.jsonl does not exist"):
        pipeline.main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="^error: .* holds no cleaning run"):
        report_mod.main([str(tmp_path / "typo")])


def test_a_text_field_clash_is_refused_in_any_input(tmp_path):
    """With --text-field content, a record's own "text" field is replaced by the document's text: it was refused only
    in the first JSON Lines / Parquet input, so a later file's titles (JSONL or Parquet) were lost in silence."""
    from data.sources import SourceConfig, check_text_field, discover

    cfg = SourceConfig(text_field="content")
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "plain"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "x"}) + "\n" + json.dumps({"content": "y", "text": "T"}))
    pq.write_table(pa.table({"content": ["z"], "text": ["a title"]}), tmp_path / "c.parquet")
    check_text_field(discover([tmp_path / "a.jsonl"], cfg), cfg)  # (no clash: accepted)
    for name, what in (("b.jsonl", r"1 of the first 2 records"), ("c.parquet", r"the first record")):
        with pytest.raises(ValueError, match=rf"text_field='content': {what} of .*{name} also ha"):
            check_text_field(discover([tmp_path / "a.jsonl", tmp_path / name], cfg), cfg)


def test_the_text_field_check_reads_a_last_line_of_exactly_max_doc_bytes(tmp_path):
    """A record of max_doc_bytes is not too large (only larger ones are): the field check reads it also as a file's
    last line without a newline, so a wrong text_field is named there too (one byte more is passed over unread)."""
    from data.sources import SourceConfig, check_text_field, discover

    line = json.dumps({"body": "x" * 100})
    (tmp_path / "a.jsonl").write_text(line)  # no newline at the end
    cfg = SourceConfig(max_doc_bytes=len(line.encode()))
    with pytest.raises(ValueError, match=r"text_field='text' is not in the first record of .*a.jsonl"):
        check_text_field(discover([tmp_path / "a.jsonl"], cfg), cfg)
    small = SourceConfig(max_doc_bytes=len(line.encode()) - 1)
    check_text_field(discover([tmp_path / "a.jsonl"], small), small)  # too large: unread here, dropped when read


def test_the_text_field_check_reads_a_crlf_line_of_exactly_max_doc_bytes(tmp_path):
    """A record of max_doc_bytes ended by CR LF is read (the line end is no part of its size, `_sized`), so the field
    check reads it too: it passed over it as too large (a readline of max_doc_bytes + 1 stopped at the CR) and the
    wrong text_field went unnamed."""
    from data.sources import SourceConfig, check_text_field, discover

    line = json.dumps({"body": "x" * 100})
    (tmp_path / "a.jsonl").write_bytes(line.encode() + b"\r\n")
    cfg = SourceConfig(max_doc_bytes=len(line.encode()))
    with pytest.raises(ValueError, match=r"text_field='text' is not in the first record of .*a.jsonl"):
        check_text_field(discover([tmp_path / "a.jsonl"], cfg), cfg)
    small = SourceConfig(max_doc_bytes=len(line.encode()) - 1)
    check_text_field(discover([tmp_path / "a.jsonl"], small), small)  # too large: unread here, dropped when read


def test_the_cli_reads_another_text_field(tmp_path, capsys):
    """`--text-field content`: a JSONL export whose text is under another name (all of it dropped as missing_text,
    with exit 0, before there was a flag)."""
    from data import pipeline

    rng = np.random.default_rng(0)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"content": en_text(rng, 300)}) + "\n" for _ in range(3)))
    pipeline.main([str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--workers", "1", "--text-field",
                   "content"])
    ingest = next(s for _, s in report_mod.funnel(tmp_path / "out") if s.name == "ingest")
    assert ingest.dropped == {} and ingest.docs_out == 3, ingest
    # a record's own "text" field (here a title) was silently replaced by the document's text: refused up front
    (tmp_path / "titled.jsonl").write_text(json.dumps({"content": en_text(rng, 300), "text": "A title"}) + "\n")
    with pytest.raises(SystemExit, match=r"text_field='content': the first record of .*titled.jsonl also "
                                         r"has a 'text' field"):  # it read "1 of the first 1 records ... have"
        pipeline.main([str(tmp_path / "titled.jsonl"), "--out", str(tmp_path / "out3"), "--text-field", "content"])
    # without the flag every record would drop as missing_text: refused before any work, naming the fields there
    # are, and the directory is not claimed (the corrected command then ran into "different settings")
    with pytest.raises(SystemExit, match=r"text_field='text' is in none of the first 3 records of .*in.jsonl "
                                         r"\(they have \['content'\]\); .*--text-field"):
        pipeline.main([str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out2"), "--workers", "1"])
    assert not (tmp_path / "out2" / "manifest.json").exists()
    pipeline.main([str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out2"), "--workers", "1", "--text-field",
                   "content"])
    (tmp_path / "one.jsonl").write_text(json.dumps({"content": en_text(rng, 300)}) + "\n")
    with pytest.raises(SystemExit, match=r"text_field='text' is not in the first record of .*one.jsonl "
                                         r"\(it has \['content'\]\)"):  # "in none of the first 1 records"
        pipeline.main([str(tmp_path / "one.jsonl"), "--out", str(tmp_path / "out8"), "--workers", "1"])
    # nothing readable at all: exit 1 with the reasons, not "0 of 2 records kept" and exit 0
    (tmp_path / "bad.jsonl").write_text('{"text": "unterminated\n\n')
    with pytest.raises(SystemExit, match=r"^error: no record was read \(empty 1, malformed_json 1\)"):
        pipeline.main([str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "out4"), "--workers", "1"])
    # records read but every one dropped (too short here): exit 1, not "0 of 2 records kept" and exit 0
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": en_text(rng, 5)}) + "\n" for _ in range(2)))
    with pytest.raises(SystemExit, match=r"^error: all 2 records read were dropped .*the tiers are empty"):
        pipeline.main([str(tmp_path / "short.jsonl"), "--out", str(tmp_path / "out5"), "--workers", "1"])
    (tmp_path / "short1.jsonl").write_text(json.dumps({"text": en_text(rng, 5)}) + "\n")  # "all 1 records ... were"
    with pytest.raises(SystemExit, match=r"^error: the 1 record read was dropped .*the tiers are empty"):
        pipeline.main([str(tmp_path / "short1.jsonl"), "--out", str(tmp_path / "out7"), "--workers", "1"])
    # a run-time check of a flag's value names the flag too, not only PipelineConfig.dedup_against
    with pytest.raises(SystemExit, match=r"^error: argument --dedup-against: PipelineConfig.dedup_against=.* is not "
                                         r"a finished cleaning run"):
        pipeline.main([str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out6"), "--text-field", "content",
                       "--dedup-against", str(tmp_path / "nowhere")])
    # settings name the flag they came from, not the config field; an --out that is a file is named
    for bad, says in ((["--workers", "0"], "argument --workers: must be an integer >= 1, got 0"),
                      (["--near-dup-threshold", "80"], "argument --near-dup-threshold: DedupConfig.threshold"),
                      (["--keep-langs", "en,xx"], "argument --keep-langs: LangIDConfig.keep"),
                      (["--out", str(tmp_path / "in.jsonl")], "argument --out: .* is a file")):
        with pytest.raises(SystemExit):
            pipeline.main([str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out3"), *bad])
        assert re.search(says, capsys.readouterr().err), bad


def test_embedded_stdlib_corpus_goes_through_the_same_pipeline(tmp_path, capsys):
    import threading

    from data.corpus import default_corpus, stdlib_documents
    from data.run_lock import RunLock

    # a cache another process is building: waited for (the pipeline's lock on its tiers refused a second builder)
    got = []
    with RunLock(tmp_path, "another builder"):
        builder = threading.Thread(target=lambda: got.append(default_corpus(tmp_path, num_shards=2, max_files=6,
                                                                            workers=1, progress=False)))
        builder.start()
        builder.join(timeout=1.0)
        assert builder.is_alive() and not (tmp_path / "input").exists()  # waiting, nothing written
    builder.join(timeout=300)
    err = capsys.readouterr().err
    assert "waiting for" in err and "another builder" in err  # the holder named
    tier = got[0]
    rows = report_mod.funnel(os.path.dirname(tier))
    assert report_mod.reconcile(rows) == []
    assert rows[0][1].docs_in == len(list(stdlib_documents(6))) >= 6  # each module's source (+ docstrings)
    docs = all_docs(tier)
    assert docs and {d["kind"] for d in docs} <= {"code", "docs"} and all(d["lang"] == "en" for d in docs)
    # a second call reuses the finished run
    assert default_corpus(tmp_path, num_shards=2, max_files=6, workers=1, progress=False) == tier


def test_the_embedded_corpus_names_an_unknown_tier_before_any_work(tmp_path):
    """tier='augumented' cleaned the whole corpus, then returned a directory no run writes (the loader failed on it
    later, naming no tier)."""
    from data.corpus import default_corpus

    with pytest.raises(ValueError, match=r"default_corpus: tier='augumented' .*'augmented'"):
        default_corpus(tmp_path / "run", max_files=2, workers=1, progress=False, tier="augumented")
    assert not (tmp_path / "run").exists()


def test_parquet_records_of_the_wrong_type_or_a_corrupt_file_are_counted(tmp_path):
    from data.sources import SourceConfig, read_records

    pq.write_table(pa.table({"text": pa.array([1, 2, 3], pa.int64())}), tmp_path / "ints.parquet")
    assert [r for _, r, _ in read_records([str(tmp_path / "ints.parquet")])] == ["bad_text_type"] * 3
    # max_doc_bytes is the largest text kept (inclusive, as for a JSON Lines line or a text file)
    pq.write_table(pa.table({"text": ["é" * 100, "é" * 100 + "x"]}), tmp_path / "sizes.parquet")
    got = [(r, n) for _, r, n in read_records([str(tmp_path / "sizes.parquet")], SourceConfig(max_doc_bytes=200))]
    assert got == [(None, 200), ("too_large", 201)]
    for k, reason in ((199, None), (200, None), (201, "too_large")):  # a plain text file of that size too
        (tmp_path / "doc.txt").write_text("é" + "x" * (k - 2))
        assert [(r, n) for _, r, n in read_records([str(tmp_path / "doc.txt")], SourceConfig(max_doc_bytes=200))] == [
            (reason, k)]
    pq.write_table(pa.table({"text": [en_text(np.random.default_rng(i), 40) for i in range(400)]}),
                   tmp_path / "ok.parquet", row_group_size=100)
    data = bytearray((tmp_path / "ok.parquet").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # a corrupt page in the middle
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    reasons = [r for _, r, _ in read_records([str(tmp_path / "bad.parquet")])]
    assert reasons == ["unreadable_file"]  # its first batch of rows crosses the damage: nothing read
    data = bytearray((tmp_path / "ok.parquet").read_bytes())
    data[len(data) * 7 // 8: len(data) * 7 // 8 + 64] = b"\xff" * 64  # in the last row group
    (tmp_path / "late.parquet").write_bytes(bytes(data))
    got = list(read_records([str(tmp_path / "late.parquet")], with_ids=True))
    assert [r for _, r, _, _ in got[:-1]] == [None] * (len(got) - 1) and 0 < len(got) - 1 < 400
    assert got[-1][1:] == ("unreadable_rest", 0, f"{tmp_path / 'late.parquet'}:{len(got) - 1}")  # first row not read
    # a file without the text column: every row is a counted drop (it was one record, whatever its rows), its bytes
    # shared out, each with its row as the id (7 rows: the 3-row file's size split evenly, hiding a lost remainder)
    pq.write_table(pa.table({"content": list("abcdefg")}), tmp_path / "other.parquet")
    got = list(read_records([str(tmp_path / "other.parquet")], with_ids=True))
    assert [(r, i) for _, r, _, i in got] == [("missing_text", f"{tmp_path / 'other.parquet'}:{k}") for k in range(7)]
    sizes = [n for _, _, n, _ in got]
    assert sum(sizes) == os.path.getsize(tmp_path / "other.parquet") and max(sizes) - min(sizes) <= 1


def test_a_parquet_file_is_read_a_batch_at_a_time_not_its_row_group_whole(tmp_path):
    from data.sources import read_records

    # one row group of incompressible text (pyarrow writes up to 1Mi rows to a group, so a file of ~2 kB documents
    # is often one): pyarrow's default pre_buffer read the group's whole column chunks into memory first, so the
    # Arrow memory held grew with the file (8 / 16 MB files: 13 / 21 MB); read a batch at a time, it does not
    rng = np.random.default_rng(0)
    held = []
    for rows in (2048, 4096):
        chars = rng.integers(97, 123, (rows, 4096), dtype=np.uint8)
        pq.write_table(pa.table({"text": [r.tobytes().decode() for r in chars]}), tmp_path / f"{rows}.parquet",
                       compression="none")
        most = n = 0
        for _ in read_records([str(tmp_path / f"{rows}.parquet")]):
            most, n = max(most, pa.total_allocated_bytes()), n + 1
        assert n == rows
        held.append(most)
    assert held[1] < 1.25 * held[0], f"Arrow memory held: {held[0] / 2**20:.1f} MB for an 8 MB file, " \
        f"{held[1] / 2**20:.1f} MB for a 16 MB one"


def test_empty_stage_tiers_exact_copies_of_near_dups_and_nested_parquet_metadata(tmp_path):
    import datetime

    from data.sources import read_records

    rng = np.random.default_rng(0)
    a = en_text(rng, 300)
    words = a.split()
    words[len(words) // 2] = "zebra"  # one word changed: a near duplicate of a
    b = " ".join(words)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in (a, b, b, en_text(rng, 300))))
    for kw in ({"filters": ()}, {"labelers": ()}):  # a tier without stages used to crash pass 2 (and resume)
        cfg = dataclasses.replace(PipelineConfig(workers=1), **kw)
        out = tmp_path / f"out_{next(iter(kw))}"
        run([str(path)], out, cfg, progress=False)
        run([str(path)], out, cfg, progress=False)  # the resume path reads the same counts
        rows = report_mod.funnel(out)
        assert report_mod.reconcile(rows) == []
        dedup = next(s for _, s in rows if s.name == "dedup")
        # b is a near duplicate of a; its byte-identical copy is an exact duplicate (it was reported near_dup) of the
        # survivor a, not of the dropped b, as similar to it as b (125 of 128 MinHash values agree)
        assert dedup.dropped == {"near_dup": 1, "exact_dup": 1}, dedup.dropped
        assert json.loads((out / "cleaned" / "dedup.json").read_text())["drops"] == {
            "0": {"1": ["near_dup", "0:0", 0.9766], "2": ["exact_dup", "0:0", 0.9766]}}
    # each kind of dedup alone: without exact keys the copy is a near duplicate too; without MinHash b is kept
    for dedup_cfg, want in ((DedupConfig(exact=False), {"near_dup": 2}), (DedupConfig(near=False), {"exact_dup": 1})):
        out = tmp_path / f"out_exact{dedup_cfg.exact}"
        run([str(path)], out, PipelineConfig(workers=1, dedup=dedup_cfg), progress=False)
        assert next(s for _, s in report_mod.funnel(out) if s.name == "dedup").dropped == want, dedup_cfg
    # a representative is named `shard:index`: a's copy in the second shard duplicates the first shard's record 1
    two = [tmp_path / "pair-0.jsonl", tmp_path / "pair-1.jsonl"]
    two[0].write_text("".join(json.dumps({"text": t}) + "\n" for t in (en_text(rng, 300), a)))
    two[1].write_text(json.dumps({"text": a}) + "\n")
    run(list(map(str, two)), tmp_path / "out_two", PipelineConfig(workers=1), progress=False)
    assert json.loads((tmp_path / "out_two" / "cleaned" / "dedup.json").read_text())["drops"] == {
        "0": {}, "1": {"0": ["exact_dup", "0:1"]}}
    # Parquet metadata of any type and depth is kept as JSON (a list of timestamps crashed the run)
    pq.write_table(pa.table({"text": [a], "when": [[datetime.datetime(2026, 1, 2)]], "raw": [b"\x00\xff"]}),
                   tmp_path / "m.parquet")
    (doc, reason, _), = read_records([str(tmp_path / "m.parquet")])
    assert reason is None and json.loads(json.dumps(doc))["when"] == ["2026-01-02 00:00:00"] and doc["raw"] == "00ff"
    # default ids carry the path: en/part-0.jsonl and zh/part-0.jsonl do not collide
    for lang in ("en", "zh"):
        (tmp_path / lang).mkdir()
        (tmp_path / lang / "part-0.jsonl").write_text(json.dumps({"text": a}) + "\n")
    ids = {d["id"] for lang in ("en", "zh") for d, _, _ in read_records([str(tmp_path / lang / "part-0.jsonl")])}
    assert len(ids) == 2


def test_exporters_file_layouts_are_read_record_by_record(tmp_path):
    """Compressed JSON Lines under every common suffix, Spark's side files, a damaged stream, a byte-order mark and
    metadata with a lone surrogate: each record is read or counted, none merged, crashed on or silently lost."""
    import bz2
    import gzip
    import lzma

    from data.shards import encode_doc
    from data.sources import discover, read_records

    rng = np.random.default_rng(0)
    texts = [en_text(rng, 20) for _ in range(5)]
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    src = tmp_path / "export"
    src.mkdir()
    for name, opener in (("a.ndjson.gz", gzip.open), ("b.json", open), ("c.jsonl.bz2", bz2.open),
                         ("d.jsonl.xz", lzma.open)):
        with opener(src / name, "wt") as f:
            f.write(lines)
    with gzip.open(src / "notes.txt.gz", "wt") as f:
        f.write(texts[0])
    (src / "_SUCCESS").write_text("")
    (src / ".b.json.crc").write_bytes(b"\x00\x01crc")
    (src / "_temporary" / "0").mkdir(parents=True)
    (src / "_temporary" / "0" / "part-0.json").write_text(lines)  # a Spark job's uncommitted output
    (src / "_en").mkdir()  # a user's folder whose name starts with _ is data
    (src / "_en" / "e.jsonl").write_text(lines)
    shards = discover([src])
    assert sorted(os.path.relpath(f, src) for s in shards for f in s) == [
        "_en/e.jsonl", "a.ndjson.gz", "b.json", "c.jsonl.bz2", "d.jsonl.xz", "notes.txt.gz"]
    for shard in shards:
        docs = [d for d, r, _ in read_records(shard) if r is None]
        assert [d["text"] for d in docs] == (texts[:1] if shard[0].endswith("txt.gz") else texts), shard
    # a damaged deflate stream ends its file with one counted drop (zlib.error crashed the run)
    raw = bytearray(gzip.compress(lines.encode() * 50))
    raw[200:216] = bytes(b ^ 0xFF for b in raw[200:216])
    (tmp_path / "bad.jsonl.gz").write_bytes(bytes(raw))
    reasons = [r for _, r, _ in read_records([str(tmp_path / "bad.jsonl.gz")])]
    assert reasons == ["unreadable_file"]  # damaged before its first line ends
    # xz's own error (lzma.LZMAError, neither an OSError nor an EOFError) too
    (tmp_path / "bad.jsonl.xz").write_bytes(b"not xz at all" * 10)
    assert [r for _, r, _ in read_records([str(tmp_path / "bad.jsonl.xz")])] == ["unreadable_file"]
    # a truncated file: what was read counts; the rest is one `unreadable_rest` drop at the first line not read,
    # which the report warns of (a download cut in half read as 94 % kept, nothing said)
    (tmp_path / "cut").mkdir()
    whole = gzip.compress(lines.encode() * 20)
    (tmp_path / "cut" / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    got = list(read_records([str(tmp_path / "cut" / "cut.jsonl.gz")], with_ids=True))
    assert [r for _, r, _, _ in got[:-1]] == [None] * (len(got) - 1) and 0 < len(got) - 1 < 20 * len(texts)
    assert got[-1][1:] == ("unreadable_rest", 0, f"{tmp_path / 'cut' / 'cut.jsonl.gz'}:{len(got)}")
    # damaged right after its first line: that line counts, the rest is unreadable_rest from line 2
    one = gzip.compress((json.dumps({"text": texts[0]}) + "\n" + "x" * 400_000).encode())
    (tmp_path / "one.jsonl.gz").write_bytes(one[: len(one) - 200])
    got_one = list(read_records([str(tmp_path / "one.jsonl.gz")], with_ids=True))
    assert [r for _, r, _, _ in got_one] == [None, "unreadable_rest"]
    assert got_one[1][3] == f"{tmp_path / 'one.jsonl.gz'}:2"
    (tmp_path / "cut" / "junk.jsonl.gz").write_bytes(b"not gzip at all" * 10)  # nothing of it readable
    run([tmp_path / "cut"], tmp_path / "out", PipelineConfig(workers=1))
    text = report_mod.report(tmp_path / "out")
    assert ("WARNING: input files not read to their end: 1 read only up to damage or truncation (unreadable_rest); "
            "1 not readable at all (unreadable_file).") in text
    assert "`python -m data.report DIR --drops unreadable_rest` lists them" in text
    # a file not readable at all, alone, is warned of too (pointing at its own reason)
    from data.stages import StageStats

    ingest = StageStats("ingest", docs_in=1)
    ingest.drop("unreadable_file", 0)
    warning = "\n".join(report_mod.unread_warning([("raw", ingest)]))
    assert "WARNING: input files not read to their end: 1 not readable at all (unreadable_file)." in warning
    assert "--drops unreadable_file` lists them" in warning
    assert [d["id"] for d in report_mod.drops(tmp_path / "out", "unreadable_rest")] == [got[-1][3]]
    # a byte-order mark does not cost the first record; a lone surrogate in metadata is replaced, not fatal
    (tmp_path / "bom.jsonl").write_text("\ufeff" + json.dumps({"title": "\ud83d cut", "text": texts[0]},
                                                                ensure_ascii=True) + "\n" + lines)
    out = list(read_records([str(tmp_path / "bom.jsonl")]))
    assert [r for _, r, _ in out] == [None] * 6
    # nor does one mid-file, where concatenating such files puts it (that record was a malformed_json drop)
    (tmp_path / "cat.jsonl").write_bytes((tmp_path / "bom.jsonl").read_bytes() * 2)
    assert [r for _, r, _ in read_records([str(tmp_path / "cat.jsonl")])] == [None] * 12
    # a compressed text file is sized decompressed: over max_doc_bytes it is too_large, never cut to that size and
    # kept (reading max_doc_bytes instead of one byte more passed every test); at exactly the limit it is whole
    from data.sources import SourceConfig

    cfg = SourceConfig(max_doc_bytes=1000)
    for size in (1500, 1000):
        with gzip.open(tmp_path / f"t{size}.txt.gz", "wt") as f:
            f.write(("word " * 400)[:size])
        (doc, reason, n), = read_records([str(tmp_path / f"t{size}.txt.gz")], cfg)
        assert (reason, n) == (("too_large", 1500) if size > 1000 else (None, 1000))
        assert size > 1000 or len(doc["text"].encode()) == 1000
    # a JSON Lines record at exactly the limit is whole too (its line end not counted), the last line without one too
    at, over = json.dumps({"text": "w" * 988}), json.dumps({"text": "w" * 989})  # 1000 and 1001 bytes
    (tmp_path / "edge.jsonl").write_text(f"{at}\n{over}\n{at}")
    assert [r for _, r, _ in read_records([str(tmp_path / "edge.jsonl")], cfg)] == [None, "too_large", None]
    assert out[0][0]["title"] == "\ufffd cut" and encode_doc(out[0][0])


def test_text_files_group_into_shards_of_text_files_per_shard(tmp_path):
    """Plain text files, one document each, are grouped `text_files_per_shard` to a shard in sorted order (a group
    one file larger passed); a JSON Lines file is a shard of its own."""
    from data.sources import SourceConfig, discover

    for i in range(5):
        (tmp_path / f"t{i}.txt").write_text(f"document {i}")
    (tmp_path / "j.jsonl").write_text('{"text": "x"}\n')
    shards = discover([tmp_path], SourceConfig(text_files_per_shard=2))
    names = [tuple(os.path.basename(f) for f in s) for s in shards]
    assert names == [("j.jsonl",), ("t0.txt", "t1.txt"), ("t2.txt", "t3.txt"), ("t4.txt",)]


def test_reject_policy_drops_lone_surrogates_too(tmp_path):
    """invalid_utf8='reject' drops any record with a bad character, a lone surrogate escape in JSON included
    (repairing it under 'reject' passed); 'repair' keeps it with U+FFFD."""
    from data.normalize import NormalizeConfig
    from data.sources import SourceConfig, read_records

    text = en_text(np.random.default_rng(0), 120)
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"text": text + " \ud800 end."}) + "\n" + json.dumps({"text": text}) + "\n")
    reject = [r for _, r, _ in read_records([str(path)], SourceConfig(), NormalizeConfig(invalid_utf8="reject"))]
    assert reject == ["invalid_utf8", None]
    (doc, r, _), _ = read_records([str(path)], SourceConfig(), NormalizeConfig())
    assert r is None and doc["text"] == text + " \ufffd end."
    # the limit is inclusive, as decode's for bad bytes: 1 lone surrogate in 100 characters is 0.01, repaired
    path.write_text("".join(json.dumps({"text": "\ud800" + "x" * k}) + "\n" for k in (99, 98)))
    assert [r for _, r, _ in read_records([str(path)])] == [None, "invalid_utf8"]
    # in a metadata key too: repaired, so the record can be written as UTF-8
    path.write_text(json.dumps({"text": text, "k\ud800": 1}) + "\n")
    (doc, r, _), = read_records([str(path)])
    assert r is None and "k\ufffd" in doc and json.dumps(doc, ensure_ascii=False).encode()


def test_stdlib_documents_are_written_round_robin(tmp_path):
    """Document i goes to shard i mod num_shards, in order, each one JSON line."""
    from data.corpus import stdlib_documents, write_stdlib_jsonl

    docs = list(stdlib_documents(5))
    paths = write_stdlib_jsonl(tmp_path, num_shards=3, max_files=5)
    assert len(paths) == 3 and len(docs) > 3
    for k, p in enumerate(paths):
        assert [json.loads(line) for line in pathlib.Path(p).read_text(encoding="utf-8").splitlines()] == docs[k::3]


def test_a_modules_docs_document_is_its_docstrings_breadth_first():
    """The module docstring, then `module.name: docstring` per class and (async) function, top level first; a module
    that does not parse, or has no docstring, gives no docs document (only its code one)."""
    from data.corpus import _docstrings, stdlib_documents

    src = ('"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n'
           'async def g():\n    """Coroutine doc."""\ndef h():\n    pass\n')
    assert _docstrings(src, "m") == "Module doc.\n\nm.A: Class doc.\n\nm.g: Coroutine doc.\n\nm.f: Method doc."
    assert _docstrings("def h():\n    pass\n", "m") is None and _docstrings("def (:", "m") is None
    docs = list(stdlib_documents(3))
    assert all(d["kind"] == ("docs" if d["id"].endswith("#docs") else "code") for d in docs)
    assert {d["kind"] for d in docs} == {"code", "docs"}


def test_quality_counts_boilerplate_lines_of_kept_documents_only():
    """`boilerplate_lines_removed` counts lines removed from documents that go on; a page dropped as `boilerplate`
    is counted as that drop, its lines not added."""
    from data.stages import QualityFilter, StageStats, run_stages

    rng = np.random.default_rng(0)
    kept = {"text": "Privacy Policy\n" + en_text(rng, 120)}
    dropped = {"text": "Privacy Policy\nTerms of Use\nAccept cookies\n" + en_text(rng, 12)}
    stats = [StageStats("quality")]
    assert run_stages(kept, [QualityFilter()], stats)["signals"]["boilerplate_lines"] == 1
    assert run_stages(dropped, [QualityFilter()], stats) is None
    assert stats[0].dropped == {"boilerplate": 1} and stats[0].counters == {"boilerplate_lines_removed": 1}
    # a drop counts the bytes the stage was given, not those of the text it stripped: in = out + dropped
    assert stats[0].dropped_bytes == {"boilerplate": len(dropped["text"].encode())}
    # the kept signals are stored to 4 places (the labelled score reads them so)
    assert all(v == round(v, 4) for v in run_stages(kept, [QualityFilter()], stats)["signals"].values())


def test_discover_refuses_an_earlier_runs_output_and_broken_links(tmp_path):
    """The run's own --out inside the input is skipped; another run's output there (manifest.json + tiers) was
    refused as '34 files in a format this pipeline would misread', never saying what they were; a broken symbolic
    link was skipped without a count."""
    from data.sources import discover

    (tmp_path / "a.txt").write_text("document a")
    (tmp_path / "clean" / "raw").mkdir(parents=True)
    (tmp_path / "clean" / "manifest.json").write_text("{}")
    (tmp_path / "clean" / "raw" / "shard-00000.stats.json").write_text("{}")
    assert discover([tmp_path], skip=tmp_path / "clean") == [(str(tmp_path / "a.txt"),)]
    with pytest.raises(ValueError, match=r"holds the output of an earlier pipeline run: .*clean .*move it out"):
        discover([tmp_path], skip=tmp_path / "clean2")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match=r"1 inputs under .* broken symbolic links: .*gone.txt"):
        discover([tmp_path], skip=tmp_path / "clean")
    # the input folder as the run's --out (or inside it): every file was skipped, and the run said "no input files"
    for out in (tmp_path, tmp_path.parent):
        with pytest.raises(ValueError, match=r"is the run's output directory .* or inside it; write the run elsewhere"):
            discover([tmp_path], skip=out)


def test_held_out_data_deduplicated_against_the_training_run(tmp_path):
    """Held-out data cleaned in its own run was never compared with the training set (a user study: 2 of 5
    training documents copied into it stayed). With dedup_against the training run's kept documents come first:
    a verbatim and a near copy drop by their own reasons, new documents stay; signatures of other settings refuse."""
    rng = np.random.default_rng(0)
    train = [en_text(rng, 120) for _ in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    cfg = PipelineConfig(workers=1)
    run([tmp_path / "train.jsonl"], tmp_path / "clean", cfg, progress=False)
    near = train[2].split()
    near[5] = near[60] = "changed"
    held = [train[1], " ".join(near), en_text(rng, 120), en_text(rng, 120)]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in held))

    def dedup_stage(out, **kw):
        run([tmp_path / "held.jsonl"], out, dataclasses.replace(cfg, **kw), progress=False)
        return next(s for _, s in report_mod.funnel(out) if s.name == "dedup")

    alone = dedup_stage(tmp_path / "held_alone")
    assert dict(alone.dropped) == {} and alone.docs_out == 4
    against = dedup_stage(tmp_path / "held", dedup_against=str(tmp_path / "clean"))
    assert dict(against.dropped) == {"exact_dup_reference": 1, "near_dup_reference": 1} and against.docs_out == 2
    kept = sorted(d["text"] for d in iter_docs(tier_shards(tmp_path / "held" / "cleaned")[0]))
    assert kept == sorted(held[2:])
    with pytest.raises(ValueError, match=r"dedup_against=.*is not a finished cleaning run"):
        dedup_stage(tmp_path / "held2", dedup_against=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"other settings \(num_perm: 128 there, 64 here\)"):
        dedup_stage(tmp_path / "held3", dedup_against=str(tmp_path / "clean"), dedup=DedupConfig(num_perm=64))
    with pytest.raises(ValueError, match=r"other settings \(seed: 1 there, 2 here\)"):  # other hash functions
        dedup_stage(tmp_path / "held3", dedup_against=str(tmp_path / "clean"), dedup=DedupConfig(seed=2))
    # the training run cleaned again, now with a held-out document: resuming the held-out run kept its stale
    # decisions (that document stayed, exit 0); it is refused, and a new --out drops the document
    import shutil

    shutil.rmtree(tmp_path / "clean")
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": held[2]}) + "\n")
    run([tmp_path / "train.jsonl", tmp_path / "more.jsonl"], tmp_path / "clean", cfg, progress=False)
    with pytest.raises(ValueError, match=r"different dedup_against: it was cleaned again since"):
        dedup_stage(tmp_path / "held", dedup_against=str(tmp_path / "clean"))
    assert dedup_stage(tmp_path / "held5", dedup_against=str(tmp_path / "clean")).docs_out == 1
    # a training run without near dedup has no signatures: named before any work (pass 2 crashed on them)
    run([tmp_path / "train.jsonl"], tmp_path / "clean_exact", dataclasses.replace(cfg, dedup=DedupConfig(near=False)),
        progress=False)
    with pytest.raises(ValueError, match=r"dedup_against=.*DedupConfig.near=False"):
        dedup_stage(tmp_path / "held4", dedup_against=str(tmp_path / "clean_exact"))
    assert not (tmp_path / "held4").exists()
    # a training run cleaned before dedup folded case by str.casefold (its manifest has no version): warned, once
    manifest = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    del manifest["version"]
    (tmp_path / "clean" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"dedup_against=.*older cleaning code .*str.casefold") as caught:
        dedup_stage(tmp_path / "held6", dedup_against=str(tmp_path / "clean"))
    assert sum("older cleaning code" in str(w.message) for w in caught) == 1
    # one cleaned before exact keys folded the spaces beside Chinese / Japanese (version 11): every such text had
    # another key, so with near=False no exact copy of one was dropped, silently
    manifest["version"] = 10
    (tmp_path / "clean" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"older cleaning code \(version 10; .*Chinese / Japanese") as caught:
        dedup_stage(tmp_path / "held7", dedup_against=str(tmp_path / "clean"))
    assert not any("variation selectors" in str(w.message) for w in caught)
    # before version 7 its keys and shingles also kept variation selectors ('❤️' vs '❤'): named too (was left out)
    manifest["version"] = 6
    (tmp_path / "clean" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"\(version 6; .*variation selectors.*Chinese / Japanese"):
        dedup_stage(tmp_path / "held8", dedup_against=str(tmp_path / "clean"))


def test_a_reference_cleaned_before_nfkc_folding_in_dedup_keys_is_warned_about(tmp_path):
    """Version 26 folds dedup keys and shingles as NFKC does. A training run cleaned before it under form="NFD" (or
    "NFC") has keys of its decomposed text: a held-out exact copy of a French training document had another key and
    shingles and was kept, with no warning (only versions before 11 were warned about)."""
    import warnings

    from data.normalize import NormalizeConfig

    rng = np.random.default_rng(0)
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": en_text(rng, 200)}) + "\n")
    (tmp_path / "held.jsonl").write_text(json.dumps({"text": en_text(rng, 200)}) + "\n")
    for form, warned in (("NFD", True), ("NFKC", False)):
        cfg = PipelineConfig(workers=1, normalize=NormalizeConfig(form=form))
        clean = tmp_path / f"clean_{form}"
        run([tmp_path / "train.jsonl"], clean, cfg, progress=False)
        manifest = json.loads((clean / "manifest.json").read_text())
        manifest["version"] = 25
        (clean / "manifest.json").write_text(json.dumps(manifest))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run([tmp_path / "held.jsonl"], tmp_path / f"held_{form}",
                dataclasses.replace(cfg, dedup_against=str(clean)), progress=False)
        said = [str(w.message) for w in caught if "older cleaning code" in str(w.message)]
        assert len(said) == warned, (form, said)
        if warned:
            assert "(version 25; " in said[0] and "NormalizeConfig.form='NFD'" in said[0], said
            assert "Chinese / Japanese" not in said[0]  # (version 11's change is in it)


def test_held_out_near_copy_of_a_training_document_kept_beside_a_similar_one_is_dropped(tmp_path):
    """The training run (threshold 0.8) keeps A and B (Jaccard 0.59); a held-out run against it at 0.45 left B out
    of its index, as a near duplicate of A under its own threshold, so C (0.59 to B, 0.32 to A) was kept though the
    training set holds B."""
    rng = np.random.default_rng(0)
    ws = en_text(rng, 200).split()
    texts = []
    for positions in ((), range(5, 100, 10), range(105, 200, 10)):  # A; B: 10 words of A changed; C: 10 more of B's
        for i in positions:
            ws[i] = "changed"
        texts.append(" ".join(ws))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:2]))
    (tmp_path / "held.jsonl").write_text(json.dumps({"text": texts[2]}) + "\n")
    cfg = PipelineConfig(workers=1, filters=(), labelers=(), augment=None)
    run([tmp_path / "train.jsonl"], tmp_path / "clean", cfg, progress=False)
    assert next(s for _, s in report_mod.funnel(tmp_path / "clean") if s.name == "dedup").docs_out == 2
    held = dataclasses.replace(cfg, dedup=DedupConfig(threshold=0.45, confirm_sigmas=0.0),
                               dedup_against=str(tmp_path / "clean"))
    run([tmp_path / "held.jsonl"], tmp_path / "held", held, progress=False)
    dedup = next(s for _, s in report_mod.funnel(tmp_path / "held") if s.name == "dedup")
    assert dict(dedup.dropped) == {"near_dup_reference": 1}
    rep = json.loads((tmp_path / "held" / "cleaned" / "dedup.json").read_text())["drops"]["0"]["0"][1]
    assert rep == "reference:0:1"  # B


def test_reference_signatures_are_read_once_a_shard(tmp_path, monkeypatch):
    """An .npz member is read from the archive at each z[name]: indexed per document, the reference run's survivors
    took time quadratic in its shard size (2,000 / 4,000 / 8,000 documents a shard: 1.3 / 4.7 / 23 s; a 100k-document
    shard about an hour) before the held-out run compared anything."""
    from data import pipeline as pipeline_mod

    rng = np.random.default_rng(0)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": en_text(rng, 60)}) + "\n" for _ in range(20)))
    cfg = PipelineConfig(workers=1, filters=(), labelers=(), augment=None)
    run([tmp_path / "train.jsonl"], tmp_path / "clean", cfg, progress=False)
    reads, load = collections.Counter(), np.load

    class CountingNpz:
        def __init__(self, path):
            self.z = load(path)

        def __getitem__(self, name):
            reads[name] += 1
            return self.z[name]

    monkeypatch.setattr(np, "load", CountingNpz)
    assert len(list(pipeline_mod._reference_survivors(tmp_path / "clean", cfg))) == 20
    assert reads == {"keys": 1, "sigs": 1}


def test_held_out_data_is_not_deduplicated_against_what_the_training_runs_labelers_dropped(tmp_path):
    """dedup_against compares with the documents the reference run kept; its labelers' drops (lines 1 and 3 here)
    are not in its training set, but they were compared too: a held-out copy of line 1 dropped as
    exact_dup_reference, pointing to a document the training run does not hold."""
    from data.stages import Label

    train = small_corpus(tmp_path)
    run(train, tmp_path / "clean", PipelineConfig(workers=1, labelers=(Label(), DropOdd())), progress=False)
    lines = pathlib.Path(train[0]).read_text(encoding="utf-8").splitlines()
    (tmp_path / "held.jsonl").write_text(f"{lines[0]}\n{lines[1]}\n")  # line 1: dropped there; line 2: kept there
    out = tmp_path / "held"
    run([tmp_path / "held.jsonl"], out, PipelineConfig(workers=1, dedup_against=str(tmp_path / "clean")),
        progress=False)
    dedup = next(s for _, s in report_mod.funnel(out) if s.name == "dedup")
    assert dict(dedup.dropped) == {"exact_dup_reference": 1}
    assert [d["text"] for d in all_docs(out / "cleaned")] == [json.loads(lines[0])["text"]]


def test_every_drop_is_logged_with_its_id_stage_and_reason(corpus, cleaned, capsys, closed_stdout):
    """The stats name three ids per reason; a user had to rebuild which documents went, and why, from set
    differences between tiers. Each shard's drops.jsonl lists every one: as many as the stats count, per stage and
    reason, beginning with the stats' examples; `python -m data.report OUT --drops REASON` prints them."""
    import collections

    out, _ = cleaned
    rows = list(report_mod.drops(out))
    counted = collections.Counter((r["stage"], r["reason"]) for r in rows)
    want = collections.Counter({(s.name, r): n for _, s in report_mod.funnel(out) for r, n in s.dropped.items()})
    assert counted == want and sum(want.values()) == sum(sum(d.values()) for d in EXPECTED_DROPS.values())
    for _, s in report_mod.funnel(out):
        for reason, ids in s.examples.items():
            assert [r["id"] for r in rows if (r["stage"], r["reason"]) == (s.name, reason)][:len(ids)] == ids
    report_mod.main([str(out), "--drops", "empty"])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == want[("ingest", "empty")] and all(ln.endswith("\traw/ingest\tempty") for ln in printed)
    with pytest.raises(SystemExit, match=r"dropped for 'near_dups'; its drop reasons: .*near_dup"):  # a typo
        report_mod.main([str(out), "--drops", "near_dups"])  # printed nothing and exited 0
    # `--drops all | head`: the reader gone, the listing ends quietly (a BrokenPipeError traceback ended it)
    rc, err = closed_stdout("data.report", str(out), "--drops", "all")
    assert rc == 1 and "Traceback" not in err and "BrokenPipeError" not in err, err
    # the pipeline prints the same report when it finishes (here: resumes a finished run), to the same end
    rc, err = closed_stdout("data.pipeline", *corpus[1], "--out", str(out), "--workers", "1")
    assert rc == 1 and "Traceback" not in err and "BrokenPipeError" not in err, err


def test_run_main_ends_quietly_only_when_the_reader_has_gone():
    """Every other ending passes through run_main unchanged: main's value, its error message, its exception."""
    import sys

    from data.cli import run_main

    assert run_main(lambda a, b: a - b, 3, 1) == 2
    with pytest.raises(SystemExit, match="^error: bad$"):
        run_main(lambda: sys.exit("error: bad"))
    with pytest.raises(ValueError):
        run_main(lambda: int("x"))


def test_report_reads_one_mojibake_repair_in_the_singular(cleaned, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(cleaned[0], out)
    path = out / "filtered" / "stats.json"
    stats = json.loads(path.read_text())
    next(s for s in stats["stages"] if s["name"] == "normalize")["counters"].update(
        mojibake_repaired_docs=1, mojibake_repaired_sequences=1)
    path.write_text(json.dumps(stats))
    assert "mojibake repaired in 1 document (1 sequence; kept, not dropped)" in report_mod.report(out)


def test_every_dedup_drop_names_the_document_kept_in_its_place(tmp_path, capsys):
    """A drop logged as exact_dup / near_dup said which document went, not which copy was kept (dedup.json held only
    the survivor's internal `shard:row`): an audit of the corpus could not answer "duplicate of what?". Each such
    line names the survivor's id and, as ids may be repeated (two records "x" here) or made up from where a record
    was (none given), its place in its run's filtered tier; a near duplicate also its estimated Jaccard similarity.
    A held-out run's `..._reference` drops name the training run's document."""
    rng = np.random.default_rng(0)
    a, b, c, d = (en_text(rng, 120) for _ in range(4))
    ws = b.split()
    ws[60] = "changed"
    near_b = " ".join(ws)
    ws = c.split()
    ws[30] = "changed"
    line = lambda text, **meta: json.dumps({"text": text, **meta}) + "\n"  # noqa: E731
    (tmp_path / "in").mkdir()
    first, second = tmp_path / "in" / "0.jsonl", tmp_path / "in" / "1.jsonl"
    first.write_text(line(a, id="x") + line(b, id="x") + line(c) + line("  " + a.upper() + " ", id="copy_a")
                     + line(near_b, id="near_b") + line(near_b, id="copy_of_near_b"))
    # an exact copy of the record without id, under a repeated id; a survivor in another shard, with an int id
    second.write_text(line(c, id="x") + line(d, id=7) + line(d, id="copy_d"))
    cfg = PipelineConfig(workers=1, filters=(), labelers=(), augment=None)
    run([tmp_path / "in"], tmp_path / "clean", cfg, progress=False)
    logged = {(r["id"], r["reason"]): {k: v for k, v in r.items() if k.startswith(("duplicate", "jaccard"))}
              for r in report_mod.drops(tmp_path / "clean")}
    at = lambda shard, row: f"filtered/shard-{shard:05d}.array_record:{row}"  # noqa: E731
    (j_near,) = {logged[("near_b", "near_dup")]["jaccard"]}
    assert 0.9 < j_near < 1
    assert logged == {("copy_a", "exact_dup"): {"duplicate_of": "x", "duplicate_at": at(0, 0)},
                      ("near_b", "near_dup"): {"duplicate_of": "x", "duplicate_at": at(0, 1), "jaccard": j_near},
                      # an exact copy of a near duplicate is as similar to the survivor: not its text
                      ("copy_of_near_b", "exact_dup"): {"duplicate_of": "x", "duplicate_at": at(0, 1),
                                                        "jaccard": j_near},
                      ("x", "exact_dup"): {"duplicate_of": f"{first}:3", "duplicate_at": at(0, 2)},
                      ("copy_d", "exact_dup"): {"duplicate_of": 7, "duplicate_at": at(1, 1)}}  # the input's int
    # the place names the survivor: its filtered record is the cleaned tier's copy
    filtered = list(iter_docs(tier_shards(tmp_path / "clean" / "filtered")[0]))
    assert [filtered[k]["text"] for k in (0, 1, 2)] == [a, b, c]
    report_mod.main([str(tmp_path / "clean"), "--drops", "near_dup"])
    assert capsys.readouterr().out == (f"near_b\tcleaned/dedup\tnear_dup\tduplicate of x ({at(0, 1)}, Jaccard "
                                       f"~{j_near:.2f})\n")
    # h3: a near copy of b (the training run dropped its own copy of near_b)
    (tmp_path / "held.jsonl").write_text(line(a, id="h1") + line(" ".join(ws), id="h2") + line(near_b, id="h3"))
    run([tmp_path / "held.jsonl"], tmp_path / "held", dataclasses.replace(cfg, dedup_against=str(tmp_path / "clean")),
        progress=False)
    held = {r["id"]: r for r in report_mod.drops(tmp_path / "held")}
    assert {k: (r["reason"], r["duplicate_of"], r["duplicate_at"]) for k, r in held.items()} == {
        "h1": ("exact_dup_reference", "x", at(0, 0)), "h2": ("near_dup_reference", f"{first}:3", at(0, 2)),
        "h3": ("near_dup_reference", "x", at(0, 1))}
    assert "jaccard" not in held["h1"] and 0.9 < held["h2"]["jaccard"] < 1 and held["h3"]["jaccard"] == j_near
    report_mod.main([str(tmp_path / "held"), "--drops", "exact_dup_reference"])
    assert capsys.readouterr().out.endswith(f"\tduplicate of x (the dedup_against run's {at(0, 0)})\n")
    # a run whose pass 2 ran before survivors were recorded, resumed: its shards still left name them (read now)
    dedup_json = tmp_path / "clean" / "cleaned" / "dedup.json"
    decided = json.loads(dedup_json.read_text())
    dedup_json.write_text(json.dumps({k: v for k, v in decided.items() if k != "survivors"}))
    for tier in ("cleaned", "labeled", "augmented"):
        (tmp_path / "clean" / tier / "shard-00001.stats.json").unlink()
    run([tmp_path / "in"], tmp_path / "clean", cfg, progress=False)
    assert [r for r in report_mod.drops(tmp_path / "clean") if r["id"] == "x"] == [
        {"id": "x", "tier": "cleaned", "stage": "dedup", "reason": "exact_dup", "duplicate_of": f"{first}:3",
         "duplicate_at": at(0, 2)}]


def test_a_duplicate_whose_survivor_a_labeler_dropped_says_so(tmp_path, capsys):
    """Dedup runs before the labelers: a custom labeler dropping the copy a duplicate names left the duplicate's line
    saying "duplicate of" a document the final corpus does not hold, with nothing to tell it from a kept one."""
    rng = np.random.default_rng(0)
    a, b = en_text(rng, 120), en_text(rng, 120)
    path = tmp_path / "in.jsonl"  # DropOdd drops lines 1 and 3: a (a survivor) and its copy (a duplicate already)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in (a, b, a, b)))
    run([str(path)], tmp_path / "out", PipelineConfig(workers=1, filters=(), labelers=(DropOdd(),), augment=None),
        progress=False)
    dups = {r["id"]: r for r in report_mod.drops(tmp_path / "out", "exact_dup")}
    assert dups[f"{path}:3"]["survivor_dropped"] is True and "survivor_dropped" not in dups[f"{path}:4"]
    report_mod.main([str(tmp_path / "out"), "--drops", "exact_dup"])
    at = "filtered/shard-00000.array_record"
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:3\tcleaned/dedup\texact_dup\tduplicate of {path}:1 ({at}:0), itself dropped by a labeler since",
        f"{path}:4\tcleaned/dedup\texact_dup\tduplicate of {path}:2 ({at}:1)"]


def test_ids_of_any_json_type_are_logged_and_listed_as_json(tmp_path, capsys):
    """A list / dict / bool id was logged as Python's str of it ("['a', 1]", "True"), in drops.jsonl, the stats'
    examples, a duplicate's duplicate_of and `--drops`: no JSON reader (jq) takes it back, and the input holds no
    such text to grep for. The logs hold the id itself, and listings and messages print it as JSON."""
    from data.stages import QualityFilter, StageStats, run_stages

    text = en_text(np.random.default_rng(0), 120)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for t, i in
                            [("Too short.", ["a", 1]), (text, {"k": "ü"}), (text, True), ("Short.", 7)]))
    run([path], tmp_path / "out", PipelineConfig(workers=1, filters=(QualityFilter(),), labelers=(), augment=None),
        progress=False)
    assert [(r["id"], r["reason"], r.get("duplicate_of")) for r in report_mod.drops(tmp_path / "out")] == [
        (["a", 1], "too_short", None), (7, "too_short", None), (True, "exact_dup", {"k": "ü"})]
    report_mod.main([str(tmp_path / "out"), "--drops", "all"])
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ['["a", 1]', "7", "true"]
    assert 'duplicate of {"k": "ü"} (' in lines[2]  # as the input spells it (not {"k": "\u00fc"})
    assert 'quality too_short: ["a", 1], 7' in report_mod.report(tmp_path / "out")
    with pytest.raises(KeyError) as e:  # a failing stage's note names the record as the input has it
        run_stages({"text": "x", "id": ["a", 1]}, [Raises()], [StageStats("raises")])
    assert """on record '["a", 1]'""" in "\n".join(e.value.__notes__)


def test_ids_json_cannot_hold_are_logged_as_json_values_or_their_str():
    """StageStats.drop logs an id as loggable_id's docstring says: a numpy number (a custom stage's) as its number, a
    tuple as its list, and one JSON has no form for (a set) as its str, so every log line is JSON again."""
    from data.shards import id_text
    from data.stages import StageStats

    stats = StageStats("custom")
    for rid in (np.int64(7), ("a", np.float32(0.5)), {3}):
        stats.drop("r", 1, rid)
    assert stats.log == [(7, "r"), (["a", 0.5], "r"), ("{3}", "r")]
    assert json.loads(json.dumps(stats.log)) == [[7, "r"], [["a", 0.5], "r"], ["{3}", "r"]]
    assert [id_text(r) for r in (np.int64(7), ("a", np.float32(0.5)), {3})] == ["7", '["a", 0.5]', "{3}"]


def test_records_with_a_null_id_are_named_by_where_they_were(tmp_path):
    """An "id": null (a JSONL export, a Parquet id column with nulls) counts as no id: `--drops` listed None."""
    rng = np.random.default_rng(0)
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "Too short.", "id": None}) + "\n"
                    + json.dumps({"text": en_text(rng, 120), "id": None}) + "\n")
    pq.write_table(pa.table({"text": ["Short.", en_text(rng, 120)], "id": pa.array([None, "b"], pa.string())}),
                   tmp_path / "in.parquet")
    run([tmp_path], tmp_path / "out", PipelineConfig(workers=1), progress=False)
    assert [r["id"] for r in report_mod.drops(tmp_path / "out")] == [f"{path}:1", f"{tmp_path / 'in.parquet'}:0"]
    kept = [d["id"] for p in tier_shards(tmp_path / "out" / "raw") for d in iter_docs(p)]
    assert sorted(kept) == sorted([f"{path}:1", f"{path}:2", f"{tmp_path / 'in.parquet'}:0", "b"])
    # pandas writes an integer id column with gaps as floats, NaN in each gap: those records had id null (NaN as
    # JSON could not hold it) and a dropped one was named 'nan'
    pq.write_table(pa.table({"text": ["Short.", en_text(rng, 120), en_text(rng, 120)], "id": [np.nan, np.nan, 2.0]}),
                   tmp_path / "in.parquet")
    run([tmp_path / "in.parquet"], tmp_path / "out2", PipelineConfig(workers=1), progress=False)
    assert [r["id"] for r in report_mod.drops(tmp_path / "out2")] == [f"{tmp_path / 'in.parquet'}:0"]
    assert [d["id"] for p in tier_shards(tmp_path / "out2" / "raw") for d in iter_docs(p)] == [
        f"{tmp_path / 'in.parquet'}:{i}" for i in range(2)] + [2.0]


def test_records_with_an_infinite_id_are_named_by_where_they_were(tmp_path):
    """An id of Infinity (Python's json reads it in JSON Lines; a Parquet float id column can hold inf) was kept as
    the id, stored as null as JSON cannot hold it: the document and its drops named nothing. As NaN: no id."""
    from data.sources import read_records

    path = tmp_path / "in.jsonl"
    path.write_text('{"id": Infinity, "text": "a"}\n{"id": -Infinity, "text": "b"}\n{"id": 1e999, "text": "c"}\n')
    pq.write_table(pa.table({"text": ["d", "e"], "id": [np.inf, 2.0]}), tmp_path / "in.parquet")
    ids = [r[0]["id"] for r in read_records([str(path), str(tmp_path / "in.parquet")], with_ids=True)]
    assert ids == [f"{path}:{i}" for i in (1, 2, 3)] + [f"{tmp_path / 'in.parquet'}:0", 2.0]


@dataclasses.dataclass(frozen=True)
class SlowOrFail:
    """A filter stage (module level: worker processes import it) failing on 'boom', slow on anything else."""

    name: str = "slow_or_fail"

    def __call__(self, doc):
        if doc["text"] == "boom":
            raise RuntimeError("boom")
        import time

        time.sleep(0.3)
        return doc, None


def test_a_failing_shard_stops_the_run_without_cleaning_the_rest(tmp_path):
    """A failed shard (or Ctrl-C) ended the run only after the pool had cleaned every queued shard (hours, on a
    corpus): the error waited for the whole pass. Queued shards are cancelled; the running ones finish."""
    (tmp_path / "in").mkdir()
    for i in range(16):
        (tmp_path / "in" / f"p{i:02d}.jsonl").write_text(json.dumps({"text": "boom" if i == 0 else f"doc {i}"}) + "\n")
    with pytest.raises(RuntimeError, match="boom"):
        run([tmp_path / "in"], tmp_path / "out", PipelineConfig(workers=2, filters=(SlowOrFail(),)), progress=False)
    assert len(list((tmp_path / "out" / "filtered").glob("*.stats.json"))) <= 8


@dataclasses.dataclass(frozen=True)
class RecordPidThenSleep:
    """A filter stage (module level: worker processes import it) that writes its worker's pid, then sleeps."""

    pid_dir: str
    name: str = "record_pid_then_sleep"

    def __call__(self, doc):
        import time

        (pathlib.Path(self.pid_dir) / str(os.getpid())).touch()
        time.sleep(60)
        return doc, None


def _alive(pid: int) -> bool:
    try:  # reparented workers may linger as zombies where nothing reaps them: those have exited
        return pathlib.Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_workers_end_when_the_pipeline_process_is_killed(tmp_path):
    """A SIGKILLed run cannot shut its pool down: its workers went on cleaning their shards (into a run nobody was
    watching) until each shard ended. They now exit within a second of their parent."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "in").mkdir()
    for i in range(2):
        (tmp_path / "in" / f"p{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}) + "\n")
    pids = tmp_path / "pids"
    pids.mkdir()
    script = ("from data.pipeline import PipelineConfig, run\n"
              "from tests.test_data_pipeline import RecordPidThenSleep\n"
              f"run([{str(tmp_path / 'in')!r}], {str(tmp_path / 'out')!r}, "
              f"PipelineConfig(workers=2, filters=(RecordPidThenSleep({str(pids)!r}),)), progress=False)\n")
    root = pathlib.Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)})
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 2:
            assert time.monotonic() < deadline and parent.poll() is None, "the workers never started"
            time.sleep(0.1)
        workers = [int(p.name) for p in pids.iterdir()]
        assert all(_alive(w) for w in workers)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived their killed parent"


def test_a_json_line_python_refuses_to_parse_is_a_counted_drop_not_a_crash(tmp_path):
    """An integer of more than 4,300 digits is valid JSON, but json.loads raises a plain ValueError on it (Python's
    int/str conversion limit), not a JSONDecodeError: one such line stopped the whole run."""
    from data.sources import read_records

    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ({"text": "first one"}, {"text": "x", "n": 10**500},
                                                            {"text": "last one"})).replace("1" + "0" * 500, "7" * 5000))
    got = list(read_records([str(path)], with_ids=True))
    assert [r for _, r, _, _ in got] == [None, "malformed_json", None] and got[1][3] == f"{path}:2"
    assert got[1][2] == len(path.read_bytes().split(b"\n")[1]) + 1  # its bytes counted


def test_the_funnel_counts_text_bytes_in_and_out_and_the_input_bytes_apart(tmp_path, capsys):
    """A JSON Lines record's metadata is no loss: ingest counted its whole line in and its text out, so a run that
    kept every document (one 10-byte malformed line dropped) reported 'overall ... (16.0 kB of 51.6 kB)'."""
    rng = np.random.default_rng(0)
    texts = [en_text(rng, 120) for _ in range(6)]
    meta = {"url": "https://example.com/" + "p" * 200, "html": "<div>" + "m" * 1500 + "</div>"}
    path = tmp_path / "in.jsonl"
    bad = "{bad json" + "x" * 990 + "\n"  # 1 kB: the report's sizes, to 0.1 kB, show it
    path.write_text("".join(json.dumps({"text": t, **meta}) + "\n" for t in texts) + bad)
    stats = run([path], tmp_path / "out", PipelineConfig(workers=1), progress=False)
    ingest, last = stats["raw"]["stages"][0], stats["augmented"]["stages"][-1]
    text = sum(len(t.encode()) for t in texts)
    assert last["docs_out"] == 6 and last["bytes_out"] == text
    # in = the text of the records read + what the dropped ones took up in the input (their text is unknown)
    assert ingest["dropped_bytes"] == {"malformed_json": 1000} and ingest["bytes_in"] == text + 1000
    assert ingest["bytes_out"] == text and ingest["counters"]["input_bytes"] == path.stat().st_size
    print(report_mod.report(tmp_path / "out"))
    out = capsys.readouterr().out
    size = report_mod._size
    assert f"overall: 6 of 7 records kept ({size(text)} of {size(text + 1000)} of text" in out
    assert f"input read: {size(path.stat().st_size)}" in out


def test_input_file_names_that_are_not_utf8_are_refused_by_name(tmp_path):
    """A file named in latin-1 (café.jsonl as the bytes caf\\xe9) crashed writing the manifest, after the walk:
    UnicodeEncodeError: 'utf-8' codec can't encode character '\\udce9', naming no file."""
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ok.jsonl").write_text(json.dumps({"text": en_text(rng, 50)}) + "\n")
    bad = os.fsdecode(os.fsencode(str(tmp_path / "in")) + b"/caf\xe9.jsonl")
    try:
        with open(bad, "w", encoding="utf-8") as f:
            f.write(json.dumps({"text": en_text(rng, 50)}) + "\n")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    from data import pipeline

    for inputs in ([tmp_path / "in"], [bad]):
        with pytest.raises(ValueError, match=r"not UTF-8: .*caf\\xe9\.jsonl.*rename") as e:
            run(inputs, tmp_path / "out", PipelineConfig(workers=1), progress=False)
        str(e.value).encode("utf-8")  # printable: the message holds no lone surrogate
        assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match=r"^error: .*caf\\xe9\.jsonl"):
        pipeline.main([str(tmp_path / "in"), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("suffix", [".bz2", ".xz"])
def test_a_damaged_later_stream_of_a_bz2_or_xz_file_is_counted_not_silently_cut(tmp_path, suffix):
    """bz2.open / lzma.open stop, as at the file's end, where what follows a stream is not a valid one (pbzip2 writes
    one stream per block, `cat a.bz2 b.bz2` two): a damaged later stream's records, and all after it, were in no
    count, and a text file was kept as its first stream alone. Now, as with gzip, the rest is one counted drop."""
    import bz2
    import lzma

    from data.sources import read_records

    compress = {".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    lines = [json.dumps({"text": f"record {i}"}).encode() + b"\n" for i in range(4)]
    first, second = compress(b"".join(lines[:2])), compress(b"".join(lines[2:]))
    (tmp_path / f"ok.jsonl{suffix}").write_bytes(first + second)  # whole streams, one after another: all read
    assert [r for _, r, _ in read_records([str(tmp_path / f"ok.jsonl{suffix}")])] == [None] * 4
    damaged = first + second[:4] + bytes(b ^ 0xFF for b in second[4:12]) + second[12:]
    (tmp_path / f"cut.jsonl{suffix}").write_bytes(damaged)
    got = list(read_records([str(tmp_path / f"cut.jsonl{suffix}")], with_ids=True))
    assert [r for _, r, _, _ in got] == [None, None, "unreadable_rest"]
    assert got[-1][3] == f"{tmp_path / f'cut.jsonl{suffix}'}:3"
    (tmp_path / f"notes.txt{suffix}").write_bytes(damaged)
    assert [r for _, r, _ in read_records([str(tmp_path / f"notes.txt{suffix}")])] == ["unreadable_file"]


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_a_parquet_file_compressed_whole_is_refused_before_any_work(tmp_path, suffix):
    """pyarrow reads no .parquet.gz: its rows were one `unreadable_file` drop (a .parquet.zst was refused, with the
    hint to recompress it as .gz)."""
    import bz2
    import lzma

    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"text": [en_text(rng, 50) for _ in range(3)]}), tmp_path / "t.parquet")
    raw = (tmp_path / "t.parquet").read_bytes()
    comp = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": lambda b: b"\x28\xb5\x2f\xfd"}
    name = f"part-0.parquet{suffix}"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_bytes(comp[suffix](raw))
    with pytest.raises(ValueError, match=re.escape(name) + r" \(Parquet compressed whole.*decompress it") as e:
        run([tmp_path / "in"], tmp_path / "out", PipelineConfig(workers=1), progress=False)
    assert "recompress" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_json_nested_too_deep_is_one_counted_drop_not_a_failed_run(tmp_path):
    """A record whose metadata nests deep enough to parse (json's C scanner goes deeper than Python recursion) but
    not to clean crashed the run in the metadata clean-up (RecursionError); one too deep to parse as the first record
    crashed the text-field check before any work. Both are now one `malformed_json` drop, as a line too deep to parse
    always was. The first window is the interpreter's: 500-990 deep on Python 3.11, 1,000-1,490 on 3.12 (its
    comprehensions take no frame of their own, and its scanner counts C recursion), so it is measured here."""
    from data.sources import _clean_meta

    def fails(f, depth):
        try:
            f(json.loads("[" * depth + "]" * depth))
        except RecursionError:
            return True
        return False

    window = [d for d in range(100, 4000, 50) if not fails(lambda x: x, d) and fails(_clean_meta, d)]
    assert window, "no depth parses but fails the metadata clean-up: the first case is unreachable here"
    rng = np.random.default_rng(0)
    good = [json.dumps({"text": en_text(rng, 100)}) for _ in range(2)]
    for depth in (window[len(window) // 2], 2000):
        path = tmp_path / f"d{depth}.jsonl"
        path.write_text("\n".join([f'{{"text": "deep", "m": {"[" * depth}{"]" * depth}}}', *good]) + "\n")
        stats = run([str(path)], tmp_path / f"out{depth}", PipelineConfig(workers=1), progress=False)
        ingest = stats["raw"]["stages"][0]
        assert (ingest["docs_in"], ingest["docs_out"], ingest["dropped"]) == (3, 2, {"malformed_json": 1}), depth


def test_a_file_named_twice_is_read_once(tmp_path):
    """A folder and a file in it (or a link to another input) named together read the file twice: its records were
    counted twice in ingest (32 in for 31 records) and, with exact dedup off, kept twice in every tier."""
    from data.sources import discover

    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        (tmp_path / "in" / f"{name}.jsonl").write_text(json.dumps({"text": en_text(rng, 100)}) + "\n")
    os.symlink(tmp_path / "in" / "a.jsonl", tmp_path / "in" / "c.jsonl")
    a = str(tmp_path / "in" / "a.jsonl")
    assert discover([a, str(tmp_path / "in"), a]) == [(a,), (str(tmp_path / "in" / "b.jsonl"),)]
    # under the name it first appears by: the folder's a.jsonl, not the link to it named after
    link = str(tmp_path / "in" / "c.jsonl")
    assert discover([str(tmp_path / "in"), link]) == [(a,), (str(tmp_path / "in" / "b.jsonl"),)]
    cfg = PipelineConfig(workers=1, dedup=DedupConfig(exact=False, near=False))
    stats = run([a, str(tmp_path / "in")], tmp_path / "out", cfg, progress=False)
    assert stats["raw"]["stages"][0]["docs_in"] == 2 and stats["augmented"]["stages"][-1]["docs_out"] == 2


def test_a_record_field_named_like_normalizes_repair_count_stays_metadata():
    """Normalize handed its mojibake repair count to its `count` as a field '_mojibake_repaired': a record's own field
    of that name was taken for it (a str ended the run with a TypeError, a number went into the counters and the field
    was deleted)."""
    from data.stages import Normalize, StageStats, run_stages

    for own, text, counted in (("yes", "plain text", {}), (3, "plain text", {}),
                               ("yes", "caf\u00c3\u00a9 au lait", {"mojibake_repaired_docs": 1,
                                                                "mojibake_repaired_sequences": 1})):
        stats = [StageStats("normalize")]
        doc = run_stages({"text": text, "_mojibake_repaired": own}, [Normalize()], stats)
        assert doc == {"text": text.replace("\u00c3\u00a9", "\u00e9"), "_mojibake_repaired": own}, own
        assert stats[0].counters == counted, own


def test_discover_walks_linked_directories(tmp_path):
    """A link to a directory inside an input directory (`corpus/wiki -> /mnt/wiki`) was not walked (pathlib's rglob
    does not follow them): its files went unread and in no count. A link back up is walked once, not in a loop."""
    from data.sources import discover

    for d in ("in", "ext"):
        (tmp_path / d).mkdir()
        (tmp_path / d / f"{d}.jsonl").write_text(json.dumps({"text": d}) + "\n")
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "ext")
    (tmp_path / "in" / "up").symlink_to(tmp_path / "in")
    assert discover([tmp_path / "in"]) == [(str(tmp_path / "in" / "in.jsonl"),),
                                           (str(tmp_path / "in" / "linked" / "ext.jsonl"),)]


def test_discover_reads_a_directory_that_a_hidden_link_names_too(tmp_path):
    """A hidden link beside the data (`.latest -> data`, '.' sorting first) or a hidden store that the data links into
    (`data -> .store/v2`) marked the directory walked under its hidden name, whose files are side files, not read:
    the data's own files were in no count (an empty input). Side directories are not walked at all."""
    from data.sources import discover

    (tmp_path / "in" / "data").mkdir(parents=True)
    (tmp_path / "in" / "data" / "a.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    (tmp_path / "in" / ".latest").symlink_to("data")
    (tmp_path / "in" / ".store" / "v2").mkdir(parents=True)
    (tmp_path / "in" / ".store" / "v2" / "b.jsonl").write_text(json.dumps({"text": "b"}) + "\n")
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "b").symlink_to(tmp_path / "in" / ".store" / "v2")
    assert discover([tmp_path / "in"]) == [(str(tmp_path / "in" / "data" / "a.jsonl"),),
                                           (str(tmp_path / "in" / "sub" / "b" / "b.jsonl"),)]


def _raw_strings(vals):
    """A Parquet string column of raw bytes, unvalidated, as another writer may leave it."""
    offsets = np.cumsum([0] + [len(v) for v in vals]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(vals), [None, pa.py_buffer(offsets.tobytes()),
                                                          pa.py_buffer(b"".join(vals))])


def test_a_parquet_map_is_metadata_as_a_json_object(tmp_path):
    """A map column (Spark's MapType: headers, a record's tags) came through as pyarrow's list of (key, value) pairs,
    [["lang", "en"]] where the same records written as JSON Lines hold {"lang": "en"}; at any depth. A map whose keys
    repeat stays pairs: no JSON object holds it."""
    from data.sources import read_records

    str_map = pa.map_(pa.string(), pa.string())
    pq.write_table(pa.table({
        "text": ["one", "two", "three", "four"],
        "headers": pa.array([[("lang", "en"), ("url", "u")], [], None, [("k", "a"), ("k", "b")]], str_map),
        "nested": pa.array([{"tags": [[("a", "1")]]}] * 4, pa.struct([("tags", pa.list_(str_map))])),
        "counts": pa.array([[(1, 2)]] * 4, pa.map_(pa.int64(), pa.int64()))}), tmp_path / "m.parquet")
    docs = [doc for doc, _, _ in read_records([str(tmp_path / "m.parquet")])]
    assert [d["headers"] for d in docs] == [{"lang": "en", "url": "u"}, {}, None, [["k", "a"], ["k", "b"]]]
    assert docs[0]["nested"] == {"tags": [{"a": "1"}]} and docs[0]["counts"] == {"1": 2}


def test_parquet_strings_holding_invalid_utf8_are_decoded_like_json_lines(tmp_path):
    """pyarrow does not check UTF-8 when reading a string column (nor do all writers when writing): one invalid byte
    in a Parquet file's text or metadata (a list of strings too) raised UnicodeDecodeError and ended the run. The
    text's are repaired or dropped as a JSON line's are (invalid_utf8), a metadata value's get U+FFFD."""
    from data.sources import read_records

    rng = np.random.default_rng(0)
    good = en_text(rng, 60).encode()
    texts = [good, good[:200] + b"\xff" + good[200:], b"\xed\xa0\x80 lone"]
    path = tmp_path / "bad.parquet"
    tags = pa.ListArray.from_arrays(pa.array([0, 1, 2, 3], pa.int32()), _raw_strings([b"a", b"b\xe9", b"c"]))
    title = _raw_strings([b"ok", b"caf\xe9", b"x"])
    pq.write_table(pa.table({"text": _raw_strings(texts), "title": title, "tags": tags}), path)
    got = list(read_records([str(path)]))
    assert [r for _, r, _ in got] == [None, None, "invalid_utf8"]
    assert [n for _, _, n in got] == [len(t) for t in texts]
    assert got[1][0]["text"] == good[:200].decode() + "\ufffd" + good[200:].decode()
    assert (got[1][0]["title"], got[1][0]["tags"], got[0][0]["tags"]) == ("caf\ufffd", ["b\ufffd"], ["a"])


def test_dictionary_encoded_parquet_strings_holding_invalid_utf8_are_decoded_too(tmp_path):
    """A dictionary-encoded string column (a pandas category; pyarrow reads it back as one) holding invalid UTF-8
    still raised UnicodeDecodeError and ended the run after the plain-string fix: its type is not `string`, so it
    was cast to itself and read again. Its text is judged as a JSON line's, its metadata gets U+FFFD."""
    from data.sources import read_records

    rng = np.random.default_rng(0)
    good = en_text(rng, 60).encode()
    codes = pa.array([0, 1, 0], pa.int32())
    text = pa.DictionaryArray.from_arrays(codes, _raw_strings([good, b"\xed\xa0\x80 lone"]))
    lang = pa.DictionaryArray.from_arrays(pa.array([1, 0, 1], pa.int32()), _raw_strings([b"en", b"caf\xe9"]))
    path = tmp_path / "cat.parquet"
    pq.write_table(pa.table({"text": text, "lang": lang}), path)
    got = list(read_records([str(path)]))
    assert [r for _, r, _ in got] == [None, "invalid_utf8", None]
    assert [d["text"] for d, _, _ in got if d] == [good.decode()] * 2
    assert [d["lang"] for d, _, _ in got if d] == ["caf\ufffd"] * 2


def test_discover_names_linked_directories_independently_of_listing_order(tmp_path, monkeypatch):
    """A directory reachable both as itself and through a link (`aa/` and `zz -> aa`) was walked under whichever
    name the file system listed first: its files' names (their ids, drop-log places), and with them the shard
    order, changed with a copy of the corpus. The name first in sorted order is walked, however they are listed."""
    from data.sources import discover

    (tmp_path / "aa").mkdir()
    (tmp_path / "aa" / "x.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "mm.jsonl").write_text(json.dumps({"text": "m"}) + "\n")
    (tmp_path / "zz").symlink_to(tmp_path / "aa")
    scandir = os.scandir

    class Listing(list):  # os.walk uses its scandir as an iterator and a context manager
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def __next__(self):
            if not self:
                raise StopIteration
            return self.pop(0)

    def listed(reverse):
        def listing(path="."):
            with scandir(path) as entries:
                return Listing(sorted(entries, key=lambda e: e.name, reverse=reverse))
        return listing

    got = []
    for reverse in (False, True):
        monkeypatch.setattr(os, "scandir", listed(reverse))
        got.append(discover([tmp_path]))
    assert got == [[(str(tmp_path / "aa" / "x.jsonl"),), (str(tmp_path / "mm.jsonl"),)]] * 2


def test_invalid_utf8_in_json_lines_is_judged_in_the_text_alone_as_in_parquet(tmp_path):
    """A JSON line's bad bytes were judged over the whole line: one latin-1 byte in a short record's title dropped
    its well-formed text as `invalid_utf8` (under 'reject' in any record), where the same record from Parquet is
    kept with U+FFFD in the title; and a text over the limit passed when long metadata padded the line. Now the
    text is judged alone, as Parquet's is; a metadata value gets U+FFFD."""
    from data.normalize import NormalizeConfig
    from data.sources import read_records

    text = en_text(np.random.default_rng(0), 20).encode()
    records = [(b"A short, well-formed text.", b"caf\xe9"),  # a bad byte in the title only: kept
               (text[:50] + b"\xff" + text[50:], b"ok"),  # one bad byte in 100+ of text: repaired, kept
               (b"short \xff text", b"x" * 500),  # 1 bad byte in 12: dropped, however long the line
               (b"\xff\xfe" * 20, b"ok")]
    lines = [b'{"text": "' + t + b'", "title": "' + title + b'"}\n' for t, title in records]
    (tmp_path / "m.jsonl").write_bytes(b"".join(lines))
    pq.write_table(pa.table({"text": _raw_strings([t for t, _ in records]),
                             "title": _raw_strings([title for _, title in records])}), tmp_path / "m.parquet")
    for mode, kept in (("repair", [True, True, False, False]), ("reject", [True, False, False, False])):
        ncfg = NormalizeConfig(invalid_utf8=mode)
        got = {f: list(read_records([str(tmp_path / f)], ncfg=ncfg)) for f in ("m.jsonl", "m.parquet")}
        for recs in got.values():
            assert [r is None for _, r, _ in recs] == kept, mode
            assert [r for _, r, _ in recs if r] == ["invalid_utf8"] * kept.count(False), mode
        strip = lambda d: {k: v for k, v in d.items() if k != "id"}  # noqa: E731
        assert [strip(d) for d, _, _ in got["m.jsonl"] if d] == [strip(d) for d, _, _ in got["m.parquet"] if d]
    assert got["m.jsonl"][0][0]["title"] == "caf\ufffd"


def test_a_directory_that_cannot_be_listed_is_refused_naming_it(tmp_path, monkeypatch):
    """An input folder os.walk could not list (no read permission, a stale mount) was passed over: its files were
    in no count, and the run finished as if they did not exist. Hidden / Spark side folders are skipped anyway."""
    from data import pipeline
    from data.sources import discover

    for d in ("in/ok", "in/locked", "in/.cache"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "a.jsonl").write_text(json.dumps({"text": d}) + "\n")
    scandir = os.scandir

    def denied(path="."):  # chmod 000 as any user but root, who may list it anyway
        if os.path.basename(os.fsdecode(path)) in ("locked", ".cache"):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(ValueError, match=r"1 directory under .*in could not be listed \(Permission denied\): "
                                         r".*in/locked; .*chmod"):
        discover([tmp_path / "in"])
    with pytest.raises(SystemExit, match=r"^error: 1 directory under .*in/locked"):
        pipeline.main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert discover([tmp_path / "in" / "ok"]) == [(str(tmp_path / "in" / "ok" / "a.jsonl"),)]


def test_inputs_that_are_not_regular_files_are_refused_naming_them(tmp_path):
    """A FIFO or a socket in an input folder was passed over: in no count, named nowhere (a broken link or a folder
    that cannot be listed is refused). Named as an input, a FIFO (`<(zcat a.jsonl.gz)`) was said not to exist."""
    import socket

    from data import pipeline
    from data.sources import discover

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    os.mkfifo(tmp_path / "in" / "pipe.jsonl")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "in" / "sock"))
        with pytest.raises(ValueError, match=r"2 inputs under .*in are not regular files: .*in/pipe.jsonl \(a FIFO\), "
                                             r".*in/sock \(a socket\); .*remove them"):
            discover([tmp_path / "in"])
    with pytest.raises(ValueError, match=r"input .*pipe.jsonl is a FIFO, not a regular file; .*write it to a file"):
        discover([tmp_path / "in" / "pipe.jsonl"])
    with pytest.raises(SystemExit, match=r"^error: input .*pipe.jsonl is a FIFO"):
        pipeline.main([str(tmp_path / "in" / "pipe.jsonl"), "--out", str(tmp_path / "out"), "--workers", "1"])
    if os.path.exists("/dev/null"):  # a character device
        with pytest.raises(ValueError, match=r"^input /dev/null is a device, not a regular file"):
            discover(["/dev/null"])
    (tmp_path / "in" / "pipe.jsonl").unlink()
    (tmp_path / "in" / "sock").unlink()
    assert discover([tmp_path / "in"]) == [(str(tmp_path / "in" / "a.jsonl"),)]


def test_an_out_directory_that_cannot_be_made_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    """`--out` under a file (or where the user may not write) ended in a NotADirectoryError / PermissionError
    traceback from mkdir, after the inputs had been walked."""
    from data import pipeline

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        pipeline.main([str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "file" / "run" / "1"), "--workers", "1"])
    assert re.search(r"argument --out: cannot make the directory .*file/run/1: .*file is a file; name a directory",
                     capsys.readouterr().err)
    # a directory one may write in but not enter (-w-: mkdir under it fails); root passes os.access, so it is faked
    monkeypatch.setattr(pipeline.os, "access", lambda path, mode: not mode & os.X_OK)
    with pytest.raises(SystemExit):
        pipeline.main([str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "run"), "--workers", "1"])
    assert re.search(r"argument --out: cannot make the directory .*run: .* is not writable", capsys.readouterr().err)
    monkeypatch.undo()
    # a folder where even root may not make one (/sys, /proc): os.access says yes, and mkdir's PermissionError was a
    # traceback once the inputs had been walked
    mkdir = os.mkdir

    def refused(path, *args, **kwargs):
        if "sysfs" in pathlib.Path(path).parts:
            raise PermissionError(1, "Operation not permitted", os.fsdecode(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refused)
    with pytest.raises(SystemExit):
        pipeline.main([str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "sysfs" / "run"), "--workers", "1"])
    assert re.search(r"argument --out: cannot make the directory .*sysfs/run: .*sysfs: Operation not permitted; "
                     "name a directory", capsys.readouterr().err)
    mkdir(tmp_path / "sysfs")  # one there already, in which none may be made (the run makes its tiers in it)
    with pytest.raises(SystemExit):
        pipeline.main([str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "sysfs"), "--workers", "1"])
    assert re.search(r"argument --out: cannot make directories in .*sysfs: Operation not permitted; name a directory",
                     capsys.readouterr().err)
    # the probe leaves nothing behind: a run refused for its inputs still leaves no directory
    with pytest.raises(SystemExit, match="does not exist"):
        pipeline.main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "new" / "run"), "--workers", "1"])
    assert not (tmp_path / "new").exists()



def test_an_out_through_a_dangling_link_is_named_in_one_line(tmp_path, capsys):
    """`--out` that is, or lies under, a link to nothing (a moved scratch disk) passed the check (it stopped at the
    first path that exists, the link's folder) and ended in mkdir's FileExistsError traceback."""
    from data import pipeline

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    (tmp_path / "scratch").symlink_to(tmp_path / "gone")
    for out in ("scratch", "scratch/run"):
        with pytest.raises(SystemExit):
            pipeline.main([str(tmp_path / "a.jsonl"), "--out", str(tmp_path / out), "--workers", "1"])
        assert re.search(r"argument --out: cannot make the directory .*scratch.*: .*scratch is a link to .*gone, "
                         r"which does not exist; name a directory", capsys.readouterr().err), out


def test_records_ending_in_a_bare_cr_after_lf_ended_ones_are_read_one_by_one(tmp_path):
    """`cat unix.jsonl mac.jsonl`: the first line ends in LF, so the bare-CR check passes the file, and the classic-Mac
    part was one line: its 4 records were one malformed_json drop, and 3 of them in no count. JSON strings hold no
    raw CR, so a line that parses only split at its CRs is those records; one that does not is one drop still."""
    from data.sources import read_records

    rng = np.random.default_rng(0)
    texts = [en_text(rng, 300) for _ in range(4)]
    path = tmp_path / "cat.jsonl"
    raw = (json.dumps({"id": "u", "text": texts[0]}) + "\n"
           + "".join(json.dumps({"id": f"m{i}", "text": t}) + "\r" for i, t in enumerate(texts[1:])) + "[1]\r\n"
           + '{"text": "a\rb"}\n{bad\n').encode()
    path.write_bytes(raw)
    got = list(read_records([str(path)], with_ids=True))
    assert [d["id"] for d, *_ in got if d] == ["u", "m0", "m1", "m2"]
    # drops keep their line numbers (grep -n's: a line of records joined by CRs is one), after it too
    assert [(r, rid) for d, r, _, rid in got if d is None] == [
        ("not_an_object", f"{path}:2"), ("malformed_json", f"{path}:3"), ("malformed_json", f"{path}:4")]
    assert sum(n for _, _, n, _ in got) == len(raw)  # every byte read counted once (input_bytes)
    # each piece counts its own bytes and its CR; a line that parses whole (CR and blanks as JSON whitespace) is one
    # record, with no empty piece after it; one whose pieces do not all parse is one drop, its good pieces too
    lines = [b'{"id": "a", "text": "x"}\r{"id": "b", "text": "yz"}\n', b'{"id": "c", "text": "w"}\r \n',
             b'{"id": "d", "text": "v"}\r{bad\n']
    (tmp_path / "pieces.jsonl").write_bytes(b"".join(lines))
    got = [(d and d["id"], r, n) for d, r, n, _ in read_records([str(tmp_path / "pieces.jsonl")], with_ids=True)]
    assert got == [("a", None, 25), ("b", None, 26), ("c", None, len(lines[1])),
                   (None, "malformed_json", len(lines[2]))]



def test_records_joined_by_bare_crs_past_max_doc_bytes_are_read_one_by_one(tmp_path):
    """A classic-Mac part (after LF-ended lines) longer than max_doc_bytes in all, whose records each fit, was one
    too_large drop: 3,000 records of 527 bytes (1.6 MB, the default limit 1 MB) were 1 drop, 2,999 in no count. Each
    CR-ended piece of such a line is held and judged alone: one too large itself is too_large, one that does not
    parse malformed_json, under the line's number; its CR LF end makes no empty record."""
    from data.sources import SourceConfig, read_records

    rng = np.random.default_rng(0)
    recs = [json.dumps({"id": f"m{i}", "text": en_text(rng, 300)}) for i in range(6)]
    limit = max(map(len, recs)) + 2
    big = json.dumps({"id": "big", "text": en_text(rng, 3 * limit)})
    path = tmp_path / "cat.jsonl"
    line = lambda i: json.dumps({"id": i, "text": en_text(rng, 300)}) + "\n"  # noqa: E731
    raw = (line("u") + "\r".join([*recs[:3], big, "{bad", *recs[3:]]) + "\r\n" + line("v") + "x" * 3 * limit + "\n"
           + line("w")).encode()
    path.write_bytes(raw)
    got = list(read_records([str(path)], SourceConfig(max_doc_bytes=limit), with_ids=True))
    assert [d["id"] for d, *_ in got if d] == ["u", *(f"m{i}" for i in range(6)), "v", "w"]
    assert [(r, rid) for d, r, _, rid in got if d is None] == [
        ("too_large", f"{path}:2"), ("malformed_json", f"{path}:2"), ("too_large", f"{path}:4")]
    assert sum(n for _, _, n, _ in got) == len(raw)  # every byte read counted once (input_bytes)


def test_max_doc_bytes_measures_a_record_without_its_line_end(tmp_path):
    """A record of exactly max_doc_bytes was kept ended by LF but dropped as too_large ended by CR LF (a Windows
    export), and in a line of records joined by bare CRs by its CR, CR LF or LF: the limit took in the line end. One
    byte more is too_large, whatever ends it."""
    from data.sources import SourceConfig, read_records

    limit = 60
    rec = lambda i, n=limit: json.dumps({"id": i, "text": "x" * (n - 22 - len(i))}).encode()  # noqa: E731
    assert len(rec("a")) == limit
    big = lambda i: rec(i, limit + 1)  # noqa: E731
    raw = (rec("a") + b"\n" + rec("b") + b"\r\n" + rec("c") + b"\r" + rec("d") + b"\r\n" + rec("e") + b"\r" + rec("f")
           + b"\n" + big("F") + b"\r\n" + big("G") + b"\n" + rec("g") + b"\r" + big("H") + b"\n")
    path = tmp_path / "ends.jsonl"
    path.write_bytes(raw)
    got = list(read_records([str(path)], SourceConfig(max_doc_bytes=limit), with_ids=True))
    assert [d["id"] for d, *_ in got if d] == list("abcdefg")
    assert [(r, rid) for d, r, _, rid in got if d is None] == [
        ("too_large", f"{path}:5"), ("too_large", f"{path}:6"), ("too_large", f"{path}:7")]
    assert sum(n for _, _, n, _ in got) == len(raw)  # every byte read counted once (input_bytes)


def test_records_with_an_empty_id_are_named_by_where_they_were(tmp_path):
    """An "id": "" (an export that writes missing strings empty: pandas after fillna('')) counts as no id, as null
    does: a record dropped past ingest was logged with id "", which names nothing `--drops` can find."""
    rng = np.random.default_rng(0)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                            for t, i in (("Too short.", ""), (en_text(rng, 120), " "), (en_text(rng, 120), "c"))))
    run([path], tmp_path / "out", PipelineConfig(workers=1), progress=False)
    assert [r["id"] for r in report_mod.drops(tmp_path / "out")] == [f"{path}:1"]
    assert [d["id"] for p in tier_shards(tmp_path / "out" / "raw") for d in iter_docs(p)] == [
        f"{path}:1", f"{path}:2", "c"]


def _ascii_locale(*paths):
    """The environment of a shell whose locale is plain C with Python's UTF-8 mode off (a container or cron job
    without LANG, PYTHONUTF8=0): stdio, open() and file names all ASCII. Skips the test where the checkout, the
    interpreter or `paths` are not ASCII: there that Python cannot even import jax (nor use those paths)."""
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    if not all(str(p).isascii() for p in (root, sys.executable, *paths)):
        pytest.skip("a non-ASCII checkout, interpreter or temporary directory: unusable under an ASCII locale")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING", "PYTHONUTF8"))}
    return {**env, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(root)}


def test_cli_cleans_chinese_text_under_an_ascii_locale(tmp_path):
    """Under LC_ALL=C PYTHONUTF8=0 the run wrote its manifest with open()'s ASCII default and ended in 'error:
    'ascii' codec can't encode characters'; every file of a run is UTF-8 whatever the locale, and what stdout
    cannot encode is printed as escapes."""
    import subprocess
    import sys

    from data.synthetic import documents

    docs = [{**d, "id": f"文档-{i}"} for i, d in enumerate(documents(6, seed=1, zh_fraction=0.5))]
    docs.append({"id": "副本", "text": docs[0]["text"]})  # a duplicate: the report below names the copy kept
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                                                encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "data.pipeline", str(tmp_path / "in"), "--out", str(out),
                           "--workers", "1"], env=_ascii_locale(tmp_path), capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    kept = {d["id"]: d["text"] for p in tier_shards(out / "raw") for d in iter_docs(p)}
    assert kept == {d["id"]: d["text"] for d in docs}
    proc = subprocess.run([sys.executable, "-m", "data.report", str(out), "--drops", "exact_dup"],
                          env=_ascii_locale(tmp_path), capture_output=True)
    assert proc.returncode == 0 and "\\u6587\\u6863-0" in proc.stdout.decode("ascii"), proc


def test_utf8_file_names_under_an_ascii_locale_ask_for_utf8_mode(tmp_path):
    """A UTF-8 name read by a Python whose file names are ASCII (LC_ALL=C PYTHONUTF8=0) was called 'not UTF-8', with
    advice to re-encode it from latin-1 (which would garble it); the fix is Python's UTF-8 mode. So for --out."""
    import subprocess
    import sys

    for name in ("zh/中文.txt", "en/a.txt"):
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_text("你好，世界。" * 40, encoding="utf-8")
    zh = str(tmp_path / "zh")
    proc = subprocess.run([sys.executable, "-c", f"from data.sources import discover; discover([{zh!r}])"],
                          env=_ascii_locale(tmp_path), capture_output=True, text=True, encoding="utf-8")
    assert "PYTHONUTF8=1" in proc.stderr and "convmv" not in proc.stderr, proc.stderr
    # an --out there: ArrayRecord took the name for no string, a traceback after the walk
    out = os.fsencode(tmp_path) + b"/\xc3\xbc"
    proc = subprocess.run([sys.executable, "-m", "data.pipeline", str(tmp_path / "en"), "--out", out],
                          env=_ascii_locale(tmp_path), capture_output=True, text=True, errors="replace")
    assert proc.returncode == 2 and "argument --out: " in proc.stderr and "PYTHONUTF8=1" in proc.stderr, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["en", "zh"]


def test_run_main_prints_what_an_ascii_stdout_cannot_encode_as_escapes():
    """The trainer's first line ('batch 16×128') raised UnicodeEncodeError under LC_ALL=C PYTHONUTF8=0, before any
    step; so would a Chinese sample."""
    import subprocess
    import sys

    script = "from data.cli import run_main; run_main(print, '16\\xd7128 \\u4e2d\\u6587')"  # (an ASCII -c: see below)
    proc = subprocess.run([sys.executable, "-c", script], env=_ascii_locale(), capture_output=True)
    assert (proc.returncode, proc.stdout) == (0, b"16\\xd7128 \\u4e2d\\u6587\n"), proc.stderr.decode()


def test_run_files_are_utf8_under_an_ascii_locale(tmp_path):
    """sample.txt and the tiers' JSON are UTF-8 whatever the locale (open()'s default is the locale's encoding)."""
    import subprocess
    import sys

    # (the command line ASCII too: Python cannot read a non-ASCII -c under this locale)
    script = ("import sys, pathlib; from data.shards import read_json, write_json; "
              "from experiments.run_log import write_text_atomically; p = pathlib.Path(sys.argv[1]); "
              "write_json(p / 'a.json', {'id': '\\u6587\\u6863'}); "
              "assert read_json(p / 'a.json') == {'id': '\\u6587\\u6863'}; "
              "write_text_atomically(p / 'sample.txt', '\\u4e2d\\u6587\\u6837\\u672c')")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=_ascii_locale(tmp_path),
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (tmp_path / "sample.txt").read_bytes() == "中文样本".encode()
    assert json.loads((tmp_path / "a.json").read_bytes()) == {"id": "文档"}


def test_every_text_read_and_write_names_its_encoding():
    """ruff's PLW1514 flags `path.read_text()` only where it can tell `path` is a pathlib.Path (not `(folder /
    'config.json').read_text()`, the form most of them take): each one without encoding= read or wrote the locale's
    encoding, ASCII under LC_ALL=C PYTHONUTF8=0. Here every read_text / write_text / text-mode .open of the library's
    code, whatever its receiver."""
    import ast

    root = pathlib.Path(__file__).resolve().parents[1]
    text_mode = lambda a: isinstance(a, ast.Constant) and isinstance(a.value, str) and (  # noqa: E731
        a.value != "" and set(a.value) <= set("rwaxt+") and "b" not in a.value)
    missing = []
    for f in sorted(p for d in ("benchmarks", "data", "experiments", "models", "parallel", "scaling")
                    for p in (root / d).rglob("*.py")):
        for n in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
                continue
            text = n.func.attr in ("read_text", "write_text") or (n.func.attr == "open" and any(
                text_mode(a) for a in [*n.args, *(k.value for k in n.keywords if k.arg == "mode")]))
            if text and not any(k.arg == "encoding" for k in n.keywords):
                missing.append(f"{f.relative_to(root)}:{n.lineno}")
    assert missing == [], f"text I/O without encoding='utf-8' (the locale's encoding otherwise): {missing}"


def _listing(d: pathlib.Path) -> list:
    return sorted((str(p.relative_to(d)), p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*"))


def test_a_second_cleaning_run_on_an_out_in_use_is_refused_before_reading_its_inputs(tmp_path, monkeypatch):
    """Two runs of one command on one --out (a double launch, a requeue while the first still ran) wrote each shard
    to the same temporary file: one failed renaming it ('No such file or directory: .../raw/shard-00000.array_record
    .tmp'), the other's tiers could hold a mix of both. The second is refused at once, naming the holder."""
    from data import pipeline
    from data.run_lock import LOCK_NAME, DirLocked, RunLock

    rng = np.random.default_rng(0)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": en_text(rng, 60)}) + "\n" for _ in range(3)))
    out = tmp_path / "clean"
    holder = RunLock(out, "data.pipeline")  # this test process is the running job
    (out / "manifest.json").write_text("{}")  # what a running job has written so far: untouched by the refusal
    before = _listing(out)
    refusal = (rf"{re.escape(str(out))} is in use by another job: pid {os.getpid()} on host \S+ "
               r"\(data.pipeline, started [^)]+\);.* Wait for it, stop it, or use another --out$")
    with pytest.raises(DirLocked, match=refusal):
        run([tmp_path / "a.jsonl"], out, PipelineConfig(workers=1), progress=False)
    with pytest.raises(SystemExit, match="^error: argument --out: " + refusal):
        pipeline.main([str(tmp_path / "a.jsonl"), "--out", str(out), "--workers", "1"])
    with pytest.raises(DirLocked, match=r"in use by another job: pid \d+ on host \S+ \(data.pipeline, "):
        RunLock(out, "experiments.train_lm")  # named the holder "another experiments.train_lm job": the refused one
    assert _listing(out) == before
    holder.release()
    (out / "manifest.json").unlink()
    # released: the run goes ahead (and holds the lock while it runs: its shards are written under it)
    write = pipeline.DocWriter.write

    def write_locked(self, doc):
        with pytest.raises(DirLocked):
            RunLock(out, "probe")
        return write(self, doc)

    monkeypatch.setattr(pipeline.DocWriter, "write", write_locked)
    stats = run([tmp_path / "a.jsonl"], out, PipelineConfig(workers=1), progress=False)
    monkeypatch.undo()
    assert stats["raw"]["stages"][0]["docs_out"] == 3
    RunLock(out, "next").release()  # free again once run() returned
    assert (out / LOCK_NAME).exists()
    # a fresh run refused under the lock (here: no record has the text field) still leaves no directory: the lock
    # removes the one it made
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(ValueError, match="text"):
        run([tmp_path / "b.jsonl"], tmp_path / "never", PipelineConfig(workers=1), progress=False)
    assert not (tmp_path / "never").exists()


def test_a_refused_run_leaves_none_of_the_parent_directories_its_lock_made(tmp_path):
    """`--out new/x/run` refused under the lock (no record has the text field) removed `run` and left `new/x/`
    behind: the lock makes the missing parents too, and removes those it made, up to the first that was there."""
    from data.run_lock import RunLock

    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(ValueError, match="text"):
        run([tmp_path / "b.jsonl"], tmp_path / "new" / "x" / "run", PipelineConfig(workers=1), progress=False)
    assert not (tmp_path / "new").exists()
    # a parent that was there, or that another job wrote in meanwhile, stays
    (tmp_path / "kept").mkdir()
    lock = RunLock(tmp_path / "kept" / "a" / "run", "probe")
    (tmp_path / "kept" / "a" / "other").write_text("")
    lock.release()
    assert sorted(p.name for p in (tmp_path / "kept").rglob("*")) == ["a", "other"]


def test_the_run_lock_is_released_when_its_holder_is_killed(tmp_path):
    """flock: the kernel frees the lock when the holding process dies, kill -9 included: no stale lock to clear."""
    import signal
    import subprocess
    import sys

    from data.run_lock import DirLocked, RunLock

    out = tmp_path / "run"
    code = ("import sys, time; from data.run_lock import RunLock; RunLock(sys.argv[1], 'data.pipeline'); "
            "print('held', flush=True); time.sleep(60)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(DirLocked, match=rf"pid {proc.pid} on host "):
            RunLock(out, "data.pipeline")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    RunLock(out, "data.pipeline").release()  # taken at once: the dead holder's lock is gone


def test_a_lock_taken_while_its_holder_removes_the_directory_it_made_is_taken_anew(tmp_path, monkeypatch):
    """A holder that made --out and wrote nothing removes it on release. A job that opened the lock file just before
    held, once the holder let go, a lock on a removed file: the next job made a new one, and two jobs held --out
    (a fuzz of 6 jobs taking and releasing saw two at once). One whose mkdir lost the directory to such a release
    between its mkdir and its check failed with a bare FileExistsError."""
    import errno
    import pathlib

    from data import run_lock
    from data.run_lock import DirLocked, RunLock

    out = tmp_path / "a" / "run"
    holder = RunLock(out, "data.pipeline")  # made out: its release removes it
    flock = run_lock.fcntl.flock

    def release_first(fd, op):  # the holder lets go between this job's open and its flock
        monkeypatch.setattr(run_lock.fcntl, "flock", flock)
        holder.release()
        return flock(fd, op)

    monkeypatch.setattr(run_lock.fcntl, "flock", release_first)
    lock = RunLock(out, "data.pipeline")
    with pytest.raises(DirLocked):  # the lock held is the one on `out`'s lock file
        RunLock(out, "data.pipeline")
    lock.release()
    assert not out.exists()
    mkdir = pathlib.Path.mkdir

    def lost_race(self, *a, **k):  # what mkdir(exist_ok=True) raises when the directory goes before its check
        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", lost_race)
    RunLock(out, "data.pipeline", wait=True).release()


@pytest.mark.parametrize("before", ["dead", "empty"])
def test_a_refusal_names_the_new_holder_not_the_last_one(tmp_path, before):
    """Two jobs started at once on an --out a finished job had used: the one refused in the instant between the
    winner's flock and its writing its line named the finished job, a dead pid, as the one to stop (10% of such
    races). It reads the line again while that names a process gone from this host, or while the file is empty (the
    winner truncates, then writes: refused in between, it said "holder not yet written")."""
    import json
    import socket
    import subprocess
    import threading

    from data.run_lock import LOCK_NAME, DirLocked, RunLock

    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "run"
    holder = RunLock(out, "data.pipeline")  # this test process is the winner, its line not yet written
    mine = (out / LOCK_NAME).read_text()
    (out / LOCK_NAME).write_text("" if before == "empty" else json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "job": "data.pipeline", "started": "yesterday"}) + "\n")
    writes = threading.Timer(0.05, (out / LOCK_NAME).write_text, [mine])
    writes.start()
    try:
        with pytest.raises(DirLocked, match=rf"pid {os.getpid()} on host "):
            RunLock(out, "data.pipeline")
    finally:
        writes.join()
        holder.release()


def test_an_out_on_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    """A Lustre mount without -o flock (or a FUSE mount) answers flock with ENOSYS / ENOLCK: such an --out is a
    legitimate one, run without the guard (said once), not refused."""
    import errno

    from data import run_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    with run_lock.RunLock(tmp_path / "run", "data.pipeline"):
        pass
    assert "warning: cannot lock" in capsys.readouterr().err and (tmp_path / "run").is_dir()


def test_a_bucket_url_is_refused_by_the_cli_and_run_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """`--out gs://bucket/clean` passed every check as the relative path gs:/bucket/clean: the run cleaned into a
    local folder named 'gs:' and said nothing. A URL input said 'input gs:/bucket/in.jsonl does not exist'."""
    from data import pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": en_text(np.random.default_rng(0))}) + "\n")
    for argv, flag in ((["in.jsonl", "--out", "gs://bucket/clean"], "--out"),
                       (["s3://b/in.jsonl", "--out", "o"], "inputs"),
                       (["in.jsonl", "--out", "o", "--dedup-against", "gs://b/train"], "--dedup-against")):
        with pytest.raises(SystemExit):
            pipeline.main(argv)
        assert re.search(rf"argument {flag}: '\w+://[^']*' is a URL.*gcsfuse", capsys.readouterr().err)
    with pytest.raises(ValueError, match="is a URL"):
        run(["in.jsonl"], pathlib.Path("gs://bucket/clean"))  # (pathlib makes it gs:/bucket/clean)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
