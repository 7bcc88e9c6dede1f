"""Every quality / repetition / spam rule on crafted documents that must fail it, next to ones that must pass."""

import collections
import dataclasses
import itertools

import numpy as np
import pytest

from data.filters import (
    QualityConfig,
    analyze,
    markup_chars,
    match_form,
    ngram_signals,
    quality_filter,
    strip_boilerplate,
    tokens,
    words,
)
from data.normalize import normalize_text
from data.synthetic import en_text, zh_text

CFG = QualityConfig()


def reason(text, cfg=CFG):
    return quality_filter(text, cfg)[1]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_clean_en_zh_and_mixed_documents_pass(rng):
    assert reason(en_text(rng, 120)) is None
    assert reason(zh_text(rng, 300)) is None
    mixed = en_text(rng, 40) + "\n" + zh_text(rng, 120) + "\n" + en_text(rng, 40)
    assert reason(mixed) is None


def test_cjk_aware_word_counts(rng):
    zh = zh_text(rng, 160)
    # whitespace splitting sees one "word"; CJK-aware tokens count each character
    assert len(zh.split()) == 1
    assert len(words(zh)) == 160
    assert tokens("我用Python写code。") == ["我", "用", "Python", "写", "code", "。"]
    assert words("我用Python写code。") == ["我", "用", "Python", "写", "code"]
    # a 160-character Chinese document has enough words; 30 characters do not
    assert reason(zh) is None
    assert reason(zh_text(rng, 30)) == "too_short"
    s = analyze(zh)
    assert s["mean_word_len"] is None  # not defined without latin words
    assert s["cjk_chars"] == 160


def test_length_rules(rng):
    assert reason("Too short.") == "too_short"
    assert reason(en_text(rng, 25)) == "too_few_words"
    assert reason(en_text(rng, 200), dataclasses.replace(CFG, max_words=100)) == "too_many_words"


def test_mean_word_length(rng):
    short_words = " ".join(rng.choice(["a", "an", "to", "of", "is", "it", "we"], 120)) + "."
    assert reason(short_words) == "mean_word_len"
    long_words = " ".join(rng.choice(["internationalization", "counterrevolutionaries", "incomprehensibilities"], 80))
    assert reason(long_words) == "mean_word_len"


def test_alpha_symbol_digit_hash_ratios(rng):
    numbers = " ".join(str(x) for x in rng.integers(1000, 9999, 80))
    assert reason(numbers) == "alpha_words"
    symbols = " ".join(w + "$%^&*" for w in rng.choice(["word", "text", "data", "line"], 80))
    assert reason(symbols) == "symbol_ratio"
    digits = " ".join(f"id{x}" for x in rng.integers(10**6, 10**7, 80))
    assert reason(digits) == "digit_ratio"
    hashtags = " ".join("#" + w for w in rng.choice(["python", "code", "today", "love", "summer"], 80))
    assert reason(hashtags) == "hash_ellipsis"


def test_bullet_and_ellipsis_lines(rng):
    bullets = "\n".join("- " + en_text(rng, 8)[:-1] for _ in range(12))
    assert reason(bullets) == "bullet_lines"
    trailing = "\n".join(en_text(rng, 12)[:-1] + "..." for _ in range(10))
    assert reason(trailing) == "ellipsis_lines"
    # a few bullets inside prose are fine
    assert reason(en_text(rng, 100) + "\n- one item here\n- another item") is None


def test_boilerplate_lines_removed_or_document_dropped(rng):
    body = "\n".join(en_text(rng, 30) for _ in range(4))
    text = "Home | News | Sports\n" + body + "\nCopyright 2024 Example Inc. All Rights Reserved.\n隐私政策 | 联系我们"
    out, removed, total = strip_boilerplate(text, CFG)
    assert (removed, total) == (3, 7) and out == body
    kept, r, signals = quality_filter(text, CFG)
    assert r is None and kept == body and signals["boilerplate_lines"] == 3
    footer = ["Accept cookies to continue", "Privacy Policy", "Terms of Service", "Follow us on twitter"]
    mostly_boilerplate = "\n".join([*footer, en_text(rng, 15)])  # 4 of 5 lines, over 20% of the characters
    assert reason(mostly_boilerplate) == "boilerplate"
    # an article of two one-line paragraphs under a longer footer: 4 of 6 lines, ~10% of the characters
    article = "\n".join([en_text(rng, 60), en_text(rng, 60), *footer])
    kept, r, signals = quality_filter(article, CFG)
    assert r is None and signals["boilerplate_lines"] == 4 and kept.count("\n") == 1
    assert quality_filter(article, QualityConfig(max_boilerplate_chars=0.05))[1] == "boilerplate"


def test_duplicate_lines_and_paragraphs(rng):
    lines = [en_text(rng, 10) for _ in range(10)]
    dup_lines = "\n".join(lines + [lines[0]] * 6)
    assert reason(dup_lines) == "dup_lines"
    paras = [en_text(rng, 30) for _ in range(4)]
    dup_paras = "\n\n".join(paras + [paras[1], paras[1], paras[2]])
    relaxed = dataclasses.replace(CFG, max_dup_lines=1.0, max_dup_line_chars=1.0)
    assert reason(dup_paras, relaxed) == "dup_paragraphs"
    # unique lines pass
    assert reason("\n".join(lines)) is None


def test_top_and_duplicate_ngrams(rng):
    filler = list(rng.choice(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
                              "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"], 120))
    top = " ".join(w + " machine learning" if i % 2 else w for i, w in enumerate(filler))
    assert reason(top) == "top_2gram"
    phrase = "the quick brown fox jumps over the lazy sleeping dog"
    repeated = en_text(rng, 60) + f" {phrase}. " + en_text(rng, 20) + f" {phrase}. " + en_text(rng, 20) + f" {phrase}."
    r = reason(repeated)
    assert r is not None and r.startswith("dup_") and r.endswith("gram")
    # Chinese repetition is caught by the same CJK-aware n-grams
    sentence = zh_text(rng, 20)
    assert reason(zh_text(rng, 100) + sentence * 6).startswith(("dup_", "top_"))


# A real news paragraph: it names "国家统计局新闻发言人" (10 characters, 4 words) three times, as news does
ZH_NEWS = ("国家统计局今天发布数据显示，今年前三季度国内生产总值同比增长百分之五点二，经济运行总体回升向好。"
           "国家统计局新闻发言人在发布会上表示，消费对经济增长的拉动作用明显增强，服务业恢复较快。"
           "分季度看，第一季度增长四点五，第二季度增长六点三，第三季度增长四点九。"
           "国家统计局新闻发言人同时指出，外部环境依然复杂严峻，国内需求仍显不足，经济回升向好的基础还需要进一步巩固。"
           "对于下一阶段的工作，国家统计局新闻发言人认为，要继续扩大有效需求，增强市场信心，推动经济持续健康发展。"
           "多位经济学家接受记者采访时表示，全年经济增长目标有望顺利实现。")
# SEO spam: one keyword phrase stuffed into every clause (no line repeats, so only the n-gram rules see it)
ZH_SPAM = ("北京代办营业执照哪家好？北京代办营业执照找我们，专业代办营业执照十年经验。"
           "北京代办营业执照价格多少钱？北京代办营业执照流程简单，代办营业执照当天出证。"
           "朝阳区代办营业执照，海淀区代办营业执照，东城区代办营业执照，西城区代办营业执照，"
           "丰台区代办营业执照，通州区代办营业执照，北京代办营业执照电话咨询，北京代办营业执照欢迎来电。")


