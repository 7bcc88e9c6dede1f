"""Quality, repetition and spam filters with configurable thresholds (Gopher / C4 style), CJK-aware.

`analyze(text)` measures a document once; `QualityConfig.check(signals)` returns the first failing rule
as a drop reason (or None). Words are CJK-aware: every Han / kana / hangul character is one token (Chinese
has no spaces, so whitespace words would make one zh sentence a single "word"); other tokens are runs of
non-space characters. Line-level boilerplate is removed before measuring (`strip_boilerplate`).

A CJK character is not a word, though: a Chinese word is about two characters, so the repetition rules'
n-grams span `cjk_chars_per_word` times more tokens in CJK text (scaled by the CJK share of the words in
mixed text), and the promotional-phrase, mojibake and URL densities count CJK characters `cjk_chars_per_word`
to a word (`word_units`).
Counted per character, an ordinary news paragraph that names "国家统计局新闻发言人" (10 characters, 4 words)
three times fails `dup_5gram`, while its English translation passes.

Nor is a CJK character one letter: the per-character rules (`min_chars` and the symbol, special-character, digit
and markup ratios) count each CJK character as `cjk_char_weight` characters. 23 hand-made Chinese / Japanese /
Korean documents and their English translations measured 2.7-4.4 non-space English characters per CJK character,
median 3.5; the weight is 3, below that, as a translation runs longer than its original and CJK text is not to be
judged more leniently (the pairs' ratios went from ~2.8x English's to ~1.2x, median). Counted one each, a Chinese
dialogue measured symbol_ratio 0.385 (dropped) where its translation measured 0.181, a stock report digit_ratio 0.277
(dropped) against 0.110, and a 90-character Cantonese paragraph was too short where its 347-character translation
was kept. Text without CJK characters measures as before.
"""

from __future__ import annotations

import dataclasses
import functools
import html.entities
import re
import sys
import unicodedata

import numpy as np

from data.normalize import MOJIBAKE, ordinary_text, undo_mojibake
from data.seeds import check_field_types

# Also the letters and numbers of the CJK punctuation block (Script=Han: 々 〆 〇, the Hangzhou numerals, 〻; and the
# vertical kana repeat marks): read as latin one-letter words, a Japanese paragraph with 12 々 (人々, 様々) measured
# mean_word_len 1.0 and was dropped
CJK_RANGES = ("\u2e80-\u2fdf\u3005-\u3007\u3021-\u3029\u3031-\u3035\u3038-\u303c\u3040-\u30ff\u3100-\u312f"
              "\u3190-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\uffa1-\uffdc"
              "\U00020000-\U0002fa1f")  # (half-width kana and hangul too)
# CJK punctuation and full-width symbols split tokens too (so "code。" is "code" + "。") but are not CJK text. Not the
# full-width digits and letters (U+FF10-19, FF21-3A, FF41-5A): words, as their ASCII forms. Split one a token, a
# Chinese news text naming ＧＤＰ and ２０２３年 measured mean word length 1.0 and was dropped when normalised with
# form="NFC" (NFKC folds them to ASCII). Not the ideographic space U+3000 either: whitespace, as NFKC writes it
# (a token, a Japanese list of names spaced with it measured alpha_word_fraction 0.81 under NFC, 1.0 under NFKC).
_CJK_PUNCT = "\u3001-\u303f\uff00-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\uffe0-\uffef"
_TOKEN = re.compile(rf"[{CJK_RANGES}{_CJK_PUNCT}]|[^\s{CJK_RANGES}{_CJK_PUNCT}]+")
_CJK = re.compile(rf"[{CJK_RANGES}]")
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'()\]]+", re.I)
_HAS_LETTER = re.compile(r"[^\W\d_]")  # a letter (CJK included); per word, not one regex over the text (quadratic)
_BULLET = re.compile(r"^\s*(?:[-*•●◦▪‣]|\d+[.)])\s")
# '#' that is not a hashtag, for `hash_ellipsis_ratio`: a run followed by a space or the line's end (Markdown headings
# `## Usage`, `#` comments in Python / shell / YAML / R), or a shebang or C preprocessor directive opening a line.
# Counted, a Markdown README with `###` headings measured 0.11, a commented Python config 0.20 and a C header of
# #defines 0.19: all dropped as hashtag spam (limit 0.1). A hashtag is glued to its word: `#summer`.
# (A run is matched from its first '#' only: from each, a 20k-'#' run took 4.7 s.)
_NOT_HASHTAG = re.compile(r"(?<!#)#+(?=[ \t]|$)|^[ \t]*#(?=!|[ \t]*(?:include|define|undef|ifn?def|if|elif|else|endif"
                          r"|pragma|error|warning|line)\b)", re.M)
