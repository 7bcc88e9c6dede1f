"""The grain LM loader: packing keeps documents apart and loses no token, state resumes exactly,
processes split the data exactly once, mixtures follow their weights, batches land sharded on the mesh."""

import collections
import dataclasses
import gc
import json
import multiprocessing
import pathlib
import warnings

import numpy as np
import pytest
from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

from data.loader import MAX_SEED, LMLoader, LoaderConfig, Source, Tokenize, documents
from data.shards import DocWriter, decode_doc, encode_doc, shard_name
from data.synthetic import en_text, zh_text
from data.tokenizer import ByteTokenizer, pretokenize, train_bpe

EOS_BYTES = ByteTokenizer(add_eos=True)


def write_tier(path, texts, shards=2, tag=""):
    writers = [DocWriter(path / f"{shard_name(i)}.array_record") for i in range(shards)]
    for i, t in enumerate(texts):
        writers[i % shards].write({"id": f"{tag}{i}", "text": t})
    for w in writers:
        w.commit()
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    # lengths from a few tokens to several rows of 32, English and Chinese
    texts = [en_text(rng, int(rng.integers(1, 40))) if i % 3 else zh_text(rng, int(rng.integers(1, 30)))
             for i in range(60)]
    texts = list(dict.fromkeys(texts))
    return write_tier(tmp_path_factory.mktemp("tier"), texts), texts


def rebuild_documents(batches, tok):
    """Walk rows in order and cut the stream of real targets at EOS: returns the decoded documents, and
    checks every row invariant on the way. A piece's first input is the document's start token (BOS, else the EOS
    separator) or, continuing a document past a row boundary, the target the piece before ended on: the checks
    inside a piece (inputs[1:] == targets[:-1]) passed with any first input (a document started after a pad 0)."""
    docs, current = [], []
    start = getattr(tok, "bos_id", None)
    start = tok.eos_id if start is None else start
    for b in batches:
        for inp, tgt, pos, seg, w in zip(b["inputs"], b["targets"], b["positions"], b["segment_ids"], b["weights"]):
            np.testing.assert_array_equal(w, (seg > 0).astype(np.float32))
            real = seg > 0
            assert not real[real.argmin():].any() if not real.all() else True  # padding only at the end
            assert (inp[~real] == 0).all() and (tgt[~real] == 0).all()
            ids = seg[real]
            assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
            for s in np.unique(ids):
                m = seg == s
                np.testing.assert_array_equal(pos[m], np.arange(m.sum()))  # positions restart per piece
                np.testing.assert_array_equal(inp[m][1:], tgt[m][:-1])  # next-token shift inside the piece
                assert inp[m][0] == (current[-1] if current else start), (inp[m][0], current[-1:], start)
                piece = tgt[m].tolist()
                # an EOS target only ever ends a document piece: documents never share a segment
                assert tok.eos_id not in piece[:-1]
                if piece[-1] != tok.eos_id:
                    assert m[-1], "a document continues only across a row boundary"
                current += piece
                if piece[-1] == tok.eos_id:
                    docs.append(tok.decode(current))
                    current = []
    assert current == []
    return docs


@pytest.mark.parametrize("tok_name", ["bytes", "bpe"])
def test_packing_keeps_documents_apart_and_loses_no_token(corpus, tok_name):
    path, texts = corpus
    tok = EOS_BYTES if tok_name == "bytes" else train_bpe(texts, vocab_size=400, show_progress=False)
    cfg = LoaderConfig(seq_len=32, global_batch_size=4, num_epochs=1, drop_remainder=False)
    batches = list(LMLoader([Source(path)], tok, cfg, process_index=0, process_count=1))
    assert all(v.shape == (4, 32) for b in batches[:-1] for v in b.values())
    assert {k: v.dtype.name for k, v in batches[0].items()} == {
        "inputs": "int32", "targets": "int32", "positions": "int32", "segment_ids": "int32", "weights": "float32"}
    got = rebuild_documents(batches, tok)
    assert sorted(got) == sorted(texts)  # every document exactly once, byte for byte
    # and in the loader's (shuffled) document order
    order = [tok.decode(d["targets"]) for d in documents([Source(path)], tok, cfg, 0, 1)]
    assert got == order and order != texts
    n_targets = sum(len(tok.encode(t)) + 1 for t in texts)  # the text and its closing EOS
    assert sum(b["weights"].sum() for b in batches) == n_targets


def test_mixed_sources_are_shuffled_independently(tmp_path):
    """Each source has its own permutation: two sources of one size shuffled alike would read their documents in
    the same index order (one seed shared by every source passed the tests)."""
    a = write_tier(tmp_path / "a", [f"alpha {i:02d}" for i in range(24)], shards=1)
    b = write_tier(tmp_path / "b", [f"bravo {i:02d}" for i in range(24)], shards=1)
    cfg = LoaderConfig(seq_len=16, global_batch_size=2, seed=5)
    docs = documents([Source(a), Source(b)], EOS_BYTES, cfg, 0, 1)
    texts = [EOS_BYTES.decode(d["targets"]) for d, _ in zip(docs, range(48))]
    order = {k: [int(t.split()[1]) for t in texts if t.startswith(k)][:12] for k in ("alpha", "bravo")}
    assert len(order["alpha"]) == len(order["bravo"]) == 12 and order["alpha"] != order["bravo"]


def test_without_eos_every_document_of_two_tokens_or_more_is_trained_on(tmp_path):
    """No EOS: a document of n tokens has n - 1 targets; one of a single token has none and is skipped, but a
    two-token one (one target) is kept (dropping it too passed every test: the corpus had no short documents)."""
    texts = ["ab", "c", "hello"]
    path = write_tier(tmp_path / "short", texts, shards=1)
    cfg = LoaderConfig(seq_len=8, global_batch_size=2, num_epochs=1, drop_remainder=False, shuffle=False)
    loader = LMLoader([Source(path)], ByteTokenizer(), cfg, process_index=0, process_count=1)
    with pytest.warns(UserWarning, match="skips documents of fewer than 2 tokens"):
        batches = list(loader)
    assert sum(b["weights"].sum() for b in batches) == (2 - 1) + (5 - 1)
    assert loader.skipped == {"no_target": 1, "mixture_end": 0}
    loader.close()  # the counts stay readable; reading on, or its state, is refused by name
    assert loader.skipped == {"no_target": 1, "mixture_end": 0}
    for use in (lambda: next(loader), loader.get_state, lambda: loader.set_state({})):
        with pytest.raises(ValueError, match="LMLoader is closed"):
            use()
    # another text field: a bare KeyError from inside grain's iterator at the first next(); now named at once
    with pytest.raises(ValueError, match=r"text_field='body' is not a field of .* \(they have \['id', 'text'\]\)"):
        LMLoader([Source(path)], ByteTokenizer(), dataclasses.replace(cfg, text_field="body"), process_index=0,
                 process_count=1)
    with pytest.raises(ValueError, match=r"text_field='body' is not a field of the documents"):
        Tokenize(ByteTokenizer(), "body")([encode_doc({"id": "x", "text": "t"})])