def test_cjk_ngrams_span_words_not_characters():
    _, r, s = quality_filter(ZH_NEWS)
    assert r is None and s["ngram_scale"] == 2.0
    # counted per character, the repeated name alone covers 20% of the text and fails dup_5gram
    assert reason(ZH_NEWS, dataclasses.replace(CFG, cjk_chars_per_word=1.0)) == "dup_5gram"
    # 5 words are 10 characters: the name's three copies are still measured, just against comparable units
    assert s["dup_5gram"] == pytest.approx(30 / 240)
    assert reason(ZH_SPAM) == "top_2gram"
    # English is measured per word as before
    assert analyze("The quick brown fox jumps over the lazy dog. " * 3)["ngram_scale"] == 1.0
    # inf was accepted, then analyze failed on every document (NaN n-gram scale in English, inf in Chinese)
    for bad in (0.5, float("inf")):
        with pytest.raises(ValueError, match="cjk_chars_per_word"):
            QualityConfig(cjk_chars_per_word=bad)


def test_ngram_signals_match_definition():
    ws = "a b c a b c x y".split()
    s = ngram_signals(ws, [2, 3], [3])
    # 'a b' occurs twice: 2 chars x 2 / 8 chars; 'a b c' twice: 3 x 2 / 8; its words cover 6 of 8 chars
    assert s["top_2gram"] == pytest.approx(4 / 8)
    assert s["top_3gram"] == pytest.approx(6 / 8)
    assert s["dup_3gram"] == pytest.approx(6 / 8)
    assert ngram_signals("a b c d".split(), [2], [3]) == {"top_2gram": 0.0, "dup_3gram": 0.0}
    # scale 2: the "2-gram" is 4 tokens ('a b c a' once, every 4-gram once) and the "1-gram" 2 tokens
    assert ngram_signals(ws, [2, 1], [], scale=2.0) == {"top_2gram": 0.0, "top_1gram": pytest.approx(4 / 8)}


def test_duplicate_ngrams_longer_than_127_words_cover_their_words():
    """dup_{n}gram counted the n-grams covering each word in int8: from n = 128 the counts wrapped negative, and a
    page of one 400-word passage twice (and 40 words more) measured dup_128gram 0.60 (it passed a 0.7 limit), not
    0.94."""
    passage = [f"w{i}" for i in np.random.default_rng(0).permutation(400)]
    ws = passage + passage + [f"end{i}" for i in range(40)]

    def reference(ws, n):  # characters of the words inside an n-gram that occurs twice or more
        grams = collections.Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
        covered = {j for i in range(len(ws) - n + 1) if grams[tuple(ws[i:i + n])] > 1 for j in range(i, i + n)}
        return sum(len(ws[j]) for j in covered) / sum(map(len, ws))

    for n in (5, 127, 128, 200, 400):
        assert ngram_signals(ws, [], [n])[f"dup_{n}gram"] == pytest.approx(reference(ws, n)), n
    assert reference(ws, 400) > 0.9


def test_spam_signals(rng):
    body = en_text(rng, 100)
    links = body + " " + " ".join(f"https://spam{i}.example.com/offer" for i in range(20))
    assert reason(links) == "url_density"
    assert reason(body + " " + " ".join(f"www.spam{i}.example.com/offer" for i in range(20))) == "url_density"
    dots = body + " Wait..." * 12  # '...' counts toward hash_ellipsis, like '#' and '…'
    assert analyze(dots, CFG)["hash_ellipsis_ratio"] == pytest.approx(12 / len(words(dots)))
    assert reason(body + " See https://docs.python.org for details.") is None
    assert reason(body + " Buy now! Best price. BUY NOW. Click here, buy now.") == "promo_spam"
    assert reason(body + " You can buy now if you like.") is None
    assert reason(zh_text(rng, 200) + "限时优惠！限时优惠！限时优惠！") == "promo_spam"
    assert reason(body + " Cheap viagra here.") == "blocklist"
    assert reason(body + " Visit Viagrafalls park.") is None  # whole words only for latin terms
    # at their start too: 'contact now' holds 'act now', 'border now' 'order now'
    assert analyze(body + " Contact now, by the border now.", CFG)["promo_hits"] == 0
    assert analyze(body + " Act now, order now.", CFG)["promo_hits"] == 2
    # phrases that begin or end with punctuation: `\b` around them never matched
    cfg = dataclasses.replace(CFG, blocklist=("$$$", "#gambling", "xxx!"))
    for hit in ("Win $$$ today.", "Try #gambling now.", "Hot xxx! here."):
        assert reason(f"{body} {hit}", cfg) == "blocklist", hit
    assert reason(f"{body} Pay a$$$b.", cfg) is None and reason(f"{body} See #gamblingtips.", cfg) is None
    assert reason(zh_text(rng, 200) + "欢迎来到博彩网站") == "blocklist"


def test_promo_density_counts_chinese_in_words_like_english(rng):
    """Four different promo phrases (none repeated) in ~150 words: English dropped, Chinese of the same length in
    words (~300 characters) was kept, its density taken per character."""
    en = en_text(rng, 150) + " Buy now. Click here. Order now. Best price."
    zh = zh_text(rng, 150 * int(CFG.cjk_chars_per_word)) + "限时优惠。立即购买。点击购买。免费领取。"
    for text in (en, zh):
        s = analyze(text, CFG)
        assert s["promo_max_repeat"] <= CFG.max_promo_repeats and s["promo_hits"] == 4
        assert s["promo_density"] > CFG.max_promo_density and reason(text) == "promo_spam", (text[:40], s)
    assert reason(zh_text(rng, 600) + "限时优惠。立即购买。") is None  # two in ~300 words: within the density


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="max_symbol_ratio"):
        QualityConfig(max_symbol_ratio=1.5)
    with pytest.raises(ValueError, match="min_mean_word_len"):
        QualityConfig(min_mean_word_len=12.0)
    with pytest.raises(ValueError, match="boilerplate"):
        QualityConfig(boilerplate=("([unclosed",))
    # a rule that matches an empty string (an empty alternative, an optional group alone) matched every line, so the
    # whole corpus was dropped as `boilerplate`; anchored rules for blank or punctuation-only lines are rules
    for rule in ("footer|", "(share this)?", "x*", "^", r"\s*"):
        with pytest.raises(ValueError, match=r"QualityConfig.boilerplate pattern .* matches an empty string"):
            QualityConfig(boilerplate=(*CFG.boilerplate, rule))
    assert QualityConfig(boilerplate=(r"^\W*$", r"^$", r"read more\s*$")).boilerplate[0] == r"^\W*$"
    # a bare string where a tuple of phrases belongs made every character a rule (and dropped every document)
    for field in ("blocklist", "promo_phrases", "boilerplate"):
        with pytest.raises(ValueError, match=rf"QualityConfig.{field}=.*\(\'x y\',\)"):
            QualityConfig(**{field: "x y"})
    with pytest.raises(ValueError, match=r"top_ngram_max entry \(2, 20.0\)"):  # a percentage, not a fraction
        QualityConfig(top_ngram_max=((2, 20.0),))
    with pytest.raises(ValueError, match="dup_ngram_max"):
        QualityConfig(dup_ngram_max=((0, 0.1),))
    with pytest.raises(ValueError, match="min_words"):
        QualityConfig(min_words=-1)


