"""The data generators' seeds are ints, numpy ints too; a bool or a fraction is refused by name (seed=True ran as 1:
another run's data under the seed it logged). The data configs' other int / float / bool fields likewise."""

import numpy as np
import pytest

from data.augment import DomainGlossary
from data.corpus import ByteWindows, stdlib_text
from data.dedup import DedupConfig
from data.filters import QualityConfig
from data.label import LabelConfig
from data.langid import LangIDConfig
from data.loader import LoaderConfig, Source
from data.moving_shapes import MovingShapesConfig
from data.normalize import NormalizeConfig
from data.pipeline import PipelineConfig
from data.sources import SourceConfig
from data.stages import Normalize
from data.synthetic import documents


def test_bools_and_fractions_are_refused_by_name():
    tokens = np.arange(64, dtype=np.int32)
    for bad in (True, np.bool_(True), 1.5, np.float64(1.0), -1, "1"):
        with pytest.raises(ValueError, match=r"documents seed=.* must be an int >= 0"):
            documents(2, seed=bad)
        with pytest.raises(ValueError, match=r"stdlib_text seed=.* must be an int >= 0"):
            stdlib_text(100, seed=bad)
        with pytest.raises(ValueError, match=r"ByteWindows seed=.* must be an int >= 0"):
            ByteWindows(tokens, 8, 2, seed=bad)
        with pytest.raises(ValueError, match=r"MovingShapesConfig.seed=.* must be an int in \[0, 2\*\*32\)"):
            MovingShapesConfig(seed=bad)


def test_numpy_ints_are_seeds():
    """MovingShapesConfig refused np.int64(3) (a sweep's seed), which data.moving_shapes.dataset takes."""
    cfg = MovingShapesConfig(seed=np.int64(3))
    assert cfg.seed == 3 and type(cfg.seed) is int  # configs go to JSON
    assert documents(3, seed=np.int64(2)) == documents(3, seed=2)
    assert stdlib_text(100, seed=np.uint8(2)) == stdlib_text(100, seed=2)
    tokens = np.arange(64, dtype=np.int32)
    np.testing.assert_array_equal(ByteWindows(tokens, 8, 2, seed=np.int32(5)).batch(1)["inputs"],
                                  ByteWindows(tokens, 8, 2, seed=5).batch(1)["inputs"])
    assert type(ByteWindows(tokens, 8, 2, seed=np.int32(5)).seed) is int  # kept as Python's (it goes to JSON)
    # below=2**32 (grain's shuffle): its last seed is taken, 2**32 itself refused by name
    assert MovingShapesConfig(seed=2**32 - 1).seed == 2**32 - 1
    with pytest.raises(ValueError, match=r"MovingShapesConfig.seed=4294967296 must be an int in \[0, 2\*\*32\)"):
        MovingShapesConfig(seed=2**32)


def test_synthetic_text_refuses_lengths_it_cannot_write():
    """en_text(rng, 5, sentence=-1) returned '' for the 5 words asked (an empty range), sentence=0 was range()'s bare
    'arg 3 must not be zero', a negative length numpy's 'negative dimensions'; each is refused by name."""
    from data.synthetic import en_text, zh_text

    rng = np.random.default_rng(0)
    for fn, n_name in ((en_text, "n_words"), (zh_text, "n_chars")):
        for n, sentence, says in ((5, -1, "sentence=-1 must be an int >= 1"), (5, 0, "sentence=0 must be an int >= 1"),
                                  (-1, 4, f"{n_name}=-1 must be an int >= 0"), (2.0, 4, f"{n_name}=2.0 must be")):
            with pytest.raises(ValueError, match=f"{fn.__name__}: {says}"):
                fn(rng, n, sentence)
        assert fn(rng, 0, 3) == ""
        assert fn(np.random.default_rng(1), np.int64(2), np.int64(1)) == fn(np.random.default_rng(1), 2, 1)


