"""Domain tags: keywords count as whole words with punctuation split off, and only when frequent enough."""

import numpy as np
import pytest

from data.filters import QualityConfig
from data.label import LabelConfig, domain_tags
from data.synthetic import zh_text


def test_keywords_with_attached_punctuation_count():
    assert domain_tags("We state the theorem. Then the lemma, and finally the proof.") == ["math"]
    assert domain_tags("定理theorem与lemma") == ["math"]  # CJK next to a latin keyword splits it off
    # whole words only: "proofs" or "theorematic" are not keywords
    assert domain_tags("The proofs were theorematic and reproofed.") == []


def test_density_threshold_still_applies():
    long = "theorem lemma " + "word " * 5000
    assert domain_tags(long) == []
    assert domain_tags(long, LabelConfig(min_hits_per_1k_words=0.1)) == ["math"]
    # "at least" per thousand words: 2 hits in 2,000 words is 1.0 exactly, and tags
    assert domain_tags("theorem lemma " + "word " * 1998) == ["math"]
    assert domain_tags("theorem lemma " + "word " * 1999) == []


def test_code_and_math_tags_need_code_and_math():
    """Line-start code keywords and specific math terms: trade news and a motor race are neither."""
    from data.label import domain_tags

    en = ("The government announced new import tariffs on steel on Monday. Officials said the import duties would "
          "protect the working class and the middle class, and that the measures would return production to "
          "domestic mills. Critics said higher prices would hurt consumers in return for modest gains.")
    zh = ("今天上午，2024年中国汽车方程式大奖赛在上海开幕，来自各地的车队参加了比赛。入场观众需要出示身份证明，"
          "没有身份证明的观众不能进入赛场。主办方表示，方程式赛车运动在中国越来越受欢迎。")
    assert "code" not in domain_tags(en) and "math" not in domain_tags(zh)
    py = "import os\nfrom typing import Any\n\nclass A:\n    def f(self):\n        return self.x\n"
    assert "code" in domain_tags(py)


def test_cjk_keywords_count_inside_running_chinese_text():
    """A keyword starting with a letter had to start a word ('self.' is not in 'himself.'), and CJK characters are
    letters: '定理' after another character ('勾股定理', '这个定理') never counted, nor '报道' in '据记者报道', so only
    keywords after punctuation or a space tagged Chinese text."""
    math = "我们证明了勾股定理，这个定理说明直角三角形的两条直角边的平方和等于斜边的平方。这是一个重要的定理。"
    news = "据记者报道，该国政府今天宣布了新的政策。据报道，该国政府官员表示反对。"
    assert math.count("定理") == 3 and "math" in domain_tags(math)
    assert news.count("报道") + news.count("记者") + news.count("政府") == 5 and "news" in domain_tags(news)
    assert domain_tags("The farmer saw himself. He hid itself. She found herself.") == []  # latin: still whole


def test_latin_keywords_right_after_chinese_text_start_a_word():
    """CJK characters split words for plain keywords ('定理theorem' holds 'theorem'), but a substring keyword starting
    with a letter had to follow a non-word character, and CJK characters are word characters: 'self.' and
    'function(' after '调用' ('调用self.fit()', common in Chinese tutorials) never counted. Latin and '_' still join."""
    tutorial = "我们调用self.fit()训练模型，然后用self.predict()预测，最后调用function(x)。"
    assert "code" in domain_tags(tutorial)
    assert domain_tags("模型my_self.fit()和his_self.x，还有herself.") == []


def test_latin_keywords_glued_to_thai_text_are_words():
    """Thai (as Lao, Myanmar, Khmer) is written without spaces and glues latin words to its letters as Chinese does:
    '定理theorem' held 'theorem' but 'ทฤษฎีtheoremพิสูจน์' held 'theoremพ', so the math keywords of a Thai page went
    uncounted where its Chinese twin was tagged (data.filters' blocklist reads such text as whole words since 29)."""
    zh = "我们的定理theorem和证明proof以及lemma引理和equation方程和integral积分。" * 3
    th = "ทฤษฎีtheoremและพิสูจน์proofและlemmaกับequationและintegralนี้ " * 3
    assert domain_tags(zh) == ["math"] and domain_tags(th) == ["math"]
    assert domain_tags("ทฤษฎีtheoremsxและproofsxและlemmasxกับequationsx " * 3) == []  # still whole words