def test_combining_marks_are_word_characters_not_symbols():
    """Devanagari vowel signs, Thai vowels / tone marks and Arabic harakat are Unicode marks, for which str.isalnum is
    False: ordinary prose in those scripts measured ~0.4 symbol ratio and failed the 0.35 limit."""
    from data.normalize import normalize_text

    hindi = "भारत एक विशाल देश है जिसकी संस्कृति बहुत पुरानी और समृद्ध है। यहाँ अनेक भाषाएँ बोली जाती हैं।"
    thai = "ประเทศไทยมีวัฒนธรรมที่หลากหลาย และผู้คนเป็นมิตรกับนักท่องเที่ยว"
    arabic = "اَلْعَرَبِيَّةُ لُغَةٌ جَمِيلَةٌ يَتَكَلَّمُهَا مَلَايِينُ النَّاسِ"
    for text in (hindi, thai, arabic):
        s = analyze(normalize_text(text))
        punct = sum(c in "।," for c in text) / len(text.replace(" ", ""))
        assert s["symbol_ratio"] == pytest.approx(punct, abs=1e-9), (text, s["symbol_ratio"])
    # ASCII text measures as before
    assert analyze("word$ " * 5)["symbol_ratio"] == pytest.approx(1 / 5)


def test_zh_numbers_blank_lines_and_copyright_owner_do_not_misfire():
    """Chinese news full of dates and counts is not judged by the mean length of its numbers; a page's boilerplate
    fraction does not depend on blank lines; 版权所有者 (copyright owner) is not the footer 版权所有."""
    from data.filters import QualityConfig, quality_filter, strip_boilerplate
    from data.normalize import normalize_text

    zh = normalize_text("2023年10月1日至7日国庆假期期间，全国国内旅游出游8.26亿人次，按可比口径同比增长71%。"
                        "据交通运输部统计，10月1日全国共发送旅客5千万人次，10月2日约4千万人次，10月3日约3千万人次。"
                        "北京市共接待游客1千万人次，上海市接待游客9百万人次。记者在现场看到，各大景区游人如织，"
                        "多家酒店在假期前3天就已经满房。业内人士表示，假期消费市场的火热反映出经济持续恢复向好的态势。")
    _, reason, signals = quality_filter(zh)
    assert reason is None and signals["mean_word_len"] is None
    body = ("The committee met on Tuesday to discuss the proposed changes to the city budget, which would increase "
            "spending on public transport and reduce funding for road maintenance over the next three years.")
    page = ["Privacy Policy", "Terms of Use", "We use cookies. Accept cookies to continue.", body]
    assert [quality_filter(sep.join(page))[1] for sep in ("\n", "\n\n")] == ["boilerplate", "boilerplate"]
    assert strip_boilerplate("\n\n".join(page), QualityConfig())[1:] == (3, 4)
    owner = ("根据新修订的著作权法，版权所有者可以许可他人使用其作品。\n\n"
             "版权所有人的通知送达后，平台应及时删除侵权内容。")
    assert strip_boilerplate(owner, QualityConfig())[1] == 0
    assert strip_boilerplate("版权所有 © 2024 某某公司\n正文", QualityConfig())[1] == 1  # the footer still goes


def test_alpha_word_fraction_is_linear_and_matches_a_per_word_count():
    """Per word: a word counts when it has a letter (CJK included). The regex over the joined text it replaces
    was quadratic in a letterless token's length (a 40k-digit token: 16 s; 200k here would take minutes)."""
    text = en_text(np.random.default_rng(0), 200) + " 12345 ?? 第3章 " + "7" * 200_000
    ws = words(text)
    want = sum(any(c.isalpha() for c in w) for w in ws) / len(ws)
    assert analyze(text)["alpha_word_fraction"] == pytest.approx(want)


def test_unicode_punctuation_alone_is_no_word():
    """French guillemets and dialogue dashes, a danda spaced off its word: punctuation (Unicode P*), not words
    without a letter; a French dialogue measured alpha_word_fraction 0.66 and was dropped as alpha_words."""
    assert words("« Tu viens ? » – Oui. यह है । „Ja“ ¿Qué?") == ["Tu", "viens", "Oui.", "यह", "है", "„Ja“", "¿Qué?"]
    dialogue = "\n".join(["« Tu viens ? » demanda Marie.", "– Oui, j’arrive.", "« Maintenant ? »", "– Tout de suite !"])
    assert analyze(dialogue)["alpha_word_fraction"] == 1.0


def test_each_rule_passes_at_its_limit_and_fails_just_over_it_by_its_own_name(rng):
    """The limits are inclusive, and a failing signal is dropped under its own reason: crafted documents sit far
    from the limits, so a '>' turned '>=' or a drop filed under another rule's name passed the tests above."""
    base = analyze(en_text(rng, 300), CFG)
    assert CFG.check(base) is None
    rules = [("symbol_ratio", "symbol_ratio", CFG.max_symbol_ratio, 1e-6),
             ("digit_ratio", "digit_ratio", CFG.max_digit_ratio, 1e-6),
             ("hash_ellipsis", "hash_ellipsis_ratio", CFG.max_hash_ellipsis_ratio, 1e-6),
             ("bullet_lines", "bullet_lines", CFG.max_bullet_lines, 1e-6),
             ("ellipsis_lines", "ellipsis_lines", CFG.max_ellipsis_lines, 1e-6),
             ("dup_lines", "dup_lines", CFG.max_dup_lines, 1e-6),
             ("dup_paragraphs", "dup_paragraphs", CFG.max_dup_paragraphs, 1e-6),
             ("dup_line_chars", "dup_line_chars", CFG.max_dup_line_chars, 1e-6),
             ("dup_paragraph_chars", "dup_paragraph_chars", CFG.max_dup_paragraph_chars, 1e-6),
             ("url_density", "url_density", CFG.max_url_density, 1e-6),
             ("promo_spam", "promo_max_repeat", CFG.max_promo_repeats, 1),
             ("promo_spam", "promo_density", CFG.max_promo_density, 1e-6),
             ("markup", "markup_ratio", CFG.max_markup_ratio, 1e-6),
             ("mojibake", "mojibake_rate", CFG.max_mojibake_rate, 1e-6)]
    rules += [(f"top_{n}gram", f"top_{n}gram", m, 1e-6) for n, m in CFG.top_ngram_max]
    rules += [(f"dup_{n}gram", f"dup_{n}gram", m, 1e-6) for n, m in CFG.dup_ngram_max]
    for name, signal, limit, step in rules:
        assert CFG.check({**base, signal: limit}) is None, name
        assert CFG.check({**base, signal: limit + step}) == name, name
    floor = CFG.min_alpha_word_fraction
    assert CFG.check({**base, "alpha_word_fraction": floor}) is None
    assert CFG.check({**base, "alpha_word_fraction": floor - 1e-6}) == "alpha_words"
    for mwl in (CFG.min_mean_word_len, CFG.max_mean_word_len):
        assert CFG.check({**base, "mean_word_len": mwl}) is None
    assert CFG.check({**base, "mean_word_len": CFG.max_mean_word_len + 1e-6}) == "mean_word_len"


def test_boilerplate_rules_match_wherever_their_regex_does():
    """A rule runs only when its leading literal is in the text: that literal must be in every match. 'home ?[|>»]'
    read as the literal 'home ' missed 'Home|News' (no space), and a top-level alternation read as its first
    branch's literal never ran the other branches. A rule written with a capital never matched the lower-cased
    lines."""
    body = en_text(np.random.default_rng(0), 30)
    for rules, line in ((CFG.boilerplate, "Home|News|Sports"), (CFG.boilerplate, "HOME>Docs"),
                        (("unsubscribe here|opt out",), "Click to opt out of e-mails"),
                        (("colou?r scheme",), "Pick a color scheme"),
                        (("ab{0,1}c footer",), "the ac footer"),
                        (("Read more at",), "READ MORE AT example.com"),  # case-insensitive, capitals in the rule too
                        ((r"Posted by \w+",), "posted by admin")):
        cfg = dataclasses.replace(CFG, boilerplate=rules)
        assert strip_boilerplate(f"{line}\n{body}", cfg) == (body, 1, 2), (rules, line)


