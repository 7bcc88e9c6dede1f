"""Tokenizers for the LM loader: byte-level BPE trained with Hugging Face `tokenizers`, and a byte fallback.

Both encode any Unicode string (zh, emoji, control characters, ...) and decode it back exactly: the BPE
works on UTF-8 bytes (ByteLevel pre-tokenizer, no normaliser, no prefix space), so no input is
`<unk>`. The byte tokenizer needs no training: ids 0..255 are bytes, then the special tokens. Lone UTF-16
surrogates, which UTF-8 cannot hold, are encoded as U+FFFD (as `data.normalize` writes them); ids outside the
vocabulary decode to nothing. These hold for tokenizers `train_bpe` trains; a Hugging Face tokenizer.json loaded
with `BPETokenizer.load` keeps its own model and normaliser (a SentencePiece-style vocabulary may map unseen
characters to `<unk>`, an NFKC normaliser folds 'ﬁ' to 'fi'), so decode(encode(t)) == t is then its property.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import numbers
import operator
import os
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from data.cli import local_path
from data.normalize import replace_surrogates

EOS = "<|endoftext|>"
_NONE = object()  # train_bpe: no first text


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; `eos_id` = 256 when `add_eos` (vocab 257), else None (vocab 256)."""

    def __init__(self, add_eos: bool = False):
        if not isinstance(add_eos, bool | np.bool_):  # "no" (truthy) added EOS
            raise TypeError(f"ByteTokenizer add_eos={add_eos!r} must be True or False")
        add_eos = bool(add_eos)
        self.eos_id = 256 if add_eos else None
        self.bos_id = None
        self.vocab_size = 257 if add_eos else 256
        self.fingerprint = f"bytes+eos{self.eos_id}"

    def encode(self, text: str) -> np.ndarray:
        """str → int32 [n_bytes]."""
        _check_str(text, "ByteTokenizer.encode")  # bytes said "'bytes' object has no attribute 'encode'"
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            raw = replace_surrogates(text).encode("utf-8")
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Ids → str; special ids are skipped, so decode(encode(t)) == t for any text UTF-8 can hold (a lone surrogate,
        which it cannot, is encoded as U+FFFD and comes back as one)."""
        ids = _check_ids(ids, "ByteTokenizer.decode")
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _check_ids(ids, who: str) -> np.ndarray:
    """`ids` as an array, refusing what is no sequence of ids: a [B, T] batch (generate's output) ran its rows together
    in one text, a str's characters were read as ids."""
    if ids is None or isinstance(ids, str | bytes | bytearray):
        raise TypeError(f"{who}: ids must be integers, got {type(ids).__name__}")
    arr = np.asarray(ids)
    # floats were truncated (1.7 read as id 1, NaN a bare "cannot convert float NaN to integer"), bools read as ids
    # 0 / 1 and a list of digit strings as ids by the BPE (a ufunc error in the byte tokenizer); Python ints past int64
    # (an object array) are ids outside the vocabulary, which decode to nothing
    if arr.size and arr.dtype.kind not in "iu" and not (
            arr.dtype.kind == "O" and all(isinstance(i, int) and not isinstance(i, bool) for i in arr.flat)):
        kind = type(arr.flat[0]).__name__ if arr.dtype.kind == "O" else str(arr.dtype)
        raise TypeError(f"{who}: ids must be integers, got {kind}; pass token ids, e.g. ids.astype(np.int32) of "
                        "integral values")
    if arr.ndim > 1:
        raise ValueError(f"{who}: ids must be one sequence (1-D), got shape {arr.shape}; decode each row, e.g. "
                         "[tok.decode(row) for row in ids]")
    # one id (an int, or ids[-1] of generate's output) is a sequence of one, as Hugging Face's decode(5) reads it:
    # the BPE's decode raised a bare "'int' object is not iterable" where the byte tokenizer decoded it
    return arr.reshape(-1)


def _check_str(text, who: str) -> None:
    """A TypeError naming the fix for a text that is not a str (bytes from a file opened 'rb', a JSON null)."""
    if not isinstance(text, str):
        hint = "; decode it first: text.decode('utf-8')" if isinstance(text, bytes | bytearray) else ""
        raise TypeError(f"{who}: a text must be str, got {type(text).__name__}{hint}")


class BPETokenizer:
    """A trained byte-level BPE (`train_bpe` / `load`); `encode(text)` → int32 ids, `decode(ids)` → text.

    Special tokens are never read from text: a document that contains the characters "<|endoftext|>"
    encodes them as ordinary bytes, so only the loader's EOS ids mark document boundaries and
    decode(encode(t)) == t (a loaded tokenizer.json whose model spells its EOS / BOS from text is warned of; a lone
    surrogate, which UTF-8 cannot hold, is encoded as U+FFFD and comes back as one).
    `fingerprint` hashes the whole tokenizer (vocabulary, merges, settings), so
    two BPEs of equal vocab size are told apart; `ids_fingerprint` the same without the EOS / BOS choice (what
    `encode` gives: `pretokenize` records it)."""

    def __init__(self, tok: Tokenizer, eos_token: str | None = None, bos_token: str | None = None, *,
                 _copy: bool = True, _probe: bool = True):
        """eos_token: the special token that ends a document (None: `EOS` if the vocabulary has it; a tokenizer with
        other special tokens but not that one must name it, e.g. '</s>', or the loader would pack documents with no
        separator). A tokenizer without special tokens has eos_id None. bos_token: one that starts every document
        (Llama's '<s>', Gemma's '<bos>': the models fine-tuned from those checkpoints saw it first; None: documents
        start after the previous one's EOS). `tok` itself is left as it is: the settings below go on a copy.
        A tokenizer whose model spells its EOS / BOS from their text (a SentencePiece vocabulary's '</s>' reached by
        merges or Unigram scores) is warned of: those characters in a document encode to the special id."""
        # a copy: the settings below (no truncation / padding, specials not read from text, EOS / BOS made special)
        # changed the caller's Tokenizer, which then encoded its own batches otherwise
        # (_copy=False: a Tokenizer this module just made, loaded or unpickled: parsing a 128k vocabulary took 1 s)
        self.tok = tok = Tokenizer.from_str(tok.to_str()) if _copy else tok
        # add_special_tokens=False only stops *adding* specials; this stops matching them inside the text.
        # It is not saved in the JSON, so it is set on every construction (train, load, unpickle).
        tok.encode_special_tokens = True
        # a tokenizer.json saved with truncation / padding on (sentence-transformers, pipeline exports) cut every
        # document to max_length and padded a batch's shorter ones with pad ids: the loader packs whole documents
        tok.no_truncation()
        tok.no_padding()
        # the id bound, not the token count: a tokenizer.json's vocabulary may skip ids, and the count let ids past it
        # through the model's vocab_size check (into the embedding) while decode dropped them
        self.vocab_size = 1 + max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
        specials = sorted(t.content for t in tok.get_added_tokens_decoder().values() if t.special)
        name = eos_token if eos_token is not None else (EOS if tok.token_to_id(EOS) is not None else None)
        if name is not None and tok.token_to_id(name) is None:
            raise ValueError(f"BPETokenizer eos_token={name!r} is not in the vocabulary; its special tokens are "
                             f"{specials}")
        if name is None and specials:
            raise ValueError(f"BPETokenizer: none of the special tokens {specials[:8]} is {EOS!r}; name the one that "
                             "ends a document, e.g. BPETokenizer.load(path, eos_token='</s>')")
        self.eos_token = name
        self.eos_id = None if name is None else tok.token_to_id(name)
        if bos_token is not None and tok.token_to_id(bos_token) is None:
            raise ValueError(f"BPETokenizer bos_token={bos_token!r} is not in the vocabulary; its special tokens are "
                             f"{specials}")
        self.bos_token = bos_token
        self.bos_id = None if bos_token is None else tok.token_to_id(bos_token)
        _make_special(tok, [t for t in (name, bos_token) if t is not None])
        if _probe:  # (train_bpe refuses such tokens itself; an unpickled copy was probed where it was made)
            _warn_spelled_specials(tok, [t for t in (name, bos_token) if t is not None])
            if bos_token is None:
                _warn_dropped_bos(tok, self.eos_id)
        # another EOS / BOS choice packs other streams (the defaults keep the fingerprints made before the choices)
        extra = ("" if name in (EOS, None) else f"\0eos={name}") + ("" if bos_token is None else f"\0bos={bos_token}")
        self.fingerprint = hashlib.sha256((tok.to_str() + extra).encode()).hexdigest()[:16]
        # what `encode` gives (the BPE and its special tokens), without the EOS / BOS choice, which only the loader
        # adds: pretokenize records it, as its ids are the same either way (a tier pre-tokenized without a BOS was
        # refused to a run with data.bos_token, as "another tokenizer", though its shards came out byte-identical)
        self.ids_fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> np.ndarray:
        _check_str(text, "BPETokenizer.encode")  # a list / tuple was encoded as a (text, pair), silently
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once (parallel inside `tokenizers`)."""
        if isinstance(texts, str | bytes | bytearray):  # each character was encoded as a document of its own
            raise TypeError("BPETokenizer.encode_batch: pass a list of texts, e.g. [text], not one "
                            f"{type(texts).__name__}")
        texts = list(texts)
        for t in texts:  # bytes or None said "cannot use a string pattern on a bytes-like object" (the regex's), and
            _check_str(t, "BPETokenizer.encode")  # a (text, pair) tuple was encoded as one text
        try:
            enc = self.tok.encode_batch(texts, add_special_tokens=False)
        except TypeError:  # `tokenizers` refuses a str with lone surrogates as "not a str"
            enc = self.tok.encode_batch([replace_surrogates(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in enc]

    def decode(self, ids) -> str:
        ids = _check_ids(ids, "BPETokenizer.decode")
        return self.tok.decode([int(i) for i in ids.tolist() if 0 <= int(i) < self.vocab_size],
                               skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        """One JSON file (the `tokenizers` format, loadable by `transformers` too). Not saved in it: that special
        tokens are never read from text. `Tokenizer.from_file` and `PreTrainedTokenizerFast(tokenizer_file=...)` encode
        a document's text "<|endoftext|>" as the EOS id, as they do by default; `encode_special_tokens = True` on
        the former, `split_special_tokens=True` to the latter give `encode`'s ids (`load` sets it)."""
        self.tok.save(local_path(path))  # (tokenizers said only "No such file or directory" to gs://...)

    @classmethod
    def load(cls, path: str | os.PathLike, eos_token: str | None = None, bos_token: str | None = None
             ) -> BPETokenizer:
        """The tokenizer a `save` (or a Hugging Face tokenizer.json) wrote; eos_token / bos_token as for the
        constructor."""
        path = local_path(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}; train one with data.tokenizer.train_bpe(...).save(path)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception that names no file
            raise ValueError(f"{path} is not a `tokenizers` JSON file ({e}); pass the file that "
                             "BPETokenizer.save (or a Hugging Face tokenizer.json) wrote") from None
        return cls(tok, eos_token, bos_token, _copy=False)

    def __reduce__(self):  # grain worker processes receive the tokenizer by pickling
        return _bpe_from_json, (self.tok.to_str(), self.eos_token, self.bos_token)


def _make_special(tok: Tokenizer, names: list[str]) -> None:
    """Mark the named EOS / BOS special where the tokenizer.json holds them as ordinary added tokens
    (special=false): `encode_special_tokens` stops matching special tokens only, so a document's text "</s>"
    encoded to the EOS id. Same id, same other settings."""
    added = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    plain = [added[n] for n in names if n in added and not added[n].special]
    if plain:
        tok.add_special_tokens([AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                           normalized=t.normalized, special=True) for t in plain])