def test_documents_without_a_target_are_counted_as_skipped_across_a_resume(tmp_path):
    """No EOS: a one-token (or empty) document has no target and is skipped; with usable documents beside it the skip
    was counted nowhere (data lost silently). `LMLoader.skipped` counts it, warned about, and the count survives
    get_state / set_state (the packer replays from its own checkpoint: a count outside grain's state doubled)."""
    texts = [f"document number {i}" if i % 3 else "xyz"[i % 9 // 3] for i in range(27)] + ["", "q"]
    path = write_tier(tmp_path / "short", texts, shards=2)
    short = sum(len(t) < 2 for t in texts)
    assert short == 11
    for epochs, tb in ((1, 4), (2, 1)):
        cfg = LoaderConfig(seq_len=16, global_batch_size=2, num_epochs=epochs, drop_remainder=False, tokenize_batch=tb)
        loader = LMLoader([Source(path)], ByteTokenizer(), cfg, process_index=0, process_count=1)
        with pytest.warns(UserWarning, match=r"skips documents of fewer than 2 tokens .*LMLoader.skipped"):
            batches = list(loader)
        assert loader.skipped == {"no_target": epochs * short, "mixture_end": 0}
        assert sum(b["weights"].sum() for b in batches) == epochs * sum(len(t) - 1 for t in texts if len(t) >= 2)
        for cut in (1, len(batches) // 2, len(batches) - 1):  # resumed: the same batches and the same count
            first = LMLoader([Source(path)], ByteTokenizer(), cfg, process_index=0, process_count=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                [next(first) for _ in range(cut)]
                state = json.loads(json.dumps(first.get_state()))
                resumed = LMLoader([Source(path)], ByteTokenizer(), cfg, process_index=0, process_count=1)
                resumed.set_state(state)
                rest = list(resumed)
            assert len(rest) == len(batches) - cut
            assert all(np.array_equal(a[k], b[k]) for a, b in zip(rest, batches[cut:]) for k in a)
            assert resumed.skipped == loader.skipped, (epochs, tb, cut)


def test_pretokenized_source_gives_the_same_batches(corpus, tmp_path):
    path, texts = corpus
    tok = train_bpe(texts, vocab_size=400, show_progress=False)
    pre = pretokenize(path, tok, tmp_path / "pre", progress=False)
    cfg = LoaderConfig(seq_len=32, global_batch_size=4, seed=7)
    live = LMLoader([Source(path)], tok, cfg, process_index=0, process_count=1)
    cached = LMLoader([Source(pre)], tok, cfg, process_index=0, process_count=1)
    for _ in range(10):
        a, b = next(live), next(cached)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="pre-tokenized with vocab_size=400"):
        LMLoader([Source(pre)], EOS_BYTES, cfg, process_index=0, process_count=1)
    # another BPE with the same vocab size and EOS id maps the ids to other text
    other = train_bpe(texts[::-1][:20], vocab_size=400, show_progress=False)
    assert (other.vocab_size, other.eos_id) == (tok.vocab_size, tok.eos_id)
    with pytest.raises(ValueError, match="another tokenizer"):
        LMLoader([Source(pre)], other, cfg, process_index=0, process_count=1)
    # a state of the text read with one of them does not resume with the other (the ids would differ)
    with pytest.raises(ValueError, match=f"over another stream .*tokenizer: saved {tok.fingerprint}"):
        LMLoader([Source(path)], other, cfg, process_index=0, process_count=1).set_state(live.get_state())
    with pytest.raises(TypeError, match=r"tokenizer Tokenizer has no \['vocab_size', 'eos_id'\]; .*not its .tok"):
        LMLoader([Source(path)], tok.tok, cfg, process_index=0, process_count=1)  # an AttributeError deep inside
    # pretokenizing a smaller tier into the same folder: the earlier run's extra shards were read as this tier's
    small = write_tier(tmp_path / "small", texts[:6], shards=1)
    pretokenize(small, tok, tmp_path / "pre", progress=False)
    assert sorted(p.name for p in (tmp_path / "pre").glob("shard-*")) == ["shard-00000.array_record",
                                                                          "shard-00000.digest.json"]
    # the shards named as files are checked too, and shards whose tokenizer.json is missing (a pretokenize run that
    # stopped before its last step) are refused: both were read with any tokenizer, ids >= its vocab_size included
    files = tuple(sorted(str(f) for f in pathlib.Path(pre).glob("shard-*.array_record")))
    with pytest.raises(ValueError, match="pre-tokenized with vocab_size=400"):
        LMLoader([Source(files)], EOS_BYTES, cfg, process_index=0, process_count=1)
    # into the tier itself: every text shard was replaced by its ids
    with pytest.raises(ValueError, match="is tier_dir: the cleaned text would be overwritten"):
        pretokenize(path, tok, path, progress=False)
    assert LMLoader([Source(path)], tok, cfg, process_index=0, process_count=1) is not None
    # files of two folders in one Source: each folder is checked (only the first file's was: the second tier's ids,
    # of another tokenizer, were read as this one's)
    other_pre = pretokenize(small, other, tmp_path / "other_pre", progress=False)
    mixed = tuple(str(pathlib.Path(d) / "shard-00000.array_record") for d in (pre, other_pre))
    with pytest.raises(ValueError, match="another tokenizer"):
        LMLoader([Source(mixed)], tok, cfg, process_index=0, process_count=1)
    (pathlib.Path(pre) / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="holds pre-tokenized ids but no .*tokenizer.json"):
        LMLoader([Source(pre)], tok, cfg, process_index=0, process_count=1)
    # a file that is not a shard (a renamed JSON Lines file, a git-lfs pointer) is named
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shard-00000.array_record").write_text('{"text": "hello"}\n' * 5)
    with pytest.raises(ValueError, match=r"bad/shard-00000.array_record is not an ArrayRecord shard"):
        LMLoader([Source(str(bad))], tok, cfg, process_index=0, process_count=1)


def test_ids_pretokenized_without_a_bos_are_read_with_one(corpus, tmp_path):
    """The ids hold no BOS / EOS (the loader adds them), so a tier pre-tokenized with the plain BPE is the same with
    bos_token chosen: it was refused as "another tokenizer" (the fingerprint holds the BOS choice), though
    pretokenizing again wrote byte-identical shards."""
    from data.tokenizer import BPETokenizer

    path, texts = corpus
    tok = train_bpe(texts, vocab_size=300, special_tokens=("<|endoftext|>", "<|bos|>"), show_progress=False)
    bos = BPETokenizer(tok.tok, bos_token="<|bos|>")
    cfg = LoaderConfig(seq_len=32, global_batch_size=4, num_epochs=1)
    for made_by, read_by in ((tok, bos), (bos, tok)):
        pre = pretokenize(path, made_by, tmp_path / f"pre{made_by.bos_id}", progress=False)
        got = list(LMLoader([Source(pre)], read_by, cfg, process_index=0, process_count=1))
        want = list(LMLoader([Source(path)], read_by, cfg, process_index=0, process_count=1))
        assert len(got) == len(want) and all(np.array_equal(a[k], b[k]) for a, b in zip(got, want) for k in a)
    meta = pathlib.Path(pre) / "tokenizer.json"  # a meta written before: the whole fingerprint, BOS included
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "fingerprint": bos.fingerprint}))
    assert LMLoader([Source(pre)], bos, cfg, process_index=0, process_count=1) is not None



def test_pretokenized_ids_are_checked_by_eos_id_and_an_interrupted_pretokenize_leaves_no_meta(corpus, tmp_path):
    """A tokenizer without a fingerprint (any duck-typed one) is checked by vocab size *and* EOS id: another EOS id
    packs documents apart at another token. A pretokenize run that dies part-way over an earlier run's output must not
    leave that run's tokenizer.json beside its shards, some of which now hold the new tokenizer's ids."""
    path, _ = corpus
    cfg = LoaderConfig(seq_len=32, global_batch_size=4)
    pre = pretokenize(path, EOS_BYTES, tmp_path / "pre", progress=False)

    class OtherEos:  # the byte ids, EOS at 0, no fingerprint
        vocab_size, eos_id, bos_id = 257, 0, None
        encode, decode = EOS_BYTES.encode, EOS_BYTES.decode

    with pytest.raises(ValueError, match="pre-tokenized with vocab_size=257, eos_id=256"):
        LMLoader([Source(pre)], OtherEos(), cfg, process_index=0, process_count=1)

    from data.shards import iter_docs, tier_shards

    first = len(list(iter_docs(tier_shards(path)[0])))

    class DiesOnTheSecondShard(OtherEos):
        fingerprint, calls = "dies", 0

        def encode(self, text):
            self.calls += 1
            if self.calls > first:  # the first shard is rewritten with these ids, then the run dies
                raise KeyboardInterrupt
            return EOS_BYTES.encode(text)

    with pytest.raises(KeyboardInterrupt):
        pretokenize(path, DiesOnTheSecondShard(), tmp_path / "pre", batch=8, progress=False)
    assert not (tmp_path / "pre" / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="holds pre-tokenized ids but no .*tokenizer.json"):
        LMLoader([Source(pre)], EOS_BYTES, cfg, process_index=0, process_count=1)


def test_a_pretokenize_meta_write_cut_short_leaves_no_meta(corpus, tmp_path, full_disk):
    """tokenizer.json (the meta the loader trusts beside the ids) was written in place: a write cut short (a full
    disk) left a truncated meta there instead of none, which then failed as a bare JSON error."""
    full_disk("tokenizer.json")
    with pytest.raises(OSError, match="No space left"):
        pretokenize(corpus[0], EOS_BYTES, tmp_path / "pre", progress=False)
    assert not [p.name for p in (tmp_path / "pre").iterdir() if p.name.startswith("tokenizer.json")]


def test_a_tokenizer_saved_beside_the_text_is_not_read_as_pretokenize_meta(corpus, tmp_path):
    """`tok.save(tier / "tokenizer.json")` (the Hugging Face name, next to the text it was trained on): the loader read
    that file as pretokenize's meta of the same name and raised a bare KeyError: 'vocab_size'. Beside pre-tokenized
    ids it says nothing of them either, and is refused as no meta."""
    import shutil

    path, texts = corpus
    tok = train_bpe(texts, vocab_size=400, show_progress=False)
    tier = shutil.copytree(path, tmp_path / "tier")
    tok.save(tier / "tokenizer.json")
    cfg = LoaderConfig(seq_len=32, global_batch_size=4, num_epochs=1)
    got = next(LMLoader([Source(str(tier))], tok, cfg, process_index=0, process_count=1))
    want = next(LMLoader([Source(path)], tok, cfg, process_index=0, process_count=1))
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    pre = pathlib.Path(pretokenize(path, tok, tmp_path / "pre", progress=False))
    tok.save(pre / "tokenizer.json")  # over the meta
    with pytest.raises(ValueError, match="holds pre-tokenized ids but no .*tokenizer.json"):
        LMLoader([Source(str(pre))], tok, cfg, process_index=0, process_count=1)