def test_prose_is_neither_code_nor_docs_and_gets_no_glossary():
    """'self.' matched inside 'himself.', and 'returns', 'raises', 'default' made bond-market news API docs: both
    then had Python glossary definitions appended by the augmentation stage."""
    from data.augment import DomainGlossary
    from data.label import domain_tags

    farm = ("The farmer looked at himself. The old dog lay by itself. She found herself at the gate. " * 3
            + "The generator hummed; an exception was made.")
    bonds = ("Bond investors expect higher returns as the central bank raises interest rates. The risk of a "
             "sovereign default rose, analysts said, and optional hedges were bought. ") * 2
    assert domain_tags(farm) == [] and domain_tags(bonds) == ["finance"]
    for text in (farm, bonds):
        doc = {"text": text, "domains": domain_tags(text)}
        assert DomainGlossary()(doc) is doc
    no_tags = {"text": farm, "domains": None}  # a custom labeler's "none": a TypeError that named nothing
    assert DomainGlossary()(no_tags) is no_tags
    docstring = ('def f(x, y=1):\n    """Add.\n\n    Args:\n        x: first\n\n    Returns:\n        the sum\n\n'
                 '    Raises:\n        ValueError: never\n    """\n    return x + y\n')
    assert domain_tags(docstring) == ["code", "docs"]
    assert domain_tags("class A:\n    def f(self):\n        return self.x + self.y\n") == ["code"]


def test_glossary_appends_the_terms_of_the_documents_domains_up_to_max_terms():
    """No test ran DomainGlossary (returning the document unchanged passed them all)."""
    from data.augment import DomainGlossary

    gloss = DomainGlossary(glossaries=(("code", (("iterator", "yields items"), ("generator", "has yield"),
                                                 ("decorator", "wraps"))), ("math", (("matrix", "an array"),))),
                           max_terms=2)
    text = "Generators return an iterator; a regenerator is not a generator term here. The matrix is unrelated."
    out = gloss({"text": text, "domains": ["code"], "id": 7})
    # glossary order, plural and case folded, whole words only; math terms not added to a code-only document
    assert out["augmented"] == ["iterator", "generator"] and out["id"] == 7
    assert out["text"] == text + "\n\nGlossary:\n- iterator: yields items\n- generator: has yield"
    assert gloss({"text": "a decorator and a matrix", "domains": ["code", "math"]})["augmented"] == ["decorator",
                                                                                                   "matrix"]
    plain = {"text": "the regenerator", "domains": ["code"]}
    assert gloss(plain) is plain and gloss({"text": text}) == {"text": text}
    with pytest.raises(ValueError, match="DomainGlossary.glossaries"):
        DomainGlossary(glossaries=(("code", ("iterator", "yields items")),))  # one tuple level missing


def test_cleaning_an_augmented_tier_again_glosses_it_once():
    """Re-cleaning an augmented tier appended the glossary a second time (its own definitions even name terms, e.g.
    'iterator' in the generator's, that the text did not): the glossary hook is idempotent on its own output."""
    import numpy as np

    from data.augment import PYTHON_GLOSSARY, DomainGlossary
    from data.stages import Augment, Label, LanguageFilter, Normalize, QualityFilter, StageStats, run_stages
    from data.synthetic import en_text

    rng = np.random.default_rng(0)
    text = (en_text(rng, 80) + "\n\nA generator function returns one; a decorator wraps it.\n"
            "def numbers(n):\n    for i in range(n):\n        yield i\n\nclass Box:\n    def get(self):\n"
            "        return self.value\n\n" + en_text(rng, 40))
    stages = [Normalize(), QualityFilter(), LanguageFilter(), Label(), Augment(DomainGlossary())]
    once = run_stages({"text": text, "id": 1}, stages, [StageStats(s.name) for s in stages])
    defs = dict(PYTHON_GLOSSARY)
    assert once["augmented"][:2] == ["generator", "decorator"] and "iterator" not in once["augmented"]
    block = "\n\nGlossary:\n" + "\n".join(f"- {t}: {defs[t]}" for t in once["augmented"])
    assert once["text"].endswith(block) and once["text"].count("Glossary:") == 1
    twice = run_stages(dict(once), stages, [StageStats(s.name) for s in stages])
    assert twice["text"] == once["text"] and twice["augmented"] == once["augmented"]
    # a block whose terms the text's domains no longer have is stale: removed; the text's own lines stay
    assert DomainGlossary()({"text": once["text"], "domains": []})["text"] == once["text"][:-len(block)]
    mine = text + "\n\nGlossary:\n- generator: my own definition"
    assert DomainGlossary()({"text": mine, "domains": []})["text"] == mine
    # only a block made wholly of the hook's own lines is its: one of the user's lines keeps the whole block
    mixed = text + f"\n\nGlossary:\n- generator: {defs['generator']}\n- widget: my own definition"
    assert DomainGlossary()({"text": mixed, "domains": []})["text"] == mixed


