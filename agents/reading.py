"""Reading clinical text: words with offsets, lexicon names found as word n-grams, statements and clauses.

What :mod:`agents.rules` reasons over. Words are the term matcher's words (:mod:`knowledge.terms`: lower
case, British spellings folded), kept with their character offsets, so every finding, place and cue
found has a position in the request; statements are sentences and clauses split where negation scope
changes; long requests are cut at a statement end.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from knowledge.schema import Concept
from knowledge.terms import fold

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")  # the words of knowledge.terms.normalise, here with offsets
CLAUSE_WORDS = {"and", "or", "with", "without", "but", "plus", "nor"}  # end a finding's word window
BOUNDARY_PUNCTUATION = re.compile(r"[,;:()\[\]]")


# ---------------------------------------------------------------- words and spans
@dataclass(frozen=True)
class Token:
    surface: str  # as written
    norm: str  # lower case, folded (oedema -> edema)
    start: int  # character offsets into the request text
    end: int


def tokenize(text: str, offset: int = 0) -> list[Token]:
    """The words of ``knowledge.terms.normalise(text)``, with their character offsets."""
    lower = text.lower()
    if len(lower) != len(text):  # a few characters change length in lower case; keep offsets aligned
        lower = "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in text)
    return [Token(text[m.start() : m.end()], fold(m.group()), offset + m.start(), offset + m.end())
            for m in WORD.finditer(lower)]


def words_of(name: str) -> tuple[str, ...]:
    return tuple(fold(w) for w in WORD.findall(name.lower()))


@dataclass(frozen=True)
class Span:
    """A concept found in a run of tokens ``[first, stop)`` of one statement."""

    concept: Concept
    first: int
    stop: int
    form: str  # the lexicon's surface form, or the measurement text
    fuzzy: bool = False  # a word had to be corrected
    # elliptical ("paraseptal [emphysema] and centrilobular emphysema"): the first token of the full name
    shares: int | None = None

    def overlaps(self, other: "Span") -> bool:
        return self.first < other.stop and other.first < self.stop


class TermIndex:
    """Every surface form of the lexicon's concepts as a word n-gram, with the retriever's spelling correction.

    Two-letter upper-case abbreviations (OD, OS, MS, PE, BE) match only as written: in lower case they
    are ordinary words ("may be", "os").
    """

    def __init__(self, concepts: Iterable[Concept], fuzzy_cutoff: float = 0.85, min_fuzzy_word: int = 5):
        self.forms: dict[tuple[str, ...], list[tuple[Concept, str, bool]]] = {}
        for concept in concepts:
            for name in concept.names():
                key = words_of(name)
                if key:
                    exact_case = len(name.strip()) <= 2 and name.strip().isupper()
                    self.forms.setdefault(key, []).append((concept, name, exact_case))
        self.max_words = max((len(k) for k in self.forms), default=0)
        self.vocabulary = sorted({w for key in self.forms for w in key})
        self._known = set(self.vocabulary)
        self.fuzzy_cutoff, self.min_fuzzy_word = fuzzy_cutoff, min_fuzzy_word
        self._corrections: dict[str, str | None] = {}

    def knows(self, word: str) -> bool:
        return word in self._known

    def correct(self, word: str) -> str | None:
        """A close vocabulary word for a word no name holds, else None."""
        if word in self._known or len(word) < self.min_fuzzy_word or word.isdigit():
            return None
        if word not in self._corrections:
            close = difflib.get_close_matches(word, self.vocabulary, n=1, cutoff=self.fuzzy_cutoff)
            self._corrections[word] = close[0] if close else None
        return self._corrections[word]

    def find(self, tokens: Sequence[Token]) -> list[Span]:
        """All spans, overlapping ones included, exact before corrected."""
        words = [t.norm for t in tokens]
        corrected = [self.correct(w) for w in words]
        spans: list[Span] = []
        seen: set[tuple[str, int, int]] = set()
        for n in range(min(self.max_words, len(words)), 0, -1):
            for first in range(len(words) - n + 1):
                stop = first + n
                for concept, form, exact_case in self.forms.get(tuple(words[first:stop]), ()):
                    if exact_case and tokens[first].surface != form.strip():
                        continue
                    spans.append(Span(concept, first, stop, form))
                    seen.add((concept.id, first, stop))
                if any(corrected[first:stop]):
                    key = tuple(c or w for c, w in zip(corrected[first:stop], words[first:stop]))
                    for concept, form, exact_case in self.forms.get(key, ()):
                        if not exact_case and (concept.id, first, stop) not in seen:
                            spans.append(Span(concept, first, stop, form, fuzzy=True))
                            seen.add((concept.id, first, stop))
        return spans


def longest_first(spans: Iterable[Span], rank=lambda span: 0) -> list[Span]:
    """Non-overlapping spans: longer first, then exact before corrected, then by ``rank``, then leftmost."""
    chosen: list[Span] = []
    for span in sorted(spans, key=lambda s: (-(s.stop - s.first), s.fuzzy, rank(s), s.first)):
        if not any(span.overlaps(c) for c in chosen):
            chosen.append(span)
    return sorted(chosen, key=lambda s: s.first)


@dataclass
class Clause:
    """One statement's words and what was found in them (positions are token indices in ``tokens``)."""

    index: int
    start: int
    end: int
    tokens: list[Token]
    gaps: list[str]  # gaps[i]: the text between token i-1 (or the statement start) and token i; gaps[-1]: the tail
    findings: list[Span]  # resolved, every modality
    normals: list[Span]
    anatomy: list[Span]
    modifiers: list[Span]
    cues: list[Span]

    def boundary_before(self, i: int) -> bool:
        return 0 < i < len(self.tokens) and bool(BOUNDARY_PUNCTUATION.search(self.gaps[i]))

    def covering(self, spans: list[Span], i: int) -> Span | None:
        return next((s for s in spans if s.first <= i < s.stop), None)

    def chunks(self) -> list[tuple[int, int]]:
        """Runs of words between punctuation and conjunctions, which are left out: "small PTX | RLL consolidation"."""
        runs, start = [], None
        for i, token in enumerate(self.tokens):
            if token.norm in CLAUSE_WORDS or self.boundary_before(i):
                if start is not None:
                    runs.append((start, i))
                start = None if token.norm in CLAUSE_WORDS else i
            elif start is None:
                start = i
        if start is not None:
            runs.append((start, len(self.tokens)))
        return runs

    def chunk_of(self, i: int) -> tuple[int, int]:
        return next((c for c in self.chunks() if c[0] <= i < c[1]), (i, i + 1))