def _warn_spelled_specials(tok: Tokenizer, names: list[str]) -> None:
    """Warn where the text of the EOS / BOS encodes to a special id. `encode_special_tokens` stops only the added-token
    match: a model holding the token as a piece of its own (a SentencePiece-converted vocabulary with '</' and 's>'
    merged to '</s>', a Unigram '</s>' of score 0) still spells it from the text, so a document's characters "</s>"
    ended it mid-text (an EOS id the model learns there, which decode drops), silently. Probed alone and between
    letters, as the model splits words differently there; the EOS / BOS only: they are the document boundaries (6000
    reserved special tokens took 0.6 s to probe, on every load)."""
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    special |= {i for i in map(tok.token_to_id, names) if i is not None}
    probes = [text for c in names for text in (c, f"a {c} a", f"a{c}a")]
    encs = tok.encode_batch(probes, add_special_tokens=False)
    if any(i in special for enc in encs for i in enc.ids):  # the unknown-token id is how the model reads unseen
        # characters, not the EOS / BOS spelled: a WordPiece without 'p' warned that '[SEP]' encodes to '[UNK]'
        special -= {_unk_id(tok)} - {tok.token_to_id(c) for c in names}
    for text, enc in zip(probes, encs):
        if (hit := next((i for i in enc.ids if i in special), None)) is not None:  # (id 0 is an id)
            warnings.warn(f"BPETokenizer: the text {text!r} encodes to {enc.ids}, holding the special token "
                          f"{tok.id_to_token(hit)!r} (id {hit}): this tokenizer's model spells it from text (as "
                          "Hugging Face's split_special_tokens=True does), so a document holding those characters gets "
                          "that id mid-text (an EOS there ends it for the model) and decode drops it; remove or escape "
                          "them in the documents", stacklevel=3)
            return