def test_a_stale_glossary_block_removed_takes_its_augmented_terms_with_it():
    """The hook called on its own output whose domains lost the terms removed the stale block but kept the block's
    `augmented` terms: the document said it was glossed with definitions it no longer held."""
    from data.augment import DomainGlossary

    once = DomainGlossary()({"text": "A generator wraps an iterator.", "domains": ["code"], "id": 3})
    assert once["augmented"] == ["iterator", "generator"]
    again = DomainGlossary()({**once, "domains": []})
    assert again == {"text": "A generator wraps an iterator.", "domains": [], "id": 3}
    # a document without the hook's block passes unchanged, its own fields included
    mine = {"text": "Nothing to explain.", "domains": ["code"], "augmented": ["iterator"]}
    assert DomainGlossary()(mine) is mine


def test_quality_score_is_the_mean_headroom_under_the_limits():
    """Hand-computed: a signal at 0 has headroom 1, at half its limit 0.5, at or past it 0; the score is their mean
    over the signals present. (Only a range check covered it: an inverted score passed.)"""
    import numpy as np

    from data.filters import QualityConfig, analyze
    from data.label import SCORED_SIGNALS, quality_score
    from data.synthetic import en_text

    q = QualityConfig()
    ngram_limits = {f"top_{n}gram": m for n, m in q.top_ngram_max} | {f"dup_{n}gram": m for n, m in q.dup_ngram_max}
    zeros = {name: 0.0 for name, _ in SCORED_SIGNALS} | dict.fromkeys(ngram_limits, 0.0)
    k = len(SCORED_SIGNALS) + 2  # + the two n-gram families, each once
    assert quality_score(zeros, q) == 1.0
    assert quality_score({name: getattr(q, lim) for name, lim in SCORED_SIGNALS} | ngram_limits, q) == 0.0
    half = dict(zeros, special_char_ratio=q.max_symbol_ratio / 2, digit_ratio=3 * q.max_digit_ratio)
    assert quality_score(half, q) == round((k - 2 + 0.5 + 0.0) / k, 4)
    # repeated 5-grams at 80 % of their limit (a user's document scored 1.0 at 87 %: n-grams were not scored); a
    # family counts by its n nearest the limit
    rep = dict(zeros, dup_5gram=0.8 * ngram_limits["dup_5gram"], dup_6gram=0.1 * ngram_limits["dup_6gram"])
    assert quality_score(rep, q) == round((k - 1 + 0.2) / k, 4)
    assert quality_score({"special_char_ratio": q.max_symbol_ratio / 4}, q) == 0.75  # only the signals present count
    # on documents: clean prose scores above the same prose with spam appended
    clean = en_text(np.random.default_rng(0), 300)
    spammy = clean + "\n" + "\n".join(["#deal #sale #win www.x.com/a www.x.com/b 50% 70% 90%"] * 8)
    assert quality_score(analyze(clean), q) > quality_score(analyze(spammy), q)


def test_keyword_density_counts_chinese_words_not_whitespace_runs():
    """Per thousand CJK-aware words: a long Chinese text is one whitespace-separated run, so counted by `split`
    two stray 定理 in 4,000 characters were 2,000 per thousand words and tagged it math."""
    rng = np.random.default_rng(0)
    long, short = zh_text(rng, 4000), zh_text(rng, 400)
    assert "math" not in domain_tags(long) and "math" not in domain_tags(short)
    assert "math" not in domain_tags(long + "定理。" + long + "定理。")  # 2 hits in ~4,000 words (8,000 characters)
    assert "math" in domain_tags(short + "定理。定理。")  # 2 hits in ~200 words


