"""Tokenizers: trained byte-level BPE and the byte fallback round-trip any Unicode text exactly."""

import pickle
import warnings

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from data.synthetic import en_text, zh_text
from data.tokenizer import EOS, BPETokenizer, ByteTokenizer, pretokenize, train_bpe

SAMPLES = ["", "hello world", "  leading and trailing  ", "你好，世界！今天天气很好。", "ＡＢＣ　全角",
           "emoji 👍🏽 👨‍👩‍👧",
           "e\u0301 combining", "tabs\tand\nnewlines\r\n", "\x00\x01 control", "\ufffd replacement", "Ω≈ç√∫ 😀 𝔘𝔫𝔦",
           "mixed 中文 and English 混合"]


def random_unicode(rng, n):
    # any code point except surrogates (which no UTF-8 string can hold)
    cps = rng.integers(0, 0x110000, n)
    cps = np.where((cps >= 0xD800) & (cps < 0xE000), cps - 0x800, cps)
    return "".join(map(chr, cps))


@pytest.fixture(scope="module")
def bpe():
    rng = np.random.default_rng(0)
    texts = [en_text(rng, 200) for _ in range(60)] + [zh_text(rng, 400) for _ in range(30)]
    return train_bpe(texts, vocab_size=600, show_progress=False)


def test_bpe_trains_to_the_requested_vocab_and_compresses(bpe):
    assert bpe.vocab_size == 600
    assert bpe.eos_id == 0 and bpe.tok.id_to_token(0) == EOS
    rng = np.random.default_rng(1)
    en, zh = en_text(rng, 200), zh_text(rng, 400)
    assert len(bpe.encode(en)) < len(en.encode()) / 2.5  # merges learned on English words
    assert len(bpe.encode(zh)) < len(zh.encode()) / 1.3  # and on Chinese characters (3 UTF-8 bytes each)


def test_min_frequency_gates_merges():
    """A pair seen 3 times is merged at min_frequency 3, not at 5 (passing min_frequency nowhere passed the
    tests): 256 bytes + EOS and nothing more."""
    from data.tokenizer import train_bpe

    texts = ["hello world"] * 3
    with pytest.warns(UserWarning, match="vocab_size=400 asked, the corpus gave 257"):  # said nothing
        assert train_bpe(texts, vocab_size=400, min_frequency=5, show_progress=False).vocab_size == 257
    with pytest.raises(ValueError, match=r"eos_token='</s>' is not among special_tokens \(\)"):  # after training
        train_bpe(texts, vocab_size=400, special_tokens=(), eos_token="</s>", show_progress=False)
    assert train_bpe(texts, vocab_size=400, min_frequency=3, show_progress=False).vocab_size > 257
    with pytest.raises(TypeError, match="an iterable of documents"):  # one string trained on its letters
        train_bpe("hello world " * 3, vocab_size=400, show_progress=False)


@pytest.mark.parametrize("tok_name", ["bpe", "byte"])
def test_round_trip_exact(tok_name, bpe):
    tok = bpe if tok_name == "bpe" else ByteTokenizer()
    rng = np.random.default_rng(2)
    for text in SAMPLES + [random_unicode(rng, 50) for _ in range(50)]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and (ids >= 0).all() and (ids < tok.vocab_size).all()
        assert tok.decode(ids) == text


def test_save_load_and_pickle(bpe, tmp_path):
    path = tmp_path / "tok.json"
    bpe.save(path)
    loaded = BPETokenizer.load(path)
    text = "你好 world, round trip!"
    assert loaded.encode(text).tolist() == bpe.encode(text).tolist()
    assert pickle.loads(pickle.dumps(bpe)).encode(text).tolist() == bpe.encode(text).tolist()
    assert [a.tolist() for a in bpe.encode_batch(SAMPLES)] == [bpe.encode(t).tolist() for t in SAMPLES]
    with pytest.raises(FileNotFoundError, match="train_bpe"):
        BPETokenizer.load(tmp_path / "missing.json")


def test_special_token_text_inside_a_document_is_plain_text(bpe, tmp_path):
    """Only the loader puts EOS ids between documents: the characters "<|endoftext|>" in a text are bytes."""
    text = f"a code comment: tokens end with {EOS}, then{EOS}the next"
    bpe.save(tmp_path / "tok.json")
    for tok in (bpe, BPETokenizer.load(tmp_path / "tok.json"), pickle.loads(pickle.dumps(bpe))):
        for ids in (tok.encode(text), tok.encode_batch([text])[0]):
            assert tok.eos_id not in ids.tolist()
            assert tok.decode(ids) == text


def test_fingerprint_tells_tokenizers_of_one_vocab_size_apart(bpe, tmp_path):
    rng = np.random.default_rng(3)
    other = train_bpe([zh_text(rng, 400) for _ in range(30)], vocab_size=600, show_progress=False)
    assert (other.vocab_size, other.eos_id) == (bpe.vocab_size, bpe.eos_id)
    assert other.fingerprint != bpe.fingerprint
    bpe.save(tmp_path / "tok.json")
    assert BPETokenizer.load(tmp_path / "tok.json").fingerprint == pickle.loads(pickle.dumps(bpe)).fingerprint \
        == bpe.fingerprint