def test_anchored_boilerplate_rules_match_at_each_line():
    """Rules are searched in lines, so ^ / $ anchor at a line's ends: the whole-text prefilter searched without
    MULTILINE, so '^\\d+ comments$' matched only a one-line page and a footer rule anchored at its start never ran
    on a page's later lines (each kept silently)."""
    body = en_text(np.random.default_rng(0), 30)
    for rule in (r"^\d+ comments$", r"^share this:?$", r"comments$"):
        cfg = dataclasses.replace(CFG, boilerplate=(rule,))
        line = "Share this:" if "share" in rule else "12 Comments"
        assert strip_boilerplate(f"{body}\n{line}\n{body}", cfg) == (f"{body}\n{body}", 1, 3), rule
    cfg = dataclasses.replace(CFG, boilerplate=(r"^\d+ comments$",))
    assert strip_boilerplate(f"{body}\nread 12 comments here\n{body}", cfg)[1] == 0  # anchored: whole lines only


def test_zero_width_boilerplate_rules_that_test_the_line_are_rules():
    """A rule matching an empty string is refused as matching every line, but one judged on "a line of text" alone
    refused zero-width rules that test the line (accepted before, removing only their lines): C4's "no terminal
    punctuation" as a lookahead, and short lines: under 80 characters or 15 words as under 20 characters (judged
    on two lines of 14 and 70 characters, those were still refused)."""
    body = en_text(np.random.default_rng(0), 30) + "."
    for rule in (r"^(?!.*[.!?\"']\s*$)", r"^(?=.{0,20}$)", r"^(?=.{0,80}$)", r"^(?!.{100})", r"^(?!(?:\S+ +){14}\S)"):
        cfg = dataclasses.replace(CFG, boilerplate=(rule,))
        assert strip_boilerplate(f"{body}\nShare\n{body}\nMenu\n{body}", cfg) == (f"{body}\n{body}\n{body}", 2, 5)
    with pytest.raises(ValueError, match="matches an empty string"):  # empty wherever: still refused
        QualityConfig(boilerplate=(r"^(?!.*[.!?]$)|\d*",))


def test_zero_width_rules_for_lines_without_a_script_are_rules():
    """Judged on English lines alone, a rule for lines without Chinese (a Chinese corpus's English menus), hangul or
    Cyrillic matched empty in each, and was refused as matching every line (accepted before, removing only those)."""
    for rule in (r"^(?!.*[\u4e00-\u9fff])", r"^(?!.*[가-힣])", r"^(?=[^а-я]*$)"):
        assert QualityConfig(boilerplate=(rule,)).boilerplate == (rule,)
    cfg = dataclasses.replace(CFG, boilerplate=(r"^(?!.*[\u4e00-\u9fff])",))
    assert strip_boilerplate(f"{ZH_NEWS}\nHome | News | About\n{ZH_NEWS}", cfg) == (f"{ZH_NEWS}\n{ZH_NEWS}", 1, 3)


@pytest.mark.parametrize("script", ["\u0370-\u03ff", "\u0590-\u05ff", "\u0530-\u058f", "\u10a0-\u10ff",
                                    "\u0980-\u09ff", "\u0b80-\u0bff", "\u0c00-\u0c7f", "\u0a80-\u0aff",
                                    "\u0d00-\u0d7f", "\u1200-\u137f", "\u1780-\u17ff", "\u1000-\u109f"])
def test_rules_for_lines_without_greek_hebrew_or_other_scripts_are_rules(script):
    """Rules for lines without Greek, Hebrew, Armenian, Georgian, Bengali, Tamil, Telugu, Gujarati, Malayalam,
    Ethiopic, Khmer or Myanmar (a menu in English on those corpora's pages) matched empty in every line the check
    tried, and were refused as rules matching every line."""
    assert QualityConfig(boilerplate=(f"^(?!.*[{script}])",)).boilerplate == (f"^(?!.*[{script}])",)


def test_blank_lines_a_boilerplate_rule_matches_do_not_count_as_boilerplate_lines():
    """A rule that matches blank lines (C4's "no terminal punctuation", ^$) removed them and counted them against the
    non-blank lines: a page with paragraphs between blank lines lost 7 "lines" of 6 and was dropped as
    `boilerplate`, the same page with single line breaks 2 of 6 and kept. Blank lines do not count either way."""
    body = "This is a long enough sentence of ordinary prose that ends properly and has many words in it."
    nav = "Home About Contact Blog Careers Press Privacy Terms Cookies Sitemap Login Register Help Shop"
    cfg = dataclasses.replace(CFG, boilerplate=(r"^(?!.*[.!?\"']\s*$)",))
    page = [f"Part one. {body}", nav, f"Part two. {body}", f"Part three. {body}", nav, f"Part four. {body}"]
    pages = ["\n".join(page), "\n\n".join(page)]
    assert [strip_boilerplate(p, cfg)[1:] for p in pages] == [(2, 6), (2, 6)]
    assert [quality_filter(p, cfg)[1] == "boilerplate" for p in pages] == [False, False]
    assert strip_boilerplate(f"{body}\n\n{body}", dataclasses.replace(CFG, boilerplate=(r"^$",))) == (
        f"{body}\n{body}", 0, 2)  # still removed: the rule says so


def test_boilerplate_limit_is_inclusive():
    """Half the non-blank lines boilerplate (the default line limit, 0.5) is kept, more is dropped as `boilerplate`
    (the character limit out of the way); the same at the character limit: exactly 20% of the non-space characters
    is kept."""
    rng = np.random.default_rng(1)
    bodies = [en_text(rng, 60) for _ in range(3)]
    by_lines = QualityConfig(max_boilerplate_chars=0.0)
    assert quality_filter("\n".join(["Privacy Policy", "Terms of Use", *bodies[:2]]), by_lines)[1] is None
    page = "\n".join(["Privacy Policy", "Terms of Use", "Accept cookies", *bodies[:2]])
    assert quality_filter(page, by_lines)[1] == "boilerplate" and reason(page) is None  # ~8% of the characters
    by_chars = QualityConfig(max_boilerplate_lines=0.0)  # "Privacy Policy": 13 of 65 non-space characters
    assert quality_filter("Privacy Policy\n" + "a" * 52, by_chars)[1] != "boilerplate"
    assert quality_filter("Privacy Policy\n" + "a" * 51, by_chars)[1] == "boilerplate"


def test_line_signals_match_a_direct_count():
    """Hand counts: duplicate lines / paragraphs by number and by characters, ellipsis lines (U+2026 counts as '...':
    text normalised with form='NFC' keeps it), hash-ellipsis per word; tabs are whitespace, not symbols."""
    s = analyze("aaaa\nbb\naaaa\nc\nbb")
    assert (s["dup_lines"], s["dup_line_chars"]) == (pytest.approx(2 / 5), pytest.approx(6 / 13))
    s = analyze("first para\n\nsecond one\n\nfirst para")
    assert (s["dup_paragraphs"], s["dup_paragraph_chars"]) == (pytest.approx(1 / 3), pytest.approx(10 / 30))
    # a line of whitespace alone parts paragraphs too (form="NFC" keeps an ideographic space)
    s = analyze("first para\n\u3000\nsecond one\n \nfirst para")
    assert (s["dup_paragraphs"], s["dup_paragraph_chars"]) == (pytest.approx(1 / 3), pytest.approx(10 / 30))
    s = analyze("one line ends…\ntwo lines end...\nthree does not\n#tag")  # a hashtag ('# tag' is a heading)
    assert s["ellipsis_lines"] == pytest.approx(2 / 4)
    assert s["hash_ellipsis_ratio"] == pytest.approx(3 / len(words("one line ends…\ntwo lines end...\nthree does "
                                                                      "not\n#tag")))
    assert analyze("alpha\tbeta\t\tgamma\ndelta\tepsilon")["symbol_ratio"] == 0.0
    # mean word length needs 10 words with a letter (it is None for fewer)
    assert analyze(" ".join(["word"] * 10))["mean_word_len"] == 4.0
    assert analyze(" ".join(["word"] * 9))["mean_word_len"] is None