def _warn_dropped_bos(tok: Tokenizer, eos_id: int | None) -> None:
    """Warn when the tokenizer's post-processor starts every sequence with a special token (Llama's '<s>', Gemma's
    '<bos>', BERT's '[CLS]') and no bos_token was named: `encode` leaves post-processors out (the loader adds EOS /
    BOS itself), so such a checkpoint was fine-tuned on documents without the token it always saw first, silently.
    Not when that token is the EOS (OPT's '</s>'): without a BOS the loader already starts documents with it."""
    if tok.post_processor is None:
        return
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    with_ids, without = (tok.encode("a", add_special_tokens=s).ids for s in (True, False))
    if with_ids and with_ids[0] in special - {eos_id} and with_ids[:1] != without[:1]:
        first = tok.id_to_token(with_ids[0])
        warnings.warn(f"BPETokenizer: this tokenizer's post-processor starts every sequence with {first!r}, which the "
                      f"loader does not add unless told: pass bos_token={first!r} (train_lm: --set "
                      f"data.bos_token={first!r}) to start every document with it, as the model was trained; "
                      "bos_token=None (as now) starts documents after the previous one's EOS", stacklevel=4)


def _unk_id(tok: Tokenizer) -> int | None:
    """The model's unknown-token id (BPE / WordPiece / WordLevel `unk_token`, Unigram `unk_id`), or None."""
    if isinstance(tok.model, models.Unigram):  # (its unk_id is in the JSON only)
        return json.loads(tok.to_str())["model"].get("unk_id")
    name = getattr(tok.model, "unk_token", None)
    return None if name is None else tok.token_to_id(name)


