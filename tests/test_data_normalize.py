"""Decoding and normalisation: NFKC on full-width text, control/invisible characters, whitespace, bad bytes."""

import unicodedata

import pytest

from data.normalize import NormalizeConfig, decode, normalize_text


def test_nfkc_folds_full_width_and_compatibility_characters():
    # full-width latin, digits and punctuation, ideographic space, ligature, circled digit, half-width katakana
    assert normalize_text("ＡＢＣ　ｘｙｚ　１２３！") == "ABC xyz 123!"
    assert normalize_text("ﬁle ①") == "file 1"
    assert normalize_text("ｶﾀｶﾅ") == "カタカナ"
    # Han characters and the ideographic full stop stay; full-width comma/question mark/colon fold to ASCII
    assert normalize_text("你好，世界。") == "你好,世界。"
    assert normalize_text("真的？是：") == "真的?是:"


def test_nfc_form_keeps_full_width():
    assert normalize_text("ＡＢＣ", NormalizeConfig(form="NFC")) == "ＡＢＣ"
    # but still composes combining sequences
    assert normalize_text("e\u0301", NormalizeConfig(form="NFC")) == "é"


@pytest.mark.parametrize("form", ["NFC", "NFD", "NFKC", "NFKD"])
def test_each_form_is_the_one_unicodedata_gives(form):
    # a combining sequence beside compatibility characters: in no form already, so every form rewrites it its own way
    text = "cafe\u0301 ＡＢＣ ﬁle é ½"
    assert normalize_text(text, NormalizeConfig(form=form)) == unicodedata.normalize(form, text)


def test_control_and_invisible_characters_removed_newlines_and_tabs_kept():
    text = "a\x00b\x07c\u200bd\ufeffe\u00adf\u202eg\tx\ny"
    assert normalize_text(text) == "abcdefg\tx\ny"
    # emoji ZWJ sequences survive (U+200D is not removed)
    family = "👨\u200d👩\u200d👧"
    assert normalize_text(family) == family
    # ZWNJ spells Persian and Indic words (deleted, 'می‌خواهم' was misspelt); dedup's keys fold it away
    from data.dedup import exact_key

    for word in ("می\u200cخواهم", "क्\u200cष"):
        assert normalize_text(word) == word and exact_key(word) == exact_key(word.replace("\u200c", ""))


def test_line_breaks_and_whitespace():
    assert normalize_text("a\r\nb\rc\u2028d") == "a\nb\nc\nd"
    # a form feed (page break of PDF-extracted text) or vertical tab separates lines; deleted, it glued words
    assert normalize_text("end of page.\x0cNext page\x0bnext line") == "end of page.\nNext page\nnext line"
    assert normalize_text("one   two three   \n") == "one two three"
    # tab runs are TSV columns, some empty: kept; space runs between words collapse
    assert normalize_text("id\tname\t\tscore\n7\t\t\t0.5") == "id\tname\t\tscore\n7\t\t\t0.5"
    assert normalize_text("x = 1    # note") == "x = 1 # note"
    # documented NFKC effects: superscripts and fractions fold
    assert normalize_text("E = mc² and ½ cup") == "E = mc2 and 1\u20442 cup"
    # leading indentation is kept (code), trailing spaces go, blank-line runs shrink
    assert normalize_text("def f():\n    return 1   \n\n\n\n\nx") == "def f():\n    return 1\n\nx"
    assert normalize_text("a\n\n\n\nb", NormalizeConfig(max_blank_lines=0)) == "a\nb"
    assert normalize_text(" \n\t\n ") == ""
    # at the boundaries (each of these passed with its rule loosened by one): NEL is a line break, two spaces
    # between words collapse, a run of exactly max_blank_lines + 2 newlines shrinks, one of max + 1 stays
    assert normalize_text("a\x85b") == "a\nb"
    assert normalize_text("x  y") == "x y"
    assert normalize_text("a\n\n\nb") == "a\n\nb"  # default max_blank_lines=1
    assert normalize_text("a\n\nb") == "a\n\nb"