# ASCII plus CJK/full-width punctuation that NFKC leaves alone
PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" + "，。、；：？！“”‘’（）《》〈〉【】「」『』…—·～")
# HTML left in extracted text: script / style elements with their contents and comments (`_MARKUP_BLOCK`, to their
# end: found by str.find, as a lazy regex scanned to the text's end for each unclosed one), doctypes, tags of HTML
# elements (by name, every attribute with a value: `vector<int>`, `#include <stdio.h>` and `a<b and c>d` are not tags),
# named (HTML 4) and numeric character references (`&amp;`, `&#39;`; not `&x;` in C), and CSS rule bodies
# (`{color: #333; margin: 0}`: a CSS property first)
_HTML_ELEMENTS = ("a abbr article aside b blockquote body br button caption center cite code col dd div dl dt em "
                  "fieldset figcaption figure font footer form h1 h2 h3 h4 h5 h6 head header hr html i iframe img "
                  "input label legend li link main meta nav noscript ol option p path picture pre q s script section "
                  "select small source span strong style sub sup svg table tbody td textarea tfoot th thead title tr u "
                  "ul video")
_CSS_PROPERTIES = ("align-items background background-color border border-bottom border-radius border-top bottom "
                   "box-shadow box-sizing clear color cursor display flex float font font-family font-size font-weight "
                   "height justify-content left letter-spacing line-height list-style margin margin-bottom margin-left "
                   "margin-right margin-top max-width min-height min-width opacity overflow padding padding-bottom "
                   "padding-left padding-right padding-top position right text-align text-decoration text-transform "
                   "top transform transition vertical-align visibility white-space width z-index")
_MARKUP_BLOCK = re.compile(r"<(script|style)\b[^<>]*>|<!--", re.I)
# names matched generically and looked up (an alternation of 250 entity names cost 9 us a '&')
_MARKUP = re.compile(
    r"<!doctype[^<>]{0,200}>"
    r"""|</?(?P<tag>[a-z][a-z0-9]*)(?:\s+[\w:.-]+\s*=\s*(?:"[^"<>]*"|'[^'<>]*'|[^\s"'<>=]+))*\s*/?>"""
    r"|&(?:#[0-9]{1,7}|#x[0-9a-f]{1,6}|(?P<entity>[a-z][a-z0-9]{1,31}));"
    r"|\{\s*(?:-(?:webkit|moz|ms|o)-)?(?P<css>[a-z][a-z-]*)\s*:[^{}]{0,2000}\}", re.I)
# code, not a CSS rule body: a second `name:` after a comma, an object or struct literal (`{ left: 0, top: 0 }` in JS,
# Rust, Go; CSS declarations end in ';', and a comma in one separates values: fonts, transitions, no ':' follows); or
# a TypeScript primitive type as a value (`interface Size { width: number; height: number }`), which CSS has not
_CODE_FIELDS = re.compile(r",\s*[a-z_][\w-]*\s*:(?!:)|:\s*(?:number|string|boolean|bigint|any|unknown|void)"
                          r"\b(?!-)", re.I)
_MARKUP_NAMES = {"tag": frozenset(_HTML_ELEMENTS.split()), "css": frozenset(_CSS_PROPERTIES.split()),
                 "entity": frozenset(html.entities.name2codepoint)}

# Regexes matched case-insensitively against lower-cased lines. A rule that starts with a literal is only run when
# `literal in text` (a C-speed scan) finds it; most documents match no rule and cost a few substring tests.
# The breadcrumb's `home` (Home > News) is not the end of a name: `if score_home > score_away:` or `self.home |`
# matched, and that line of code was deleted.
DEFAULT_BOILERPLATE = (
    r"all rights reserved", r"cookie (policy|settings|consent)", r"uses cookies", r"accept cookies", r"privacy policy",
    r"terms of (use|service)", r"subscribe to (our|the) newsletter", r"sign up (for free|now|today)",
    r"javascript (is )?(disabled|required)", r"enable javascript",
    r"share on (facebook|twitter|linkedin|weibo)", r"follow us on ", r"home(?<![\w.$]home) ?[|>»] ?\w+",
    r"版权所有(?![者人方])", r"免责声明", r"隐私政策", r"关注我们的?(微信|公众号)", r"点击(这里|此处)(查看|下载|订阅)",
)
DEFAULT_PROMO = (
    "buy now", "click here", "free shipping", "limited time offer", "order now", "act now", "best price",
    "100% free", "discount code", "special offer", "money back guarantee", "earn money fast",
    "限时优惠", "立即购买", "点击购买", "免费领取", "加微信", "全场包邮",
)
# "lorem ipsum" drops the page, as in C4: a placeholder page is placeholder text throughout, and as a boilerplate line
# rule it removed the line naming it and kept the rest ("Sed do eiusmod tempor...")
DEFAULT_BLOCKLIST = ("viagra", "cialis", "online casino", "replica watches", "payday loan", "lorem ipsum",
                     "博彩", "代开发票", "六合彩")