def test_synthetic_documents_refuse_a_count_or_share_they_cannot_write():
    """documents(-1) returned [] and documents(True) one document, silently; 2.5 and '3' failed as range()'s bare
    TypeError, zh_fraction='0.3' as a bare comparison error and zh_fraction=True ran as 1. Each is refused by name."""
    for n in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=rf"documents: n={n!r} must be an int >= 0"):
            documents(n)
    for share in ("0.3", True, float("nan"), 1.5):
        with pytest.raises(ValueError, match=rf"documents: zh_fraction={share!r} must be a fraction in \[0, 1\]"):
            documents(3, zh_fraction=share)
    assert documents(0) == [] and documents(np.int64(2), zh_fraction=np.float32(1.0)) == documents(2, zh_fraction=1)


@pytest.mark.parametrize("make,says", [
    # a NaN threshold passed every range check and switched its filter off: a 10-character document was kept
    (lambda: QualityConfig(min_chars=float("nan"), min_words=0), r"QualityConfig.min_chars=nan must be an int"),
    (lambda: QualityConfig(min_mean_word_len=float("nan")), r"QualityConfig.min_mean_word_len=nan must be a number, "
                                                             r"not NaN"),
    # 'no' is truthy: spaces were collapsed, exact duplicates dropped, rows shuffled
    (lambda: NormalizeConfig(collapse_spaces="no"), r"NormalizeConfig.collapse_spaces='no' must be True or False"),
    (lambda: DedupConfig(exact="no"), r"DedupConfig.exact='no' must be True or False"),
    (lambda: LoaderConfig(shuffle="no"), r"LoaderConfig.shuffle='no' must be True or False"),
    (lambda: LoaderConfig(drop_remainder=None), r"LoaderConfig.drop_remainder=None must be True or False"),
    # float counts failed inside str / range / numpy, naming no field
    (lambda: NormalizeConfig(max_blank_lines=2.0), r"NormalizeConfig.max_blank_lines=2.0 must be an int"),
    (lambda: DedupConfig(num_perm=128.0), r"DedupConfig.num_perm=128.0 must be an int"),
    (lambda: MovingShapesConfig(max_caption_len=8.0), r"MovingShapesConfig.max_caption_len=8.0 must be an int"),
    (lambda: MovingShapesConfig(object_size=12), r"MovingShapesConfig.object_size=12 must be a tuple of 2 ints"),
    (lambda: MovingShapesConfig(speed=(1.0, float("inf"))), r"MovingShapesConfig.speed=.* must be a tuple of 2 finite"),
    # a NaN rate tagged no document ('code' lost from a Python file); 1e6 bytes failed in readline on the first file
    (lambda: LabelConfig(min_hits_per_1k_words=float("nan")), r"LabelConfig.min_hits_per_1k_words=nan must be a"),
    (lambda: SourceConfig(max_doc_bytes=1e6), r"SourceConfig.max_doc_bytes=1000000.0 must be an int"),
    (lambda: DomainGlossary(max_terms=2.5), r"DomainGlossary.max_terms=2.5 must be an int"),
    # accepted, then every worker failed in detect: "slice indices must be integers"; a str failed in '<', unnamed
    (lambda: LangIDConfig(sample_chars=500.5), r"LangIDConfig.sample_chars=500.5 must be an int"),
    (lambda: LangIDConfig(min_confidence="0.5"), r"LangIDConfig.min_confidence='0.5' must be a number"),
])
def test_data_configs_refuse_wrong_types_by_name(make, says):
    with pytest.raises(ValueError, match=says):
        make()


def test_an_infinite_threshold_is_a_bound_that_never_binds():
    """NaN is refused (it passed every range check and switched its filter off); inf is a legitimate "no limit"
    (it was accepted before the type checks), so a float threshold keeps it."""
    from data.filters import quality_filter

    q = QualityConfig(min_words=0, max_mean_word_len=float("inf"))
    text = " ".join(f"{w}ation" * 3 for w in ("inform", "transform", "realis", "organis") * 8)  # ~20 letters a word
    assert q.max_mean_word_len == float("inf")
    assert quality_filter(text, QualityConfig(min_words=0))[1] == "mean_word_len"  # the default bound, 10, drops it
    assert quality_filter(text, q)[1] != "mean_word_len"