@pytest.mark.parametrize("form", ["NFKC", "NFC"])
def test_a_text_of_whitespace_only_becomes_empty(form):
    """Every character Python calls whitespace, alone and all together: nothing is left (the pipeline then drops
    the record as empty). The trailing-space pass takes spaces and tabs only, so Unicode spaces that NFKC keeps
    (U+1680 ogham space mark) or that NFC keeps (U+3000, NBSP, U+2000-U+200A) came through as the document."""
    cfg = NormalizeConfig(form=form)
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    for text in spaces + ["".join(spaces), "\u3000\n\u00a0 \u1680\n\n"]:
        assert normalize_text(text, cfg) == "", (form, [hex(ord(c)) for c in text][:8])

def test_lone_surrogates_become_replacement_characters():
    assert normalize_text("ok\ud800x") == "ok\ufffdx"


# the last three: mojibake that a deleted BOM / zero-width space joins only after the first repair pass; nested, each
# repaired BOM ("ï»¿") joins the next level's sequence, a pass a level (3 extra passes left "Â©" for a second call)
@pytest.mark.parametrize("text", ["ＡＢＣ　１２３\r\n\r\n\r\nx  y\u200b", "你好，世界！\n\n\n\nｶﾀｶﾅ", "a\tb\n  c  d  ",
                                  "CafÃ©, Ã\xad, ä¸\xadæ–‡", "Ð©é\ufeff\u200bÂ\ufeff©", "Ã\u200b©",
                                  "Âïïï\ufeff»¿»¿»¿©"])
def test_normalize_is_idempotent(text):
    once = normalize_text(text)
    assert normalize_text(once) == once


def test_decode_valid_repaired_rejected_binary():
    assert decode("héllo 你好".encode()) == ("héllo 你好", None)
    # one bad byte in a long record: repaired with U+FFFD
    text, reason = decode(b"x" * 500 + b"\xff" + b"y" * 500)
    assert reason is None and text.count("\ufffd") == 1 and text.startswith("x" * 500)
    # mostly bad bytes: rejected
    assert decode(b"\xff\xfe\xfa" * 50 + b"abc") == (None, "invalid_utf8")
    # reject policy: a single bad byte is enough
    assert decode(b"x" * 500 + b"\xff", NormalizeConfig(invalid_utf8="reject")) == (None, "invalid_utf8")
    # binary: NUL bytes or many control bytes
    assert decode(b"PK\x03\x04\x00\x00binary") == (None, "binary")
    assert decode(bytes(range(1, 32)) * 10) == (None, "binary")
    # one NUL is enough, however long the text around it (0.1% control bytes here, far under the 5% limit)
    assert decode(b"a" * 500 + b"\x00" + b"b" * 500) == (None, "binary")
    assert decode(b"a" * 500 + b"\x01" + b"b" * 500) == ("a" * 500 + "\x01" + "b" * 500, None)
    # a genuine U+FFFD in valid input is not counted as damage
    assert decode("valid \ufffd".encode()) == ("valid \ufffd", None)
    # the limit counts bad bytes, not U+FFFD characters: 6 characters cut after 2 of their 3 bytes are 12 bad bytes
    # (1.2% of 1000 > 1%) but 6 replacement characters, and passed
    cut = (b"\xe4\xb8 " * 6 + b"a" * 1000)[:1000]
    assert decode(cut) == (None, "invalid_utf8")
    assert decode(cut, NormalizeConfig(max_invalid_fraction=0.012))[1] is None
    # a genuine U+FFFD beside bad bytes is not counted either
    assert decode("\ufffd".encode() * 20 + b"\xff" + b"a" * 500)[1] is None


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="form"):
        NormalizeConfig(form="NFX")
    with pytest.raises(ValueError, match="invalid_utf8"):
        NormalizeConfig(invalid_utf8="ignore")
    with pytest.raises(ValueError, match="max_invalid_fraction"):
        NormalizeConfig(max_invalid_fraction=2.0)
    # -1 made the blank-line pass replace every newline by nothing: the lines of a document ran together
    with pytest.raises(ValueError, match="max_blank_lines=-1 must be >= 0"):
        NormalizeConfig(max_blank_lines=-1)
    assert normalize_text("a\n\nb", NormalizeConfig(max_blank_lines=0)) == "a\nb"