# unlike lines of prose: a boilerplate rule with an empty match in each matches every line (QualityConfig refuses it).
# One of a paragraph's length: short-line rules (under 80 characters, 15 words) are rules; two in other scripts: a
# rule for lines without Chinese (a Chinese corpus's English menus), hangul, Cyrillic, Greek, Hebrew, ... is a rule
_PROSE_LINES = ("a line of text", "Another, much longer Line with the digits 42 that ends in a full stop.",
                " ".join(["A paragraph of web text runs on, sentence after sentence, for a hundred words or so."] * 8),
                "中文网页的一行，日本語の文、한국어 문장, русский текст, النص العربي, हिंदी पाठ, ข้อความภาษาไทย",
                "ελληνικό κείμενο, עברית, հայերեն, ქართული, বাংলা, தமிழ், తెలుగు, ગુજરાતી, ਪੰਜਾਬੀ, ಕನ್ನಡ, മലയാളം, සිංහල, "
                "አማርኛ, ខ្មែរ, ພາສາລາວ, မြန်မာ, བོད་ཡིག, ଓଡ଼ିଆ")


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """Thresholds of every quality rule; a document failing any one is dropped with that rule's name.

    Word counts are CJK-aware (see module doc). Ratios are fractions in [0, 1]. Repetition follows Gopher
    (Rae et al. 2021, table A1): duplicated lines/paragraphs (by count and by characters), the share of
    characters in the most frequent 2-4-gram, and the share of characters in duplicated 5-10-grams.
    `top_ngram_max` / `dup_ngram_max` are `((n, max_fraction), ...)` with n in words; in CJK text an n-gram
    is `round(n · cjk_chars_per_word)` characters (see module doc). `boilerplate` rules are regexes searched
    case-insensitively in lines (`^` / `$` anchor at a line's ends); matching lines are removed, and a document that
    loses more than `max_boilerplate_lines` of its lines *and* more than `max_boilerplate_chars` of its non-space
    characters is dropped (by lines alone, an article with a three-line footer was dropped whole: web extractions put a
    paragraph on a line). `promo_phrases` / `blocklist` match case-insensitively (whole words for latin phrases);
    rules and phrases match the text's NFKC folding (`match_form`: full-width letters kept by form="NFC" too).
    `max_markup_ratio`: of the non-space characters, those in HTML left by text extraction (tags, comments, entities,
    script / style elements, CSS rules; see `markup_chars`); `max_mojibake_rate`: mojibake sequences per word (CJK
    counted in words, as for promo density) that normalisation left, not repairing them safely (UTF-8 read as cp1252 /
    latin-1: "Ð¿Ñ€Ð¸" for Russian; see `data.normalize`). `min_chars` and the symbol, special-character, digit
    and markup ratios count a CJK character as `cjk_char_weight` characters (about a word's worth of text, not a
    letter's; see module doc): `analyze`'s ratios are of characters so weighed, its `chars` the plain length (`check`
    weighs its `cjk_chars`).
    """

    min_chars: int = 100
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    min_alpha_word_fraction: float = 0.8
    max_symbol_ratio: float = 0.35
    max_digit_ratio: float = 0.25
    max_hash_ellipsis_ratio: float = 0.1
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    max_markup_ratio: float = 0.05
    max_mojibake_rate: float = 0.05
    boilerplate: tuple[str, ...] = DEFAULT_BOILERPLATE
    max_boilerplate_lines: float = 0.5
    max_boilerplate_chars: float = 0.2
    max_dup_lines: float = 0.3
    max_dup_paragraphs: float = 0.3
    max_dup_line_chars: float = 0.2
    max_dup_paragraph_chars: float = 0.2
    top_ngram_max: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngram_max: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11),
                                                    (10, 0.10))
    cjk_chars_per_word: float = 2.0
    cjk_char_weight: float = 3.0
    max_url_density: float = 0.1
    promo_phrases: tuple[str, ...] = DEFAULT_PROMO
    max_promo_repeats: int = 2
    max_promo_density: float = 0.02
    blocklist: tuple[str, ...] = DEFAULT_BLOCKLIST

    def __post_init__(self):
        check_field_types(self)  # before the range checks: NaN passes `not lo <= x`, 'no' is truthy
        fractions = [f.name for f in dataclasses.fields(self) if f.name.startswith(("max_", "min_"))
                     and f.type == "float" and "word_len" not in f.name]
        for name in fractions:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"QualityConfig.{name}={getattr(self, name)} must be a fraction in [0, 1]")
        for name in ("boilerplate", "promo_phrases", "blocklist"):
            v = getattr(self, name)
            if isinstance(v, str) or not all(isinstance(p, str) and p for p in v):
                raise ValueError(f"QualityConfig.{name}={v!r} must be a tuple of non-empty strings, e.g. "
                                 f"({v!r},) for one (a bare string would make each character a rule)")
        for name in ("top_ngram_max", "dup_ngram_max"):
            for pair in getattr(self, name):
                if not (isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[0], int)
                        and pair[0] >= 1 and 0 <= pair[1] <= 1):
                    raise ValueError(f"QualityConfig.{name} entry {pair!r} must be (n >= 1 words, max fraction in "
                                     "[0, 1]), e.g. (2, 0.20)")
        for name in ("min_chars", "min_words", "max_promo_repeats"):
            if getattr(self, name) < 0:
                raise ValueError(f"QualityConfig.{name}={getattr(self, name)} must be >= 0")
        if self.min_mean_word_len > self.max_mean_word_len:
            raise ValueError(f"QualityConfig.min_mean_word_len={self.min_mean_word_len} exceeds "
                             f"max_mean_word_len={self.max_mean_word_len}; swap them")
        if self.min_words > self.max_words:
            raise ValueError(f"QualityConfig.min_words={self.min_words} exceeds max_words={self.max_words}")
        if not 1 <= self.cjk_chars_per_word < float("inf"):  # inf: a NaN n-gram scale, analyze failed on all text
            raise ValueError(f"QualityConfig.cjk_chars_per_word={self.cjk_chars_per_word} must be finite and >= 1 "
                             "(1 counts each CJK character as a word; Chinese words average about 2)")
        if not 1 <= self.cjk_char_weight < float("inf"):
            raise ValueError(f"QualityConfig.cjk_char_weight={self.cjk_char_weight} must be finite and >= 1 (the "
                             "characters a CJK character counts as in min_chars and the per-character ratios: 1 counts "
                             "it as one letter; English translations measure about 3 characters per CJK character)")
        # stored as tuples, as LangIDConfig: a list (valid above) is unhashable in the quality stage's kept-signal
        # cache, and the run's fingerprint must not depend on which container held the same rules
        for name in ("boilerplate", "promo_phrases", "blocklist"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("top_ngram_max", "dup_ngram_max"):
            object.__setattr__(self, name, tuple(map(tuple, getattr(self, name))))
        for p in self.boilerplate:
            try:
                rx = re.compile(p, re.I | re.M)
            except re.error as e:
                raise ValueError(f"QualityConfig.boilerplate pattern {p!r} is not a regex: {e}") from e
            # a rule matching an empty string whatever the line removes every line: the corpus dropped. Judged on
            # three lines, not one: a zero-width rule that tests the line (C4's "no terminal punctuation",
            # ^(?!.*[.!?]$); short lines, ^(?=.{0,80}$)) matches "a line of text" and removes only the lines it names
            if all(any(not m.group() for m in rx.finditer(line)) for line in _PROSE_LINES):
                raise ValueError(f"QualityConfig.boilerplate pattern {p!r} matches an empty string, so every line is "
                                 "boilerplate and every document dropped; make each alternative match some text (no "
                                 "empty '|' branch, no optional part alone)")
        # case-insensitive, as documented: lines are searched lower-cased, and a rule written with a capital
        # ("Read more at") never matched, silently. MULTILINE: the whole text is searched first (to skip the
        # line loop), and without it '^' / '$' matched only at the text's ends, so an anchored rule never ran
        # on a page's other lines; a lone line reads the same either way
        object.__setattr__(self, "_boilerplate_re", tuple((_leading_literal(p).lower(), re.compile(p, re.I | re.M))
                                                          for p in self.boilerplate))
        object.__setattr__(self, "_promo_re", _phrase_regexes(self.promo_phrases))
        object.__setattr__(self, "_block_re", _phrase_regexes(self.blocklist))

    def check(self, s: dict) -> str | None:
        """The first rule `signals` (from `analyze`) fails, or None if the document passes."""
        # a CJK character counts as cjk_char_weight characters: a 90-character Cantonese paragraph was too short, its
        # 347-character English translation kept
        if _cjk_weighed(s["chars"], s["cjk_chars"], self.cjk_char_weight) < self.min_chars:
            return "too_short"
        # before the word rules, which they also fail: a URL in a tag is a 40-letter word, Chinese read as cp1252 one
        # word a line
        if s["markup_ratio"] > self.max_markup_ratio:
            return "markup"
        if s["mojibake_rate"] > self.max_mojibake_rate:
            return "mojibake"
        if s["words"] < self.min_words:
            return "too_few_words"
        if s["words"] > self.max_words:
            return "too_many_words"
        mwl = s["mean_word_len"]
        if mwl is not None and not self.min_mean_word_len <= mwl <= self.max_mean_word_len:
            return "mean_word_len"
        checks = [("alpha_words", s["alpha_word_fraction"] < self.min_alpha_word_fraction),
                  ("symbol_ratio", s["symbol_ratio"] > self.max_symbol_ratio),
                  ("digit_ratio", s["digit_ratio"] > self.max_digit_ratio),
                  ("hash_ellipsis", s["hash_ellipsis_ratio"] > self.max_hash_ellipsis_ratio),
                  ("bullet_lines", s["bullet_lines"] > self.max_bullet_lines),
                  ("ellipsis_lines", s["ellipsis_lines"] > self.max_ellipsis_lines),
                  ("dup_lines", s["dup_lines"] > self.max_dup_lines),
                  ("dup_paragraphs", s["dup_paragraphs"] > self.max_dup_paragraphs),
                  ("dup_line_chars", s["dup_line_chars"] > self.max_dup_line_chars),
                  ("dup_paragraph_chars", s["dup_paragraph_chars"] > self.max_dup_paragraph_chars)]
        checks += [(f"top_{n}gram", s[f"top_{n}gram"] > m) for n, m in self.top_ngram_max]
        checks += [(f"dup_{n}gram", s[f"dup_{n}gram"] > m) for n, m in self.dup_ngram_max]
        checks += [("url_density", s["url_density"] > self.max_url_density),
                   ("promo_spam", s["promo_max_repeat"] > self.max_promo_repeats
                    or s["promo_density"] > self.max_promo_density),
                   ("blocklist", s["blocklist_hits"] > 0)]
        return next((name for name, failed in checks if failed), None)


def _leading_literal(pattern: str) -> str:
    """The literal text every match of `pattern` starts with ("" if none can be read off)."""
    depth, in_class, escaped = 0, False, False
    for ch in pattern:  # a top-level alternation has no common prefix
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch in "()":
            depth += 1 if ch == "(" else -1
        elif ch == "|" and depth == 0:
            return ""
    lit = re.match(r"[^\\.^$*+?{}\[\]|()]*", pattern).group()
    if pattern[len(lit):][:1] in ("?", "*", "{"):  # the last literal character is optional
        lit = lit[:-1]
    return lit


# Scripts whose words run into their neighbours: Chinese, Japanese, Thai, Lao, Myanmar, Khmer (no spaces), and
# hangul (Korean attaches particles: "정리는", "Python으로"); one table for filters, data.label and data.augment
UNSPACED_RANGES = CJK_RANGES + "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"
# a word character not of those scripts: their text glues latin words to its characters ("购买viagra请", "viagra를",
# "ซื้อviagraที่นี่"); also what a latin keyword of data.label must not follow to start a word ('_' joins identifiers:
# "my_self.")
_LATIN_WORD_CHAR = rf"[^\W{UNSPACED_RANGES}]"


def _phrase_regexes(phrases) -> tuple:
    """(phrase, regex) pairs; word boundaries only make sense around latin phrases, CJK ones are substrings. A
    phrase is whole when no latin word character touches it (`\b` needs one inside: '$$$' or '#gambling' never
    matched; and `\\w` is one for a CJK character: '购买viagra请联系' passed the blocklist)."""
    # in the form they are matched in (`match_form`): a Persian phrase spelt with its ZWNJ matched no text
    return tuple((p, re.compile(rf"(?<!{_LATIN_WORD_CHAR}){re.escape(p)}(?!{_LATIN_WORD_CHAR})"
                                if p.isascii() else re.escape(p)))
                 for p in map(match_form, phrases))


# invisible characters normalisation keeps (ZWJ / ZWNJ, the combining grapheme joiner, variation selectors), as
# data.dedup's `_IGNORABLE`: between two letters they show nothing, and 'via\u200dgra' passed the blocklist
_INVISIBLE = re.compile("[\u034f\u200c\u200d\u180b-\u180f\ufe00-\ufe0f\U000e0100-\U000e01ef]")


def match_form(text: str) -> str:
    """`text` as rules and phrases are matched: its NFKC folding, lower-cased, without invisible joiners and variation
    selectors (`_INVISIBLE`). Kept full-width by NormalizeConfig(form="NFC"), 'ＶＩＡＧＲＡ', 'Ｂｕｙ　ｎｏｗ' and an
    'All rights reserved' footer in full-width letters matched no blocklist, promo or boilerplate rule (the page
    kept), where NFKC's ASCII folding of them was dropped."""
    if not text.isascii():
        text = _INVISIBLE.sub("", text)  # first, as data.dedup: a joiner between 'e' and U+0301 blocks composition
        if not unicodedata.is_normalized("NFKC", text):
            text = unicodedata.normalize("NFKC", text)
    return text.lower()


def phrase_counts(low: str, compiled) -> dict[str, int]:
    """Occurrences of each phrase in lower-cased text (a substring test first: most phrases are absent)."""
    return {p: n for p, rx in compiled if p in low and (n := len(rx.findall(low)))}


def tokens(text: str) -> list[str]:
    """CJK-aware tokens: each CJK character alone, other runs of non-space characters whole."""
    return _TOKEN.findall(text)


@functools.cache
def _punctuation() -> dict:
    """A str.translate table deleting punctuation (Unicode P*: ，。、 as well as , . ;)."""
    return dict.fromkeys(cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] == "P")