def _bpe_from_json(s: str, eos_token: str | None = None, bos_token: str | None = None) -> BPETokenizer:
    return BPETokenizer(Tokenizer.from_str(s), eos_token, bos_token, _copy=False, _probe=False)


def _empty_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # no normaliser and no prefix space: encoding must be exactly invertible
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
              special_tokens: tuple[str, ...] = (EOS,), length: int | None = None,
              show_progress: bool = True, eos_token: str | None = None) -> BPETokenizer:
    """Train a byte-level BPE on `texts` (any iterable of str, streamed) with `tokenizers`' BpeTrainer.

    `vocab_size` counts the 256 byte symbols and the special tokens; it must exceed their number. Ids: the
    special tokens first (0..k-1, in the order given: the default EOS is 0), then the 256 byte symbols (k..k+255),
    then the merges in the order learned. `length` (the number of texts, if known) sizes the progress bar.
    eos_token: which of `special_tokens` ends a document (None: `EOS`, which special tokens without it must then
    name). Lone surrogates in a text are trained on as U+FFFD, as `encode` reads them. A special token the BPE
    can also build from text (a byte symbol such as 'a' or 'Ġ', a plain word of the corpus) is refused: name them
    with delimiters, as '<|endoftext|>'.
    """
    if isinstance(special_tokens, str):  # `EOS in "<|endoftext|>"` passes, and each character became a special token
        raise TypeError(f"train_bpe special_tokens={special_tokens!r}: pass a tuple of tokens, e.g. "
                        f"({special_tokens!r},)")
    if special_tokens is None:  # "object of type 'NoneType' has no len()"
        raise TypeError(f"train_bpe special_tokens=None: pass a tuple of tokens, e.g. ({EOS!r},), or () for none")
    special_tokens = tuple(special_tokens)
    if any(not isinstance(t, str) or not t for t in special_tokens):  # '' was accepted as a token of no text
        raise TypeError(f"train_bpe special_tokens={special_tokens!r}: each must be a non-empty str, e.g. {EOS!r}")
    if len(set(special_tokens)) < len(special_tokens):  # counted twice against vocab_size, one id in the vocab
        raise ValueError(f"train_bpe special_tokens={special_tokens!r} names a token twice; name each once")
    if (special_tokens or eos_token) and (eos_token or EOS) not in special_tokens:  # before training, not after
        raise ValueError(f"train_bpe: eos_token={eos_token or EOS!r} is not among special_tokens {special_tokens}; "
                         "pass eos_token= the one that ends a document")
    sizes = {}
    for name, v in (("vocab_size", vocab_size), ("min_frequency", min_frequency)):  # `tokenizers` named neither
        # by __index__, as `tokenizers` reads them: a 0-d integer jax array (jnp.int32(8192)) is one too
        is_bool = isinstance(v, bool) or getattr(getattr(v, "dtype", None), "kind", "") == "b"
        n = None if is_bool else _index(v)
        if n is None or n < 0:
            raise ValueError(f"train_bpe {name}={v!r} must be an int >= 0 (a numpy int too), e.g. "
                             f"{name}={dict(vocab_size=8192, min_frequency=2)[name]}")
        sizes[name] = n
    vocab_size, min_frequency = sizes["vocab_size"], sizes["min_frequency"]
    if vocab_size > 2**31:  # `tokenizers` reserves vocab_size entries up front: past the memory, SIGABRT, no traceback
        raise ValueError(f"train_bpe vocab_size={vocab_size} must be <= 2**31: ids are int32; use e.g. 8192")
    if isinstance(texts, str | bytes):  # an iterable of characters: it would train on single letters
        raise TypeError("train_bpe texts: pass an iterable of documents (e.g. [text]), not one string")
    if isinstance(texts, Mapping):  # one document ({"id": .., "text": ..}) iterated to its keys, trained on
        raise TypeError(f"train_bpe texts: pass an iterable of documents, not one {type(texts).__name__} (iterating it "
                        "gives its keys); e.g. [doc['text']]")
    if length is not None and (isinstance(length, bool) or _index(length) is None or _index(length) < 0):
        # `tokenizers` said "can't convert negative int to unsigned", naming no argument
        raise ValueError(f"train_bpe length={length!r} must be None or the number of texts, an int >= 0")
    try:
        it = iter(texts)
    except TypeError:  # None said "'NoneType' object is not iterable", naming no argument
        raise TypeError(f"train_bpe texts: pass an iterable of documents (e.g. [text]), got {type(texts).__name__}"
                        ) from None
    first = next(it, _NONE)  # (a None default read a first item None, a JSON null, as "no documents")
    if first is not _NONE and not isinstance(first, str):  # `tokenizers` would train on a dict's keys, silently
        raise TypeError(f"train_bpe texts: the items must be str, got {type(first).__name__}; pass the texts, e.g. "
                        "tier_texts(tier_dir) or (d['text'] for d in docs)")
    if first is _NONE:  # `tokenizers` would return the bare byte alphabet: a tokenizer that learned nothing
        raise ValueError("train_bpe texts: no documents; an empty tier? (`python -m data.report DIR` shows what "
                         "each cleaning stage dropped)")
    texts = _train_texts(itertools.chain([first], it))
    floor = 256 + len(special_tokens)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size={vocab_size} must exceed 256 byte symbols + {len(special_tokens)} special "
                         f"tokens = {floor}; use e.g. 8192")
    _check_specials_not_spelled(special_tokens)  # a byte symbol: before training, not after
    tok = _empty_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    if tok.get_vocab_size() < vocab_size:  # `tokenizers` stops when no pair reaches min_frequency
        warnings.warn(f"train_bpe: vocab_size={vocab_size} asked, the corpus gave {tok.get_vocab_size()} (no more "
                      f"pairs occur min_frequency={min_frequency} times); size the model's vocabulary to the "
                      "tokenizer's vocab_size", stacklevel=2)
    bpe = BPETokenizer(tok, eos_token, _copy=False, _probe=False)
    _check_specials_not_spelled(special_tokens, bpe)
    return bpe