def test_trailing_whitespace_goes_line_by_line_in_linear_time():
    """Equal to rstrip(' \\t') per line; long runs inside a line (tabs, indentation) used to be rescanned from
    every position (quadratic: 40k tabs took 5 s)."""
    cfg = NormalizeConfig(collapse_spaces=False)
    for text in ("a \t \nb\t\t\n  c  ", "x" + "\t" * 200_000 + "y", "x\n" + " " * 200_000 + "y \t"):
        want = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
        assert normalize_text(text, cfg) == want.strip("\n")


def test_every_control_character_goes_except_tab_and_line_breaks():
    """Every Unicode control (category Cc) is deleted, is a line break, or is a tab: only the two spot-checked
    controls were tested, so a range bound that kept backspace (0x08) or shift-out (0x0E) passed."""
    import unicodedata

    breaks = {"\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85"}
    for cp in range(0x110000):
        c = chr(cp)
        if unicodedata.category(c) != "Cc":
            continue
        want = "a\nb" if c in breaks else "a\tb" if c == "\t" else "ab"
        assert normalize_text(f"a{c}b") == want, hex(cp)


def test_record_and_group_separators_are_line_breaks_not_deleted():
    """The ASCII file / group / record separators (U+001C-U+001E) end lines for str.splitlines and are paragraph
    separators to Unicode (bidi class B, as U+0085 and U+2029): deleted, they glued the record before to the one
    after ('first\x1esecond' became one word 'firstsecond', as a form feed once glued a PDF's pages)."""
    assert normalize_text("first\x1esecond\x1dthird\x1cfourth") == "first\nsecond\nthird\nfourth"
    for c in "\x1c\x1d\x1e":
        assert normalize_text(f"a{c}b").splitlines() == f"a{c}b".splitlines()


def test_every_bidi_control_goes():
    """The documented 'bidi controls' are Unicode's Bidi_Control set (PropList.txt: U+061C, U+200E-U+200F,
    U+202A-U+202E, U+2066-U+2069): the Arabic letter mark U+061C, which phones insert beside numbers in Arabic
    text, was kept, so 'a\u061cb' and 'ab' stayed two texts to matching and dedup."""
    bidi = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
    for cp in bidi:
        assert normalize_text(f"a{chr(cp)}b") == "ab", hex(cp)
    assert normalize_text("السعر ؜50 درهم") == "السعر 50 درهم"


def test_first_line_indentation_is_kept():
    """Leading indentation is kept on every line, the first too: only blank lines are stripped from the ends (a
    strip of all whitespace dedented a snippet's first line, and passed: every tested text began unindented)."""
    code = "    x = 1\n    y = 2"
    assert normalize_text(code) == code
    assert normalize_text("\n\n  \n\tfirst\nsecond  \n\n") == "\tfirst\nsecond"
    assert normalize_text(normalize_text("   a  b")) == "   a b"


def test_decode_line_ends_are_not_control_bytes_and_the_binary_limit_is_inclusive():
    """CR is text (Windows line ends), not a control byte: short CRLF lines are a third CR and were not binary; a
    record with exactly max_control_fraction control bytes passes, one byte more is binary."""
    crlf = b"ok\r\n" * 50
    assert decode(crlf) == (crlf.decode(), None)
    cfg = NormalizeConfig(max_control_fraction=0.25)  # exact in binary floating point: 75 of 100 bytes
    assert decode(b"\x01" * 25 + b"a" * 75, cfg) == ("\x01" * 25 + "a" * 75, None)
    assert decode(b"\x01" * 26 + b"a" * 74, cfg) == (None, "binary")


def test_decode_limits_are_inclusive_where_the_fraction_is_inexact_in_binary():
    """0.29 * 100 is 28.999... in floating point and 1 - 0.57 is under 0.43: a record with exactly the limit's bad
    (or control) bytes was refused. One byte more still is."""
    for frac, n in ((0.29, 100), (0.35, 180), (0.57, 100)):
        cfg = NormalizeConfig(max_invalid_fraction=frac, max_control_fraction=frac)
        k = round(frac * n)
        for bad, reason in ((b"\xff", "invalid_utf8"), (b"\x01", "binary")):
            assert decode(bad * k + b"a" * (n - k), cfg)[1] is None, (frac, reason)
            assert decode(bad * (k + 1) + b"a" * (n - k - 1), cfg)[1] == reason, (frac, reason)