@functools.cache
def _marks() -> dict:
    """A str.translate table deleting combining marks (Unicode M*: Devanagari vowel signs, Thai tone marks, Arabic
    harakat): parts of their words, not symbols, though str.isalnum is False for them. Built once (~0.25 s)."""
    return dict.fromkeys(cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] == "M")


@functools.cache
def _punctuation_chars() -> frozenset:
    """`PUNCTUATION` and every Unicode P* character: with ASCII's and CJK's alone, French guillemets and dialogue
    dashes (« Oui », – Non) and the Devanagari danda spaced off its word were words without a letter, and a French
    dialogue measured alpha_word_fraction 0.66 (dropped; 1.0 without them)."""
    return PUNCTUATION | frozenset(map(chr, _punctuation()))


def words(text: str) -> list[str]:
    """Tokens that are not made only of punctuation (Gopher's word definition, CJK-aware)."""
    punct = _punctuation_chars()
    return [t for t in _TOKEN.findall(text) if not punct.issuperset(t)]


def word_units(ws: list[str], cfg: QualityConfig) -> float:
    """How many words `words(text)` makes with CJK text counted in words, `cfg.cjk_chars_per_word` characters each
    (at least 1: a divisor). Per CJK character, a Chinese document's densities were half its English translation's."""
    cjk = sum(1 for w in ws if _CJK.match(w))
    return max(len(ws) - cjk + cjk / cfg.cjk_chars_per_word, 1)