def test_glossary_terms_count_once_across_domains_and_match_plurals():
    """'code' and 'docs' share the Python glossary: a document tagged both listed each term twice; and a term
    found only in its plural ('iterators') was documented to match."""
    from data.augment import PYTHON_GLOSSARY, DomainGlossary

    defs = dict(PYTHON_GLOSSARY)
    out = DomainGlossary()({"text": "Iterators wrap decorators.", "domains": ["code", "docs"]})
    assert out["augmented"] == ["iterator", "decorator"]
    assert out["text"].endswith(f"Glossary:\n- iterator: {defs['iterator']}\n- decorator: {defs['decorator']}")


def test_a_zero_limit_scores_full_headroom_at_zero_and_none_above():
    """A limit of 0 (e.g. max_url_density=0: no URL allowed) has no ratio to take: a signal at 0 has headroom 1."""
    from data.filters import QualityConfig
    from data.label import SCORED_SIGNALS, quality_score

    q = QualityConfig(max_url_density=0.0)
    zeros = {name: 0.0 for name, _ in SCORED_SIGNALS}
    assert quality_score(zeros, q) == 1.0
    assert quality_score(dict(zeros, url_density=0.01), q) == round(1 - 1 / len(SCORED_SIGNALS), 4)


def test_quality_score_ranks_clean_chinese_and_english_alike():
    """Human-written prose in either language (data/langid_samples.py, documents of four sentences): Chinese puts
    a punctuation mark every ~9 characters, so a score over `symbol_ratio` (punctuation included) ranked every
    Chinese document below every English one; the score's `special_char_ratio` leaves punctuation out, and still
    counts $ % © and emoji."""
    import numpy as np

    from data.filters import QualityConfig, analyze, quality_filter
    from data.label import quality_score
    from data.langid_samples import EN_LONG, ZH_LONG
    from data.normalize import normalize_text

    rng, q = np.random.default_rng(0), QualityConfig(min_chars=0, min_words=0)
    scores, symbols = {}, {}
    for lang, sents, sep in (("en", EN_LONG, " "), ("zh", ZH_LONG, "")):
        out = [quality_filter(normalize_text(sep.join(rng.choice(sents, 4, replace=False))), q) for _ in range(20)]
        assert all(reason is None for _, reason, _ in out)
        scores[lang] = np.array([quality_score(s, q) for *_, s in out])
        symbols[lang] = np.median([s["symbol_ratio"] for *_, s in out])
    # the punctuation-inclusive ratio differs by script: Chinese has more marks a word. (5x when a CJK character
    # counted one character; that gap was unfair and closed by QualityConfig.cjk_char_weight: 1.8x now)
    assert symbols["zh"] > 1.5 * symbols["en"]
    assert abs(np.median(scores["zh"]) - np.median(scores["en"])) < 0.01 and scores["zh"].min() > 0.97
    assert analyze("word$ " * 5)["special_char_ratio"] == pytest.approx(1 / 5)
    assert analyze("好的，好的。" * 5)["special_char_ratio"] == 0.0
    # one emoji in 4 CJK characters (cjk_char_weight each) and a mark: 1 / 6 when a CJK character counted one
    assert analyze("好的😀好的。" * 5)["special_char_ratio"] == pytest.approx(1 / (4 * q.cjk_char_weight + 2))


def test_the_labelled_tier_scores_a_document_as_quality_score_does():
    """The label stage scores the signals the quality stage kept on the document: those must be every one
    quality_score reads (without dup_paragraph_chars, top_3gram ... this one, a passage repeated, scored 0.84, not
    0.81)."""
    import numpy as np

    from data.filters import QualityConfig, analyze
    from data.label import quality_score
    from data.stages import Label, QualityFilter
    from data.synthetic import en_text

    rng = np.random.default_rng(0)
    parts, passage = [en_text(rng, 60) for _ in range(6)], en_text(rng, 12)
    for q in (QualityConfig(), QualityConfig(top_ngram_max=((3, 0.2),), dup_ngram_max=((7, 0.15), (12, 0.1)))):
        doc, reason = QualityFilter(q)({"text": "\n\n".join(parts[:2] + [passage] + parts[2:] + [passage])})
        assert reason is None
        want = quality_score(analyze(doc["text"], q), q)
        assert want < 0.9 and Label(quality=q)(doc)[0]["quality"] == pytest.approx(want, abs=1e-3)