def test_top_ngram_ties_take_the_longest_whatever_the_order():
    """Of n-grams tied for most frequent, top_{n}gram measures the one with the most characters: argmax took the
    first in hash order, and these four paragraphs reordered measured top_2gram 0.034, 0.055 or 0.096."""
    assert ngram_signals("x y x y long words long words".split(), [2], [])["top_2gram"] == pytest.approx(18 / 22)
    paras = ["Officials said the new trade agreement would expand exports of grain and steel next year.",
             "Ministers from both countries signed the new trade agreement after three rounds of talks.",
             "Farmers welcomed the deal, saying a lot of their crops had been stuck in warehouses.",
             "Analysts expect a lot of small firms to benefit within months of the start of the deal."]
    for order in itertools.permutations(paras):
        ws = words("\n\n".join(order))
        grams = collections.Counter(tuple(ws[i:i + 2]) for i in range(len(ws) - 1))
        top = max(grams.values())  # brute force: the longest of the most frequent 2-grams
        expect = top * max(sum(map(len, g)) for g, k in grams.items() if k == top) / sum(map(len, ws))
        assert analyze("\n\n".join(order))["top_2gram"] == pytest.approx(expect), order


def test_per_word_and_per_character_signals_match_a_direct_count():
    """digit_ratio is per non-space character, url_density per word with CJK text counted in words
    (cjk_chars_per_word characters each: per character, a Chinese page was allowed twice the URLs of its English
    translation); hash_ellipsis_ratio per token (a Chinese "……" is two marks); '1)' opens a bullet line as '1.'
    does; tokens made only of punctuation ('--', '...') are no words (Gopher)."""
    assert analyze("abc 123\n45 x")["digit_ratio"] == pytest.approx(5 / 9)
    zh = "这是一个测试句子" * 10 + " https://example.com/a"
    assert analyze(zh)["url_density"] == pytest.approx(1 / (80 / 2 + 1))  # 80 characters (40 words) and the URL
    assert analyze(zh, QualityConfig(cjk_chars_per_word=1.0))["url_density"] == pytest.approx(1 / (80 + 1))
    zh = "这是一个测试句子…" * 10
    assert analyze(zh)["hash_ellipsis_ratio"] == pytest.approx(10 / 80)
    assert analyze("1) one\n2) two\n3. three\nfour")["bullet_lines"] == pytest.approx(3 / 4)
    assert words("hello -- world ... ok !!") == ["hello", "world", "ok"]


def test_scaled_ngrams_round_half_up():
    """In mixed text an n-word n-gram is round(n · scale) tokens, half up (7.5 → 8): truncating made it 7."""
    ws = list("abcdefg") + ["x"] + list("abcdefg") + ["y"]  # a 7-gram repeats, no 8-gram does
    assert ngram_signals(ws, [], [5], scale=1.4)["dup_5gram"] == pytest.approx(14 / 16)  # 7 tokens
    assert ngram_signals(ws, [], [5], scale=1.5)["dup_5gram"] == 0.0  # 8 tokens
    # and half up at an even floor too (6.5 → 7): Python's round() goes to even, 6, and 7.5 → 8 could not tell
    ws = list("abcdef") + ["x"] + list("abcdef") + ["y"]  # a 6-gram repeats, no 7-gram does
    assert ngram_signals(ws, [], [5], scale=1.2)["dup_5gram"] == pytest.approx(12 / 14)  # 6 tokens
    assert ngram_signals(ws, [], [5], scale=1.3)["dup_5gram"] == 0.0  # 6.5: 7 tokens


def test_length_limits_are_inclusive(rng):
    """min_chars, min_words and max_words pass at their limit and fail just past it, by their own name (the loop
    above covers the ratio rules only: a '<' turned '<=' or a '>' turned '>=' here passed every test)."""
    base = analyze(en_text(rng, 300), CFG)
    assert CFG.check(base) is None
    assert CFG.check({**base, "chars": CFG.min_chars}) is None
    assert CFG.check({**base, "chars": CFG.min_chars - 1}) == "too_short"
    assert CFG.check({**base, "words": CFG.min_words}) is None
    assert CFG.check({**base, "words": CFG.min_words - 1}) == "too_few_words"
    assert CFG.check({**base, "words": CFG.max_words}) is None
    assert CFG.check({**base, "words": CFG.max_words + 1}) == "too_many_words"


def test_mixed_text_ngrams_scale_by_the_cjk_share_of_the_words():
    """In mixed text an n-gram spans 1 + (cjk_chars_per_word - 1)·(CJK share of the words) tokens per word (module
    doc): the share counted from the text's parts, and the signals are ngram_signals at that scale. Scaling by the
    full cjk_chars_per_word whenever any CJK is present passed every test (pure zh and pure en only)."""
    en = [f"word{i}" for i in range(60)]  # 60 distinct latin words
    zh = list("国家统计局新闻发言人表示今年经济运行总体平稳")  # 20 CJK characters, one word each
    text = " ".join(en[:30]) + "。" + "".join(zh) + "。" + " ".join(en[30:]) + " " + " ".join(en[:10])
    n_latin, n_cjk = 70, len(zh)
    s = analyze(text, CFG)
    want = 1 + (CFG.cjk_chars_per_word - 1) * n_cjk / (n_latin + n_cjk)
    assert s["ngram_scale"] == pytest.approx(want)
    ref = ngram_signals(words(text), [n for n, _ in CFG.top_ngram_max], [n for n, _ in CFG.dup_ngram_max], want)
    assert {k: s[k] for k in ref} == pytest.approx(ref)


def test_removed_boilerplate_lines_leave_normalised_text(rng):
    """A removed header or footer took only its own line: the text it left began or ended with a line break, and a
    removed line between paragraphs left 2 blank lines (normalize_text keeps at most max_blank_lines=1)."""
    from data.normalize import normalize_text

    a, b = en_text(rng, 40), en_text(rng, 40)
    for page, n in (("Privacy Policy\n\n" + a + "\n\nShare on Facebook\n\n" + b + "\n\nAll rights reserved.", 3),
                    (a + "\n\nShare on Facebook\nFollow us on X\n\n" + b + "\nCookie policy", 3),
                    ("Privacy policy\n" + a + "\n\n" + b, 1)):
        assert page == normalize_text(page)
        out, removed, _ = strip_boilerplate(page, CFG)
        assert (out, removed) == (a + "\n\n" + b, n) and out == normalize_text(out)
    # the longer blank run stays (not their sum): the text's own spacing, as normalised with max_blank_lines=2
    assert strip_boilerplate(a + "\n\nShare on Facebook\n\n\n" + b, CFG)[0] == a + "\n\n\n" + b
    assert strip_boilerplate(a + "\n\n" + b + "\n", CFG) == (a + "\n\n" + b + "\n", 0, 2)  # nothing removed: as is
    # a footer on the last line of a file (its line break read too): none of the blank lines after it stay
    assert strip_boilerplate(a + "\nAll rights reserved.\n\n", CFG) == (a, 1, 2)