def test_processes_and_sources_shuffle_independently(tmp_path):
    """Every process shuffled its slice [p::n] with one seed and grain shuffles epoch e with seed + e: the processes
    read neighbouring documents in lockstep (process 1's j-th = process 0's + 1), and in a mixture source 0's epoch
    1 repeated source 1's epoch 0."""
    tok, n_docs = ByteTokenizer(add_eos=True), 20
    a = write_tier(tmp_path / "a", [f"a{i:02d}" for i in range(n_docs)], shards=1)
    b = write_tier(tmp_path / "b", [f"b{i:02d}" for i in range(n_docs)], shards=1)
    cfg = LoaderConfig(seq_len=16, global_batch_size=2, seed=0, tokenize_batch=1)

    def order(srcs, p=0, n=1, k=n_docs):
        return [tok.decode(d["targets"])[:3] for d, _ in zip(documents(srcs, tok, cfg, p, n), range(k))]

    p0, p1 = order([Source(a)], 0, 2, n_docs // 2), order([Source(a)], 1, 2, n_docs // 2)
    assert sorted(p0 + p1) == sorted(f"a{i:02d}" for i in range(n_docs))  # each document once
    assert sum(int(y[1:]) == int(x[1:]) + 1 for x, y in zip(p0, p1)) < 4, (p0, p1)
    mix = order([Source(a), Source(b)], k=4 * n_docs)
    ma, mb = [x[1:] for x in mix if x[0] == "a"], [x[1:] for x in mix if x[0] == "b"]
    assert ma[n_docs:2 * n_docs] != mb[:n_docs]


def test_one_source_on_one_process_keeps_the_seed_times_1000_order(tmp_path):
    """States saved before the per-process seeds resume only if one source on one process still shuffles as grain
    does with seed·1000 (`_shuffle_seed`, MAX_SEED): any other seed reorders every epoch of those runs silently."""
    import grain

    from data.loader import _data_source

    tok, n_docs = ByteTokenizer(add_eos=True), 20
    a = write_tier(tmp_path / "a", [f"a{i:02d}" for i in range(n_docs)], shards=1)
    cfg = LoaderConfig(seq_len=16, global_batch_size=2, seed=3, tokenize_batch=1)
    got = [tok.decode(d["targets"])[:3] for d, _ in zip(documents([Source(a)], tok, cfg, 0, 1), range(2 * n_docs))]
    ds = grain.MapDataset.source(_data_source(Source(a).files())).shuffle(seed=3000).repeat(2)
    want = [decode_doc(ds[i])["text"] for i in range(2 * n_docs)]
    assert got == want


def test_a_mixture_state_of_the_old_shared_seed_order_is_another_stream(tmp_path):
    """A mixture on one process shuffles with per-source seeds now (it was seed·1000 + k): a state saved before, with
    no "order" in its stream key, points into another order and is refused; one source on one process kept its
    order, so its key has no "order" and its old states resume."""
    from data.loader import StreamMismatch

    a = write_tier(tmp_path / "a", [f"a{i:02d}" for i in range(12)], shards=1)
    b = write_tier(tmp_path / "b", [f"b{i:02d}" for i in range(12)], shards=1)
    cfg = LoaderConfig(seq_len=16, global_batch_size=2, seed=1)
    one = LMLoader([Source(a)], EOS_BYTES, cfg, process_index=0, process_count=1)
    assert "order" not in one.get_state()["stream"]
    mix = LMLoader([Source(a), Source(b)], EOS_BYTES, cfg, process_index=0, process_count=1)
    old = mix.get_state()
    old["stream"].pop("order")
    with pytest.raises(StreamMismatch, match="order: saved None, now per-process seeds"):
        LMLoader([Source(a), Source(b)], EOS_BYTES, cfg, process_index=0, process_count=1).set_state(old)
    # one source on several processes shuffled with seed·1000 on each too: its old states are refused as well
    two = LMLoader([Source(a)], EOS_BYTES, cfg, process_index=0, process_count=2)
    old = two.get_state()
    assert old["stream"].pop("order") == "per-process seeds"
    with pytest.raises(StreamMismatch, match="order: saved None, now per-process seeds"):
        two.set_state(old)


def test_a_tier_cleaned_again_is_another_stream(corpus, tmp_path):
    """ArrayRecord files grow in 64 KiB steps: a tier of one document fewer kept its shard names and sizes, and a
    resume read the old position in another stream, silently. The record count tells them apart."""
    from data.loader import StreamMismatch

    _, texts = corpus
    cfg = LoaderConfig(seq_len=32, global_batch_size=4, seed=3)
    a = write_tier(tmp_path / "a" / "augmented", texts[:30])
    b = write_tier(tmp_path / "b" / "augmented", texts[:29])
    sizes = lambda d: [f.stat().st_size for f in sorted(pathlib.Path(d).iterdir())]  # noqa: E731
    assert sizes(a) == sizes(b)  # what the key had compared
    state = LMLoader([Source(a)], EOS_BYTES, cfg, process_index=0, process_count=1).get_state()
    with pytest.raises(StreamMismatch, match="sources: saved .*records 30 ends \\w+'\\], now .*records 29 "):
        LMLoader([Source(b)], EOS_BYTES, cfg, process_index=0, process_count=1).set_state(state)
    # another tier of as many records (e.g. labeled and augmented of one run): told apart by its end records
    c = write_tier(tmp_path / "c" / "augmented", texts[1:31])
    with pytest.raises(StreamMismatch, match="sources: saved .*records 30 ends"):
        LMLoader([Source(c)], EOS_BYTES, cfg, process_index=0, process_count=1).set_state(state)
    # ... and by its last record where the first is the same
    d = write_tier(tmp_path / "d" / "augmented", texts[:29] + [texts[40]])
    assert sizes(d) == sizes(a)
    with pytest.raises(StreamMismatch, match="sources: saved .*records 30 ends"):
        LMLoader([Source(d)], EOS_BYTES, cfg, process_index=0, process_count=1).set_state(state)
    # an int weight and the same float are one stream
    for w, v in ((2, 2.0), (2.0, 2)):
        one = LMLoader([Source(a, w)], EOS_BYTES, cfg, process_index=0, process_count=1).get_state()
        LMLoader([Source(a, v)], EOS_BYTES, cfg, process_index=0, process_count=1).set_state(one)


def rewrite_shard(path, edit):
    """Rewrite one shard through DocWriter (as a hand edit would) with `edit(docs)` applied."""
    from data.shards import iter_docs

    docs = list(iter_docs(path))
    edit(docs)
    w = DocWriter(path)
    for d in docs:
        w.write(d)
    w.commit()


def test_a_shard_edited_in_place_is_another_stream_a_copy_is_not(corpus, tmp_path):
    """A middle record edited to text of the same length keeps the shard's name, size, record count and end records:
    every part of the key, so a resume read the old position in another stream, silently. DocWriter writes each
    shard's content digest beside it (`shard-NNNNN.digest.json`) and the key holds it: the edit is named, with the
    shard; the same tier copied elsewhere (sidecars and all) still resumes."""
    import shutil

    from data.loader import StreamMismatch

    _, texts = corpus
    cfg = LoaderConfig(seq_len=32, global_batch_size=4, seed=3)
    a = write_tier(tmp_path / "a" / "augmented", texts[:30])
    live = LMLoader([Source(a)], EOS_BYTES, cfg, process_index=0, process_count=1)
    next(live)
    state = json.loads(json.dumps(live.get_state()))
    want = next(live)
    copy = shutil.copytree(a, tmp_path / "elsewhere" / "augmented")  # an unedited copy: the same stream
    b = LMLoader([Source(str(copy))], EOS_BYTES, cfg, process_index=0, process_count=1)
    b.set_state(state)
    np.testing.assert_array_equal(next(b)["inputs"], want["inputs"])
    shard = pathlib.Path(a) / "shard-00001.array_record"
    size = shard.stat().st_size

    def edit(docs):
        t = docs[len(docs) // 2]["text"]
        docs[len(docs) // 2]["text"] = t[1:] + t[0]  # the same length, another text

    rewrite_shard(shard, edit)
    assert shard.stat().st_size == size
    with pytest.raises(StreamMismatch, match=r"shard-00001.array_record was rewritten since the state was saved "
                                             r"\(content digest saved \w{8}, now \w{8}\).*Put back"):
        LMLoader([Source(a)], EOS_BYTES, cfg, process_index=0, process_count=1).set_state(state)
    # the copy's sidecars left behind: its shards are not known to be the ones the state was saved over
    for f in pathlib.Path(copy).glob("*.digest.json"):
        f.unlink()
    with pytest.raises(StreamMismatch, match=r"shard-00000.array_record has no content digest beside it \(saved "
                                             r"\w{8}\).*shard-\*.digest.json"):
        LMLoader([Source(str(copy))], EOS_BYTES, cfg, process_index=0, process_count=1).set_state(state)


def test_a_corpus_written_before_content_digests_keeps_its_stream_key(corpus, tmp_path):
    """Shards of older runs have no digest sidecar: their key is the one states were saved with before (names,
    sizes, records, ends: no "digests"), so those checkpoints still resume; digests add a part, change none."""
    _, texts = corpus
    cfg = LoaderConfig(seq_len=32, global_batch_size=4, seed=3)
    a = write_tier(tmp_path / "a", texts[:30])
    with_digests = LMLoader([Source(a)], EOS_BYTES, cfg, process_index=0, process_count=1).get_state()["stream"]
    assert len(with_digests["digests"][0].split()) == 2
    for f in pathlib.Path(a).glob("*.digest.json"):
        f.unlink()
    live = LMLoader([Source(a)], EOS_BYTES, cfg, process_index=0, process_count=1)
    next(live)
    state = json.loads(json.dumps(live.get_state()))
    assert "digests" not in state["stream"]
    assert {k: v for k, v in with_digests.items() if k != "digests"} == state["stream"]
    want = next(live)
    b = LMLoader([Source(a)], EOS_BYTES, cfg, process_index=0, process_count=1)
    b.set_state(state)
    np.testing.assert_array_equal(next(b)["inputs"], want["inputs"])


def test_state_restores_identical_batches(corpus, tmp_path):
    path, texts = corpus
    other = write_tier(tmp_path / "other", texts[:20], shards=1, tag="o")
    for sources in ([Source(path)], [Source(path, 2.0), Source(other, 1.0)]):
        cfg = LoaderConfig(seq_len=32, global_batch_size=4, seed=3)
        a = LMLoader(sources, EOS_BYTES, cfg, process_index=0, process_count=1)
        for _ in range(7):
            next(a)
        state = json.loads(json.dumps(a.get_state()))  # saved as JSON next to a checkpoint
        expected = [next(a) for _ in range(25)]  # crosses epoch boundaries of the small source
        b = LMLoader(sources, EOS_BYTES, cfg, process_index=0, process_count=1)
        b.set_state(state)
        for e, g in zip(expected, [next(b) for _ in range(25)]):
            for k in e:
                np.testing.assert_array_equal(e[k], g[k])
        b = LMLoader(sources, EOS_BYTES, cfg, process_index=0, process_count=1)  # a state saved before "stream"
        b.set_state(state["grain"])
        np.testing.assert_array_equal(next(b)["inputs"], expected[0]["inputs"])
        # a state of another stream is named, not read as a position in this one (it was, silently)
        for other_cfg, srcs, what in ((dataclasses.replace(cfg, seed=9), sources, "config: saved .*'seed': 3"),
                                      (dataclasses.replace(cfg, tokenize_batch=1), sources, "tokenize_batch"),
                                      (cfg, [Source(other)], "sources: saved")):
            with pytest.raises(ValueError, match=f"saved by a loader over another stream .*{what}"):
                LMLoader(srcs, EOS_BYTES, other_cfg, process_index=0, process_count=1).set_state(state)
        # states saved before the key counted records still restore
        before = json.loads(json.dumps(state))
        before["stream"]["sources"] = [x.split(" records ")[0] for x in before["stream"]["sources"]]
        b = LMLoader(sources, EOS_BYTES, cfg, process_index=0, process_count=1)
        b.set_state(before)
        np.testing.assert_array_equal(next(b)["inputs"], expected[0]["inputs"])
        # the batches after the restored point are not simply the first ones again
        fresh = LMLoader(sources, EOS_BYTES, cfg, process_index=0, process_count=1)
        assert (next(fresh)["inputs"] != expected[0]["inputs"]).any()
        # the seed picks the order: another seed, another first batch; the same seed, the same one (a shuffle
        # that ignored cfg.seed passed every test)
        first = next(LMLoader(sources, EOS_BYTES, cfg, process_index=0, process_count=1))["inputs"]
        seed4 = dataclasses.replace(cfg, seed=4)
        assert (next(LMLoader(sources, EOS_BYTES, seed4, process_index=0, process_count=1))["inputs"] != first).any()
        again = LMLoader(sources, EOS_BYTES, cfg, process_index=0, process_count=1)
        np.testing.assert_array_equal(next(again)["inputs"], first)
    # every LoaderConfig field that cuts or orders the rows is part of the stream (without seq_len in the key, a
    # state restored into another row length silently), and so is the process: process 0's state on process 1
    cfg = LoaderConfig(seq_len=32, global_batch_size=4, seed=3)
    state = LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=1).get_state()
    for change in ({"seq_len": 16}, {"global_batch_size": 8}, {"shuffle": False}, {"num_epochs": 3},
                   {"drop_remainder": False}):
        with pytest.raises(ValueError, match=f"over another stream .*config: saved .*'{next(iter(change))}'"):
            LMLoader([Source(path)], EOS_BYTES, dataclasses.replace(cfg, **change), process_index=0,
                     process_count=1).set_state(state)
    # the field read as text: another field of the same tier is another stream
    two = DocWriter(tmp_path / "two" / "shard-00000.array_record")
    for t in texts:
        two.write({"text": t, "title": t[:5]})
    two.commit()
    state = LMLoader([Source(str(tmp_path / "two"))], EOS_BYTES, cfg, process_index=0, process_count=1).get_state()
    with pytest.raises(ValueError, match="over another stream .*config: saved .*'text_field': 'text'"):
        LMLoader([Source(str(tmp_path / "two"))], EOS_BYTES, dataclasses.replace(cfg, text_field="title"),
                 process_index=0, process_count=1).set_state(state)
    state = LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=2).get_state()
    with pytest.raises(ValueError, match="over another stream .*process: saved 0 of 2, now 1 of 2"):
        LMLoader([Source(path)], EOS_BYTES, cfg, process_index=1, process_count=2).set_state(state)


def test_a_config_of_numpy_numbers_saves_a_json_state(corpus):
    """LoaderConfig accepts numpy ints (numbers.Integral: a sweep over np.arange, values read from an array), but
    they went raw into get_state()'s "stream": experiments/checkpoint.py's json.dumps raised TypeError at the first
    checkpoint save."""
    path, _ = corpus
    cfg = LoaderConfig(seq_len=np.int64(32), global_batch_size=np.int64(4), seed=np.int64(3), num_epochs=np.int64(2),
                       shuffle=np.bool_(True))
    a = LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=1)
    next(a)
    state = json.loads(json.dumps(a.get_state()))
    expected = next(a)
    b = LMLoader([Source(path)], EOS_BYTES, LoaderConfig(seq_len=32, global_batch_size=4, seed=3, num_epochs=2),
                 process_index=0, process_count=1)  # the same stream written with Python ints
    b.set_state(state)
    np.testing.assert_array_equal(next(b)["inputs"], expected["inputs"])