def test_a_records_own_augmented_field_is_not_taken_for_the_augment_stages():
    """`augmented` names what the augment stage added: a record's own field (its source's metadata) stayed on the
    documents the glossary left alone, and the stage counted them as augmented_docs (2 here, for 1 augmented)."""
    from data.augment import DomainGlossary
    from data.stages import Augment, StageStats, run_stages

    docs = [{"text": "Iterators wrap decorators.", "domains": ["code"], "augmented": True, "id": 1},
            {"text": "Nothing to explain here.", "domains": ["code"], "augmented": ["iterator"], "id": 2}]
    for hook in (DomainGlossary(), None):
        stage = Augment(hook)
        st = StageStats(stage.name)
        out = [run_stages(dict(d), [stage], [st]) for d in docs]
        changed = [o["text"] != d["text"] for o, d in zip(out, docs)]
        assert changed == ([True, False] if hook else [False, False])
        assert [o.get("augmented") for o in out] == ([["iterator", "decorator"], None] if hook else [None, None])
        assert st.counters["augmented_docs"] == sum(changed) and [o["id"] for o in out] == [1, 2]
    # a hook that loses the text is named where it runs, not later by the writer or the loader
    with pytest.raises(TypeError, match="augmentation hook .* must return the document dict with a str 'text'"):
        Augment(lambda d: {**d, "text": None})(dict(docs[0]))


def test_a_quality_config_of_lists_labels_as_its_tuples_do():
    """QualityConfig validates lists for its rules (as JSON gives them), but the quality stage's kept-signal cache
    hashed the config: every document raised TypeError: unhashable type: 'list'. Stored as tuples now, the same
    config as the tuples' (its fingerprint too)."""
    import numpy as np

    from data.filters import QualityConfig
    from data.pipeline import PipelineConfig
    from data.stages import Label, QualityFilter
    from data.synthetic import en_text

    fields = ("boilerplate", "promo_phrases", "blocklist", "top_ngram_max", "dup_ngram_max")
    tuples = QualityConfig(top_ngram_max=((3, 0.2),), dup_ngram_max=((7, 0.15), (12, 0.1)))
    lists = QualityConfig(**{f: [list(x) if isinstance(x, tuple) else x for x in getattr(tuples, f)] for f in fields})
    rng = np.random.default_rng(0)
    for text in (en_text(rng, 300), "Home | News\n" + en_text(rng, 200) + "\nAll rights reserved."):
        want = Label(quality=tuples)(QualityFilter(tuples)({"text": text})[0])[0]
        assert Label(quality=lists)(QualityFilter(lists)({"text": text})[0])[0] == want
    assert lists == tuples
    assert PipelineConfig(quality=lists).fingerprint() == PipelineConfig(quality=tuples).fingerprint()


def test_label_and_glossary_settings_given_as_lists_are_the_tuples_settings():
    """As QualityConfig's: the same domains / glossaries as lists (a JSON config's) were another LabelConfig /
    DomainGlossary, so the run's fingerprint differed and a run resumed with them was refused ("different settings:
    label.domains: (('math', ...)) → [['math', ...]]"); both were unhashable too."""
    import json

    from data.augment import DomainGlossary
    from data.pipeline import PipelineConfig

    label = LabelConfig(domains=(("math", ("theorem", "lemma")),))
    gloss = DomainGlossary(glossaries=(("math", (("theorem", "a statement"),)),))
    as_json = lambda v: json.loads(json.dumps(v))  # noqa: E731
    lists = PipelineConfig(label=LabelConfig(domains=as_json(label.domains)),
                           augment=DomainGlossary(glossaries=as_json(gloss.glossaries)))
    assert lists.label == label and lists.augment == gloss and hash(lists.label) == hash(label)
    assert lists.fingerprint() == PipelineConfig(label=label, augment=gloss).fingerprint()
    assert domain_tags("theorem lemma", lists.label) == ["math"]
    assert lists.augment({"text": "A theorem.", "domains": ["math"]})["augmented"] == ["theorem"]