def test_headings_comments_and_directives_are_not_hashtags():
    """`hash_ellipsis` is Gopher's hashtag / truncation signal, but it counted every '#': a Markdown README with `###`
    headings measured 0.11, a Python config with a comment per setting 0.20 and a C header of #defines 0.19, all
    dropped (limit 0.1). Heading and comment markers (a '#' run before a space) and directives opening a line are
    not hashtags; hashtags still count, one per line too."""
    readme = "\n\n".join(f"{'#' * (1 + i % 3)} Section {i}\n\n{en_text(np.random.default_rng(i), 12)}"
                         for i in range(6))
    config = "\n".join(f"# {en_text(np.random.default_rng(i), 4)[:-1].lower()}\nSETTING_{i} = {i}" for i in range(20))
    header = "#ifndef CONFIG_H\n#define CONFIG_H\n" + "\n".join(f"#define LIMIT_{i} {i * 8}" for i in range(16)) + (
        "\n#include <stdint.h>\n  #  if DEBUG\n#endif\n#!/bin/sh\n" + en_text(np.random.default_rng(0), 20))
    for text in (readme, config, header):
        s = analyze(text)
        assert s["hash_ellipsis_ratio"] == 0.0 and reason(text) != "hash_ellipsis", (text[:60], s)
    assert reason(readme) is None and reason(config) is None
    body = en_text(np.random.default_rng(1), 60)
    tags = [f"#summer{i}" for i in range(30)]
    for spam, n in ((body + "\n" + "\n".join(tags), 30), (body + "\n" + " ".join(tags), 30),
                    (body + " C# ## #tag #include", 2)):  # mid-line '#include' is a hashtag, 'C# ' is not
        assert analyze(spam)["hash_ellipsis_ratio"] == pytest.approx(n / len(words(spam)))
    assert reason(body + "\n" + "\n".join(tags)) == "hash_ellipsis"
    assert analyze("#" * 200_000 + "x")["hash_ellipsis_ratio"] == 200_000  # linear: a run is tried once, not per '#'


def test_breadcrumb_rule_leaves_code_comparing_names_ending_in_home():
    """The breadcrumb rule `home ?[|>»] ?\\w+` matched `if score_home > score_away:` and deleted that line of code
    silently (the function was left without its test); breadcrumbs are still removed."""
    code = ("def winner(score_home, score_away):\n    if score_home > score_away:\n        return 'home'\n"
            "    x = self.home > limit\n    return None")
    assert strip_boilerplate(code, CFG) == (code, 0, 5)
    body = en_text(np.random.default_rng(0), 30)
    for crumb in ("Home > News > Sports", "HOME|Docs", "You are here: Home » Blog"):
        assert strip_boilerplate(f"{crumb}\n{body}", CFG) == (body, 1, 2), crumb


def test_full_width_letters_and_digits_are_words_under_nfc():
    """Normalised with form="NFC" (NFKC folds them to ASCII), full-width digits and letters stay; they were split one
    character a token like full-width punctuation, and a Chinese news text naming ＧＤＰ and ２０２３年 measured mean
    word length 1.0 and was dropped. Half-width katakana are kana (CJK), not latin one-letter words."""
    from data.normalize import NormalizeConfig, normalize_text

    zh = ("据统计，２０２３年全国ＧＤＰ同比增长５．２％，其中第三产业增加值占ＧＤＰ比重为５４．６％。"
          "ＩＢＭ、ＡＭＤ等外资企业继续加大在华投资，ＡＩ相关产业发展迅速。专家指出，随着５Ｇ网络的普及，"
          "数字经济将成为推动经济增长的重要引擎。报告还显示，全年社会消费品零售总额比上年增长７．２％，"
          "最终消费支出对经济增长的贡献率达到８２．５％，比上年提高４３．１个百分点。")
    for form in ("NFC", "NFKC"):
        _, r, s = quality_filter(normalize_text(zh, NormalizeConfig(form=form)))
        assert r is None, (form, s)
    assert tokens("２０２３年ＧＤＰ增长５％。") == ["２０２３", "年", "ＧＤＰ", "增", "长", "５", "％", "。"]
    ja = "ｺﾝﾋﾟｭｰﾀｰの性能は毎年向上しています。最新のﾌﾟﾛｾｯｻｰは高速で、消費電力も少ない。" * 3
    s = analyze(ja)
    assert s["mean_word_len"] is None and s["cjk_chars"] == len(words(ja))


def test_full_width_spam_phrases_and_boilerplate_lines_match_under_nfc():
    """Kept full-width by form="NFC", 'ＶＩＡＧＲＡ', 'Ｂｕｙ　ｎｏｗ' and an 'All rights reserved' footer in
    full-width letters matched no blocklist, promo or boilerplate rule, and the page was kept, where NFKC's ASCII
    folding of it was dropped: rules and phrases are matched in the text's NFKC folding, whatever the normal form."""
    from data.normalize import NormalizeConfig, normalize_text

    def full_width(t):
        return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else "\u3000" if c == " " else c for c in t)

    en = ("The river that runs through the old town was once used to carry timber down to the coast. Over the last "
          "century the mills closed one by one, and the banks were slowly turned into parks. Today families walk "
          "there on weekend mornings, fishermen sit under the willows, and a small museum in a former warehouse "
          "tells the story of the men who worked the rafts.")
    for text, why in ((en + " VIAGRA for sale.", "blocklist"), (en + " Buy now! Buy now! Buy now!", "promo_spam"),
                      ("All rights reserved.\nPrivacy policy\nTerms of use\n" + en[:120], "boilerplate")):
        for form in ("NFKC", "NFC"):
            assert reason(normalize_text(full_width(text), NormalizeConfig(form=form))) == why, (form, why)
    line = full_width("A line of text.")
    assert strip_boilerplate(full_width("Home | News") + "\n" + line, CFG)[:2] == (line, 1)


def test_placeholder_lorem_ipsum_pages_are_dropped_whole():
    """A boilerplate line rule, "lorem ipsum" removed the one line naming it and kept the page's other placeholder
    lines ("Sed do eiusmod tempor..."); the page goes, as in C4."""
    page = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n"
            "Sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
            "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in "
            "reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur. Excepteur sint occaecat "
            "cupidatat non proident, sunt in culpa qui officia deserunt mollit anim id est laborum.")
    assert reason(page) == "blocklist"


def test_an_ellipsis_weighs_the_same_in_symbol_ratio_under_nfkc_and_nfc():
    """NFKC writes "…" as "...": a Chinese novel's dialogue, full of "……", measured symbol_ratio 0.40 under the default
    normalisation (dropped, limit 0.35) and 0.33 under NFC; its English translation 0.17."""
    from data.normalize import NormalizeConfig, normalize_text

    novel = ("“你……你说什么？”\n“我说，我要走了。”\n“去哪儿？”\n“南方。”\n“什么时候回来？”\n"
             "“不知道……也许明年，也许……再也不回来了。”\n她愣住了，手里的茶杯差点掉在地上。\n“为什么？”\n"
             "“这里……已经没有我要等的人了。”\n“那我呢？”\n他没有回答，只是转过身，慢慢地走出了院子。\n"
             "“你等等！”她追了出去，“你把话说清楚！”\n“说什么？该说的……我都说过了。”")
    nfkc, nfc = (normalize_text(novel, NormalizeConfig(form=f)) for f in ("NFKC", "NFC"))
    assert "......" in nfkc and "……" in nfc
    assert analyze(nfkc)["symbol_ratio"] == pytest.approx(analyze(nfc)["symbol_ratio"])
    assert reason(nfkc) is None and reason(nfc) is None
    assert analyze("word... " * 5)["symbol_ratio"] == pytest.approx(analyze("word… " * 5)["symbol_ratio"]) == 0.2