def test_data_configs_keep_numpy_numbers_as_python_types():
    cfg = MovingShapesConfig(frames=np.int64(5), size=16, object_size=[5, 6], speed=(1, np.float32(1.2)))
    assert (cfg.frames, cfg.object_size, cfg.speed) == (5, (5, 6), (1.0, float(np.float32(1.2))))
    # configs go to JSON and into fingerprints: numpy numbers become Python's; Python's stay as given (an int
    # threshold keeps the fingerprint a cleaning run in progress was started with)
    assert type(cfg.frames) is int and type(cfg.speed[0]) is int and type(cfg.speed[1]) is float
    q = QualityConfig(min_words=np.int32(3), max_symbol_ratio=np.float64(0.5), min_mean_word_len=2)
    assert (type(q.min_words), type(q.max_symbol_ratio), type(q.min_mean_word_len)) == (int, float, int)
    assert repr(q) == repr(QualityConfig(min_words=3, max_symbol_ratio=0.5, min_mean_word_len=2))  # (fingerprints)
    lid = LangIDConfig(sample_chars=np.int64(500), min_confidence=np.float32(0.5))
    assert (type(lid.sample_chars), type(lid.min_confidence)) == (int, float)


@pytest.mark.parametrize("make, says", [
    # None or a number where a tuple of entries is meant: "'NoneType' object is not iterable", naming no field
    (lambda: QualityConfig(blocklist=None), r"QualityConfig.blocklist=None must be a tuple: \(\) for none"),
    (lambda: QualityConfig(top_ngram_max=3), r"QualityConfig.top_ngram_max=3 must be a tuple"),
    (lambda: LabelConfig(domains=None), r"LabelConfig.domains=None must be a tuple"),
    (lambda: DomainGlossary(glossaries=None), r"DomainGlossary.glossaries=None must be a tuple"),
    (lambda: MovingShapesConfig(held_out=None), r"MovingShapesConfig.held_out=None must be a tuple"),
    (lambda: LabelConfig(domains="code"), r"LabelConfig.domains='code' must be a tuple: \(\) for none, \('code',\)"),
    # a bare pair, or a tag that is no string: "too many values to unpack (expected 2)"
    (lambda: LabelConfig(domains=("code", ("def", "import"))), r"LabelConfig.domains entry 'code' must be a \(tag"),
    (lambda: LabelConfig(domains=((1, ("a",)),)), r"LabelConfig.domains entry \(1, \('a',\)\) must be a \(tag"),
    # a number among the keywords: "expected string or bytes-like object"
    (lambda: LabelConfig(domains=(("x", ("a", 3)),)), r"LabelConfig.domains\['x'\] must be a non-empty tuple of "),
    # one string of members was read letter by letter: "unknown language codes ['e', 'u', 'y']"
    (lambda: LangIDConfig(fold=(("zh", "yue"),)), r"LangIDConfig.fold=.* must be a tuple of \(code, \(member, "),
    (lambda: LangIDConfig(fold="zh"), r"LangIDConfig.fold='zh' must be a tuple of \(code"),
    (lambda: LangIDConfig(keep=None), r"LangIDConfig.keep=None must be a tuple of codes"),
    # one stage in place of a tuple failed mid-run ("'Normalize' object is not iterable"); a name ran stages 'n', 'o'
    (lambda: PipelineConfig(workers=1, filters=Normalize()), r"PipelineConfig.filters=Normalize\(.* must be a tuple"),
    (lambda: PipelineConfig(workers=1, labelers="label"), r"PipelineConfig.labelers='label' must be a tuple of st"),
    (lambda: Source(None), r"Source.path=None must be a tier directory or a tuple of shard files"),
])
def test_data_configs_refuse_a_string_none_or_a_bare_entry_where_a_tuple_is_meant(make, says):
    with pytest.raises(ValueError, match=says):
        make()


def test_an_empty_keyword_is_refused_it_tagged_every_document():
    """'' is in every text: LabelConfig(domains=(('code', ('def', 'import', '')),)) tagged a poem 'code' (a keyword
    list read from a CSV with a trailing comma). The tuples that were accepted still are, lists included."""
    from data.label import domain_tags

    with pytest.raises(ValueError, match=r"LabelConfig.domains\['code'\] must be a non-empty tuple of non-empty"):
        LabelConfig(domains=(("code", ("def", "import", "")),))
    cfg = LabelConfig(domains=[["code", ["def", "import"]]], min_hits=1)
    assert domain_tags("A quiet poem about the sea.", cfg) == [] and domain_tags("import os", cfg) == ["code"]
    assert LangIDConfig(keep={"zh", "en"}, fold=[["zh", ["yue", "wuu"]]]).fold == (("zh", ("yue", "wuu")),)
    assert QualityConfig(blocklist=["casino"], top_ngram_max=[[2, 0.2]]).blocklist == ("casino",)
    assert PipelineConfig(workers=1, filters=[Normalize()], labelers=()).labelers == ()