def test_two_processes_cover_the_data_exactly_once(corpus):
    path, texts = corpus
    cfg = LoaderConfig(seq_len=32, global_batch_size=8, num_epochs=2, drop_remainder=False)
    per_process = []
    for p in range(2):
        batches = list(LMLoader([Source(path)], EOS_BYTES, cfg, process_index=p, process_count=2))
        assert all(b["inputs"].shape[0] == 4 for b in batches[:-1])  # this process's half of the global batch
        per_process.append(rebuild_documents(batches, EOS_BYTES))
    counts = [collections.Counter(d) for d in per_process]
    assert not set(counts[0]) & set(counts[1])  # disjoint
    assert counts[0] + counts[1] == collections.Counter({t: 2 for t in texts})  # every doc once per epoch
    # epochs are reshuffled
    half = len(per_process[0]) // 2
    assert per_process[0][:half] != per_process[0][half:]


def test_without_shuffle_documents_come_in_tier_order_split_by_process(tmp_path):
    """shuffle=False reads the tier in shard order, process p the documents [p::n] of it (a loader that shuffled
    anyway passed every test: their counts do not depend on the order)."""
    from data.shards import iter_docs, tier_shards

    path = write_tier(tmp_path / "t", [f"doc {i:02d}" for i in range(11)], shards=3)
    want = [d["text"] for f in tier_shards(path) for d in iter_docs(f)]
    cfg = LoaderConfig(seq_len=8, global_batch_size=2, num_epochs=1, shuffle=False)
    for p, n in ((0, 1), (0, 2), (1, 2)):
        got = [EOS_BYTES.decode(d["targets"]) for d in documents([Source(path)], EOS_BYTES, cfg, p, n)]
        assert got == want[p::n], (p, n)


def test_mixture_follows_weights(corpus, tmp_path):
    path, texts = corpus
    rng = np.random.default_rng(5)
    b = write_tier(tmp_path / "b", [zh_text(rng, 50) + "乙" for _ in range(15)], shards=1, tag="b")
    cfg = LoaderConfig(seq_len=32, global_batch_size=4)
    docs = documents([Source(path, 3.0), Source(b, 1.0)], EOS_BYTES, cfg, 0, 1)
    it = iter(docs)
    first = [EOS_BYTES.decode(next(it)["targets"]) for _ in range(400)]
    share_b = sum(d.endswith("乙") for d in first) / len(first)
    assert abs(share_b - 0.25) < 0.03