# ---------------------------------------------------------------- statements
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|;|\n+")
_ABBREVIATED = {"vs", "approx", "eg", "ie", "dr", "st", "etc", "cf", "fig", "no"}
_CONTRAST = re.compile(
    r",?\s+but\s+|[,;]?\s*\bhowever\b,?\s*|,?\s+(?:although|though|whereas)\s+|\s+[-\u2013\u2014]+\s+", re.I)
_NEGATING_WITH = re.compile(r"(?<=\w)[,\s]+(?=(?:with\s+no|without|w/o)\b)", re.I)


def split_statements(text: str, comma_cues: re.Pattern | None = None) -> list[tuple[int, int]]:
    """Character ranges of the statements: sentences, then clauses where the negation scope changes
    (", but", "however", " - ", before "with no"/"without" and before a cue after a comma)."""
    sentences, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.group() == "." or m.group() == "?" or m.group() == "!":
            before = text[start : m.start()]
            last = re.findall(r"[A-Za-z.]+$", before)
            if m.group() == "." and last and last[0].lower().replace(".", "") in _ABBREVIATED and len(last[0]) <= 7 \
                    and last[0].lower() != "no":
                continue
            after = text[m.start() - 1] if m.start() > 0 else " "
            if m.group() == "?" and not (after.isalnum() or after in ")]"):
                continue  # "? PTX": a hedge before its finding, not the end of a question
        sentences.append((start, m.end()))
        start = m.end()
    sentences.append((start, len(text)))

    cuts = [_CONTRAST, _NEGATING_WITH] + ([comma_cues] if comma_cues is not None else [])
    ranges: list[tuple[int, int]] = []
    for s_start, s_end in sentences:
        pieces = [(s_start, s_end)]
        for pattern in cuts:
            split: list[tuple[int, int]] = []
            for a, b in pieces:
                cursor = a
                for m in pattern.finditer(text, a, b):
                    if m.start() > cursor:
                        split.append((cursor, m.start()))
                    cursor = m.end()
                split.append((cursor, b))
            pieces = split
        for a, b in pieces:
            while a < b and (text[a].isspace() or text[a] in ",;:-"):
                a += 1
            while b > a and (text[b - 1].isspace() or text[b - 1] in ",;:-."):
                b -= 1
            if a < b and (WORD.search(text[a:b].lower()) or "?" in text[a:b]):
                ranges.append((a, b))
    return ranges


def truncate(text: str, max_chars: int) -> str:
    """At most ``max_chars`` characters, cut at the last statement end, else the last word boundary."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    ends = [m.end() for m in re.finditer(r"[.;!?\n](?=\s|$)", text[: max_chars + 1]) if m.end() <= max_chars]
    if ends and ends[-1] >= max_chars // 2:
        return head[: ends[-1]].rstrip()
    space = head.rfind(" ")
    return (head[:space] if space > 0 else head).rstrip()


__all__ = ["BOUNDARY_PUNCTUATION", "CLAUSE_WORDS", "WORD", "Token", "tokenize", "words_of", "Span", "TermIndex", "longest_first", "Clause", "_SENTENCE_END", "_ABBREVIATED", "_CONTRAST", "_NEGATING_WITH", "split_statements", "truncate"]