def test_byte_tokenizer_is_utf8():
    tok = ByteTokenizer()
    assert tok.encode("aé中").tolist() == list("aé中".encode())
    assert tok.vocab_size == 256 and tok.eos_id is None
    with_eos = ByteTokenizer(add_eos=True)
    assert with_eos.vocab_size == 257 and with_eos.decode([256, *with_eos.encode("hi"), 256]) == "hi"


def test_vocab_size_error_names_the_field():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=200)
    # it must exceed the 256 bytes + 1 special token: at exactly 257 no merge fits (that passed as a tokenizer)
    with pytest.raises(ValueError, match="vocab_size=257 must exceed"):
        train_bpe(["abc abc"], vocab_size=257, show_progress=False)
    assert train_bpe(["abc abc"], vocab_size=258, show_progress=False).vocab_size == 258


@pytest.mark.parametrize("tok_name", ["bpe", "bytes"])
def test_lone_surrogates_encode_as_replacement_and_stray_ids_decode_to_nothing(tok_name, bpe):
    """'Encode any Unicode string': a lone surrogate (a JSON escape like "\\ud800") raised TypeError in the BPE and
    UnicodeEncodeError in the byte tokenizer; a negative id raised OverflowError in the BPE's decode."""
    tok = bpe if tok_name == "bpe" else ByteTokenizer(add_eos=True)
    text = "ab\ud800cd \udfff"
    ids = tok.encode(text)
    assert tok.decode(ids) == "ab\ufffdcd \ufffd"
    np.testing.assert_array_equal(ids, tok.encode("ab\ufffdcd \ufffd"))
    if hasattr(tok, "encode_batch"):
        for got, want in zip(tok.encode_batch([text, "ok"]), [ids, tok.encode("ok")]):
            np.testing.assert_array_equal(got, want)
    assert tok.decode([-1, *tok.encode("hi"), tok.vocab_size + 5]) == "hi"


def test_an_end_of_sequence_token_of_another_name(tmp_path):
    """A BPE whose EOS is not '<|endoftext|>' (e.g. a HF tokenizer.json with '</s>') loaded with eos_id None: the
    loader packed documents with no separator, silently."""
    import pickle

    texts = ["first document here", "second document there"] * 10
    with pytest.raises(ValueError, match="eos_token='<|endoftext|>' is not among special_tokens"):
        train_bpe(texts, vocab_size=300, special_tokens=("<s>", "</s>"), show_progress=False)
    tok = train_bpe(texts, vocab_size=300, special_tokens=("<s>", "</s>"), eos_token="</s>", show_progress=False)
    assert tok.eos_id == tok.tok.token_to_id("</s>") == 1
    tok.save(tmp_path / "tok.json")
    with pytest.raises(ValueError, match=r"none of the special tokens \['</s>', '<s>'\] is '<\|endoftext\|>'"):
        BPETokenizer.load(tmp_path / "tok.json")
    back = BPETokenizer.load(tmp_path / "tok.json", eos_token="</s>")
    assert back.eos_id == 1 and pickle.loads(pickle.dumps(back)).eos_id == 1  # grain workers get it pickled
    # another EOS packs another token stream: the fingerprint (the loader's resume key) tells them apart
    other = BPETokenizer.load(tmp_path / "tok.json", eos_token="<s>")
    assert other.eos_id != back.eos_id and other.fingerprint != back.fingerprint
    with pytest.raises(ValueError, match="eos_token='<eos>' is not in the vocabulary"):
        BPETokenizer.load(tmp_path / "tok.json", eos_token="<eos>")


def test_an_eos_or_bos_that_is_an_ordinary_added_token_cannot_be_written_by_a_document(tmp_path):
    """A tokenizer.json may hold '</s>' / '<s>' as added tokens with special=false: named as eos_token / bos_token,
    the characters "</s>" in a text encoded to the EOS id (`encode_special_tokens` covers special tokens only), so a
    document could end itself mid-text. Naming them makes them special."""
    tok = train_bpe(["hello world foo bar"] * 20, vocab_size=260, special_tokens=(), show_progress=False)
    tok.tok.add_tokens([AddedToken("</s>", special=False), AddedToken("<s>", special=False)])
    tok.save(tmp_path / "tok.json")
    loaded = BPETokenizer.load(tmp_path / "tok.json", eos_token="</s>", bos_token="<s>")
    text = "a </s> b <s> c"
    for t in (loaded, pickle.loads(pickle.dumps(loaded))):
        ids = t.encode(text).tolist()
        assert t.eos_id not in ids and t.bos_id not in ids
        assert t.decode(ids) == text
    assert (loaded.eos_id, loaded.bos_id) == (tok.tok.token_to_id("</s>"), tok.tok.token_to_id("<s>"))