def test_worker_processes_give_the_same_batches(corpus):
    path, _ = corpus
    cfg = LoaderConfig(seq_len=32, global_batch_size=4, seed=1, num_epochs=1, drop_remainder=False)
    ref = LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=1)
    expected = list(ref)
    # (by type: isinstance reads each object's __class__, which torch's deprecated reduce_op answers with a warning)
    shm_arrays = lambda: sum(issubclass(type(o), SharedMemoryArray) for o in gc.get_objects())  # noqa: E731
    gc.collect()
    before = shm_arrays()
    par = LMLoader([Source(path)], EOS_BYTES, dataclasses.replace(cfg, worker_count=2), process_index=0,
                   process_count=1)
    gc.disable()  # (an automatic gc would free the arrays below by chance)
    try:
        got = [next(par) for _ in range(12)]
        saved = json.loads(json.dumps(par.get_state()))
        assert shm_arrays() > before  # the workers' batches in flight
        got += list(par)  # a finite stream, read to its end
        assert len(got) == len(expected) > 12
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(e["inputs"], g["inputs"])
            np.testing.assert_array_equal(e["segment_ids"], g["segment_ids"])
        par.close()
        # close() lets go of them, with no gc of the caller's (they were held until the loader was collected, and the
        # stream's end left its last ones in reference cycles: at a script's exit, grain's "Exception ignored in
        # SharedMemoryArray.__del__" errors and a leaked-shared_memory warning)
        assert shm_arrays() == before and par.skipped["no_target"] == 0
    finally:
        par.close()
        gc.enable()
    assert not multiprocessing.active_children()  # the workers stopped by close(), not whenever the loader is collected
    with pytest.raises(ValueError, match="LMLoader is closed"):
        next(par)
    with pytest.raises(ValueError, match="worker_count"):  # a worker state restored without workers
        LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=1).set_state(saved)
    # tokenizing one document at a time gives the same batches too (grain's batch of 1 overflowed)
    one = LMLoader([Source(path)], EOS_BYTES, LoaderConfig(seq_len=32, global_batch_size=4, seed=1, tokenize_batch=1),
                   process_index=0, process_count=1)
    for e, g in zip(expected, [next(one) for _ in range(12)]):
        np.testing.assert_array_equal(e["inputs"], g["inputs"])
        np.testing.assert_array_equal(e["segment_ids"], g["segment_ids"])


def test_device_batches_are_sharded_over_the_batch_axes(corpus, tmp_path, monkeypatch):
    import jax

    from parallel import make_mesh

    path, _ = corpus
    mesh = make_mesh({"data": 4, "fsdp": 2})
    cfg = LoaderConfig(seq_len=32, global_batch_size=8, seed=2)
    host = next(LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=1))
    dev = next(LMLoader([Source(path)], EOS_BYTES, cfg, mesh=mesh))
    for k, v in dev.items():
        assert isinstance(v, jax.Array) and v.shape == (8, 32)
        np.testing.assert_array_equal(np.asarray(v), host[k])
        assert len(v.sharding.device_set) == 8
        # each device holds one row: the batch dimension is split 8 ways (data x fsdp)
        assert {s.data.shape for s in v.addressable_shards} == {(1, 32)}
    with pytest.raises(ValueError, match=r"LoaderConfig.global_batch_size=6 / seq_len=32 do not split over the mesh: "
                                         r"dimension 'batch' of size 6"):  # jax's IndivisibleError at next() before
        LMLoader([Source(path)], EOS_BYTES, dataclasses.replace(cfg, global_batch_size=6), mesh=mesh)
    # a process share that is not this process's: 4 local rows became the whole "global" batch, silently
    with pytest.raises(ValueError, match="process_index=1 / process_count=2 with a mesh, but this is JAX process 0"):
        LMLoader([Source(path)], EOS_BYTES, cfg, mesh=mesh, process_index=1, process_count=2)
    # a partial last batch (drop_remainder=False): padded with rows of weight 0 to the step's shape, its rows those
    # of the host loader (the mesh does not divide it: it was jax's IndivisibleError, then a refusal at the end)
    small = write_tier(tmp_path / "small", [f"a few words here, number {i}" for i in range(7)], shards=1)
    last = dataclasses.replace(cfg, num_epochs=1, drop_remainder=False, shuffle=False)
    host = list(LMLoader([Source(small)], EOS_BYTES, last, process_index=0, process_count=1))
    dev = list(LMLoader([Source(small)], EOS_BYTES, last, mesh=mesh))
    assert len(dev) == len(host) and 0 < len(host[-1]["weights"]) < 8
    for h, d in zip(host, dev):
        for k in h:
            assert d[k].shape == (8, 32)
            np.testing.assert_array_equal(np.asarray(d[k])[:len(h[k])], h[k])
            assert not np.asarray(d[k])[len(h[k]):].any()  # weight 0, segment 0: padding
    # several processes: each one's last batch would have its own size (a collective mismatch / hang)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="drop_remainder=False on several processes"):
        LMLoader([Source(path)], EOS_BYTES, last, mesh=mesh)


def test_config_errors_name_the_field(corpus, tmp_path):
    path, _ = corpus
    with pytest.raises(ValueError, match="global_batch_size"):
        LMLoader([Source(path)], EOS_BYTES, LoaderConfig(global_batch_size=3), process_index=0, process_count=2)
    with pytest.raises(ValueError, match="seq_len"):
        LoaderConfig(seq_len=0)
    # each bound, at the first value past it (the smallest accepted values were tested only through defaults)
    for field, bad in (("global_batch_size", 0), ("num_epochs", 0), ("worker_count", -1), ("worker_buffer_size", 0),
                       ("tokenize_batch", 0), ("seed", -1), ("seed", MAX_SEED + 1)):
        with pytest.raises(ValueError, match=rf"LoaderConfig.{field}={bad} must be"):
            LoaderConfig(**{field: bad})
    with pytest.raises(ValueError, match="weight"):
        Source(path, weight=0)
    with pytest.raises(FileNotFoundError, match="shard-"):
        LMLoader([Source(str(tmp_path))], EOS_BYTES, LoaderConfig(), process_index=0, process_count=1)



def test_misused_sources_and_configs_are_named(tmp_path):
    """Each was an error from inside grain or array_record (or a bare TypeError) naming neither argument nor fix."""
    path = write_tier(tmp_path / "t", ["some text"], shards=1)
    (tmp_path / "raw.jsonl").write_text('{"text": "x"}\n')
    # a shard named twice was read twice per epoch (no shards: an IndexError)
    shard, link = f"{path}/{shard_name(0)}.array_record", tmp_path / "link.array_record"
    link.symlink_to(shard)
    for make, says in ((lambda: LoaderConfig(seq_len=16.5), "LoaderConfig.seq_len=16.5 must be an int"),
                       (lambda: LoaderConfig(global_batch_size="2"), "LoaderConfig.global_batch_size='2' must be"),
                       (lambda: Source(path, float("inf")), "Source.weight=inf .* positive finite number"),
                       (lambda: Source(path, "2"), "Source.weight='2'"),
                       (lambda: Source(str(tmp_path / "raw.jsonl")), r"raw.jsonl'\] are not ArrayRecord shards; clean"),
                       (lambda: Source((path,)), r"is a directory; pass a tier directory as Source\(path\)"),
                       (lambda: Source(()), r"Source.path=\(\) names no shard files"),
                       (lambda: Source(f for f in ()), r"Source.path=\(\) names no shard files"),
                       (lambda: Source((shard, shard)), "name the same shard more than once"),
                       (lambda: Source((shard, str(link))), r"shard-00000.array_record'\] name the same shard"),
                       (lambda: documents(Source(path), ByteTokenizer()), "sources must be a list of data.loader"),
                       (lambda: documents([path], ByteTokenizer()), "sources must be a list")):
        with pytest.raises(ValueError, match=says):
            make()


def test_a_process_stopped_by_another_counts_what_it_leaves_unread(corpus, monkeypatch):
    """Finite epochs on 2 processes: when the other process runs out first, this one stops too and counts its
    remaining batches, rows and real (weight-1) tokens: the multi-host test only bounded the token count."""
    import parallel.distributed
    from data import loader as loader_mod
    from data.loader import lm_dataset

    path, _ = corpus
    # the last batch is partial, and its last row padded: rows and tokens differ from full batches' counts
    cfg = LoaderConfig(seq_len=32, global_batch_size=4, num_epochs=1, seed=2, drop_remainder=False)
    every = list(lm_dataset([Source(path)], EOS_BYTES, cfg, 0, 2))  # process 0's batches, read to the end
    assert every[-1]["weights"].sum() < every[-1]["weights"].size
    calls = []
    monkeypatch.setattr(loader_mod, "_jax_process_count", lambda: 2)
    monkeypatch.setattr(parallel.distributed, "any_process", lambda flag: calls.append(flag) or len(calls) > 2)
    loader = LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=2)
    with pytest.warns(UserWarning, match="another process's loader ran out first"):
        read = list(loader)
    assert len(read) == 2 and len(every) > 3
    rest = every[2:]
    assert loader.unread == {"batches": len(rest), "rows": sum(len(b["weights"]) for b in rest),
                             "tokens": int(sum(b["weights"].sum() for b in rest))}
    # a state saved after the stop (the final checkpoint) keeps the count, as it keeps `dropped`
    resumed = LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=2)
    resumed.set_state(json.loads(json.dumps(loader.get_state())))
    assert resumed.unread == loader.unread


def _documents_in(batches, last, eos_id):
    """Brute force: the documents (cut at EOS in the stream of real targets) with a target in batch `last`."""
    hit, touched = set(), 0
    for k, b in enumerate(batches):
        for tgt, w in zip(b["targets"], b["weights"]):
            for t in tgt[w > 0]:
                if k == last:
                    hit.add(touched)
                touched += t == eos_id
    return len(hit)