def strip_boilerplate(text: str, cfg: QualityConfig) -> tuple[str, int, int]:
    """Remove lines matching any `cfg.boilerplate` rule (case-insensitive) → `(text, lines_removed,
    non-blank lines)`: blank lines do not count, so a page reads the same with single or double line breaks.
    The blank lines around a removed one shrink to the longer run of them, and go at the text's ends, so
    normalised text stays normalised."""
    low = match_form(text)
    hit = [rx for lit, rx in cfg._boilerplate_re if lit in low and rx.search(low)]
    lines = text.split("\n")
    n_lines = sum(bool(ln.strip()) for ln in lines)
    if not hit:
        return text, 0, n_lines
    # a removed footer left its blank line(s) behind: a text ending in '\n', or 3 line breaks in a row
    kept, run, gap, cut, removed = [], [], [], False, 0
    for ln in lines:
        if any(rx.search(match_form(ln)) for rx in hit):
            removed += bool(ln.strip())  # a blank line a rule matches (^$, C4's no end punctuation) goes uncounted
            cut, gap, run = True, max(gap, run, key=len), []
        elif not ln.strip():
            run.append(ln)
        else:
            if cut:  # the blank runs around removed lines: the longer of them, none at the text's start
                run = max(gap, run, key=len) if kept else []
            kept += [*run, ln]
            run, gap, cut = [], [], False
    if not cut:  # (and none at its end after a removed line)
        kept += run
    return "\n".join(kept), removed, n_lines


