"""Decoding raw bytes and normalising text: invalid UTF-8, binary blobs, NFKC, whitespace, control characters.

`decode` turns a raw record into text or a drop reason; `normalize_text` is the per-document text pass.
Both are pure functions of their input and a frozen config, so any shard can be redone identically.

What the defaults rewrite, on purpose (web text wants it; set `form="NFC"` / `collapse_spaces=False`
for corpora where it hurts): NFKC folds compatibility characters, so superscripts, fractions and
circled digits lose their meaning (`mc²` → `mc2`, `½` → `1⁄2`, `①` → `1`) and full-width punctuation
becomes ASCII; runs of spaces between words become one, so column-aligned code and tables lose their
alignment (`x = 1    # note` → `x = 1 # note`). Tabs are never collapsed: tab runs in TSV are empty
columns, and leading indentation is kept.

Mojibake (UTF-8 read as cp1252 or latin-1: "CafÃ©", "donâ€™t", "ä¸­æ–‡") is repaired first (`fix_mojibake`), as
the exact bytes it came from still decode: NFKC and the control-character pass would destroy them ("Ã³" → "Ã3",
"Ã­" loses its soft hyphen), after which no repair is possible.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata

from data.seeds import check_field_types

FORMS = ("NFC", "NFKC", "NFD", "NFKD")
INVALID_UTF8 = ("repair", "reject")

# C0/C1 controls except tab and newline (\r, form feed, vertical tab and 0x1C-0x1E are line breaks first), plus
# invisible format characters that only break tokenisation and matching: zero-width space, word joiner, BOM, soft
# hyphen, bidi controls (Unicode's Bidi_Control set, the Arabic letter mark U+061C too). ZWJ (U+200D) stays: it is
# part of emoji sequences; so does ZWNJ (U+200C): Persian and Indic scripts spell words with it ('می‌خواهم' lost it, a
# misspelling). data.dedup's keys ignore both.
_DROP_CHARS = {c: None for c in [*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F, *range(0x80, 0xA0),
                                 0x00AD, 0x061C, 0x200B, 0x200E, 0x200F, 0x2060, 0xFEFF,
                                 *range(0x202A, 0x202F), *range(0x2066, 0x206A)]}
_SURROGATES = re.compile("[\ud800-\udfff]")
# a form feed is a page break in text extracted from PDFs: deleted, it glued the last word of a page to the next; the
# file / group / record separators (0x1C-0x1E) end lines for str.splitlines and are Unicode paragraph separators:
# deleted, they glued one exported record's last word to the next's
_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x85\x0b\x0c\x1c-\x1e]")
_INNER_SPACES = re.compile(r"(?<=\S) {2,}(?=\S)")  # spaces only: a tab run in TSV is empty columns
_TRAILING_SPACES = re.compile(r"(?<![ \t])[ \t]+$", re.M)  # from a run's start only: `[ \t]+$` rescans long runs


@dataclasses.dataclass(frozen=True)
class NormalizeConfig:
    """How raw bytes become normalised text.

    form: Unicode normal form; NFKC folds full-width letters/digits, ligatures and compatibility spaces.
    invalid_utf8: `repair` replaces bad bytes with U+FFFD while they are at most `max_invalid_fraction` of
        the record (more is rejected as `invalid_utf8`); `reject` drops any record with a bad byte.
    max_control_fraction: records whose bytes are more than this fraction control bytes (or contain NUL)
        are binary blobs, dropped as `binary` (a JSON string's by its UTF-8 bytes, escaped controls counted).
    collapse_spaces: collapse runs of spaces *between* words to one; leading indentation is kept
        because code and verse depend on it, and tabs because a run of them in TSV is empty columns.
    max_blank_lines: longer runs of blank lines shrink to this many.
    repair_mojibake: undo UTF-8 read as cp1252 / latin-1 where it is certain (see `fix_mojibake`); what is left
        is measured by the quality stage's `mojibake_rate`.
    """

    form: str = "NFKC"
    invalid_utf8: str = "repair"
    max_invalid_fraction: float = 0.01
    max_control_fraction: float = 0.05
    collapse_spaces: bool = True
    max_blank_lines: int = 1
    repair_mojibake: bool = True

    def __post_init__(self):
        check_field_types(self)  # before the range checks: NaN passes `not lo <= x`, 'no' is truthy
        if self.form not in FORMS:
            raise ValueError(f"NormalizeConfig.form={self.form!r} is not a Unicode normal form; use one of {FORMS}")
        if self.invalid_utf8 not in INVALID_UTF8:
            raise ValueError(f"NormalizeConfig.invalid_utf8={self.invalid_utf8!r}; use one of {INVALID_UTF8}")
        for name in ("max_invalid_fraction", "max_control_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"NormalizeConfig.{name}={getattr(self, name)} must be a fraction in [0, 1]")
        if self.max_blank_lines < 0:
            raise ValueError(f"NormalizeConfig.max_blank_lines={self.max_blank_lines} must be >= 0")


_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 13)) + b"\x7f"


_ESCAPED = re.compile("[\udc80-\udcff]")


def is_binary(raw: bytes, cfg: NormalizeConfig = NormalizeConfig()) -> bool:
    """Whether record bytes are a binary blob: a NUL, or more than `cfg.max_control_fraction` control bytes."""
    # fractions compared as quotients of the counts: 1 - 0.57 and 0.29 * 100 are inexact (28.999...), and a record of
    # exactly the limit (29 bad bytes of 100) was refused
    return b"\x00" in raw or bool(raw) and (len(raw) - len(raw.translate(None, _CONTROL_BYTES))) / len(raw) > \
        cfg.max_control_fraction


def decode(raw: bytes, cfg: NormalizeConfig = NormalizeConfig()) -> tuple[str | None, str | None]:
    """Raw record bytes → `(text, None)`, or `(None, reason)` with reason `binary` / `invalid_utf8`.

    Repaired text carries U+FFFD where bytes were invalid; the caller can count those.
    """
    if is_binary(raw, cfg):
        return None, "binary"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        if cfg.invalid_utf8 == "reject":
            return None, "invalid_utf8"
    # the bad *bytes*: surrogateescape maps each to one lone surrogate, where 'replace' makes one U+FFFD per invalid
    # sequence (a cut 3-byte character is 2 bad bytes and 1 U+FFFD: records passed at up to 3x the limit)
    bad = len(_ESCAPED.findall(raw.decode("utf-8", errors="surrogateescape")))
    text = raw.decode("utf-8", errors="replace")
    if bad / len(raw) > cfg.max_invalid_fraction:
        return None, "invalid_utf8"
    return text, None


def count_surrogates(text: str) -> int:
    """Lone surrogates (e.g. from JSON escapes like "\\ud800") cannot be encoded as UTF-8."""
    return len(_SURROGATES.findall(text))


def replace_surrogates(text: str) -> str:
    """Lone UTF-16 surrogates (not encodable as UTF-8) replaced by U+FFFD."""
    return _SURROGATES.sub("\ufffd", text)


# cp1252 as browsers decode it (its 5 undefined bytes as the latin-1 controls), and latin-1's C1 controls: each
# character a UTF-8 continuation byte (0x80-0xbf) can become, mapped back to that byte
_CP1252 = "".join(bytes([b]).decode("cp1252", "ignore") or chr(b) for b in range(256))
_BYTE_OF = {c: b for b, c in enumerate(_CP1252)} | {chr(b): b for b in range(0x80, 0xA0)}
_CONT = "[" + re.escape("".join(c for c, b in _BYTE_OF.items() if 0x80 <= b < 0xC0)) + "]"
# a whole UTF-8 multi-byte sequence seen through cp1252: lead byte (Â-ß, à-ï, ð-ô are the same in both) + continuations
MOJIBAKE = re.compile(f"[\u00c2-\u00df]{_CONT}|[\u00e0-\u00ef]{_CONT}{{2}}|[\u00f0-\u00f4]{_CONT}{{3}}")


def undo_mojibake(seq: str) -> str | None:
    """The character a `MOJIBAKE` match stood for, or None when its bytes are not valid UTF-8."""
    try:
        return bytes(_BYTE_OF[c] for c in seq).decode("utf-8")
    except UnicodeDecodeError:
        return None


# punctuation (and the no-break space) that sits beside a word: after an accented small letter it is ordinary text.
# Spanish ¡ ¿ open a sentence right after a closing mark ("está…¡", "mamá—¿": valid UTF-8 as cp1252, U+1161, U+15FF),
# so they count only last, and only after Spanish's accented letters that lead 3 bytes (á é í; ó ñ lead 4, ú none).
# Anywhere, they were the continuation bytes of 62 common Chinese characters ("å¿…é¡»", 必须, no longer repaired);
# last after any lead, of 23 more of GB2312's 3755 commonest (政 "æ”¿", 儿; 4 remain) and of the UTF-8 byte order
# mark "ï»¿", the commonest mojibake of all
_BESIDE_WORDS = frozenset("’‘”“„…–—«»‹›\xa0")
_OPENERS = frozenset("¡¿")


def _beside_words(seq: str) -> bool:
    """Whether the symbols after `seq`'s lead are all punctuation beside a word (an opener only last, after another
    and a Spanish accented letter)."""
    return _BESIDE_WORDS.issuperset(seq[1:-1]) and (
        seq[-1] in _BESIDE_WORDS or len(seq) > 2 and seq[-1] in _OPENERS and seq[0] in "áéí")


def _certain(seq: str) -> bool:
    """A sequence ordinary text never holds: 3-4 bytes ("â€™": an accented small letter and two cp1252 symbols) not
    all of whose symbols are punctuation beside a word, or Ã / Â and a symbol ("Ã©", "Â°"). A word's accented last
    letter before two such marks is ordinary text, French "allé\xa0»" (a no-break space before »: "all頻"), "café”…"
    and "café—“" valid UTF-8 too; and other pairs end a capitalised word in quotes as often as they are mojibake:
    "“ESPAÑA”" is not "ESPAє", "“IRMÃ”" (Portuguese) not "IRMÔ". But "Â\xa0" is a no-break space misread (the
    commonest mojibake, often an English page's only one), as no word ends in a capital Â: left, NFKC made it "Â "."""
    if len(seq) > 2:
        return not _beside_words(seq)
    return seq[0] in "ÂÃ" and seq[1] not in "’”…–—»›\xa0" or seq == "Â\xa0"


# a word's last letter, Latin (not Â / Ã, the leads of Latin-1 read as cp1252, nor Ð Ñ Î Ï, Cyrillic's and Greek's),
# before a closing quote or a no-break space: valid UTF-8 as a pair, and ordinary German / French text
_LAST_LETTERS = frozenset("ÄÅÆÇÈÉÊËÌÍÒÓÔÕÖØÙÚÛÜÝÞß")
_CLOSING = frozenset("“”‘’»\xa0")


def ordinary_text(seq: str, after: str) -> bool:
    """Whether a `MOJIBAKE` match `seq`, followed by the character `after` ("" at the end), is a word's accented last
    letter before marks beside a word, which `mojibake_rate` must not count: 3-4 bytes all of whose symbols are such
    marks (French "allé\xa0»", kept under NFC, "café”…"; `_certain` does not repair them either), or a Latin capital /
    ß ending a word before a closing quote or no-break space (German "Spaß“", "„MÜ“", French "«\xa0CAFÉ\xa0»")."""
    if len(seq) > 2:
        return _beside_words(seq)
    return seq[0] in _LAST_LETTERS and seq[1] in _CLOSING and not after.isalnum()


def fix_mojibake(text: str) -> tuple[str, int]:
    """UTF-8 decoded as cp1252 / latin-1, decoded right → `(text, sequences repaired)`. Only in a text holding at
    least one sequence that is certainly mojibake (see `_certain`) and valid UTF-8, and only sequences whose bytes
    are valid UTF-8 (the round trip is exact); repeated for text mis-decoded twice ("ÃƒÂ©" → "Ã©" → "é")."""
    fixed = 0
    while not text.isascii():
        seqs = [(m.group(), u) for m in MOJIBAKE.finditer(text) if (u := undo_mojibake(m.group())) is not None]
        if not any(_certain(seq) for seq, _ in seqs):
            break
        table = dict(seqs)
        text = MOJIBAKE.sub(lambda m: table.get(m.group(), m.group()), text)
        fixed += len(seqs)
    return text, fixed


def normalize_text(text: str, cfg: NormalizeConfig = NormalizeConfig()) -> str:
    """Unicode normal form, one line-break convention, no control/invisible characters, tidy whitespace.

    Lone surrogates become U+FFFD (they cannot be stored as UTF-8); mojibake is repaired (`fix_mojibake`, with
    `cfg.repair_mojibake`). Idempotent: `normalize_text(normalize_text(t)) == normalize_text(t)`.
    """
    return normalize_counted(text, cfg)[0]


def normalize_counted(text: str, cfg: NormalizeConfig = NormalizeConfig()) -> tuple[str, int]:
    """`normalize_text` → `(text, mojibake sequences repaired)`."""
    text, fixed = _normalize(text, cfg)
    # a deleted invisible character or NFKC joined a sequence ("Â\ufeff©" → "Â©"): once more, until none is left, as
    # nested ones take a pass a level ("Âïï\ufeff»¿»¿©": a repaired "ï»¿" is a BOM, deleted); 3 passes at most left
    # a 4th level for the next call, not idempotent. Bounded by the length, and ended where a pass changes nothing
    # (normalisation undoing a repair would otherwise take len(text) passes of the whole text)
    for _ in range(len(text)):
        if not (cfg.repair_mojibake and fix_mojibake(text)[1]):
            break
        again, more = _normalize(text, cfg)
        if again == text:
            break
        text, fixed = again, fixed + more
    return text, fixed


def _normalize(text: str, cfg: NormalizeConfig) -> tuple[str, int]:
    if _SURROGATES.search(text):
        text = _SURROGATES.sub("\ufffd", text)
    text, fixed = fix_mojibake(text) if cfg.repair_mojibake else (text, 0)
    text = _LINE_BREAKS.sub("\n", text)
    text = text.translate(_DROP_CHARS)
    if not unicodedata.is_normalized(cfg.form, text):
        text = unicodedata.normalize(cfg.form, text)
        # NFKC can map compatibility characters (e.g. U+3000 ideographic space) onto line breaks or
        # controls only in principle; re-run the cheap passes so the result is a fixed point
        text = _LINE_BREAKS.sub("\n", text).translate(_DROP_CHARS)
    if cfg.collapse_spaces:
        text = _INNER_SPACES.sub(" ", text)
    text = _TRAILING_SPACES.sub("", text)
    text = re.sub(f"\n{{{cfg.max_blank_lines + 2},}}", "\n" * (cfg.max_blank_lines + 1), text)
    return (text.strip("\n") if text.strip() else ""), fixed