def test_the_last_partial_batch_dropped_is_counted(corpus, tmp_path):
    """drop_remainder=True with finite epochs dropped the last partial batch (as documented) but counted it nowhere:
    its rows, real tokens and documents are now in `dropped`, and warned about; the batches do not change."""
    path, _ = corpus
    keep = LoaderConfig(seq_len=32, global_batch_size=4, num_epochs=2, seed=1, drop_remainder=False)
    every = list(LMLoader([Source(path)], EOS_BYTES, keep, process_index=0, process_count=1))
    last = every[-1]
    assert len(last["weights"]) < 4  # a partial last batch
    loader = LMLoader([Source(path)], EOS_BYTES, dataclasses.replace(keep, drop_remainder=True), process_index=0,
                      process_count=1)
    with pytest.warns(UserWarning, match=r"drop_remainder=True.*1 batch"):
        got = list(loader)
    assert len(got) == len(every) - 1
    for a, b in zip(got, every):
        assert all(np.array_equal(a[k], b[k]) for k in b)
    from data.loader import lm_dataset  # which drops it uncounted, as documented

    assert [len(b["weights"]) for b in lm_dataset([Source(path)], EOS_BYTES, dataclasses.replace(
        keep, drop_remainder=True), 0, 1)] == [4] * len(got)
    assert loader.dropped == {"batches": 1, "rows": len(last["weights"]), "tokens": int(last["weights"].sum()),
                              "documents": _documents_in(every, len(every) - 1, EOS_BYTES.eos_id)}
    # 13 documents of 7 targets in order, rows of 16: the dropped batch holds the targets 64..90, of the documents
    # 9 (from the batch before), 10, 11 (over its two rows) and 12
    path = write_tier(tmp_path / "t", [f"doc {i:02d}" for i in range(13)], shards=1)
    cfg = LoaderConfig(seq_len=16, global_batch_size=4, num_epochs=1, shuffle=False)
    loader = LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=1)
    with pytest.warns(UserWarning, match="2 rows, 27 tokens of 4 documents"):
        assert sum(b["weights"].sum() for b in loader) == 64
    assert loader.dropped == {"batches": 1, "rows": 2, "tokens": 27, "documents": 4}
    # 10 such documents leave one row of one document: "1 row, 6 tokens of 1 document" ("1 rows ... 1 documents")
    path = write_tier(tmp_path / "one", [f"doc {i:02d}" for i in range(10)], shards=1)
    with pytest.warns(UserWarning, match="drops the last, partial batch .*: 1 row, 6 tokens of 1 document in 1 batch"):
        list(LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=1))
    # a tokenizer with a BOS starts its documents with it: 13 documents of 8 targets, two to a row, so the dropped
    # batch's rows 2 and 3 begin with a document's BOS (counted as continued from the row before, only 3 of its 5)
    bos = ByteTokenizer(add_eos=True)
    bos.bos_id = 0  # NUL: in no document
    path = write_tier(tmp_path / "b", [f"doc {i:03d}" for i in range(13)], shards=1)
    loader = LMLoader([Source(path)], bos, cfg, process_index=0, process_count=1)
    with pytest.warns(UserWarning, match="3 rows, 40 tokens of 5 documents"):
        assert sum(b["weights"].sum() for b in loader) == 64
    # 9 documents of 24 targets, rows of 16: the dropped batch's first row starts the last document, its second goes
    # on with it; each row is judged by its own first token (by the row before's, the count was 2)
    path = write_tier(tmp_path / "long", ["x" * 23] * 9, shards=1)
    every = list(LMLoader([Source(path)], EOS_BYTES, dataclasses.replace(cfg, drop_remainder=False), process_index=0,
                          process_count=1))
    loader = LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=1)
    with pytest.warns(UserWarning, match="drops the last, partial batch"):
        list(loader)
    assert loader.dropped["documents"] == _documents_in(every, len(every) - 1, EOS_BYTES.eos_id) == 1


def test_a_state_saved_after_the_end_keeps_the_dropped_count(tmp_path):
    """A finite stream's last, partial batch is dropped (and counted) at the next() that ends it: a state saved after
    that (a custom loop's final checkpoint) restored a loader that reported nothing dropped, where the run left alone
    reported 1 batch of 2 rows, 27 tokens, 4 documents."""
    path = write_tier(tmp_path / "t", [f"doc {i:02d}" for i in range(13)], shards=1)
    cfg = LoaderConfig(seq_len=16, global_batch_size=4, num_epochs=1, shuffle=False)
    loader = LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=1)
    with pytest.warns(UserWarning, match="drop_remainder=True"):
        list(loader)
    state = json.loads(json.dumps(loader.get_state()))
    resumed = LMLoader([Source(path)], EOS_BYTES, cfg, process_index=0, process_count=1)
    resumed.set_state(state)
    assert list(resumed) == []
    assert resumed.dropped == loader.dropped == {"batches": 1, "rows": 2, "tokens": 27, "documents": 4}
    assert resumed.unread == loader.unread


def test_a_process_stopped_by_another_counts_its_remainder_as_dropped(corpus, monkeypatch):
    """drop_remainder=True on 2 processes: the full batches left are `unread`, the partial last one `dropped` (it
    would have been dropped anyway; before, it was counted nowhere)."""
    import parallel.distributed
    from data import loader as loader_mod
    from data.loader import lm_dataset

    path, _ = corpus
    cfg = LoaderConfig(seq_len=32, global_batch_size=4, num_epochs=1, seed=2, drop_remainder=False)
    every = list(lm_dataset([Source(path)], EOS_BYTES, cfg, 0, 2))
    assert len(every[-1]["weights"]) < 2 and len(every) > 4
    calls = []
    monkeypatch.setattr(loader_mod, "_jax_process_count", lambda: 2)
    monkeypatch.setattr(parallel.distributed, "any_process", lambda flag: calls.append(flag) or len(calls) > 2)
    loader = LMLoader([Source(path)], EOS_BYTES, dataclasses.replace(cfg, drop_remainder=True), process_index=0,
                      process_count=2)
    with pytest.warns(UserWarning) as caught:
        assert len(list(loader)) == 2
    said = " ".join(str(w.message) for w in caught)
    assert "another process's loader ran out first" in said and "drops the last, partial batch" in said
    rest, last = every[2:-1], every[-1]
    assert loader.unread == {"batches": len(rest), "rows": 2 * len(rest),
                             "tokens": int(sum(b["weights"].sum() for b in rest))}
    assert loader.dropped == {"batches": 1, "rows": 1, "tokens": int(last["weights"].sum()),
                              "documents": _documents_in(every, len(every) - 1, EOS_BYTES.eos_id)}


def test_a_source_without_any_target_is_refused_instead_of_read_forever(tmp_path):
    """No EOS and every document under 2 tokens: none has a target, and with num_epochs=None next() looped over the
    source forever, printing nothing; now it names the source (a source with one usable document still reads)."""
    import threading

    short = write_tier(tmp_path / "short", ["a", "b", "", "c"] * 3, shards=2)
    cfg = LoaderConfig(seq_len=8, global_batch_size=2, tokenize_batch=2)

    def first_batch(path, p=0, n=1):
        got = {}

        def read():
            try:
                got["batch"] = next(LMLoader([Source(path)], ByteTokenizer(), cfg, process_index=p, process_count=n))
            except Exception as e:  # noqa: BLE001 - the test looks at it below
                got["error"] = e

        reader = threading.Thread(target=read, daemon=True)  # (before the fix it never returned)
        reader.start()
        reader.join(30)
        assert got, "next() did not return"
        return got

    got = first_batch(short)
    assert isinstance(got.get("error"), ValueError) and "short" in str(got["error"])
    assert "fewer than 2 tokens" in str(got["error"]) and "add_eos=True" in str(got["error"])
    # per process: process 0's share [0::2] has no target, though process 1's has (it would read forever alone)
    half = write_tier(tmp_path / "half", ["a", "ok"] * 6, shards=1)
    assert "fewer than 2 tokens" in str(first_batch(half, 0, 2).get("error"))
    assert first_batch(half, 1, 2)["batch"]["weights"].all()
    ok = write_tier(tmp_path / "ok", ["a"] * 30 + ["ok"], shards=1)
    b = next(LMLoader([Source(ok)], ByteTokenizer(), cfg, process_index=0, process_count=1))
    assert b["weights"].all() and (b["targets"] == ord("k")).all()  # "ok", read over and over


def test_tier_shards_keep_shard_order_past_99999(tmp_path):
    """shard_name pads to 5 digits, so from shard 100000 on the names are longer: a string sort put shard-100000
    between shard-10000 and shard-10001 (a tier of one shard per input file, 100k+ files), against 'in shard order'
    (and a shuffle=False read, or pretokenize's progress, went in that order)."""
    from data.shards import tier_shards

    ids = [3, 9999, 10000, 10001, 99999, 100000, 100001, 123456, 1000000]
    for i in reversed(ids):
        (tmp_path / f"{shard_name(i)}.array_record").touch()
    assert [pathlib.Path(f).name for f in tier_shards(tmp_path)] == [f"{shard_name(i)}.array_record" for i in ids]


