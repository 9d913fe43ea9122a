"""Exact term matching: every surface form of every concept, found inside a query.

Dense embeddings miss what clinicians write in shorthand ("PTX" is not close to "pneumothorax"
for a general-purpose sentence model), so the retriever fuses dense scores with exact matches of
synonyms, abbreviations and known misspellings. Matching is on normalised word n-grams: lower
case, punctuation dropped, British spellings folded to American (oedema/edema,
haemorrhage/hemorrhage, tumour/tumor). A query word that matches no vocabulary word may be
corrected to a close one (a misspelling not in the lexicon), and such matches count for less.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Spelling folds, applied to each word: British -> American and a few common variants.
_FOLDS = (
    (re.compile(r"'s$"), ""),  # first, so suffix folds see the bare word
    (re.compile(r"oedem"), "edem"),
    (re.compile(r"^oesophag"), "esophag"),
    (re.compile(r"haem"), "hem"),
    (re.compile(r"aemia"), "emia"),
    (re.compile(r"^paed"), "ped"),
    (re.compile(r"our$"), "or"),  # tumour, colour
    (re.compile(r"isation$"), "ization"),
    (re.compile(r"ised$"), "ized"),
    (re.compile(r"fibre$"), "fiber"),
    (re.compile(r"centre$"), "center"),
)
FUZZY_PENALTY = 0.75  # a corrected-spelling match counts this much of an exact one
MIN_FUZZY_WORD = 5  # shorter words are never corrected: too many near neighbours


def fold(word: str) -> str:
    for pattern, replacement in _FOLDS:
        word = pattern.sub(replacement, word)
    return word


def normalise(text: str) -> list[str]:
    return [fold(w) for w in _WORD.findall(text.lower())]


@dataclass
class TermMatch:
    position: int  # item position in the index
    form: str  # the surface form matched, as written in the lexicon
    coverage: float  # share of the query's characters the match covers, 0..1
    fuzzy: bool  # True when a query word had to be corrected

    @property
    def strength(self) -> float:
        """0.5 for any exact match, up to 1 when it is the whole query; fuzzy matches count less."""
        value = 0.5 + 0.5 * self.coverage
        return value * FUZZY_PENALTY if self.fuzzy else value


class TermMatcher:
    """``grammatical`` marks items (modifiers, negation and uncertainty cues) whose words qualify
    a finding rather than name one: in "small left PTX" the content is "PTX", so its match covers
    the whole of what the query is about."""

    def __init__(self, names_per_item: list[list[str]], fuzzy_cutoff: float = 0.85, grammatical: set[int] | None = None):
        self.grammatical = grammatical or set()
        self.forms: dict[tuple[str, ...], list[tuple[int, str]]] = {}
        for position, names in enumerate(names_per_item):
            for name in names:
                key = tuple(normalise(name))
                if key:
                    self.forms.setdefault(key, []).append((position, name))
        self.max_words = max((len(k) for k in self.forms), default=0)
        self.vocabulary = sorted({w for key in self.forms for w in key})
        self._vocab_set = set(self.vocabulary)
        self.fuzzy_cutoff = fuzzy_cutoff

    def _correct(self, words: list[str]) -> list[str]:
        out = []
        for word in words:
            if len(word) >= MIN_FUZZY_WORD and word not in self._vocab_set and not word.isdigit():
                close = difflib.get_close_matches(word, self.vocabulary, n=1, cutoff=self.fuzzy_cutoff)
                out.append(close[0] if close else word)
            else:
                out.append(word)
        return out

    def _scan(self, words: list[str], fuzzy: bool, found: dict[int, TermMatch]) -> None:
        spans: list[tuple[int, int, int, str]] = []  # (start, stop, position, form)
        for n in range(min(self.max_words, len(words)), 0, -1):
            for start in range(len(words) - n + 1):
                for position, form in self.forms.get(tuple(words[start : start + n]), ()):
                    spans.append((start, start + n, position, form))
        # words only grammatical items match are qualifiers, not content
        content_words = {i for a, b, p, _ in spans if p not in self.grammatical for i in range(a, b)}
        grammar_words = {i for a, b, p, _ in spans if p in self.grammatical for i in range(a, b)} - content_words
        total = sum(len(w) for w in words)
        content = sum(len(w) for i, w in enumerate(words) if i not in grammar_words) or total
        for start, stop, position, form in spans:
            chars = sum(len(w) for w in words[start:stop])
            coverage = chars / max(total if position in self.grammatical else content, 1)
            match = TermMatch(position, form, min(coverage, 1.0), fuzzy)
            best = found.get(position)
            if best is None or match.strength > best.strength:
                found[position] = match

    def match(self, query: str) -> dict[int, TermMatch]:
        """item position -> best match of one of its forms inside the query."""
        words = normalise(query)
        found: dict[int, TermMatch] = {}
        self._scan(words, fuzzy=False, found=found)
        corrected = self._correct(words)
        if corrected != words:
            self._scan(corrected, fuzzy=True, found=found)
        return found