def test_top_ngram_counts_overlapping_occurrences_once():
    """top_{n}gram is the share of the characters its occurrences cover (Gopher: "characters contained within the most
    frequently-occurring n-gram"): counted once per occurrence, overlapping ones ("ha ha ha" holds "ha ha" twice) made
    80 copies of one number measure 1.98, and this post, laughing 哈 12 times, 0.29 (dropped as top_2gram)."""
    ws = "ha ha ha x ha ha y".split()  # 'ha ha' at 0, 1, 4 covers words 0-5: 10 of 12 characters
    assert ngram_signals(ws, [2], [])["top_2gram"] == pytest.approx(10 / 12)
    assert ngram_signals(["12345"] * 80, [2, 3, 4], []) == {"top_2gram": 1.0, "top_3gram": 1.0, "top_4gram": 1.0}
    post = ("今天终于把毕业论文交上去了，导师看完只说了一句还行吧，我在办公室门口站了五分钟才反应过来这是表扬。"
            "回宿舍的路上买了两杯奶茶庆祝，结果室友说她也刚交完，我们俩对着笑了半天哈哈哈哈哈哈哈哈哈哈哈哈。"
            "晚上打算早点睡，明天还要去实验室收拾东西，下周就要搬出去了，想想还有点舍不得。")
    _, r, s = quality_filter(post)
    assert r is None and s["top_2gram"] == pytest.approx(12 / len(words(post)))  # the 12 哈, as 4-character grams

    def reference(ws, n):  # brute force: the most frequent n-gram's occurrences, each word's characters once
        grams = collections.defaultdict(list)
        for i in range(len(ws) - n + 1):
            grams[tuple(ws[i:i + n])].append(i)
        top = max(map(len, grams.values()))
        covered = [{j for i in at for j in range(i, i + n)} for at in grams.values() if len(at) == top]
        return 0.0 if top < 2 else max(sum(len(ws[j]) for j in c) for c in covered) / sum(map(len, ws))

    rng = np.random.default_rng(0)
    for _ in range(50):
        ws = list(rng.choice(["a", "bb", "ccc", "dd"], int(rng.integers(2, 40))))
        got = ngram_signals(ws, [2, 3, 4], [])
        for n in (2, 3, 4):
            assert got[f"top_{n}gram"] == pytest.approx(reference(ws, n) if len(ws) >= n else 0.0), (ws, n)


def test_spaces_kept_by_nfc_are_whitespace_not_words_or_symbols():
    """form="NFC" keeps the ideographic space U+3000 and the no-break spaces (NFKC writes them as ' '): U+3000 was a
    word without a letter, and both were symbols, so this notice, padding two-character names to three as Chinese
    lists do, measured alpha_word_fraction 0.75 under NFC (dropped) and 0.98 under NFKC, and the French article's
    symbol_ratio 0.084 against 0.057."""
    from data.normalize import NormalizeConfig, normalize_text

    notice = ("关于公布2024年度优秀学生奖学金获奖名单的通知\n"
              "经学院评审委员会审核，并在全院范围内公示五个工作日无异议，现将获奖名单公布如下：\n"
              "一等奖：张　伟　王　芳　李　娜　刘　洋　陈　静　杨　帆　赵　磊　黄　敏\n"
              "二等奖：周晓明　吴　昊　徐　婷　孙志强　马　超　朱　琳　胡　军　郭　丽　何　鹏　林　倩\n"
              "三等奖：高　翔　罗　宁　郑　洁　梁　斌　谢　雨　宋　佳　唐　杰　许　颖　韩　冰　冯　雪\n"
              "希望获奖同学再接再厉，也希望全体同学以他们为榜样，勤奋学习，全面发展。\n"
              "学生工作办公室\n2024年12月1日")
    fr = ("Le ministre a déclaré mardi\u00a0: «\u00a0Nous allons présenter le projet de loi au printemps\u00a0». "
          "Interrogé sur le calendrier, il a ajouté\u202f: «\u00a0Rien n’est encore décidé\u00a0; nous écoutons les "
          "syndicats\u00a0». Les représentants du personnel, reçus le matin même, se sont dits «\u00a0prudents\u00a0» "
          "mais ouverts au dialogue. Une nouvelle réunion est prévue la semaine prochaine\u202f; d’ici là, les "
          "négociations se poursuivent dans chaque région, où les attentes restent très fortes\u00a0!")
    for text in (notice, fr):
        nfkc, nfc = (quality_filter(normalize_text(text, NormalizeConfig(form=f))) for f in ("NFKC", "NFC"))
        assert "\u3000" in nfc[0] or "\u00a0" in nfc[0]
        assert nfc[1] is None and nfkc[1] is None
        assert nfc[2] == pytest.approx(nfkc[2])
    assert tokens("张　伟") == ["张", "伟"]


