"""Augmentation hooks for the `augmented` tier ("knowledge augmentation").

A hook is any picklable callable `doc -> doc` (it runs in worker processes); it may add text or fields
but never drops a document. `DomainGlossary` is the default: for each domain tag a document carries,
it appends the definitions of that domain's glossary terms that occur in the text.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata

from data.filters import UNSPACED_RANGES
from data.seeds import check_field_types

PYTHON_GLOSSARY = (
    ("iterator", "an object with __next__ that yields items one at a time and raises StopIteration at the end"),
    ("generator", "a function containing yield; calling it returns an iterator that runs the body lazily"),
    ("decorator", "a callable applied to a function or class with @ syntax, returning its replacement"),
    ("context manager", "an object with __enter__ and __exit__, used by the with statement to set up and tear down"),
    ("coroutine", "a function defined with async def whose execution can be suspended at await points"),
    ("descriptor", "an object defining __get__, __set__ or __delete__, which controls attribute access on a class"),
    ("keyword argument", "an argument passed as name=value in a call"),
    ("mutable", "an object whose value can change after it is created, such as a list or dict"),
    ("immutable", "an object whose value cannot change once created, such as an int, str or tuple"),
    ("namespace", "a mapping from names to objects, such as a module's globals or an object's attributes"),
    ("exception", "an object raised to signal an error; it propagates until an except clause handles it"),
    ("hashable", "an object with a hash that never changes during its lifetime, usable as a dict key"),
)
MATH_GLOSSARY = (
    ("theorem", "a statement proved from axioms and previously proved statements"),
    ("matrix", "a rectangular array of numbers with rows and columns, composing by matrix multiplication"),
    ("integral", "the limit of sums measuring the signed area under a function's graph"),
    ("定理", "由公理和已证明的命题推导出的数学命题"),
)
DEFAULT_GLOSSARIES = (("code", PYTHON_GLOSSARY), ("docs", PYTHON_GLOSSARY), ("math", MATH_GLOSSARY))


# A term is a whole word where no word character of another script touches it (scripts written without spaces:
# data.filters.UNSPACED_RANGES)
_UNSPACED = re.compile(f"[{UNSPACED_RANGES}]")


@functools.cache
def _spaced_word() -> str:
    """A character of a word in a spaced script, as a lookaround's class: \\w, less the unspaced scripts, plus the
    combining marks, which re's \\w leaves out (Devanagari's vowel signs, a decomposed accent): 'गणित' matched in
    'गणितीय'. Not Thai's marks: 'ใช้Python' holds 'Python'. Built on first use (a scan of two planes, 0.1 s)."""
    marks = [c for c in range(0x20000) if unicodedata.category(chr(c)).startswith("M") and not _UNSPACED.match(chr(c))]
    runs = [[marks[0], marks[0]]]
    for c in marks[1:]:
        if c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    mark_class = "".join(f"{chr(a)}-{chr(b)}" for a, b in runs)
    return f"(?:[^\\W{UNSPACED_RANGES}]|[{mark_class}])"


def _term_pattern(term_low: str) -> re.Pattern:
    """A lower-cased term as a whole word (plural too) searched in lower-cased text: by lookarounds, not \\b (a \\b
    next to a term's own '+' / '#' / '.' needs a letter there, so 'C++', 'C#' and '.NET' never matched), and none
    on a side where the term has a character of a script without spaces ("勾股定理" holds "定理", "แก้สมการนี้"
    "สมการ"); a neighbour in such a script is no word of the term's ("我用Python写代码" holds "Python")."""
    start = "" if _UNSPACED.match(term_low[0]) else f"(?<!{_spaced_word()})"
    end = "" if _UNSPACED.match(term_low[-1]) else f"s?(?!{_spaced_word()})"
    return re.compile(start + re.escape(term_low) + end)


@dataclasses.dataclass(frozen=True)
class DomainGlossary:
    """Append `header` and up to `max_terms` `- term: definition` lines for glossary terms of the
    document's domains (`doc["domains"]`, set by the labelling stage) found in its text. Records the
    terms in `doc["augmented"]`; documents with no matching term pass unchanged (but for a block of this hook's
    own definitions at their end, which is stale then and removed, with its `augmented` record). Idempotent: a
    glossary block this hook appended is replaced, not appended to (re-cleaning an augmented tier glossed it twice)."""

    glossaries: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = DEFAULT_GLOSSARIES
    max_terms: int = 5
    header: str = "Glossary:"

    def __post_init__(self):
        check_field_types(self)  # before the range checks: NaN passes `not x < lo`, 1.5 is no count
        if self.max_terms < 1:
            raise ValueError(f"DomainGlossary.max_terms={self.max_terms} must be >= 1")
        compiled = {}
        for entry in self.glossaries:
            ok = isinstance(entry, tuple | list) and len(entry) == 2 and not isinstance(entry[1], str)
            # an empty term matched every text: each document of the domain was glossed "- : definition"
            if not ok or not all(isinstance(t, tuple | list) and len(t) == 2 and all(isinstance(x, str) for x in t)
                                 and t[0].strip() for t in entry[1]):
                raise ValueError(f"DomainGlossary.glossaries: each entry is (domain, ((term, definition), ...)) with "
                                 f"non-empty terms, got {entry!r:.120}")
        # stored as tuples, as QualityConfig: the same glossaries as lists (a JSON config's) were another hook, so a
        # run resumed with them was refused ("different settings"), and the hook was unhashable
        object.__setattr__(self, "glossaries", tuple((d, tuple(map(tuple, terms))) for d, terms in self.glossaries))
        for domain, terms in self.glossaries:
            compiled.setdefault(domain, []).extend(
                (term, term.lower(), definition, _term_pattern(term.lower())) for term, definition in terms)
        object.__setattr__(self, "_compiled", compiled)
        # by line, as `_body` reads a block: a definition running over two lines was not recognised, and glossed twice
        object.__setattr__(self, "_lines", frozenset(ln for _, terms in self.glossaries for t, d in terms
                                                     for ln in f"- {t}: {d}".split("\n")))

    def _body(self, text: str) -> str:
        """`text` without a trailing glossary block of this hook's (its definitions name terms the text may not)."""
        body, sep, block = text.rpartition(f"\n\n{self.header}\n")
        return body if sep and all(ln in self._lines for ln in block.split("\n")) else text

    def __call__(self, doc: dict) -> dict:
        body = self._body(doc["text"])
        found, seen, low = [], set(), body.lower()
        domains = doc.get("domains") or ()  # None (a custom labeler's "no tags"): no glossary, not a TypeError
        if isinstance(domains, str):  # iterated letter by letter, it matched nothing, silently
            raise ValueError(f"DomainGlossary: doc['domains']={domains!r} must be a list of tags, e.g. [{domains!r}]")
        for domain in domains:
            for term, term_low, definition, rx in self._compiled.get(domain, ()):
                # the substring test is a C-speed scan; the word-boundary regex only confirms a hit
                # by its lower case, as it matches: 'Matrix' of one domain's glossary and 'matrix' of another's
                # are one term found, defined once (by the first domain's)
                if term_low not in seen and term_low in low and rx.search(low):
                    seen.add(term_low)
                    found.append((term, definition))
        found = found[:self.max_terms]
        if not found:  # a stale block removed takes its `augmented` terms with it (they named what it defined)
            return doc if body is doc["text"] else {k: v for k, v in doc.items() if k != "augmented"} | {"text": body}
        gloss = "\n".join(f"- {t}: {d}" for t, d in found)
        return {**doc, "text": f"{body}\n\n{self.header}\n{gloss}", "augmented": [t for t, _ in found]}