def test_iter_docs_reads_every_record_in_order_across_chunks(tmp_path):
    """iter_docs holds `chunk` records in memory at a time: a shard of more than one chunk is read whole and in order
    (every shard the tests read held fewer than the default 256, so a chunk boundary was never crossed)."""
    from data.shards import iter_docs

    path = write_tier(tmp_path, [f"doc {i}" for i in range(10)], shards=1)
    for chunk in (1, 3, 10, 11):
        assert [d["text"] for d in iter_docs(f"{path}/{shard_name(0)}.array_record", chunk=chunk)] == [
            f"doc {i}" for i in range(10)], chunk


def test_read_docs_names_a_position_outside_the_shard(tmp_path):
    """read_docs(shard, [n]) on a shard of n records said the shard was 'not a readable ArrayRecord shard ... a
    truncated copy?' (it was whole; the position was wrong), and a negative position raised pybind11's 'incompatible
    function arguments'."""
    from data.shards import read_docs

    shard = f"{write_tier(tmp_path, [f'doc {i}' for i in range(4)], shards=1)}/{shard_name(0)}.array_record"
    assert [d["text"] for d in read_docs(shard, [3, 0, 3])] == ["doc 3", "doc 0", "doc 3"]
    for bad in ([4], [1, -1]):
        with pytest.raises(ValueError, match=rf"positions \[{bad[-1]}\] .*holds 4 records \(0 to 3\)"):
            list(read_docs(shard, bad))


def test_a_chunk_below_one_is_refused_not_an_empty_shard(tmp_path):
    """iter_docs / read_docs with chunk=-1 read nothing (range() counted down from 0), so a shard of 4 documents gave
    none, silently; chunk=0 said range()'s 'arg 3 must not be zero'."""
    from data.shards import iter_docs, read_docs

    shard = f"{write_tier(tmp_path, [f'doc {i}' for i in range(4)], shards=1)}/{shard_name(0)}.array_record"
    for chunk in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"iter_docs: chunk={chunk!r} .*must be an int >= 1"):
            list(iter_docs(shard, chunk=chunk))
        with pytest.raises(ValueError, match=rf"read_docs: chunk={chunk!r} .*must be an int >= 1"):
            list(read_docs(shard, [0, 1], chunk=chunk))


def test_token_ids_and_non_text_fields_are_named(corpus, tmp_path):
    """tier_texts / pretokenize pointed at pretokenize's output said 'JSONDecodeError: Expecting value'; a text
    field holding a number said 'expected string or bytes-like object', naming neither field nor document."""
    from data.tokenizer import tier_texts

    path, texts = corpus
    pre = pretokenize(path, EOS_BYTES, tmp_path / "pre", progress=False)
    with pytest.raises(ValueError, match=r"shard-00000.array_record: the record holds token ids .*pass the cleaned "
                                         "tier"):
        next(tier_texts(pre))
    bad = write_tier(tmp_path / "bad", ["fine text"], shards=1)
    w = DocWriter(pathlib.Path(bad) / "shard-00000.array_record")
    w.write({"id": "n7", "text": 7})
    w.commit()
    with pytest.raises(ValueError, match=r"text_field='text': a document \(id 'n7'\) holds int there, not text"):
        next(LMLoader([Source(bad)], EOS_BYTES, LoaderConfig(seq_len=8, global_batch_size=1), process_index=0,
                      process_count=1))


def test_pretokenized_ids_outside_the_tokenizer_are_refused_by_name():
    """A pre-tokenized record holding an id >= vocab_size (a damaged shard, ids of a bigger tokenizer under a copied
    meta) went into the batches: under jit the embedding gathered NaN, and the trainer skipped every step as a
    'non-finite loss or gradient norm' naming no token; a negative id was ignored as a target, wrapped as an input."""
    from data.tokenizer import TOKENS_MAGIC

    ok = TOKENS_MAGIC + np.array([104, 105, 256], np.int32).tobytes()
    assert Tokenize(EOS_BYTES)([ok])[0]["targets"].tolist() == [104, 105, 256, 256]
    for bad_id in (257, 5000, -1):
        rec = TOKENS_MAGIC + np.array([104, bad_id, 105], np.int32).tobytes()
        with pytest.raises(ValueError, match=rf"token id {bad_id} outside \[0, vocab_size=257\).*pretokenize"):
            Tokenize(EOS_BYTES)([ok, rec])


def test_small_helpers_refuse_nonsense_inputs(tmp_path):
    """Each was accepted: ByteWindows(seq_len=0) gave empty rows and batch_size=0 a numpy stacking error; a
    zh_fraction of 1.5 made every document Chinese; a glossary's domains given as one string matched nothing."""
    from data.augment import DomainGlossary
    from data.corpus import ByteWindows
    from data.synthetic import documents as synthetic_documents

    tokens = np.arange(100, dtype=np.int32)
    for kw in (dict(seq_len=0, batch_size=4), dict(seq_len=-5, batch_size=4), dict(seq_len=8, batch_size=0)):
        with pytest.raises(ValueError, match=r"ByteWindows (seq_len|batch_size)=-?\d+ must be an int >= 1"):
            ByteWindows(tokens, **kw)
    # process_index == process_count read the slice [n::n]: process 0's documents from the n-th on, a second time
    tier = Source(write_tier(tmp_path, ["some text"] * 4))
    for p, n in ((2, 2), (-1, 2), (1, 1)):
        with pytest.raises(ValueError, match=rf"process_index={p} must be in \[0, process_count={n}\)"):
            documents([tier], EOS_BYTES, process_index=p, process_count=n)
    with pytest.raises(ValueError, match="zh_fraction=1.5 must be a fraction"):
        synthetic_documents(3, zh_fraction=1.5)
    with pytest.raises(ValueError, match=r"doc\['domains'\]='code' must be a list of tags"):
        DomainGlossary()({"text": "an iterator", "domains": "code"})


@pytest.mark.parametrize("weights", [(1.0, 3.0), (3.0, 1.0), (2.0, 1.0)])
def test_a_finite_mixture_reads_the_source_that_ends_whole(tmp_path, weights):
    """num_epochs=1 over sources of 10 and 5 documents: the mixture ends when the next document would come from a
    source read to its end, so that source is read whole and the other in proportion (grain's mix ended up to a
    round earlier: at weights 1:3 it read 4 of the 5 and dropped one uncounted; a user review's finding)."""
    tok = ByteTokenizer(add_eos=True)
    a = write_tier(tmp_path / "a", [f"a{i:02d}" for i in range(10)], shards=1)
    b = write_tier(tmp_path / "b", [f"b{i:02d}" for i in range(5)], shards=1)
    cfg = LoaderConfig(seq_len=8, global_batch_size=2, num_epochs=1, seed=0)
    docs = [tok.decode(d["targets"]) for d in documents([Source(a, weights[0]), Source(b, weights[1])], tok, cfg, 0, 1)]
    counts = collections.Counter(d[0] for d in docs)
    assert len(set(docs)) == len(docs)  # none twice
    share = {"a": weights[0] / sum(weights), "b": weights[1] / sum(weights)}
    whole = min("ab", key=lambda s: {"a": 10, "b": 5}[s] / share[s])  # the source that runs out first
    assert counts[whole] == {"a": 10, "b": 5}[whole], counts
    other = "b" if whole == "a" else "a"
    assert abs(counts[other] - len(docs) * share[other]) <= 1, counts  # the rest in proportion


def test_weights_near_the_float_limit_mix_by_their_ratio_or_are_named(tmp_path):
    """Source takes any positive finite weight, but weights of 1.5e308 and 1e308 summed to inf: every share was 0 and
    a finite mixture alternated 1:1 instead of 3:2, silently; and a ratio of 1e400 made grain's endless mix raise a bare
    "OverflowError: cannot convert float infinity to integer" (it scales the smallest weight to 100)."""
    a = write_tier(tmp_path / "a", [f"a{i}" for i in range(6)], shards=1)
    b = write_tier(tmp_path / "b", [f"b{i}" for i in range(6)], shards=1)
    cfg = LoaderConfig(seq_len=8, global_batch_size=1, num_epochs=1, shuffle=False)
    order = lambda wa, wb: [EOS_BYTES.decode(d["targets"])  # noqa: E731
                            for d in documents([Source(a, wa), Source(b, wb)], EOS_BYTES, cfg, 0, 1)]
    assert order(1.5e308, 1e308) == order(3.0, 2.0)
    with pytest.raises(ValueError, match=r"Source\.weight.*1e\+200.*1e-200"):
        documents([Source(a, 1e200), Source(b, 1e-200)], EOS_BYTES, dataclasses.replace(cfg, num_epochs=None), 0, 1)