def test_cjk_text_measures_as_its_translation_in_the_per_character_rules():
    """A CJK character carries about a word's worth of text (23 hand-made zh / en pairs: 2.7-4.4 non-space English
    characters per CJK character, median 3.5). Counted one character each, this Chinese dialogue measured symbol_ratio
    0.385 (dropped, limit 0.35) against its English translation's 0.181, the stock report digit_ratio 0.277 (dropped,
    limit 0.25) against 0.110, and the 90-character Cantonese paragraph was too_short where its 347-character
    translation was kept."""
    zh_lines = ["“你来了？”", "“嗯。”", "“吃饭了吗？”", "“还没……”", "“那一起去吧！”", "“好。”",
                "“去哪儿？”", "“老地方。”", "“又是那家面馆？”", "“怎么，不想去？”", "“想。”", "“那走吧。”",
                "“外面冷吗？”", "“有点。”", "“带伞了吗？”", "“没带。”", "“我有两把。”", "“谢谢。”",
                "“客气什么！”", "“明天你加班吗？”", "“不知道。”", "“看情况吧。”",
                "两个人并肩走出了办公室，外面的天已经黑了，街上的路灯一盏一盏地亮了起来，远处传来汽车的喇叭声。"]
    en_lines = ['"You\'re here?"', '"Yeah."', '"Have you eaten?"', '"Not yet..."', '"Then let\'s go together!"',
                '"Okay."', '"Where to?"', '"The usual place."', '"That noodle shop again?"',
                '"What, you don\'t want to?"', '"I do."', '"Then let\'s go."', '"Is it cold out?"', '"A bit."',
                '"Did you bring an umbrella?"', '"No."', '"I have two."', '"Thanks."', '"Don\'t mention it!"',
                '"Are you working late tomorrow?"', '"I don\'t know."', '"We\'ll see."', "The two of them walked "
                "out of the office side by side; it was already dark outside, the street lamps came on one by one, and "
                "a car horn sounded in the distance."]
    stocks = ("上证指数今日收报3056.78点，上涨12.34点，涨幅0.41%；深证成指收报9876.54点，"
              "下跌23.45点，跌幅0.24%；创业板指收报1987.65点，上涨5.67点，涨幅0.29%。"
              "两市成交额合计8765亿元，较上一交易日增加321亿元。北向资金净买入45.6亿元。"
              "行业板块方面，半导体、新能源汽车涨幅居前，房地产、银行板块小幅下跌。",
              "The Shanghai Composite Index closed at 3056.78 points today, up 12.34 points or 0.41%; the Shenzhen "
              "Component Index closed at 9876.54 points, down 23.45 points or 0.24%; the ChiNext Index closed at "
              "1987.65 points, up 5.67 points or 0.29%. Turnover on the two exchanges totalled 876.5 billion yuan, "
              "32.1 billion yuan more than the previous trading day. Northbound funds made net purchases of 4.56 "
              "billion yuan. Among sectors, semiconductors and new-energy vehicles led gains, while real estate and "
              "banks fell slightly.")
    cantonese = ("我哋今日去咗旺角食嘢，啲嘢好好食，不過啲人真係好多，排咗成個鐘先有位。"
                 "食完之後我哋去咗行街，買咗好多嘢，好開心。"
                 "聽日我哋打算去大嶼山睇大佛，如果天氣好嘅話仲會行山，希望唔好落雨啦。",
                 "We went to Mong Kok today to eat, the food was really good, but there were so many people, we "
                 "queued for a whole hour before we got a table. After eating we went shopping and bought lots of "
                 "things, really happy. Tomorrow we plan to go to Lantau Island to see the Big Buddha, and if the "
                 "weather is good we will go hiking too, hope it does not rain.")
    dialogue = ("\n".join(zh_lines), "\n".join(en_lines))
    for (zh, en), signal in ((dialogue, "symbol_ratio"), (stocks, "symbol_ratio"), (stocks, "digit_ratio")):
        (_, r_zh, s_zh), (_, r_en, s_en) = (quality_filter(normalize_text(t)) for t in (zh, en))
        assert r_zh is None and r_en is None, (signal, r_zh, r_en)
        assert 1 / 1.3 < s_zh[signal] / s_en[signal] < 1.3, (signal, s_zh[signal], s_en[signal])
    assert len(cantonese[0]) < CFG.min_chars and reason(normalize_text(cantonese[0])) is None
    assert reason(normalize_text(cantonese[1])) is None
    # a character each (cjk_char_weight=1) gives back the per-character measures
    one = QualityConfig(cjk_char_weight=1.0)
    assert analyze(normalize_text(dialogue[0]), one)["symbol_ratio"] == pytest.approx(0.385, abs=1e-3)
    assert reason(normalize_text(cantonese[0]), one) == "too_short"
    # markup's own CJK characters weigh as the text's: a Chinese comment is as much of the page at any weight
    page = "<!--" + "导航栏开始" * 4 + "-->" + "正文内容" * 20
    assert markup_chars(page) == 27 and markup_chars(page, 3.0) == 67
    assert analyze(page)["markup_ratio"] == pytest.approx(67 / (7 + 3 * 100))
    # text without CJK characters measures exactly as before, whatever the weight
    for text in (en_lines[-1], "word$ " * 5, "<p>Some text &amp; more</p> 42%", "Ünïcode… ½ ★ 2024"):
        assert analyze(text, QualityConfig(cjk_char_weight=5.0)) == analyze(text, one)
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="cjk_char_weight"):
            QualityConfig(cjk_char_weight=bad)


def test_ideographic_iteration_mark_and_zero_are_cjk_characters():
    """々 (U+3005, Script=Han: 人々, 様々), 〆, 〇 (二〇二三年) and the Hangzhou numerals sit in the CJK
    punctuation block, and were read as latin one-letter words: a clean Japanese paragraph with 12 of them measured
    mean_word_len 1.0 and was dropped. They are CJK characters, one token each, as the ideographs beside them."""
    ja = normalize_text(
        "日本の四季は様々な表情を見せてくれます。春には人々が桜の下に集まり、時々雨が降っても花見を楽しみます。"
        "夏は色々な祭りが各地で開かれ、子供たちは浴衣を着て夜店を回ります。秋になると山々が赤や黄色に染まり、"
        "多くの観光客が紅葉を見に訪れます。冬は雪が深々と降り積もり、人々は温泉で体を温めます。"
        "我々日本人にとって、季節の移り変わりは生活の中で大切なものです。昔々から続く伝統行事も、"
        "年々少しずつ形を変えながら受け継がれています。家々の軒先には季節の飾りが並び、街々は賑わいます。")
    _, r, s = quality_filter(ja)
    assert r is None and s["mean_word_len"] is None, s
    assert s["cjk_chars"] == len(words(ja)), s  # every token CJK: 々 too
    assert tokens("人々は二〇二三年に") == ["人", "々", "は", "二", "〇", "二", "三", "年", "に"]
    assert analyze("二〇二三年")["cjk_chars"] == 5


def test_latin_phrases_glued_to_cjk_text_are_whole_words(rng):
    """Chinese, Japanese and Korean glue latin words to their own characters ("购买viagra请联系", "viagra를"), and the
    tokenizer splits them there; the blocklist and promo phrases' word boundaries took a CJK character for a word
    character, so a Chinese spam page naming its product without spaces passed the blocklist."""
    body = zh_text(rng, 200)
    assert reason(body + "购买viagra请联系我们。") == "blocklist"
    assert reason(body + "点击click here领取，click here领取，click here领取。") == "promo_spam"
    assert analyze("今天viagra를 구매하세요", CFG)["blocklist_hits"] == 1
    assert analyze("限时click here！", CFG)["promo_hits"] == 1
    assert analyze(body + "访问Viagrafalls公园。", CFG)["blocklist_hits"] == 0  # still whole words: not inside one


def test_latin_phrases_glued_to_thai_lao_myanmar_or_khmer_text_are_whole_words():
    """Thai, Lao, Myanmar and Khmer are written without spaces too (data.augment's `_UNSPACED_RANGES` reads them so):
    their letters are word characters, so "ซื้อviagraที่นี่" passed the blocklist where "购买viagra请" did not."""
    for text in ("ซื้อviagraที่นี่ราคาถูก", "ຊື້viagraຢູ່ນີ້", "ဝယ်viagraပါ", "ទិញviagraនៅទីនេះ"):
        assert analyze(text, CFG)["blocklist_hits"] == 1, text
    assert analyze("ลดราคาclick hereวันนี้", CFG)["promo_hits"] == 1
    assert analyze("ซื้อviagrafallsที่นี่", CFG)["blocklist_hits"] == 0  # still whole words: not inside one


def test_invisible_joiners_inside_a_phrase_do_not_hide_it(rng):
    """Normalisation keeps ZWJ / ZWNJ (emoji sequences, Persian and Indic spelling), the combining grapheme joiner and
    variation selectors, which show nothing between two letters: 'via\\u200dgra' and '博\\u200d彩' passed the blocklist,
    while data.dedup's keys ignore the same characters. Rules and phrases match the text without them."""
    body, zh = en_text(rng, 200), zh_text(rng, 200)
    for hidden in ("\u200d", "\u200c", "\u034f", "\ufe0f", "\U000e0100"):
        assert reason(normalize_text(f"{body} Cheap via{hidden}gra here.")) == "blocklist", repr(hidden)
        assert reason(normalize_text(f"{zh}博{hidden}彩网站。")) == "blocklist", repr(hidden)
    assert analyze(normalize_text(f"{body} Buy\u200d now, buy now.\u200c Buy n\u200dow!"), CFG)["promo_hits"] == 3
    lines = f"{body}\nAll rights\u200d reserved.\n"
    assert strip_boilerplate(lines, CFG) == (body, 1, 2)
    assert match_form("mi\u200cxed ❤\ufe0f") == "mixed ❤"
    # phrases are matched in the same form: one spelt with its ZWNJ (Persian) still matches
    cfg = dataclasses.replace(CFG, blocklist=("می\u200cخواهم",))
    assert analyze("من می\u200cخواهم", cfg)["blocklist_hits"] == 1