def _index(v) -> int | None:
    try:
        return operator.index(v)
    except TypeError:
        return None


def _check_specials_not_spelled(special_tokens, bpe: BPETokenizer | None = None) -> None:
    """A special token that is also a symbol the BPE builds from text (a byte symbol like 'a', a merged word like
    'hello') has one id for both: the text encoded to the special id, which decode skips ("hello world" read back
    as " world") and which, as EOS, ended a document mid-text. The symbols are the byte-level alphabet and the merges'
    results: encoding the token's own characters missed byte symbols that stand for other bytes ('Ġ' is ' ', 'Ċ'
    is '\\n', '¶' is byte 0xB6 of 'ö' and '綶', while the text '¶' is 0xC2 0xB6, often merged to 'Â¶').
    bpe None: the alphabet only, known before training (a 32k-vocab training ran to its end to refuse 'Ġ')."""
    symbols = set(pre_tokenizers.ByteLevel.alphabet())
    if bpe is not None:
        merges = json.loads(bpe.tok.to_str())["model"]["merges"]
        # [a, b] pairs; `tokenizers` < 0.20 wrote "a b" (byte-level symbols hold no space: ' ' is 'Ġ')
        symbols |= {"".join(m.split(" ") if isinstance(m, str) else m) for m in merges}
    for s in special_tokens:
        if s in symbols:
            raise ValueError(f"train_bpe: special token {s!r} is also text the BPE encodes to its id (a byte symbol of "
                             "the byte-level alphabet or a word of the corpus), so documents holding it would lose it; "
                             "name special tokens with delimiters the byte-level pre-tokenizer splits, e.g. '<|pad|>'")