def test_the_documents_a_finite_mixture_leaves_unread_are_counted(tmp_path):
    """num_epochs=1 over sources of 30 and 5 documents at weights 1:1: the mixture ends when the small one is read
    (as documented), and the large one's other 25 documents were counted nowhere. Now skipped['mixture_end'], warned
    about; batches' documents + dropped + skipped == the input, on each of 2 processes."""
    a = write_tier(tmp_path / "a", [f"alpha {i:02d}" for i in range(30)], shards=2)
    b = write_tier(tmp_path / "b", [f"bravo {i:02d}" for i in range(5)], shards=1)
    cfg = LoaderConfig(seq_len=16, global_batch_size=2, num_epochs=1, seed=2)
    total = 0
    for p, (n_a, n_b) in enumerate(((15, 3), (15, 2))):  # process p reads documents [p::2]
        with pytest.warns(UserWarning, match=rf"leaving {n_a - n_b - 1} of .*a' documents unread .*'mixture_end'"):
            loader = LMLoader([Source(a), Source(b)], EOS_BYTES, cfg, process_index=p, process_count=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = list(loader)
        n_kept = sum(int((b["targets"] == EOS_BYTES.eos_id).sum()) for b in batches)  # each closing EOS once
        assert loader.skipped == {"no_target": 0, "mixture_end": n_a - n_b - 1}  # b whole, a one more (ties: a first)
        assert n_kept + loader.dropped["documents"] + loader.skipped["mixture_end"] == n_a + n_b
        total += n_kept + loader.dropped["documents"] + sum(loader.skipped.values())
    assert total == 35


def _mix_order_reference(sizes, weights):
    """The finite mixture's order as it was first written (an np.argmax per document): at each index the source
    furthest behind its share, until that source is read to its end."""
    w = np.asarray(weights, np.float64) / float(sum(weights))
    taken, order = np.zeros(len(sizes), np.int64), []
    while True:
        i = int(np.argmax((len(order) + 1) * w - taken))
        if taken[i] == sizes[i]:
            break
        order.append((i, int(taken[i])))
        taken[i] += 1
    return order


def test_the_finite_mixture_keeps_its_order_on_random_configurations():
    """The mixture's order was built with an np.argmax per document (800k documents: 6.4 s and 80 MiB); the faster
    build must give the same order exactly, ties included (saved loader states index into it)."""
    import tracemalloc

    import grain

    from data.loader import _MixUntilExhausted

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 7))
        sizes = rng.integers(1, 150, n).tolist()
        weights = [rng.random(n) * 3 + 1e-3, rng.integers(1, 4, n).astype(float), rng.random(n) ** 4 + 1e-4,
                   np.full(n, 0.1)][trial % 4].tolist()  # equal weights: ties go to the first source
        parents = [grain.MapDataset.source([(k, j) for j in range(size)]) for k, size in enumerate(sizes)]
        mix = _MixUntilExhausted(parents, weights)
        assert [mix[i] for i in range(len(mix))] == _mix_order_reference(sizes, weights), (sizes, weights)
    tracemalloc.start()
    _MixUntilExhausted([grain.MapDataset.range(50_000), grain.MapDataset.range(50_000)], [1.0, 2.0])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20, peak  # 75k documents mixed: 1.8 MiB (a list of (source, position) tuples: 6.9 MiB)


def test_a_cleaning_run_directory_is_named_as_one_not_a_tier(tmp_path):
    """tier_texts / Source / data.train_dir given the run's --out (`clean`) rather than a tier said only 'no shard
    files'; it names the training tier to pass instead. An empty directory keeps the general advice."""
    from data.shards import tier_shards
    from data.tokenizer import tier_texts

    write_tier(tmp_path / "clean" / "augmented", ["a document"], shards=1)
    with pytest.raises(FileNotFoundError, match=r"clean is a cleaning run, not a tier: pass one of its tiers, e\.g\. "
                                                r".*clean/augmented"):
        next(tier_texts(tmp_path / "clean"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no shard-\*\.array_record files in .*empty; run the cleaning"):
        tier_shards(tmp_path / "empty")


def test_process_index_passed_positionally_is_refused_as_a_mesh(corpus):
    # LMLoader(srcs, tok, cfg, 0, 1) put 0 into `mesh`: an AttributeError deep in parallel/rules.py followed
    path, _ = corpus
    cfg = LoaderConfig(seq_len=32, global_batch_size=2, num_epochs=1)
    for bad in (0, "data"):
        with pytest.raises(TypeError, match=r"LMLoader: mesh must be a jax Mesh or None, got .*process_index=0, "
                                            r"process_count=1 by keyword"):
            LMLoader([Source(path)], ByteTokenizer(), cfg, bad, 1)


def test_process_index_and_count_of_another_type_or_no_process_are_named(corpus):
    """process_index=0.5 or process_count=2.0 said a bare "slice indices must be integers" from inside grain, '0' a
    "'<=' not supported"; True was read as process 1; process_count=0 said "process_index=0 must be in [0, 0)",
    which blamed the index. numpy ints (jax.process_index() may be one) stay accepted."""
    path, _ = corpus
    cfg = LoaderConfig(seq_len=8, global_batch_size=2, num_epochs=1)
    for pi, pc, says in ((0.5, 2, r"process_index=0.5 must be an int"), ("0", 2, r"process_index='0' must be an int"),
                         (True, 2, r"process_index=True must be an int"), (0, 2.0, r"process_count=2.0 must be an int"),
                         (0, 0, r"process_count=0 must be >= 1"), (0, -1, r"process_count=-1 must be >= 1")):
        for make in (lambda: LMLoader([Source(path)], EOS_BYTES, cfg, process_index=pi, process_count=pc),
                     lambda: documents([Source(path)], EOS_BYTES, cfg, pi, pc)):
            with pytest.raises(ValueError, match=says):
                make()
    loader = LMLoader([Source(path)], EOS_BYTES, cfg, process_index=np.int64(1), process_count=np.int64(2))
    assert next(loader)["inputs"].shape == (1, 8)


def test_records_that_are_not_documents_are_named(tmp_path):
    """A shard of raw text records (another tool's ArrayRecord files) said a bare 'JSONDecodeError: Expecting value',
    naming no file; records that are JSON strings (`DocWriter.write(text)` for `write({"text": text})`) were read as
    documents whose fields are the text's letters: 'is not a field ... (they have ['e', 'h', 'l', 'l', 'o']); set
    text_field', or, when the first text held the word 'text', a TypeError from inside grain. Now the source and the
    fix are named, and DocWriter.write refuses a non-dict."""
    cfg = LoaderConfig(seq_len=8, global_batch_size=1, num_epochs=1)
    for name, records in (("raw", [b"hello world", b"second"]), ("strings", [b'"my text here"', b'"other"'])):
        w = DocWriter(tmp_path / name / "shard-00000.array_record")
        for r in records:
            w.write_record(r)
        w.commit()
        with pytest.raises(ValueError, match=rf"Source '.*{name}': .*not a document\b.*DocWriter.write\(\{{'text'"):
            LMLoader([Source(str(tmp_path / name))], EOS_BYTES, cfg, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"a JSON str, not a document"):  # a later record: named inside the stream
        Tokenize(EOS_BYTES)([encode_doc({"text": "fine"}), b'"my text here"'])
    w = DocWriter(tmp_path / "w" / "shard-00000.array_record")
    with pytest.raises(TypeError, match=r"DocWriter.write: a document must be a dict\b.*got str"):
        w.write("hello")
    w.abort()


def test_a_damaged_shard_is_named_where_its_documents_are_read(corpus, tmp_path):
    """A truncated or foreign shard in a tier read by tier_texts (train_bpe's input) or pretokenize said only
    'ArrayRecord file should be at least 64KB big' or 'Invalid Riegeli/records file: ...', naming no file of the
    tier's thousands (the loader's Source named it)."""
    from data.shards import iter_docs
    from data.tokenizer import tier_texts

    path, _ = corpus
    tier = tmp_path / "tier"
    tier.mkdir()
    good = pathlib.Path(path) / "shard-00000.array_record"
    (tier / good.name).write_bytes(good.read_bytes())
    big = tier / "shard-00001.array_record"
    w = DocWriter(big)
    for i in range(2000):  # past the first 64 KiB block, so the cut leaves a header that reads
        w.write({"id": str(i), "text": f"document {i} " * 20})
    w.commit()
    for raw in (big.read_bytes()[:len(big.read_bytes()) // 2], b"not a shard"):
        big.write_bytes(raw)
        with pytest.raises(ValueError, match=r"shard-00001.array_record is not a readable ArrayRecord shard .*clean"):
            list(tier_texts(tier))
        with pytest.raises(ValueError, match=r"shard-00001.array_record is not a readable ArrayRecord shard"):
            pretokenize(tier, EOS_BYTES, tmp_path / "ids", progress=False)
    with pytest.raises(ValueError, match=r"missing.array_record is not a readable ArrayRecord shard"):
        next(iter_docs(tmp_path / "missing.array_record"))


def test_to_device_refuses_64_bit_ints_that_would_wrap_on_one_process():
    """data.loader.to_device placed int64 rows as int32 (x64 off) without a word on one process, while on several
    its global_batch_from_local refused them: the same batch wrapped (2**32 + 5 arrived as 5) or failed by process
    count. Now one process refuses them too, naming the key; values that fit pass unchanged."""
    from data.loader import to_device
    from parallel import make_mesh

    mesh = make_mesh({"data": 4, "fsdp": 2})
    with pytest.raises(ValueError, match=r"^to_device: batch\['inputs'\]: int64 values in \[4294967301, 4294967301\] "
                                         r"do not fit the int32"):
        to_device({"inputs": np.full((8, 4), 2**32 + 5, np.int64)}, mesh)
    ok = np.arange(32, dtype=np.int64).reshape(8, 4) + (2**31 - 32)
    assert np.array_equal(np.asarray(to_device({"inputs": ok}, mesh)["inputs"]), ok)