def test_a_generator_for_a_tuple_field_is_stored_whole_not_used_up_by_the_checks(tmp_path):
    """The configs' checks iterate their entries before storing them: a generator passed them and was stored used
    up, switching a filter off silently (QualityConfig(blocklist=(w for w in ...)) had blocklist=(), a LangIDConfig
    fold of a generator folded nothing, held-out combos went back to training, a Source of files read none)."""
    import random

    from data.filters import quality_filter

    vocab = "river stone garden window paper music silver orange bridge candle forest letter market".split()
    rng = random.Random(0)
    text = " ".join(rng.choice(vocab) for _ in range(80)) + ". casino."  # passes every rule but the blocklist
    words = ["casino"]
    assert quality_filter(text, QualityConfig(blocklist=tuple(words)))[1] == "blocklist"
    assert quality_filter(text, QualityConfig(blocklist=()))[1] is None
    cfg = QualityConfig(blocklist=(w for w in words), promo_phrases=iter(["buy now"]),
                        top_ngram_max=((n, 0.9) for n in (2, 3)))
    assert (cfg.blocklist, cfg.promo_phrases, cfg.top_ngram_max) == (("casino",), ("buy now",), ((2, 0.9), (3, 0.9)))
    assert quality_filter(text, cfg)[1] == "blocklist"
    assert LabelConfig(domains=(("code", (k for k in ("def", "import"))),)).domains == (("code", ("def", "import")),)
    assert len(DomainGlossary(glossaries=(g for g in DomainGlossary().glossaries)).glossaries) == 3
    held = MovingShapesConfig().held_out
    assert MovingShapesConfig(held_out=(c for c in held)).held_out == held
    assert LangIDConfig(fold=(f for f in [("zh", ("yue", "wuu"))])).fold == (("zh", ("yue", "wuu")),)
    shard = tmp_path / "shard-0.array_record"
    shard.touch()
    assert Source(path=(str(p) for p in [shard])).files() == [str(shard)]


_SET_FINGERPRINT = """
from data.filters import QualityConfig
from data.label import LabelConfig
from data.langid import LangIDConfig
from data.pipeline import PipelineConfig
words = set("alpha beta gamma delta epsilon zeta eta theta".split())
print(PipelineConfig(quality=QualityConfig(blocklist=words, promo_phrases=frozenset(words)),
                     label=LabelConfig(domains=(("code", words),)),
                     langid=LangIDConfig(fold=(("zh", {"yue", "wuu"}),))).fingerprint())
"""


def test_a_set_for_a_tuple_field_is_stored_sorted_so_the_fingerprint_is_one_in_every_process(tmp_path):
    """A set iterates in hash order, which differs between processes (PYTHONHASHSEED): stored as given, the cleaning
    run's fingerprint differed from the run it resumed (and a resume was refused), and a set of shard files was read
    in another order. Sets are stored as sorted tuples, at any depth (LangIDConfig.keep already was)."""
    import os
    import subprocess
    import sys

    words = {"gamma", "alpha", "beta"}
    assert QualityConfig(blocklist=words).blocklist == ("alpha", "beta", "gamma")
    assert LabelConfig(domains=(("code", frozenset(words)),)).domains == (("code", ("alpha", "beta", "gamma")),)
    assert Source(path={"/b.array_record", "/a.array_record"}).path == ("/a.array_record", "/b.array_record")
    from data.seeds import read_once  # mixed kinds, which sorted() refuses, in their reprs' order (in every process)

    assert read_once({"d", 3, "b", 1, "c", "a", 2}) == ("a", "b", "c", "d", 1, 2, 3)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = {subprocess.run([sys.executable, "-c", _SET_FINGERPRINT], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, cwd=root, check=True).stdout.strip()
            for seed in (1, 2)}
    assert len(outs) == 1, outs