def markup_chars(text: str, cjk_weight: float = 1.0) -> float:
    """Non-space characters of HTML markup in `text`: script / style elements (contents too), comments, doctypes,
    tags of HTML elements, character references and CSS rule bodies; CJK ones (a Chinese comment, a script's strings)
    `cjk_weight` each, as `analyze` weighs the text's."""
    if "<" not in text and "&" not in text and "{" not in text:
        return 0
    parts, n, pos, at, unclosed = [], 0, 0, 0, set()
    if "<" in text:
        low = text.lower()
        while m := _MARKUP_BLOCK.search(text, at):
            close = f"</{m.group(1).lower()}" if m.group(1) else "-->"
            end = -1 if close in unclosed else low.find(close, m.end())
            if end < 0:  # a mention ("never echo input into <script>"): its tag alone is markup; none later closes
                unclosed.add(close)
                at = m.end()
                continue
            end = low.find(">", end) + 1 or len(text)
            parts.append(text[pos:m.start()])
            n, pos, at = n + _weighed(text[m.start():end], cjk_weight), end, end
    rest = "".join(parts) + text[pos:]
    for m in _MARKUP.finditer(rest):
        kind = m.lastgroup
        if kind == "tag" and _type_parameter(rest, m) or kind == "css" and _CODE_FIELDS.search(m.group()):
            continue
        if kind is None or (m.group(kind).lower() if kind != "entity" else m.group(kind)) in _MARKUP_NAMES[kind]:
            n += _weighed(m.group(), cjk_weight)
    return n


def _type_parameter(text: str, m: re.Match) -> bool:
    """Whether a `_MARKUP` tag match is a generic's type parameter, not HTML: an opening `<Name>` without attributes
    right after a word, its name one capital (`Router<B>`, `impl<S>`) or capitalised (`Request<Body>`, `Box<Path>`).
    Counted as tags, a Rust router's source measured 5.4% markup and was dropped. HTML's own tags in text are lower
    case, or an old page's all-capitals ones (`<BR>` still counts)."""
    tag, at = m.group("tag"), m.start()
    return (at > 0 and (text[at - 1].isalnum() or text[at - 1] == "_") and m.group()[1] != "/"
            and "=" not in m.group() and tag[0].isupper() and (len(tag) == 1 or not tag.isupper()))


def mojibake_sequences(text: str) -> int:
    """UTF-8 sequences in `text` read as cp1252 / latin-1 ("Ã©", "â€™"): `data.normalize.MOJIBAKE` matches whose
    bytes are valid UTF-8, less a word's accented last letter before marks beside it (`ordinary_text`: French
    dialogue under NFC, "annulé\xa0»", measured 0.083 a word and was dropped, German "Spaß“" 0.058)."""
    if text.isascii():
        return 0
    return sum(undo_mojibake(m.group()) is not None and not ordinary_text(m.group(), text[m.end():m.end() + 1])
               for m in MOJIBAKE.finditer(text))