def test_the_labelling_stage_identifies_a_language_under_the_pipelines_langid_settings():
    """Without a langid stage, the labelling stage detects `lang` itself: it did so under the default LangIDConfig, so
    PipelineConfig.langid's fold (here Serbo-Croatian 'sh' for sr / hr / bs) was not applied and the tier said 'hr'."""
    from data.langid import LangIDConfig
    from data.pipeline import PipelineConfig
    from data.stages import Normalize, QualityFilter

    sh = LangIDConfig(keep=("en", "sh"), fold=(("sh", ("sr", "hr", "bs")),))
    cfg = PipelineConfig(workers=1, langid=sh, filters=(Normalize(), QualityFilter()))
    text = ("Vlada je u utorak objavila da će novi zakon o obrazovanju stupiti na snagu sljedeće godine, nakon što ga "
            "usvoji parlament.")
    (label,) = cfg.label_stages()
    assert label({"text": text})[0]["lang"] == "sh"
    assert PipelineConfig(workers=1).label_stages()[0]({"text": text})[0]["lang"] == "hr"  # the default: no fold
    # a `lang` the document has (from the langid stage, or the record's own) is kept, not detected again
    assert label({"text": text, "lang": "bs"})[0]["lang"] == "bs"
    # a record's "lang": null is none: it was kept, and the tier and the report's language mix said None
    assert label({"text": text, "lang": None})[0]["lang"] == "sh"


def test_glossary_terms_that_begin_or_end_in_punctuation_match():
    """An ASCII term matched as `\\bterm s?\\b`: after a final '+' or '#' (or before a leading '.') a word boundary
    needs a letter next to it, so 'C++', 'C#' and '.NET' matched no text at all, silently."""
    from data.augment import DomainGlossary

    gloss = DomainGlossary(glossaries=(("code", (("C++", "a language"), ("C#", "another"), (".NET", "a runtime"),
                                                 ("iterator", "yields items"))),))
    for text, term in (("I write C++ daily.", "C++"), ("Learn C# now", "C#"), ("The .NET runtime", ".NET"),
                       ("(C++)", "C++"), ("iterators!", "iterator")):
        assert gloss({"text": text, "domains": ["code"]}).get("augmented") == [term], text
    for text in ("abc# x", "foo.NETWORK", "a preiterator", "CC++"):  # still whole terms only
        plain = {"text": text, "domains": ["code"]}
        assert gloss(plain) is plain, text


def test_label_and_glossary_settings_that_would_mislabel_are_refused_by_field():
    """A tag given twice tagged a document twice (['code', 'code']: the report counted it twice); a negative density
    was accepted; an empty glossary term matched every text ('- : definition' appended to each document)."""
    from data.augment import DomainGlossary

    with pytest.raises(ValueError, match=r"LabelConfig.domains names the tags \['code'\] more than once"):
        LabelConfig(domains=(("code", ("\ndef ",)), ("code", ("\nclass ",))))
    with pytest.raises(ValueError, match="LabelConfig.min_hits_per_1k_words=-1.0 must be >= 0"):
        LabelConfig(min_hits_per_1k_words=-1.0)
    with pytest.raises(ValueError, match="DomainGlossary.glossaries: .* non-empty terms"):
        DomainGlossary(glossaries=(("math", (("", "nothing"), ("theorem", "a statement"))),))
    with pytest.raises(ValueError, match="DomainGlossary.max_terms=0 must be >= 1"):  # glossed nothing, silently
        DomainGlossary(max_terms=0)
    assert LabelConfig(min_hits_per_1k_words=0.0).min_hits_per_1k_words == 0.0  # 0: min_hits alone decides


def test_a_definition_over_two_lines_is_glossed_once():
    """The hook knew its own block by whole `- term: definition` entries but read the block line by line: a definition
    with a line break was not recognised, and re-cleaning appended the glossary a second time."""
    from data.augment import DomainGlossary

    gloss = DomainGlossary(glossaries=(("math", (("theorem", "a statement proved\nfrom axioms"),)),))
    once = gloss({"text": "A theorem here.", "domains": ["math"]})
    assert once["text"] == "A theorem here.\n\nGlossary:\n- theorem: a statement proved\nfrom axioms"
    assert gloss(once)["text"] == once["text"]
    # a document with a section of its own under the same header: the hook's block is the last one, so it is that
    # block that is replaced (read from the first header, the block held the document's text and was glossed twice)
    own = {"text": "Notes.\n\nGlossary:\nour own terms\n\nA theorem here.", "domains": ["math"]}
    once = gloss(own)
    assert once["text"] == own["text"] + "\n\nGlossary:\n- theorem: a statement proved\nfrom axioms"
    assert gloss(once)["text"] == once["text"]