def test_a_tokenizer_json_whose_model_spells_its_eos_from_text_is_named(bpe, tmp_path):
    """`encode_special_tokens` stops the added-token match only: a SentencePiece-style tokenizer.json whose model
    holds '</s>' as a piece reachable from text (its merges '</' + 's>', a Unigram score) encoded a document's
    characters "</s>" to the EOS id, silently: an EOS mid-document that decode drops (as Hugging Face's
    split_special_tokens=True does). Loading it says so, naming the token and its ids; a trained byte-level BPE,
    which cannot spell '<|endoftext|>', loads without a word."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "<": 4, "/": 5, "s": 6, ">": 7, "</": 8, "s>": 9, "a": 10}
    raw = Tokenizer(models.BPE(vocab, [("<", "/"), ("s", ">"), ("</", "s>")], unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    raw.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    raw.save(str(tmp_path / "spm.json"))
    with pytest.warns(UserWarning, match=r"the text '</s>' encodes to \[3, 2\].*special token '</s>' \(id 2\)"):
        tok = BPETokenizer.load(tmp_path / "spm.json", eos_token="</s>", bos_token="<s>")
    assert tok.eos_id in tok.encode("a </s> a").tolist()  # what it warned of (the ids stay Hugging Face's)
    bpe.save(tmp_path / "tok.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pickle.loads(pickle.dumps(BPETokenizer.load(tmp_path / "tok.json")))


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_an_unknown_token_is_not_taken_for_a_spelled_eos(kind, tmp_path):
    """A small WordPiece / Unigram reads characters it never saw ('[', 'S', ...) as its unknown token, a special one:
    loading it warned that the text '[SEP]' "holds the special token '[UNK]'" and to remove such text from the
    documents, though no EOS / BOS is spelled (the text's ids hold neither)."""
    if kind == "wordpiece":
        raw = Tokenizer(models.WordPiece({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3}, unk_token="[UNK]"))
        raw.pre_tokenizer, raw.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
        names = dict(eos_token="[SEP]", bos_token="[CLS]")
    else:
        raw = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("▁", -1.0)], unk_id=0))
        raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        names = dict(eos_token="</s>", bos_token="<s>")
    specials = ("[UNK]", "[CLS]", "[SEP]") if kind == "wordpiece" else ("<unk>", "<s>", "</s>")
    raw.add_special_tokens([AddedToken(t, special=True) for t in specials])
    raw.save(str(tmp_path / "tok.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = BPETokenizer.load(tmp_path / "tok.json", **names)
    ids = tok.encode(f"a {names['eos_token']} a").tolist()
    assert tok.eos_id not in ids and tok.bos_id not in ids and raw.token_to_id(specials[0]) in ids


def test_a_tokenizer_json_that_truncates_or_pads_encodes_whole_documents(tmp_path):
    """A tokenizer.json saved with truncation / padding enabled (sentence-transformers and pipeline exports do):
    loaded as is, every document was cut to max_length tokens and a batch's shorter ones padded with pad ids (here
    the EOS id, trained on as targets), silently. The loader packs whole documents itself."""
    texts = ["hello world foo bar baz"] * 20
    tok = train_bpe(texts, vocab_size=270, show_progress=False)
    whole = [tok.encode(t).tolist() for t in ("hello", " ".join(texts[:4]))]
    tok.tok.enable_truncation(8)
    tok.tok.enable_padding(pad_id=tok.eos_id, pad_token=EOS)
    tok.save(tmp_path / "tok.json")
    loaded = BPETokenizer.load(tmp_path / "tok.json")
    for t in (loaded, pickle.loads(pickle.dumps(loaded))):
        assert [x.tolist() for x in t.encode_batch(["hello", " ".join(texts[:4])])] == whole
        assert t.decode(t.encode(" ".join(texts[:4]))) == " ".join(texts[:4])
    assert loaded.fingerprint == train_bpe(texts, vocab_size=270, show_progress=False).fingerprint


def test_wrapping_a_tokenizer_leaves_the_callers_object_as_it_was(bpe):
    """BPETokenizer(tok) turned off the caller's truncation and padding, set it to encode special-token text as
    plain bytes and made its '</s>' special: the caller's own `tok.encode_batch` then gave other ids (a batch
    truncated to 4 tokens came back whole). The wrapper works on a copy."""
    raw = Tokenizer.from_str(bpe.tok.to_str())
    raw.add_tokens([AddedToken("</s>", special=False)])
    raw.enable_truncation(4)
    raw.enable_padding(pad_id=bpe.eos_id, pad_token=EOS)
    texts = [f"hello </s> {EOS} world", "hi"]

    def state(t):
        return t.to_str(), [e.ids for e in t.encode_batch(texts)], t.encode_special_tokens

    before = state(raw)
    wrapped = BPETokenizer(raw, eos_token="</s>")
    assert state(raw) == before
    assert wrapped.eos_id == raw.token_to_id("</s>") and wrapped.eos_id not in wrapped.encode(texts[0]).tolist()
    assert wrapped.decode(wrapped.encode(texts[0])) == texts[0]  # the wrapper's settings hold on its copy


def test_pretokenize_does_not_overwrite_a_saved_tokenizer(bpe, tmp_path):
    """pretokenize writes its meta as out_dir/tokenizer.json: into a run directory holding the tokenizer saved under
    that (Hugging Face) name, it deleted the tokenizer and left a file BPETokenizer.load refuses. Its own meta, from
    an earlier run, is still replaced."""
    from data.shards import DocWriter

    tier = tmp_path / "tier"
    w = DocWriter(tier / "shard-00000.array_record")
    w.write({"id": "0", "text": "hello world"})
    w.commit()
    run = tmp_path / "run"
    run.mkdir()
    bpe.save(run / "tokenizer.json")
    with pytest.raises(ValueError, match=r"holds .*tokenizer.json, a saved tokenizer, not pretokenize's meta"):
        pretokenize(tier, bpe, run, progress=False)
    assert BPETokenizer.load(run / "tokenizer.json").fingerprint == bpe.fingerprint
    assert not list(run.glob("shard-*"))
    pretokenize(tier, bpe, tmp_path / "pre", progress=False)
    pretokenize(tier, ByteTokenizer(add_eos=True), tmp_path / "pre", progress=False)  # over its own meta: fine


def test_pretokenize_names_a_tokenizer_it_cannot_use_before_any_work(bpe, tmp_path):
    """A `tokenizers.Tokenizer` (BPETokenizer.tok) or a transformers PreTrainedTokenizerFast (no eos_id) failed only
    after every shard was written and the earlier meta deleted, in a bare TypeError / AttributeError."""
    from transformers import PreTrainedTokenizerFast

    from data.shards import DocWriter

    tier = tmp_path / "tier"
    w = DocWriter(tier / "shard-00000.array_record")
    w.write({"id": "0", "text": "hello world"})
    w.commit()
    out = tmp_path / "ids"
    pretokenize(tier, bpe, out, progress=False)
    before = sorted(p.name for p in out.iterdir())
    bpe.save(tmp_path / "tok.json")
    for tok, missing in ((bpe.tok, "'vocab_size', 'eos_id'"),
                         (PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok.json")), "'eos_id'")):
        with pytest.raises(TypeError, match=rf"pretokenize tokenizer \w+ has no \[{missing}\]; pass a "
                                            r"data.tokenizer.BPETokenizer \(BPETokenizer.load\(path\)"):
            pretokenize(tier, tok, out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == before  # the earlier output kept whole
    for batch in (0, -1, "64", 2.0, True):  # these buffered a whole shard before encoding it, in silence
        with pytest.raises(ValueError, match=rf"pretokenize batch={batch!r} must be an int >= 1"):
            pretokenize(tier, bpe, out, batch=batch, progress=False)
        assert sorted(p.name for p in out.iterdir()) == before
    # a NumPy int is an int (data's other counts take numbers.Integral): it was refused as not one
    assert pretokenize(tier, bpe, out, batch=np.int64(2), progress=False) == str(out)


def test_pretokenize_meta_counts_what_it_wrote(bpe, tmp_path):
    """The meta recorded no counts: nothing said how many documents and tokens a pretokenized tier holds, nor that
    none was dropped. Recounted from the shards: documents in == written (empty ones included), tokens == ids."""
    import json

    from array_record.python.array_record_module import ArrayRecordReader

    from data.shards import DocWriter
    from data.tokenizer import TOKENS_MAGIC

    texts = [en_text(np.random.default_rng(i), i % 7) for i in range(23)] + ["", "字"]
    for i in range(3):
        w = DocWriter(tmp_path / "tier" / f"shard-0000{i}.array_record")
        for t in texts[i::3]:
            w.write({"id": t, "text": t})
        w.commit()
    out = tmp_path / "pre"
    pretokenize(tmp_path / "tier", bpe, out, batch=4, progress=False)
    meta = json.loads((out / "tokenizer.json").read_text())
    records = []
    for f in sorted(out.glob("shard-*.array_record")):
        r = ArrayRecordReader(str(f))
        records += r.read(list(range(r.num_records())))
        r.close()
    assert all(x.startswith(TOKENS_MAGIC) for x in records)
    tokens = sum((len(x) - len(TOKENS_MAGIC)) // 4 for x in records)
    assert tokens == sum(len(bpe.encode(t)) for t in texts)
    assert {k: meta[k] for k in ("documents_in", "documents", "dropped", "tokens")} == {
        "documents_in": len(texts), "documents": len(records), "dropped": {}, "tokens": tokens}
    assert len(records) == len(texts)


def test_a_beginning_of_document_token_starts_every_document(tmp_path):
    """bos_token (Llama's '<s>'): documents are [bos] text [eos], not [eos] text [eos]: a checkpoint fine-tuned with
    its own tokenizer saw BOS first in pretraining. The choice is part of the fingerprint (another stream)."""
    import pickle

    from data.loader import Tokenize
    from data.shards import encode_doc

    texts = ["first document here", "second document there"] * 10
    tok = train_bpe(texts, vocab_size=300, special_tokens=("<s>", "</s>"), eos_token="</s>", show_progress=False)
    # as Llama's tokenizer.json: a post-processor adding <s> ... </s>; the loader adds its own, so encode must not
    tok.tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                  ("</s>", 1)])
    tok.save(tmp_path / "tok.json")
    bos = BPETokenizer.load(tmp_path / "tok.json", eos_token="</s>", bos_token="<s>")
    assert (bos.bos_id, bos.eos_id, tok.bos_id) == (0, 1, None) and bos.fingerprint != tok.fingerprint
    assert pickle.loads(pickle.dumps(bos)).bos_id == 0  # grain workers get it pickled
    ids = bos.encode(texts[0])
    assert ids.tolist() == Tokenizer.from_file(str(tmp_path / "tok.json")).encode(texts[0],
                                                                                   add_special_tokens=False).ids
    [with_bos], [without] = (Tokenize(t)([encode_doc({"text": texts[0]})]) for t in (bos, tok))
    np.testing.assert_array_equal(with_bos["inputs"], [0, *ids])
    np.testing.assert_array_equal(with_bos["targets"], [*ids, 1])
    np.testing.assert_array_equal(without["inputs"], [1, *ids])  # the EOS separator, as before
    with pytest.raises(ValueError, match="bos_token='<bos>' is not in the vocabulary"):
        BPETokenizer.load(tmp_path / "tok.json", eos_token="</s>", bos_token="<bos>")


def test_misused_inputs_are_named_before_any_work(bpe, tmp_path):
    """Documents (dicts) given to train_bpe trained on their keys, silently; a wrong field was a bare KeyError (and
    pretokenize left a .tmp shard); a JSON file that is no tokenizer raised a bare Exception naming no file."""
    import json

    from data.shards import DocWriter
    from data.tokenizer import pretokenize, tier_texts

    with pytest.raises(TypeError, match="items must be str, got dict; pass the texts"):
        train_bpe([{"text": "a b c", "lang": "en"}] * 10, vocab_size=300, show_progress=False)
    with pytest.raises(ValueError, match="no documents; an empty tier"):  # it returned the bare byte alphabet
        train_bpe(iter([]), vocab_size=300, show_progress=False)
    with pytest.raises(TypeError, match="train_bpe texts: pass an iterable of documents"):  # 'NoneType' not iterable
        train_bpe(None, vocab_size=300, show_progress=False)
    # one document (a dict) trained on its keys 'id' and 'text', silently; a first text None (a JSON null) was read as
    # the end of the texts ("no documents; an empty tier?"); a negative length said "can't convert negative int to
    # unsigned"
    with pytest.raises(TypeError, match=r"not one dict \(iterating it gives its keys\); e.g. \[doc\['text'\]\]"):
        train_bpe({"id": "0", "text": "hello world hello world"}, vocab_size=300, show_progress=False)
    with pytest.raises(TypeError, match="items must be str, got NoneType"):
        train_bpe([None, "hello world"], vocab_size=300, show_progress=False)
    with pytest.raises(ValueError, match="train_bpe length=-1 must be None or the number of texts"):
        train_bpe(["a b"] * 3, vocab_size=300, length=-1, show_progress=False)
    with pytest.raises(TypeError, match=r"train_bpe special_tokens=None: pass a tuple of tokens.*or \(\)"):
        train_bpe(["a b"] * 3, vocab_size=300, special_tokens=None, show_progress=False)  # 'NoneType' has no len()
    # a token named twice was counted twice against vocab_size (a valid 258 refused) and '' was accepted; "no" (truthy)
    # added an EOS
    with pytest.raises(ValueError, match="names a token twice"):
        train_bpe(["a b"] * 3, vocab_size=300, special_tokens=(EOS, EOS), show_progress=False)
    with pytest.raises(TypeError, match="each must be a non-empty str"):
        train_bpe(["a b"] * 3, vocab_size=300, special_tokens=(EOS, ""), show_progress=False)
    with pytest.raises(TypeError, match="add_eos='no' must be True or False"):
        ByteTokenizer(add_eos="no")
    assert ByteTokenizer(add_eos=np.bool_(True)).eos_id == 256
    tier = tmp_path / "tier"
    w = DocWriter(tier / "shard-00000.array_record")
    w.write({"id": "0", "text": "hello world"})
    w.commit()
    with pytest.raises(ValueError, match="field='body': a document of .* has no such field .*'id', 'text'"):
        list(tier_texts(tier, "body"))
    out = tmp_path / "ids"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # an earlier run's meta stays until the field is known to be right
    with pytest.raises(ValueError, match="field='body'"):
        pretokenize(tier, bpe, out, field="body", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]
    bad = tmp_path / "not_a_tokenizer.json"
    bad.write_text(json.dumps({"vocab": 3}))
    with pytest.raises(ValueError, match=f"{bad} is not a `tokenizers` JSON file"):
        BPETokenizer.load(bad)


def test_corpus_byte_codec_round_trips_and_skips_ids_outside_the_bytes():
    """data.corpus's byte tokens: UTF-8 exactly, and EOS / padding / negative ids decode to nothing (a negative id
    raised ValueError in bytes())."""
    from data.corpus import decode_bytes, encode_bytes

    for text in SAMPLES:
        ids = encode_bytes(text)
        assert ids.dtype == np.int32 and bytes(ids.astype(np.uint8)) == text.encode()
        assert decode_bytes(ids) == text
        assert decode_bytes([-1, 256, *ids, 300, -7]) == text
    assert decode_bytes(encode_bytes("中")[:2]) == "\ufffd"  # a cut character is U+FFFD, as documented, not nothing


def test_train_bpe_reads_lone_surrogates_as_encode_does():
    """Raw JSON text ("\\ud800" escapes, not yet through data.normalize) raised UnicodeEncodeError in training, though
    `encode` reads a lone surrogate as U+FFFD; a non-str past the first text raised "'NoneType' object is not
    iterable"."""
    texts = ["hello \ud800 world", "hello \ufffd world"] * 10
    tok = train_bpe(texts, vocab_size=262, show_progress=False)
    clean = train_bpe([t.replace("\ud800", "\ufffd") for t in texts], vocab_size=262, show_progress=False)
    assert tok.fingerprint == clean.fingerprint
    assert tok.decode(tok.encode(texts[0])) == texts[1]
    with pytest.raises(TypeError, match="texts: item 2 is NoneType, not str"):
        train_bpe(["a b", "c d", None], vocab_size=262, show_progress=False)


def test_train_bpe_ids_follow_the_documented_layout_and_special_tokens_must_be_a_tuple():
    """Special tokens 0..k-1 in the order given, the 256 byte symbols k..k+255, then merges. A str special_tokens
    trained a tokenizer whose special tokens were its characters ('e', 'n', 'd', ...: decode skipped every such
    letter) and only then raised an error about '<|endoftext|>' naming BPETokenizer.load."""
    tok = train_bpe(["hello world"] * 5, vocab_size=262, special_tokens=("<pad>", EOS), show_progress=False)
    assert [tok.tok.token_to_id(t) for t in ("<pad>", EOS)] == [0, 1] and tok.eos_id == 1
    assert sorted(tok.tok.token_to_id(c) for c in pre_tokenizers.ByteLevel.alphabet()) == list(range(2, 258))
    with pytest.raises(TypeError, match=r"special_tokens='<\|endoftext\|>': pass a tuple of tokens"):
        train_bpe(["hello world"] * 5, vocab_size=270, special_tokens=EOS, show_progress=False)


def test_vocab_size_bounds_the_ids_of_a_vocabulary_with_gaps(tmp_path):
    """A tokenizer.json whose ids skip some (here 'hello', id 269, moved to 400): vocab_size was the token count, 270,
    so encode gave id 400 >= vocab_size (a model of that vocabulary passed the config check) and decode dropped it:
    'hello world foo bar' read back as ' world foo bar'."""
    import json

    tok = train_bpe(["hello world foo bar"] * 20, vocab_size=270, show_progress=False)
    spec = json.loads(tok.tok.to_str())
    assert spec["model"]["vocab"]["hello"] == 269
    spec["model"]["vocab"]["hello"] = 400
    (tmp_path / "tok.json").write_text(json.dumps(spec))
    loaded = BPETokenizer.load(tmp_path / "tok.json")
    ids = loaded.encode("hello world foo bar")
    assert 400 in ids.tolist() and loaded.vocab_size == 401
    assert loaded.decode(ids) == "hello world foo bar"
    assert tok.vocab_size == 270  # a trained one has no gaps: the count, as asked


@pytest.mark.parametrize("tok_name", ["bpe", "bytes"])
def test_a_text_that_is_not_str_is_named(tok_name, bpe):
    """bytes (a file read 'rb') or None (a JSON null) said "cannot use a string pattern on a bytes-like object" (the
    BPE's surrogate regex) or "'bytes' object has no attribute 'encode'"."""
    tok = bpe if tok_name == "bpe" else ByteTokenizer(add_eos=True)
    with pytest.raises(TypeError, match=r"encode: a text must be str, got bytes; decode it first: text.decode"):
        tok.encode(b"hello")
    with pytest.raises(TypeError, match="encode: a text must be str, got NoneType$"):
        tok.encode(None)
    # a list / tuple of texts: the BPE encoded it as a (text, pair) and returned one concatenated id array
    for texts in (["hello", "x"], ("hello", "x")):
        with pytest.raises(TypeError, match=f"encode: a text must be str, got {type(texts).__name__}"):
            tok.encode(texts)
    if hasattr(tok, "encode_batch"):  # a generator (not a list) is fine
        assert [x.tolist() for x in tok.encode_batch(t for t in ["a", "b\ud800"])] == [
            tok.encode("a").tolist(), tok.encode("b\ufffd").tolist()]
        # one string: each character was encoded as a document of its own; a (text, pair) item as one text
        with pytest.raises(TypeError, match=r"encode_batch: pass a list of texts, e.g. \[text\], not one str"):
            tok.encode_batch("hello")
        with pytest.raises(TypeError, match="encode: a text must be str, got tuple"):
            tok.encode_batch(["a", ("hello", "x")])
    # a batch of rows (generate's [B, T] output) was decoded as one row by the byte tokenizer (rows run together),
    # and a str's digits as ids by the BPE ("12" read back as '!"')
    with pytest.raises(ValueError, match=r"decode: ids must be one sequence \(1-D\), got shape \(2, 2\)"):
        tok.decode(np.array([[104, 105], [104, 105]]))
    with pytest.raises(TypeError, match="decode: ids must be integers, got str"):
        tok.decode("12")
    with pytest.raises(TypeError, match="decode: ids must be integers, got NoneType"):
        tok.decode(None)
    # floats were truncated (104.9 read as 'h'; the BPE said "cannot convert float NaN to integer" to a NaN), bools
    # read as ids 0 / 1, and a list of digit strings as ids by the BPE (a numpy ufunc error in the byte tokenizer)
    for ids, kind in (([104.9, 105.2], "float64"), (np.array([104.0], np.float32), "float32"),
                      ([float("nan")], "float"), ([True, False], "bool"), (["104", "105"], "<U3")):
        with pytest.raises(TypeError, match=f"decode: ids must be integers, got {kind}"):
            tok.decode(ids)
    assert tok.decode([*tok.encode("h").tolist(), 2**70]) == "h"  # a Python int past int64: an id outside the vocab
    assert tok.decode([]) == "" and tok.decode(np.zeros(0, np.int64)) == ""
    # one id (an int, a numpy / jax scalar such as ids[-1]) is one token, as transformers' decode(5) reads it: the BPE
    # raised "'int' object is not iterable"
    import jax.numpy as jnp

    one = tok.encode("h")
    for x in (int(one[0]), one[0], jnp.int32(one[0])):
        assert tok.decode(x) == "h"


@pytest.mark.parametrize("special, texts", [
    ("hello", ["hello world foo bar baz qux"] * 50), ("a", ["hello world foo bar baz qux"] * 50),
    # byte-level symbols whose own characters encode to other bytes: passed, and 'a  b' decoded to 'a b' (the
    # second space is a lone 'Ġ'), 'x\n\ny' to 'xy' ('Ċ' is '\n'), 'Ķ綶' to '\ufffd\ufffd' (byte 0xB6 is '¶'; the
    # corpus's '¶' merged to 'Â¶', so encoding '¶' itself never showed the byte symbol)
    ("Ġ", ["hello world foo bar baz qux"] * 50), ("Ċ", ["hello world\nfoo bar"] * 50),
    ("¶", ["¶ 1. Köln, ¶ 2. Zürich"] * 50)])
def test_a_special_token_the_bpe_can_spell_from_text_is_refused(special, texts):
    """A special token whose characters the trained BPE produces from text (a word it merged, a single byte symbol)
    shares the model's id: "hello world" encoded to [<hello>, ' world'] and decoded to ' world' (with 'a': every 'a'
    of every document), and an EOS of that kind ended documents mid-text. Named at training."""
    with pytest.raises(ValueError, match=f"special token {special!r} is also text the BPE encodes to its id"):
        train_bpe(texts, vocab_size=275, special_tokens=(EOS, special), show_progress=False)



@pytest.mark.parametrize("special", ["Ġ", "a"])
def test_a_special_token_of_the_byte_alphabet_is_refused_before_training(special, monkeypatch):
    """A byte symbol is a symbol of every byte-level BPE: known before training, but refused only after it (a 32k-vocab
    training on the whole corpus ran to its end first)."""
    from data import tokenizer

    def no_training():
        raise AssertionError("trained before refusing the special token")

    monkeypatch.setattr(tokenizer, "_empty_bpe", no_training)
    with pytest.raises(ValueError, match=f"special token {special!r} is also text the BPE encodes to its id"):
        train_bpe(["hello world"] * 5, vocab_size=300, special_tokens=(EOS, special), show_progress=False)

@pytest.mark.parametrize("kw, message", [
    (dict(vocab_size=300.0), r"vocab_size=300.0 must be an int"),  # 'float' object cannot be interpreted as an integer
    (dict(vocab_size=True), r"vocab_size=True must be an int"),
    (dict(min_frequency=-1), r"min_frequency=-1 must be an int >= 0"),  # can't convert negative int to unsigned
    (dict(min_frequency=1.5), r"min_frequency=1.5 must be an int >= 0"),
    # `tokenizers` reserves vocab_size entries up front: the interpreter died of SIGABRT, no traceback
    (dict(vocab_size=2**32), r"vocab_size=4294967296 must be .* int32"),
])
def test_train_bpe_sizes_are_checked_naming_the_argument(kw, message):
    with pytest.raises(ValueError, match=message):
        train_bpe(["hello world"] * 3, **{"vocab_size": 300, **kw}, show_progress=False)
    assert train_bpe(["hello world"] * 3, vocab_size=np.int64(260), min_frequency=np.int64(0),
                     show_progress=False).vocab_size == 260  # numpy ints, and min_frequency 0, as `tokenizers` takes


def test_train_bpe_takes_a_jax_integer_scalar_as_a_size():
    """`tokenizers` takes any integer with __index__, so jnp.int32(260) trained before the sizes were checked by
    numbers.Integral (which jax arrays are not); a float array is still no size."""
    import jax.numpy as jnp

    bpe = train_bpe(["hello world"] * 3, vocab_size=jnp.int32(260), min_frequency=jnp.array(0), show_progress=False)
    assert bpe.vocab_size == 260
    for bad in (jnp.float32(260), jnp.array(True), jnp.array([260])):
        with pytest.raises(ValueError, match=r"train_bpe vocab_size=.* must be an int >= 0"):
            train_bpe(["hello world"] * 3, vocab_size=bad, show_progress=False)


def test_a_bucket_url_is_refused_and_a_tilde_is_the_home_directory(tmp_path, monkeypatch):
    """save("gs://b/tok.json") failed in tokenizers with a bare 'No such file or directory (os error 2)', and
    save("~/tok.json") too (it wanted a folder named '~'); load said 'no tokenizer at gs://...'."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    tok = train_bpe(["one two three four"] * 20, vocab_size=260, show_progress=False)
    for call in (lambda: tok.save("gs://b/tok.json"), lambda: BPETokenizer.load("gs://b/tok.json")):
        with pytest.raises(ValueError, match=r"^'gs://b/tok.json' is a URL.*gcsfuse"):
            call()
    tok.save("~/tok.json")
    assert BPETokenizer.load("~/tok.json").encode("one two").tolist() == tok.encode("one two").tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json"]
    # pretokenize(tier, tok, "gs://b/ids") wrote its ids and meta into a local folder gs:/b/ids and returned that
    from data.shards import DocWriter

    w = DocWriter(tmp_path / "tier" / "shard-00000.array_record")
    w.write({"id": "0", "text": "one two"})
    w.commit()
    with pytest.raises(ValueError, match=r"^'gs://b/ids' is a URL.*gcsfuse"):
        pretokenize(tmp_path / "tier", tok, "gs://b/ids", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tier", "tok.json"]
    assert pretokenize("~/tier", tok, "~/ids", progress=False) == str(tmp_path / "ids")


def test_a_post_processor_bos_left_out_is_warned_about(tmp_path):
    """A Llama-style tokenizer.json adds '<s>' in its post-processor; `encode` leaves post-processors out and the
    loader adds a BOS only when told: loaded without bos_token, a checkpoint was fine-tuned on documents that never
    start with the token it always saw first, in silence. Named with the setting; naming the BOS (or a
    post-processor adding none) loads quietly."""
    texts = ["first document here", "second document there"] * 10
    tok = train_bpe(texts, vocab_size=300, special_tokens=("<s>", "</s>"), eos_token="</s>", show_progress=False)
    tok.tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(tmp_path / "tok.json")
    with pytest.warns(UserWarning, match=r"starts every sequence with '<s>'.*data\.bos_token='<s>'"):
        BPETokenizer.load(tmp_path / "tok.json", eos_token="</s>")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BPETokenizer.load(tmp_path / "tok.json", eos_token="</s>", bos_token="<s>")
        tok.tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        tok.save(tmp_path / "eos_only.json")
        BPETokenizer.load(tmp_path / "eos_only.json", eos_token="</s>")


def test_a_post_processor_starting_with_the_eos_is_not_warned_about(tmp_path):
    """OPT's tokenizer.json starts every sequence with '</s>', its EOS (bos == eos): the loader's [eos] text [eos]
    already starts each document with it, yet loading warned to pass bos_token='</s>' (which packs the same stream)."""
    texts = ["first document here", "second document there"] * 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (train_bpe: fewer merges than vocab_size asked)
        tok = train_bpe(texts, vocab_size=300, special_tokens=("<pad>", "</s>"), eos_token="</s>",
                        show_progress=False)
    tok.tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", tok.eos_id)])
    tok.save(tmp_path / "tok.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert BPETokenizer.load(tmp_path / "tok.json", eos_token="</s>").encode("first").tolist()[0] != tok.eos_id