def _train_texts(texts: Iterable[str]):
    """`texts` as `tokenizers` can read them: it raised UnicodeEncodeError on a lone surrogate (a raw JSON "\\ud800"
    escape) that `encode` reads as U+FFFD, and a bare "'NoneType' object is not iterable" on a non-str past the
    first."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"train_bpe texts: item {i} is {type(text).__name__}, not str; pass the texts only")
        yield replace_surrogates(text)


def tier_texts(tier_dir: str | os.PathLike, field: str = "text"):
    """The texts of every document of a cleaning tier, in shard order (for `train_bpe`)."""
    from data.shards import iter_docs, tier_shards

    for path in tier_shards(tier_dir):
        for doc in iter_docs(path):
            yield _field(doc, field, path)


def _field(doc: dict, field: str, path) -> str:
    if field not in doc:
        raise ValueError(f"field={field!r}: a document of {path} has no such field (it has {sorted(doc)[:12]}); "
                         "pass the one that holds the text (the cleaning pipeline writes 'text')")
    return doc[field]


TOKENS_MAGIC = b"\x00TOK"  # pre-tokenized records start with it; a JSON document never starts with NUL


def pretokenize(tier_dir: str | os.PathLike, tokenizer, out_dir: str | os.PathLike, field: str = "text",
                batch: int = 64, progress: bool = True) -> str:
    """Tokenize a cleaning tier once into ArrayRecord shards of int32 ids (`TOKENS_MAGIC` + ids), so the
    loader reads ids instead of running the tokenizer every epoch. Shard names and record order follow
    the tier; `tokenizer.json` (the meta the loader checks against) is written last (an out_dir holding a saved
    tokenizer under that name is refused). It records the counts too: `documents_in` (read from the tier),
    `documents` (records written), `dropped` (reason → documents; none is dropped: every document, an empty one
    included, is written) and `tokens` (ids written, without the EOS / BOS the loader adds). Returns `out_dir`."""
    import pathlib

    from tqdm import tqdm

    from data.shards import DocWriter, digest_path, iter_docs, tier_shards, write_json

    # ~ expanded; a URL refused: gs://b/ids was written to a local folder gs:/b/ids (data.cli.local_path)
    tier_dir, out = local_path(tier_dir), pathlib.Path(local_path(out_dir))
    shards = tier_shards(tier_dir)
    if out.resolve() == pathlib.Path(tier_dir).resolve():  # each shard would be replaced by its ids
        raise ValueError(f"pretokenize out_dir={str(out_dir)!r} is tier_dir: the cleaned text would be overwritten; "
                         "write the ids to another directory")
    meta_path = out / "tokenizer.json"
    if meta_path.is_file() and _is_tokenizer_file(meta_path):  # saved under the HF name: the meta would replace it
        raise ValueError(f"pretokenize out_dir={str(out_dir)!r} holds {meta_path}, a saved tokenizer, not "
                         "pretokenize's meta: it would be overwritten; write the ids to another directory")
    # a `tokenizers.Tokenizer` (encode_batch gives Encodings) or a transformers tokenizer (no eos_id) failed only
    # after every shard was written (the earlier meta deleted), in a bare TypeError / AttributeError
    if missing := [a for a in ("encode", "vocab_size", "eos_id") if not hasattr(tokenizer, a)]:
        raise TypeError(f"pretokenize tokenizer {type(tokenizer).__name__} has no {missing}; pass a "
                        "data.tokenizer.BPETokenizer (BPETokenizer.load(path), not its .tok) or ByteTokenizer")
    # batch=0 / -1 / "64" buffered a whole shard in memory before encoding it, in silence (a NumPy int is one)
    if isinstance(batch, bool | np.bool_) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ValueError(f"pretokenize batch={batch!r} must be an int >= 1 (documents encoded per call, e.g. 64)")
    for doc in iter_docs(shards[0]):  # a wrong field named before anything is deleted or written
        _field(doc, field, shards[0])
        break
    # the loader trusts the meta beside the shards: a run that dies part-way must not leave an older one there
    meta_path.unlink(missing_ok=True)
    names = {pathlib.Path(p).name for p in shards}
    for old in out.glob("shard-*.array_record"):  # an earlier run's extra shards would be read as this tier's
        if old.name not in names:
            old.unlink()
            digest_path(old).unlink(missing_ok=True)  # (a sidecar of no shard)
    counts = {"documents_in": 0, "documents": 0, "dropped": {}, "tokens": 0}
    for path in tqdm(shards, desc="pretokenize", unit="shard", disable=not progress):
        writer = DocWriter(out / pathlib.Path(path).name)
        texts = []

        def flush():
            ids = tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch") else map(tokenizer.encode, texts)
            for x in ids:
                x = np.asarray(x, dtype=np.int32)
                writer.write_record(TOKENS_MAGIC + x.tobytes())
                counts["documents"] += 1
                counts["tokens"] += len(x)
            texts.clear()

        try:
            for doc in iter_docs(path):
                texts.append(_field(doc, field, path))
                counts["documents_in"] += 1
                if len(texts) == batch:
                    flush()
            flush()
        except BaseException:
            writer.abort()
            raise
        writer.commit()
    meta = {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "fingerprint": getattr(tokenizer, "ids_fingerprint", None) or getattr(tokenizer, "fingerprint", None),
            "source": os.path.abspath(tier_dir), **counts}  # absolute: train_lm reads it from its own directory
    write_json(meta_path, meta)  # atomic: a cut write must not leave a truncated meta the loader then trusts
    return str(out)


def _is_tokenizer_file(path) -> bool:
    """Whether the file at `path` is a `tokenizers` JSON (its `model`), not a `pretokenize` meta."""
    import pathlib

    try:
        obj = json.loads(pathlib.Path(path).read_bytes())
    except ValueError:  # (JSONDecodeError, UnicodeDecodeError): neither
        return False
    return isinstance(obj, dict) and "model" in obj