def test_glossary_terms_with_accented_capitals_match_as_whole_words():
    """A term outside ASCII was searched unlowered in the lower-cased text, so 'Schrödinger equation' or 'Ökonomie'
    never matched (silently), and without word boundaries, so 'énergie' matched inside 'bioénergies'. Latin terms
    match whole words; a Chinese term still matches mid-text (Chinese has no spaces)."""
    from data.augment import DomainGlossary

    gloss = DomainGlossary(glossaries=(("science", (("Schrödinger equation", "quantum"), ("Ökonomie", "economics"),
                                                    ("énergie", "energy"), ("定理", "theorem"))),))
    for text, found in (("We solve the Schrödinger equation.", ["Schrödinger equation"]),
                        ("Die ökonomie wächst", ["Ökonomie"]), ("Die Agrarökonomie", None),
                        ("l'énergie et les énergies", ["énergie"]), ("la bioénergie", None),
                        ("勾股定理是", ["定理"])):
        assert gloss({"text": text, "domains": ["science"]}).get("augmented") == found, text


def test_glossary_terms_match_in_scripts_written_without_spaces():
    """Whole words by lookarounds for every term outside CJK: a Thai, Lao, Khmer or Burmese term (scripts without
    spaces) then never matched inside a sentence (it did before, as a substring), and a Latin term next to Chinese
    written without spaces ("我用Python写代码") did not either. Inside a Latin word a term still does not match."""
    from data.augment import DomainGlossary

    terms = (("สมการ", "equation"), ("ສົມຜົນ", "equation"), ("សមីការ", "equation"), ("ညီမျှခြင်း", "equation"),
             ("Python", "a language"), ("정리", "theorem"))
    gloss = DomainGlossary(glossaries=(("code", terms),))
    for text, found in (("แก้สมการนี้ให้ได้", ["สมการ"]), ("ແກ້ສົມຜົນນີ້", ["ສົມຜົນ"]), ("ដោះស្រាយសមីការនេះ", ["សមីការ"]),
                        ("ဒီညီမျှခြင်းကို", ["ညီမျှခြင်း"]), ("我用Python写代码", ["Python"]),
                        ("Python으로 이 정리는", ["Python", "정리"]), ("CPython3 and pythonic", None)):
        assert gloss({"text": text, "domains": ["code"]}).get("augmented") == found, text


def test_glossary_terms_do_not_match_inside_words_that_go_on_in_a_combining_mark():
    """re's \\w is no combining mark: Devanagari's vowel signs (ी in 'गणितीय', ि in 'परिगणित'), Bengali's or a
    decomposed accent (e + U+0301) ended a word for the lookarounds, so 'गणित' (mathematics) matched inside
    'गणितीय' (mathematical) and 'परिगणित', and 'cafe' inside a decomposed 'café'."""
    from data.augment import DomainGlossary

    terms = (("गणित", "mathematics"), ("সংখ্যা", "number"), ("cafe", "a coffee house"), ("Python", "a language"),
             ("\U00011025\U0001102B", "a word in Brahmi"))
    gloss = DomainGlossary(glossaries=(("math", terms),))
    for text, found in (("यह गणित है", ["गणित"]), ("गणितीय मॉडल", None), ("परिगणित संख्या", None),
                        ("সংখ্যা এবং সংখ্যাটি", ["সংখ্যা"]), ("সংখ্যাগুলি", None), ("un cafe\u0301 noir", None),
                        ("le cafe, noir", ["cafe"]), ("ใช้Pythonเขียน", ["Python"]),  # (a Thai mark before it)
                        # marks beyond the first plane too: Brahmi 'dhama' going on in its vowel sign aa (U+11038)
                        ("\U00011025\U0001102B \U0001102B", ["\U00011025\U0001102B"]),
                        ("\U00011025\U0001102B\U00011038 \U0001102B", None)):
        assert gloss({"text": text, "domains": ["math"]}).get("augmented") == found, text