def _hashtag_marks(text: str) -> int:
    """'#' characters in `text` that may be hashtags: all of them less headings, comments and directives
    (`_NOT_HASHTAG`)."""
    n = text.count("#")
    return n - sum(m.group().count("#") for m in _NOT_HASHTAG.finditer(text)) if n else 0


def _nonspace(text: str) -> int:
    """Characters that are not whitespace: Unicode's (str.split's), as the no-break spaces French puts before ':' and
    '»' and the ideographic space survive form="NFC" (counted as symbols, they raised a French article's symbol_ratio
    from 0.06 under NFKC to 0.11)."""
    return sum(map(len, text.split()))


def _cjk_weighed(n: int, cjk: int, cjk_weight: float) -> float:
    """`n` characters of which `cjk` are CJK, each of those counted `cjk_weight` times (see module doc); `n` itself,
    an int, without any, so text without CJK measures exactly as unweighed."""
    return n + (cjk_weight - 1) * cjk if cjk else n


def _weighed(text: str, cjk_weight: float) -> float:
    """`_nonspace(text)` with each CJK character counted `cjk_weight` times."""
    return _cjk_weighed(_nonspace(text), len(_CJK.findall(text)) if cjk_weight != 1 else 0, cjk_weight)


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters)."""
    if not items:
        return 0.0, 0.0
    seen, dup, dup_chars = set(), 0, 0
    for it in items:
        if it in seen:
            dup += 1
            dup_chars += len(it)
        seen.add(it)
    total_chars = sum(len(it) for it in items)
    return dup / len(items), dup_chars / max(total_chars, 1)


def ngram_signals(ws: list[str], top_ns, dup_ns, scale: float = 1.0) -> dict[str, float]:
    """Gopher's n-gram repetition signals over words `ws`, as fractions of all word characters:
    `top_{n}gram`, the characters the occurrences of the most frequent n-gram cover, overlapping ones counted once
    (0 if it occurs once; of n-grams tied for most frequent, the one covering the most);
    `dup_{n}gram`, the characters of words covered by any n-gram occurring more than once.
    With `scale` > 1 (CJK text, see module doc) the `{n}gram` signals use n-grams of round(n·scale) tokens.

    N-grams are compared by a 64-bit polynomial hash of word ids, all in numpy (collisions: ~n²/2⁶⁴).
    """
    out = {f"top_{n}gram": 0.0 for n in top_ns} | {f"dup_{n}gram": 0.0 for n in dup_ns}
    # rounding half up keeps distinct n distinct for any scale >= 1
    tokens_of = {n: int(n * scale + 0.5) for n in set(top_ns) | set(dup_ns)}
    name_of = {k: n for n, k in tokens_of.items()}
    top_ns, dup_ns = {tokens_of[n] for n in top_ns}, {tokens_of[n] for n in dup_ns}
    ns = sorted(top_ns | dup_ns)
    if not ws or not ns:
        return out
    vocab: dict[str, int] = {}
    ids = np.array([vocab.setdefault(w, len(vocab) + 1) for w in ws], dtype=np.uint64)
    lens = np.array([len(w) for w in ws], dtype=np.int64)
    total = max(int(lens.sum()), 1)
    starts = np.concatenate(([0], np.cumsum(lens)))  # characters before word i; words [i, j): j's - i's
    h = ids.copy()
    with np.errstate(over="ignore"):  # the hash wraps around on purpose
        for n in range(1, ns[-1] + 1):
            if n > 1:
                h = h[:-1] * np.uint64(0x9E3779B97F4A7C15) + ids[n - 1:]
            if len(h) == 0:
                break
            if n not in ns:
                continue
            _, inv, counts = np.unique(h, return_inverse=True, return_counts=True)
            if n in top_ns and counts.max() > 1:
                # of the n-grams tied for most frequent, the one covering the most characters: argmax took the first
                # in hash order, so reordering a page's paragraphs moved top_2gram between 0.034 and 0.096. Each
                # occurrence counts up to the next one's start: overlapping ones ("ha ha ha" holds "ha ha" twice)
                # counted whole made 80 copies of one number measure 1.98, and a post laughing 哈 12 times 0.29
                at = np.flatnonzero(counts[inv] == counts.max())
                g = inv[at]
                order = np.argsort(g, kind="stable")  # by n-gram, each one's occurrences in text order
                at, g = at[order], g[order]
                nxt = np.where(np.append(g[1:] == g[:-1], False), np.append(at[1:], 0), len(ws))
                chars = starts[np.minimum(at + n, nxt)] - starts[at]
                out[f"top_{name_of[n]}gram"] = float(np.bincount(g, weights=chars).max()) / total
            if n in dup_ns:
                # int32: int8 sums wrapped from n = 128 (a passage repeated measured 0.60, not 0.94)
                dup = (counts[inv] > 1).astype(np.int32)
                covered = np.convolve(dup, np.ones(n, np.int32))[:len(ws)] > 0
                out[f"dup_{name_of[n]}gram"] = int(lens[covered].sum()) / total
    return out


def analyze(text: str, cfg: QualityConfig = QualityConfig()) -> dict:
    """All quality signals of one document (floats/ints, JSON-serialisable). `text` is already normalised
    and boilerplate-stripped."""
    ws = words(text)
    n_words = len(ws)
    low = text.lower()
    latin = [w for w in ws if not _CJK.match(w)]
    lettered = [w for w in latin if any(c.isalpha() for c in w)]
    nonspace = _nonspace(text)
    cjk = len(_CJK.findall(text))
    weighed = _cjk_weighed(nonspace, cjk, cfg.cjk_char_weight)  # the per-character ratios' characters
    word_chars = sum(map(str.isalnum, text))
    if not text.isascii():
        word_chars += len(text) - len(text.translate(_marks()))
    digits = sum(map(str.isdigit, text))
    dots = text.count("...")
    lines = [ln.strip() for ln in text.split("\n")]
    nonblank = [ln for ln in lines if ln]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    dup_l, dup_lc = _dup_fraction(nonblank)
    dup_p, dup_pc = _dup_fraction(paragraphs)
    # per word, CJK text counted in words too: per CJK character a Chinese page was allowed twice the URLs of its
    # English translation (text without CJK characters measures as before). Not hash_ellipsis_ratio: a Chinese
    # ellipsis "……" counts as two marks (two "…", or "......" under NFKC), which per character evens out
    units = word_units(ws, cfg)
    s = {
        "chars": len(text),
        "words": n_words,
        "cjk_chars": cjk,
        # mean word length only means something for space-separated words: over tokens with a letter (numbers
        # and dates in Chinese text are not words), and only with a few of them
        "mean_word_len": sum(len(w) for w in lettered) / len(lettered) if len(lettered) >= 10 else None,
        "alpha_word_fraction": sum(1 for w in ws if _HAS_LETTER.search(w)) / max(n_words, 1),
        # an ellipsis is one character whatever the normal form: NFKC writes "…" as "...", and a Chinese novel's
        # dialogue ("……" → "......") measured 0.40 (dropped) where the same text under NFC measured 0.33
        "symbol_ratio": (nonspace - word_chars - 2 * dots) / max(weighed - 2 * dots, 1),
        # the same without punctuation ($ % © ★, emoji): what the quality score ranks by, as Chinese puts a mark
        # every ~9 characters where English has one every ~6 words (symbol_ratio 0.09 vs 0.02 on clean prose with a CJK
        # character counted one, 0.03 vs 0.02 weighed)
        "special_char_ratio": (nonspace - word_chars - len(text) + len(text.translate(_punctuation())))
        / max(weighed, 1),
        "digit_ratio": digits / max(weighed, 1),
        "hash_ellipsis_ratio": (_hashtag_marks(text) + dots + text.count("…")) / max(n_words, 1),
        "bullet_lines": sum(bool(_BULLET.match(ln)) for ln in nonblank) / max(len(nonblank), 1),
        "ellipsis_lines": sum(ln.endswith(("...", "…")) for ln in nonblank) / max(len(nonblank), 1),
        "dup_lines": dup_l, "dup_line_chars": dup_lc, "dup_paragraphs": dup_p, "dup_paragraph_chars": dup_pc,
        "url_density": len(_URL.findall(text)) / units if "http" in low or "www." in low else 0.0,
        "markup_ratio": markup_chars(text, cfg.cjk_char_weight) / max(weighed, 1),
    }
    s["ngram_scale"] = 1 + (cfg.cjk_chars_per_word - 1) * (n_words - len(latin)) / max(n_words, 1)
    s.update(ngram_signals(ws, [n for n, _ in cfg.top_ngram_max], [n for n, _ in cfg.dup_ngram_max],
                           s["ngram_scale"]))
    fold = match_form(text)
    promo = phrase_counts(fold, cfg._promo_re)
    s["promo_hits"] = sum(promo.values())
    s["promo_density"] = s["promo_hits"] / units
    s["mojibake_rate"] = mojibake_sequences(text) / units
    s["promo_max_repeat"] = max(promo.values(), default=0)
    s["blocklist_hits"] = sum(phrase_counts(fold, cfg._block_re).values())
    return s


def quality_filter(text: str, cfg: QualityConfig = QualityConfig()) -> tuple[str, str | None, dict]:
    """Strip boilerplate lines, measure, check → `(text, reason or None, signals)`."""
    stripped, removed, total = strip_boilerplate(text, cfg)
    chars = _nonspace(text)
    if total and removed / total > cfg.max_boilerplate_lines and (
            (chars - _nonspace(stripped)) / max(chars, 1) > cfg.max_boilerplate_chars):
        return stripped, "boilerplate", {"boilerplate_lines": removed}
    s = analyze(stripped, cfg)
    s["boilerplate_lines"] = removed
    return stripped, cfg.check(s), s