def test_prose_lines_starting_with_a_capitalised_statement_word_are_not_code():
    """Line-start keywords matched the lower-cased text, so a news report with paragraphs opening "From Monday" and
    "From the north" was tagged code, and the augmentation stage appended Python's definition of 'exception' to it.
    Statements are lower-case; docstring sections keep their capitals ("Args:")."""
    from data.augment import DomainGlossary
    from data.label import domain_tags

    news = ("From Monday, the city will close two bridges for repairs, officials said.\n\n"
            "From the north side, drivers can use the ring road instead, with an exception for buses.")
    essay = "Class sizes grew this year.\n\nReturn rates for library books fell.\n\nImport duties on paper rose."
    assert domain_tags(news) == [] and domain_tags(essay) == []
    doc = {"text": news, "domains": domain_tags(news)}
    assert DomainGlossary()(doc) is doc
    assert domain_tags("import os\nFrom here\nfrom typing import Any\n") == ["code"]
    assert domain_tags('"""Add.\n\nArgs:\n    x: one\n\nReturns:\n    the sum\n"""') == ["docs"]
    numpy_doc = "Parameters\n----------\nx : int\n\nReturns\n-------\nint\n"
    assert domain_tags(numpy_doc) == ["docs"]


def test_a_term_spelled_in_two_cases_across_domains_is_defined_once():
    """Terms match case-insensitively, but a term was counted once by its spelling: 'Matrix' in a math glossary and
    'matrix' in a code one appended two definitions of the one word found."""
    from data.augment import DomainGlossary

    gloss = DomainGlossary(glossaries=(("math", (("Matrix", "a grid of numbers"),)),
                                       ("code", (("matrix", "a 2-D array type"),))))
    out = gloss({"text": "the matrix here", "domains": ["math", "code"]})
    assert out["augmented"] == ["Matrix"] and out["text"].endswith("Glossary:\n- Matrix: a grid of numbers")


def test_keyword_density_counts_chinese_in_words_not_characters():
    """Per thousand words with CJK counted in words (QualityConfig.cjk_chars_per_word characters each), as the quality
    filter's promo density: per character, 2 news keywords in a 2,900-character Chinese report (~1,450 words) measured
    0.7 per thousand and tagged nothing, where its English translation (~1,500 words, the same 2) was news."""
    zh = "据新华社报道，" + zh_text(np.random.default_rng(0), 2900) + "新华社记者在现场看到。"
    en = "Xinhua reported that " + "the new metro line will open next year and halve commuting times. " * 120
    assert zh.count("报道") + zh.count("记者") == 2 and "news" in domain_tags(en + "the agency reported.")
    assert domain_tags(zh) == ["news"]
    assert domain_tags(zh, qcfg=QualityConfig(cjk_chars_per_word=1.0)) == []  # a character a word: 2 in ~3,100


def test_overlapping_keywords_of_a_tag_count_once():
    """"解方程组" (solving a system of equations) holds both 解方程 and 方程组: counted each, one mention in a Chinese
    diary was 2 hits (min_hits) and tagged it math; two mentions still do."""
    diary = ("今天小明放学回家，吃完晚饭以后开始写作业。老师布置的作业是解方程组，"
             "他很快就做完了，然后和妈妈一起去公园散步。公园里有很多人在跳舞，还有小朋友在放风筝。")
    assert domain_tags(diary) == []
    assert domain_tags(diary + "明天还要解方程组。") == ["math"]
    assert domain_tags("调用self.fit();") == ["code"]  # keywords side by side, not overlapping: 2 hits


def test_math_keywords_count_in_the_plural():
    """Science's keywords list their plurals and math's did not: a paragraph of theorems, lemmas, proofs, equations,
    integrals and matrices (6 keywords) was tagged nothing."""
    text = ("This chapter collects the main theorems. The lemmas before them have short proofs, and the equations in "
            "section 2 use integrals over matrices.")
    assert domain_tags(text) == ["math"]


def test_every_tags_keywords_count_in_the_plural():
    """Math's plurals were added and the other tags' were not: hypotheses, ministers, liabilities, licences and
    investments (their singulars keywords) tagged nothing."""
    assert domain_tags("Both hypotheses were tested, and the hypotheses held.") == ["science"]
    assert domain_tags("The ministers met; the ministers of two governments agreed.") == ["news"]
    assert domain_tags("Such liabilities survive; the licences cover no liabilities.") == ["legal"]
    assert domain_tags("Their investments grew, and the revenues of those investments rose.") == ["finance"]
