"""The deterministic reasoning backend: lexicon, retrieval and rules, offline.

:class:`RuleReasoner` runs the four reasoning stages of the agent graph on one request. How it reads:

- Words are the term matcher's words (:mod:`knowledge.terms`: lower case, British spellings folded),
  kept with their character offsets, so every finding, place and cue found has a position
  (:mod:`agents.reading`: tokens, name look-up, statements, clauses).
- Every surface form of every lexicon concept is looked up as a word n-gram, longest first, so
  "pericardial effusion" is one finding and not also a pleural one; a word that no name holds may be
  corrected to a close one, as the retriever does for misspellings the lexicon lacks.
- A negation or uncertainty cue governs a scope: forward from "no" / "possible" / "?", backward from
  "not seen" / "has resolved" / "cannot be excluded". A list stays in scope ("no effusion or
  pneumothorax"); a new item with its own size, side, place or article ends it ("no effusion, large
  left pneumothorax"), and so does a contrast ("but", "however"). Negation is decided per finding.
- A finding's severity, side and place come from the words next to it: before it back to the previous
  finding, comma or conjunction, then after it up to the next one. Severity words are first those the
  phantom of the modality uses for that finding (generator/phantoms/*.py), then the lexicon's.

Retrieval: the anatomy stage asks about each statement that names a place or a side, the pathology stage
about each statement that names a finding, about runs of words that may name one in words no name holds
("scattered haemorrhages"), and about one-word names of other modalities ("mass" on brain MRI); the visual
stage asks for each present finding's appearance and for similar cases. Every call is recorded in the
result's ``retrievals``, which is what a user inspects in the trace.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence

from generator.config import ModalityConfig, default_modalities
from generator.modalities import UnknownModalityError, alias_table, resolve_modality
from generator.phantoms import PHANTOM_MODULES, FindingSpec, catalogue, get_spec
from knowledge.lexicon import load_lexicon
from knowledge.retriever import Hit
from knowledge.schema import Concept

from .reader import lexicon_lineage
from .reading import (
    CLAUSE_WORDS, Token, tokenize, words_of, Span, TermIndex, longest_first, Clause, split_statements, truncate,
)
from .schema import (
    AnatomyMention,
    AnatomyResult,
    Contradiction,
    CueScope,
    FindingMention,
    ParsedRequest,
    PathologyResult,
    RetrievalRecord,
    StageError,
    Statement,
    VisualDescriptor,
    VisualResult,
)

SEVERITIES = ("mild", "moderate", "severe")
NORMAL_CONCEPT = "normal_study"  # the lexicon's normal study: it sets PathologyResult.normal, it is no finding

# Cue direction, by normalised surface form: these stand after what they govern ("effusion is not seen");
# "both" forms govern either side ("resolved effusion", "effusion resolved"); every other cue stands before.
POST_CUES = {
    "not seen", "not identified", "not demonstrated", "not visualised", "not visualized", "not present", "none seen",
    "not detected", "is not appreciated", "not seeen", "absent", "is absent", "are absent", "has resolved",
    "no longer seen", "no longer visible", "no longer present", "cleared", "ruled out", "has been ruled out",
    "was ruled out", "rulled out", "excluded", "has been excluded", "confidently excluded", "none", "negative",
    "cannot be excluded", "not excluded", "cannot be ruled out", "not ruled out",
}
BOTH_CUES = {"resolved", "resloved", "resovled", "difficult to exclude", "vs", "versus", "or alternatively"}
# Words that end any cue's scope, and words that end a negation's forward scope ("no effusion with ...").
SCOPE_ENDS = {"but", "however", "although", "though", "whereas", "except", "apart", "aside", "otherwise", "which",
              "there"}
NEGATION_ENDS = SCOPE_ENDS | {"with", "showing", "shows", "demonstrating", "demonstrates"}
SINGULAR = {"has", "is", "was"}  # "the effusion has resolved" governs only its own noun phrase
ARTICLES = {"a", "an", "the", "this", "there", "is", "are", "has", "have"}
CONTINUE_LIST = {"or", "nor"}
POST_WINDOW_ENDS = CLAUSE_WORDS | {"which", "showing", "shows", "secondary", "due", "consistent", "causing", "keeping",
                                   "likely", "suspicious", "concerning", "suggestive", "after", "following", "post"}
PRE_WINDOW, POST_WINDOW, SCOPE_GAP = 6, 8, 6  # tokens

# Words of a normal study ("normal CXR", "healthy chest", "unremarkable MRI brain"): with these around a
# normal word, a statement says the whole study is normal; any other word ("normal heart size") does not.
NORMAL_WORDS = {"normal", "unremarkable", "healthy"}
STUDY_WORDS = {
    "study", "scan", "exam", "examination", "film", "image", "images", "view", "photo", "photograph", "appearance",
    "appearances", "picture", "generate", "make", "create", "show", "showing", "shows", "please", "synthetic", "a",
    "an", "the", "of", "for", "with", "is", "are", "appears", "looks", "completely", "entirely", "totally", "patient",
    "pt", "control", "subject", "findings", "impression", "conclusion", "chest", "lungs", "lung", "thorax", "brain",
    "head", "retina", "retinal", "fundus", "fundi", "eye", "eyes", "macula", "macular", "x", "ray", "mri", "ct", "oct",
    "in", "on", "at", "this", "these", "level",
}
# How the image was made ("axial T2-weighted FLAIR", "lung window"): never a finding's word, even where a finding's
# name holds one ("intra-axial glial tumour" must not make "axial FLAIR" a glioma).
TECHNIQUE_WORDS = {
    "axial", "coronal", "sagittal", "oblique", "plane", "planes", "slice", "slices", "section", "sections", "weighted",
    "flair", "sequence", "sequences", "t1", "t2", "dwi", "adc", "contrast", "enhanced", "window", "windows", "settings",
    "level", "pa", "ap", "lateral", "portable", "supine", "erect", "b", "scan", "line", "horizontal", "vertical", "mm",
}
# Words of finding names too common to stand for one finding when no name matched ("no fluid" names no
# finding, "loss of the foveal depression" is not ellipsoid zone loss).
GENERIC_WORDS = {
    "change", "changes", "disease", "abnormality", "abnormalities", "finding", "findings", "loss", "of", "the", "in",
    "on", "to", "and", "with", "at", "from", "due", "a", "an", "for", "by", "or", "under", "into", "around", "inside",
    "pattern", "lesion", "process", "normal", "syndrome", "type", "seen", "study",
}
# least cosine similarity of a run of words and a finding named by one of its words (a floor: the word decides)
FALLBACK_MIN_DENSE = 0.2
ANCHOR_MIN_CHARS = 4

# Measurements that state a finding: (pattern with the value as group 1, finding id, value above which it
# is present). Thresholds are the lexicon's definitions: CDR above about 0.6, CTR above 0.5.
MEASUREMENTS = (
    (re.compile(r"\b(?:cup[\s-]*(?:to|/)?[\s-]*dis[ck](?:\s+ratio)?|c/d(?:\s+ratio)?|cdr)\s*(?:of|is|=|:|~|at)?\s*"
                r"(0?\.\d+|1\.0|1)\b", re.I), "enlarged_cup", 0.6),
    (re.compile(r"\b(?:ctr|cardio-?thoracic\s+ratio)\s*(?:of|is|=|:|~|at)?\s*(0?\.\d+)\b", re.I), "cardiomegaly", 0.5),
)


# ---------------------------------------------------------------- the reasoner
class RuleReasoner:
    """Lexicon + retrieval + rules, offline; the graph's default backend and the LLM backend's fallback.

    ``lexicon`` is the concept list the knowledge base was built from (default: the shipped lexicon); the
    rules read its attributes (cue type, modifier axis, phantom location), which the index does not keep.
    """

    name = "rules"

    def __init__(
        self,
        retriever,
        modalities: Mapping[str, ModalityConfig] | None = None,
        drawable: Mapping[str, Iterable[str]] | None = None,
        max_chars: int = 2000,
        k: int = 8,
        *,
        lexicon: Sequence[Concept] | None = None,
    ):
        self.retriever = retriever
        self.modalities = dict(default_modalities() if modalities is None else modalities)
        drawable = catalogue() if drawable is None else drawable
        self.drawable = {m: set(names) for m, names in drawable.items()}
        self.labels = {m: list(dict.fromkeys(names)) for m, names in drawable.items()}  # the same, in catalogue order
        self.max_chars, self.k = max_chars, k
        concepts = list(load_lexicon() if lexicon is None else lexicon)
        self.concepts = {c.id: c for c in concepts}
        self._lineage = lexicon_lineage(concepts)
        matcher = getattr(retriever, "matcher", None)
        self.terms = TermIndex([c for c in concepts if c.kind != "appearance"], getattr(matcher, "fuzzy_cutoff", 0.85))
        self.specs = {m: get_spec(m) for m in PHANTOM_MODULES if m in self.modalities}
        self._items = {item["id"]: item for item in getattr(getattr(retriever, "concepts", None), "items", [])}
        self._side = {c.id: self._intrinsic_side(c) for c in concepts if c.kind == "anatomy"}
        question = [c for c in concepts if c.kind == "cue" and "?" in c.names()]
        self._question_cue = question[0] if question else None
        pre_forms = sorted({n for c in concepts if c.kind == "cue" for n in c.names()
                            if words_of(n) and " ".join(words_of(n)) not in POST_CUES | BOTH_CUES},
                           key=len, reverse=True)
        # a cue before its finding after a comma starts a new clause: "atelectasis, no effusion"; "drusen, possible AMD"
        self._comma_cues = re.compile(r",\s*(?=(?:" + "|".join(re.escape(f) for f in pre_forms) + r")\b|\?)", re.I)
        self._alias_words = {w for alias in alias_table(self.modalities) for w in words_of(alias)}
        self._study_words = STUDY_WORDS | {w for spec in self.modalities.values() for w in words_of(spec.region or "")}
        self._vocab_cache: dict[tuple[str, str], set[str]] = {}
        self._anchors: dict[str, dict[str, set[str]]] = {}
        self._anchor_cache: dict[tuple[str, str], str | None] = {}

    # -- lexicon helpers -------------------------------------------------------------------
    def _intrinsic_side(self, concept: Concept) -> str | None:
        """right/left from the place's own name or its is-a parents (lingula -> left upper lobe -> left)."""
        todo, seen = [concept.id], set()
        while todo:
            cid = todo.pop(0)
            if cid in seen or cid not in self.concepts:
                continue
            seen.add(cid)
            words = set(cid.split("_")) | set(words_of(self.concepts[cid].term))
            for side in ("right", "left"):
                if side in words:
                    return side
            todo += self.concepts[cid].parents
        return None

    @staticmethod
    def _valid(concept: Concept, modality: str) -> bool:
        return not concept.modalities or modality in concept.modalities

    def _finding_spec(self, modality: str, name: str) -> FindingSpec | None:
        spec = self.specs.get(modality)
        return spec.findings.get(name) if spec is not None else None

    def _vocabulary(self, modality: str, kind: str) -> set[str]:
        """Words of the names of one kind's concepts valid for a modality."""
        key = (modality, kind)
        if key not in self._vocab_cache:
            self._vocab_cache[key] = {w for c in self.concepts.values() if c.kind == kind and self._valid(c, modality)
                                      for n in c.names() for w in words_of(n)}
        return self._vocab_cache[key]

    def _search(self, records: list[RetrievalRecord], stage: str, query: str, modality: str,
                kinds: list[str]) -> list[Hit]:
        hits = self.retriever.search(query, self.k, modality=modality, kinds=kinds)
        records.append(RetrievalRecord(stage=stage, query=query, kinds=kinds, modality=modality,
                                       hits=[h.to_dict() for h in hits]))
        return hits

    # -- reading a statement ---------------------------------------------------------------
    def _clause(self, text: str, statement: Statement, modality: str) -> Clause:
        tokens = tokenize(text[statement.start : statement.end], statement.start)
        gaps = [text[statement.start if i == 0 else tokens[i - 1].end : t.start] for i, t in enumerate(tokens)]
        gaps.append(text[tokens[-1].end if tokens else statement.start : statement.end])
        spans = self.terms.find(tokens)

        def valid(kind: str) -> list[Span]:
            return [s for s in spans if s.concept.kind == kind and self._valid(s.concept, modality)]

        findings = longest_first([s for s in spans if s.concept.kind == "finding"],
                                 rank=lambda s: 0 if self._valid(s.concept, modality) else 1)
        findings += self._measurements(text, statement, tokens, findings)
        findings += self._elliptical(tokens, findings)
        normals = [s for s in findings if s.concept.id == NORMAL_CONCEPT]
        findings = [s for s in findings if s.concept.id != NORMAL_CONCEPT]
        named = findings + normals
        # words inside a finding's name are not cues ("no acute abnormality" is a normal study, "new vessels" a finding)
        cues = [s for s in longest_first(valid("cue")) if not any(s.overlaps(f) for f in named)]
        return Clause(statement.index, statement.start, statement.end, tokens, gaps,
                      sorted(findings, key=lambda s: s.first), normals, longest_first(valid("anatomy")),
                      longest_first(valid("modifier")), cues)

    def _elliptical(self, tokens: list[Token], named: list[Span]) -> list[Span]:
        """ "paraseptal and centrilobular emphysema": the word before "and"/"or" with the head of the named
        finding is a name too (paraseptal emphysema); it is found where that word stands."""
        found = []
        for span in named:
            i = span.first - 2
            if span.stop - span.first < 2 or i < 0 or tokens[span.first - 1].norm not in ("and", "or"):
                continue
            if any(s.first <= i < s.stop for s in named + found):
                continue
            key = (tokens[i].norm, *(t.norm for t in tokens[span.first + 1 : span.stop]))
            for concept, form, _ in self.terms.forms.get(key, ()):
                if concept.kind == "finding":
                    found.append(Span(concept, i, i + 1, form, shares=span.first))
                    break
        return found

    def _measurements(self, text: str, statement: Statement, tokens: list[Token], named: list[Span]) -> list[Span]:
        found = []
        for pattern, finding, threshold in MEASUREMENTS:
            concept = self.concepts.get(finding)
            if concept is None:
                continue
            for m in pattern.finditer(text, statement.start, statement.end):
                if float(m.group(1)) <= threshold:
                    continue
                inside = [i for i, t in enumerate(tokens) if t.start < m.end() and t.end > m.start()]
                if not inside:
                    continue
                span = Span(concept, inside[0], inside[-1] + 1, m.group().strip())
                if not any(span.overlaps(s) for s in named + found):
                    found.append(span)
        return found

    # -- cue scopes --------------------------------------------------------------------------
    def _direction(self, cue: Span, clause: Clause) -> str:
        form = " ".join(t.norm for t in clause.tokens[cue.first : cue.stop])
        return "post" if form in POST_CUES else "both" if form in BOTH_CUES else "pre"

    def _item_breaks_list(self, clause: Clause, i: int) -> bool:
        """At a comma or "and" inside a scope: does the next item stand on its own ("large left PTX")?"""
        for j in range(i, len(clause.tokens)):
            if clause.covering(clause.findings, j):
                return False
            if clause.covering(clause.cues, j):
                return True
            word = clause.tokens[j].norm
            modifier = clause.covering(clause.modifiers, j)
            if word in ARTICLES or word.isdigit() or clause.covering(clause.anatomy, j) or \
                    (modifier and modifier.concept.attributes.get("axis") in ("severity", "laterality", "size")):
                return True
        return True  # no finding follows: nothing left to govern

    def _forward(self, clause: Clause, begin: int, kind: str) -> tuple[int, int] | None:
        """The words a cue before them governs, from token ``begin`` on: (first, last token) or None."""
        ends = NEGATION_ENDS if kind == "negation" else SCOPE_ENDS
        last, passed, gap, i = None, None, 0, begin
        while i < len(clause.tokens):
            word = clause.tokens[i].norm
            if word in ends or clause.covering(clause.cues, i):
                break
            if i > begin and clause.boundary_before(i) and self._item_breaks_list(clause, i):
                break
            if word in ("and", "plus") and self._item_breaks_list(clause, i + 1):
                break
            finding = clause.covering(clause.findings, i)
            if finding:
                last, gap, i = finding.stop - 1, 0, finding.stop
                continue
            gap = 0 if word in CONTINUE_LIST else gap + 1
            if gap > SCOPE_GAP:
                break
            passed = i
            i += 1
        # with no finding name in reach, the words passed are the scope: a finding said in other words
        # ("likely metastases") is still governed
        end = last if last is not None else passed
        return (begin, end) if end is not None else None

    def _backward(self, clause: Clause, end: int) -> tuple[int, int] | None:
        """The words a cue after them governs, before token ``end``: (first, last token) or None."""
        tokens = clause.tokens
        singular = any(0 <= j < len(tokens) and tokens[j].norm in SINGULAR for j in (end - 1, end))
        first, passed, gap, i = None, None, 0, end - 1
        while i >= 0 and gap <= SCOPE_GAP:
            if i + 1 < end and clause.boundary_before(i + 1):
                break
            word = tokens[i].norm
            if word in SCOPE_ENDS or word in ("with", "without") or (word == "and" and singular) \
                    or clause.covering(clause.cues, i):
                break
            finding = clause.covering(clause.findings, i)
            if finding:
                first, gap, i = finding.first, 0, finding.first - 1
                continue
            gap += 1
            passed = i
            i -= 1
        first = first if first is not None else passed
        return (first, end - 1) if first is not None else None

    def _scopes(self, clause: Clause) -> list[CueScope]:
        tokens = clause.tokens
        scopes: list[CueScope] = []

        def add(concept: Concept, cue_start: int, cue_end: int, governed: tuple[int, int] | None) -> None:
            a, b = (tokens[governed[0]].start, tokens[governed[1]].end) if governed else (cue_end, cue_end)
            scopes.append(CueScope(cue=concept.id, type=concept.attributes["type"], start=cue_start, end=cue_end,
                                   scope_start=a, scope_end=b))

        for cue in clause.cues:
            direction = self._direction(cue, clause)
            start, end = tokens[cue.first].start, tokens[cue.stop - 1].end
            if direction in ("pre", "both"):
                kind = cue.concept.attributes.get("type", "negation")
                add(cue.concept, start, end, self._forward(clause, cue.stop, kind))
            if direction in ("post", "both"):
                add(cue.concept, start, end, self._backward(clause, cue.first))
        # "?PTX" and "? RLL pneumonia" hedge what follows; "pneumothorax?" hedges what precedes
        for i, gap in enumerate(clause.gaps):
            if self._question_cue is None or "?" not in gap:
                continue
            at = (tokens[i - 1].end if i else clause.start) + gap.index("?")
            after_word = i > 0 and gap.startswith("?")
            governed = self._backward(clause, i) if after_word else self._forward(clause, i, "uncertainty")
            add(self._question_cue, at, at + 1, governed)
        return sorted(scopes, key=lambda s: (s.start, s.scope_start))

    # -- stage 1 -----------------------------------------------------------------------------
    def parse_request(self, text: str, modality: str) -> ParsedRequest:
        if text is None or not str(text).strip():
            raise StageError("empty request: the text is empty or only whitespace; describe the image to generate, "
                             "e.g. 'small left pleural effusion'")
        try:
            modality_id = resolve_modality(modality, self.modalities)
        except UnknownModalityError as exc:
            raise StageError(str(exc)) from None
        text = str(text)
        warnings = []
        kept = truncate(text, self.max_chars)
        if len(kept) < len(text):
            boundary = "statement" if kept[-1:] in ".;!?" else "word"
            warnings.append(f"request truncated: it has {len(text)} characters, more than max_chars={self.max_chars};"
                            f" kept the first {len(kept)} (to a {boundary} boundary) and dropped"
                            f" {len(text) - len(kept)}")
        statements = []
        for a, b in split_statements(kept, self._comma_cues):
            statement = Statement(index=len(statements), text=kept[a:b], start=a, end=b)
            clause = self._clause(kept, statement, modality_id)
            scopes = self._scopes(clause)
            statement.scopes = scopes
            statement.cues = list(dict.fromkeys(s.cue for s in scopes))
            statement.negated = any(s.type == "negation" for s in scopes)
            statement.uncertain = any(s.type == "uncertainty" for s in scopes)
            statements.append(statement)
        return ParsedRequest(text=kept, original_length=len(text), truncated=len(kept) < len(text),
                             modality=modality_id, modality_given=str(modality), statements=statements,
                             warnings=warnings)

    # -- stage 2 -----------------------------------------------------------------------------
    def localize_anatomy(self, request: ParsedRequest) -> AnatomyResult:
        """Places named in each statement; the retriever is asked about every statement that names a place or a
        side (its exact term matching finds the same places, and its scores and codes go into the mentions)."""
        records: list[RetrievalRecord] = []
        mentions = []
        for statement in request.statements:
            clause = self._clause(request.text, statement, request.modality)
            sided = any(m.concept.attributes.get("axis") == "laterality" for m in clause.modifiers)
            if not clause.anatomy and not sided:
                continue
            found = self._search(records, "localize_anatomy", statement.text, request.modality, ["anatomy"])
            hits = {h.id: h for h in found}
            for span in clause.anatomy:
                concept, hit = span.concept, hits.get(span.concept.id)
                tokens = clause.tokens[span.first : span.stop]
                mentions.append(AnatomyMention(
                    concept_id=concept.id, term=concept.term, location=concept.attributes.get("phantom_location"),
                    side=self._side.get(concept.id) or self._adjacent_side(clause, span), statement=statement.index,
                    matched=request.text[tokens[0].start : tokens[-1].end], score=round(hit.score, 4) if hit else 0.0,
                    source=concept.source, codes=dict(hit.codes if hit else concept.codes),
                    start=tokens[0].start, end=tokens[-1].end))
        return AnatomyResult(region=self.modalities[request.modality].region, mentions=mentions, retrievals=records)

    @staticmethod
    def _adjacent_side(clause: Clause, span: Span) -> str | None:
        """The side a laterality word right before the place gives it: "left frontal lobe"."""
        i = span.first - 1
        while i >= 0 and clause.tokens[i].norm == "the":
            i -= 1
        modifier = clause.covering(clause.modifiers, i) if i >= 0 else None
        if modifier and modifier.concept.attributes.get("axis") == "laterality":
            value = modifier.concept.attributes.get("value")
            return value if value in ("left", "right", "bilateral") else None
        return None

    # -- stage 3 -----------------------------------------------------------------------------
    def assess_pathology(self, request: ParsedRequest, anatomy: AnatomyResult) -> PathologyResult:
        modality = request.modality
        records: list[RetrievalRecord] = []
        warnings: list[str] = []
        foreign: list[str] = []
        mentions: list[FindingMention] = []
        normal = False
        clauses = [self._clause(request.text, statement, modality) for statement in request.statements]
        eye_sides = self._eye_sides(clauses, modality)
        for statement, clause in zip(request.statements, clauses):
            # a statement naming a finding is looked up as a whole; words no name holds, chunk by chunk (_unnamed)
            named = clause.findings or clause.normals
            hits = {h.id: h for h in self._search(records, "assess_pathology", statement.text, modality, ["finding"])} \
                if named else {}
            places = self._places(clause, anatomy, request.text)
            if self._says_normal(clause):
                normal = True
            spans: list[tuple[Span, Hit | None]] = []
            for span in clause.findings:
                if self._valid(span.concept, modality):
                    spans.append((span, hits.get(span.concept.id)))
                    continue
                read = self._foreign(clause, span, modality, request.text, records, warnings)
                if isinstance(read, str):
                    foreign.append(read)
                elif read is not None:
                    spans.append(read)
            spans += self._unnamed(clause, modality, request.text, records)
            for span, hit in spans:
                mentions.append(self._mention(clause, span, hit, statement, places, eye_sides, modality, request.text))
        if foreign:
            raise StageError(" ".join(dict.fromkeys(foreign)))

        findings = self._merge(mentions)
        contradictions = self._contradictions(findings, normal)
        for finding in findings:
            if finding.present and not finding.drawable:
                warnings.append(self._undrawable(finding, modality))
        return PathologyResult(findings=findings, normal=normal, contradictions=contradictions,
                               warnings=list(dict.fromkeys(warnings)), retrievals=records)

    @staticmethod
    def _eye_sides(clauses: list[Clause], modality: str) -> dict[int, str]:
        """Per statement, the eye it is about, for modalities with eye laterality (OD/OS/OU): an eye named
        once holds for the whole request; several eyes each hold for their own statement."""
        found: dict[int, set[str]] = {}
        for clause in clauses:
            for span in clause.modifiers:
                c = span.concept
                if c.attributes.get("axis") == "laterality" and c.modalities and modality in c.modalities:
                    found.setdefault(clause.index, set()).add(c.attributes["value"])
        values = {v for vs in found.values() for v in vs}
        if len(values) == 1:
            return {clause.index: next(iter(values)) for clause in clauses}
        return {i: next(iter(vs)) for i, vs in found.items() if len(vs) == 1}

    def _places(self, clause: Clause, anatomy: AnatomyResult, text: str) -> list[tuple[int, int, AnatomyMention]]:
        """The anatomy stage's mentions in this statement, as token ranges."""
        places = []
        for mention in anatomy.mentions:
            if mention.statement != clause.index:
                continue
            start, end = mention.start, mention.end
            if start is None or end is None:  # a mention from another backend: find its words
                at = text.find(mention.matched or mention.term, clause.start, clause.end)
                if at < 0:
                    continue
                start, end = at, at + len(mention.matched or mention.term)
            inside = [i for i, t in enumerate(clause.tokens) if t.start >= start and t.end <= end]
            if inside:
                places.append((inside[0], inside[-1] + 1, mention))
        return places

    def _says_normal(self, clause: Clause) -> bool:
        """The statement calls the whole study normal: a normal-study name ("no acute cardiopulmonary
        abnormality") or a normal word ("normal CXR", "healthy chest") with only study words around it in its
        run of words; "cardiomediastinal silhouette within normal limits", "normal heart size" and "otherwise
        unremarkable" are about a part."""
        if any(t.norm == "otherwise" for t in clause.tokens):
            return False
        return any(self._normal_words(clause, a, b) for a, b in clause.chunks())

    def _normal_words(self, clause: Clause, a: int, b: int) -> bool:
        named = {i for s in clause.normals if a <= s.first and s.stop <= b for i in range(s.first, s.stop)}
        words = [t.norm for i, t in enumerate(clause.tokens[a:b], a) if i not in named]
        return (bool(named) or any(w in NORMAL_WORDS for w in words)) and \
            all(w in NORMAL_WORDS or w in self._study_words or w in self._alias_words or w in TECHNIQUE_WORDS for w in words)

    def _foreign(self, clause: Clause, span: Span, modality: str, text: str, records,
                 warnings) -> tuple[Span, Hit | None] | str | None:
        """A name found only in other modalities: a one-word name shared with this modality's findings is
        read as one of them ("mass" on brain MRI); after a word of this modality it is some finding the
        lexicon lacks ("pulmonary haemorrhage" on chest CT) and is left out with a warning; otherwise the
        request asks for something this modality cannot show: a message saying so."""
        concept, tokens = span.concept, clause.tokens
        surface = text[tokens[span.first].start : tokens[span.stop - 1].end]
        if span.stop - span.first == 1:
            word = tokens[span.first].norm
            if word in self._vocabulary(modality, "finding"):
                phrase = self._chunk_text(clause, span.first, text)
                hits = self._search(records, "assess_pathology", phrase, modality, ["finding"])
                for hit in hits:
                    if hit.id in self.concepts and hit.id != NORMAL_CONCEPT and \
                            any(word in words_of(n) for n in self.concepts[hit.id].names()):
                        warnings.append(f"read {surface!r} as {self.concepts[hit.id].term} ({hit.id}) for {modality}")
                        return Span(self.concepts[hit.id], span.first, span.stop, surface), hit
            j = self._previous_content_word(clause, span.first)
            before = tokens[j].norm if j is not None else None
            own = {w for n in concept.names() for w in words_of(n)}
            content = before is not None and len(before) >= ANCHOR_MIN_CHARS and \
                before not in GENERIC_WORDS | CLAUSE_WORDS | self._study_words | self._alias_words
            if content and before not in own and (before in self._vocabulary(modality, "finding") or
                                                  before in self._vocabulary(modality, "anatomy")):
                warnings.append(f"{text[tokens[j].start : tokens[span.stop - 1].end]!r} names no finding "
                                f"the lexicon knows for {modality}; left out")
                return None
        where = ", ".join(concept.modalities)
        return (f"{surface!r} is {concept.term} ({concept.id}), a finding of {where}, not of {modality} "
                f"({self.modalities[modality].display_name}): choose one of {where} as the modality, "
                f"or remove it from the request.")

    @staticmethod
    def _previous_content_word(clause: Clause, i: int) -> int | None:
        """The word before token i, articles and modifiers skipped, in the same run of words."""
        j = i - 1
        while j >= 0 and not clause.boundary_before(j + 1) and \
                (clause.tokens[j].norm in ARTICLES or clause.covering(clause.modifiers, j)):
            j -= 1
        return j if j >= 0 and not clause.boundary_before(j + 1) else None

    @staticmethod
    def _chunk_text(clause: Clause, i: int, text: str) -> str:
        a, b = clause.chunk_of(i)
        return text[clause.tokens[a].start : clause.tokens[b - 1].end]

    def _unnamed(self, clause: Clause, modality: str, text: str, records) -> list[tuple[Span, Hit | None]]:
        """Findings said in words no name holds ("scattered haemorrhages", "the heart is enlarged"): in a run of
        words with no finding name, a word of a finding name of this modality asks the retriever, and the best
        hit whose names hold that word is taken."""
        excluded = self._vocabulary(modality, "anatomy") | self._vocabulary(modality, "modifier") | \
            self._vocabulary(modality, "cue") | GENERIC_WORDS | NORMAL_WORDS | TECHNIQUE_WORDS | self._study_words | self._alias_words
        found = []
        covered = clause.findings + clause.normals + clause.anatomy + clause.modifiers + clause.cues
        for a, b in clause.chunks():
            named = any(s.first < b and a < s.stop for s in clause.findings + clause.normals)
            # a part called normal ("a healthy neuroretinal rim", "normal heart size") names no finding by its words
            if named or any(t.norm in NORMAL_WORDS for t in clause.tokens[a:b]):
                continue
            anchors = [(j, word) for j in range(a, b) for word in [self._anchor(clause.tokens[j].norm, modality)]
                       if word and clause.tokens[j].norm not in excluded
                       and not any(s.first <= j < s.stop for s in covered)]
            if not anchors:
                continue
            hits = self._search(records, "assess_pathology", text[clause.tokens[a].start : clause.tokens[b - 1].end],
                                modality, ["finding"])
            candidates = []
            for rank, hit in enumerate(hits):
                concept = self.concepts.get(hit.id)
                if concept is None or hit.id == NORMAL_CONCEPT or hit.dense < FALLBACK_MIN_DENSE:
                    continue
                names = {w for n in concept.names() for w in words_of(n)}
                for j, word in anchors:
                    if word in names:  # the written word itself, or its correction, is in the finding's names
                        candidates.append((word != clause.tokens[j].norm, rank, j, concept, hit))
            if candidates:  # a word as written beats a corrected one ("haemorrhages" is retinal, not vitreous)
                _, _, j, concept, hit = min(candidates, key=lambda c: (c[0], c[1]))
                found.append((Span(concept, j, j + 1, clause.tokens[j].surface), hit))
        return found

    def _anchor(self, word: str, modality: str) -> str | None:
        """The finding-name word a written word is, as written or corrected, if any; a word the lexicon
        holds is never corrected (an ambiguous "opacity" must not become the misspelt "opasity")."""
        vocabulary = self._anchor_words(modality)
        if len(word) < ANCHOR_MIN_CHARS or word.isdigit():
            return None
        if word in vocabulary:
            return word
        if self.terms.knows(word):
            return None
        key = (word, modality)
        if key not in self._anchor_cache:
            close = difflib.get_close_matches(word, list(vocabulary), n=1, cutoff=self.terms.fuzzy_cutoff)
            self._anchor_cache[key] = close[0] if close else None
        return self._anchor_cache[key]

    def _anchor_words(self, modality: str) -> dict[str, set[str]]:
        """Words of this modality's finding names that point to one finding: held by at most two findings,
        or by findings of one is-a family whose root holds it too ("bleed": intracranial haemorrhage and its
        kinds); "opacity" (nodule, consolidation, ground glass) points to none."""
        if modality not in self._anchors:
            holders: dict[str, set[str]] = {}
            for c in self.concepts.values():
                if c.kind == "finding" and c.id != NORMAL_CONCEPT and self._valid(c, modality):
                    for w in {w for n in c.names() for w in words_of(n)}:
                        holders.setdefault(w, set()).add(c.id)
            self._anchors[modality] = {
                w: ids for w, ids in holders.items()
                if len(ids) <= 2 or any(all(root in self.lineage(i) for i in ids) for root in ids)}
        return self._anchors[modality]

    def lineage(self, cid: str) -> set[str]:
        """A concept and its is-a ancestors (a name the lexicon lacks: itself)."""
        return self._lineage(cid)

    # -- one finding's attributes ------------------------------------------------------------
    def _windows(self, clause: Clause, span: Span) -> tuple[list[int], list[int]]:
        """Token indices that may qualify a finding: before it (text order) and after it."""
        others = [s for s in clause.findings + clause.normals if s is not span and not s.overlaps(span)]
        stop_at = {i for s in others + clause.cues for i in range(s.first, s.stop)}
        partner = next((s for s in clause.findings if s.shares == span.first), None)
        begin = partner.first if partner is not None else span.first
        if partner is not None:
            stop_at -= set(range(partner.first, partner.stop))
        pre, i = [], begin - 1
        while i >= 0 and len(pre) < PRE_WINDOW and i not in stop_at and clause.tokens[i].norm not in CLAUSE_WORDS \
                and not clause.boundary_before(i + 1):
            pre.insert(0, i)
            i -= 1

        def qualifies(j: int) -> bool:  # past a comma only into words that qualify: "haemorrhage, moderate size"
            while j < len(clause.tokens):
                if j in stop_at or clause.tokens[j].norm in POST_WINDOW_ENDS:
                    return False
                j += 1
                if clause.boundary_before(j):
                    return True
            return True

        post, i = [], span.stop
        while i < len(clause.tokens) and len(post) < POST_WINDOW and i not in stop_at \
                and clause.tokens[i].norm not in POST_WINDOW_ENDS and (not clause.boundary_before(i) or qualifies(i)):
            post.append(i)
            i += 1
        return pre, post

    def _mention(self, clause: Clause, span: Span, hit: Hit | None, statement: Statement, places, eye_sides,
                 modality: str, text: str) -> FindingMention:
        concept = span.concept
        spec = self._finding_spec(modality, concept.id)
        first, last = clause.tokens[span.first], clause.tokens[span.stop - 1]
        negated, uncertain, cues = self._governed(statement, first.start)
        pre, post = self._windows(clause, span)
        severity = self._severity(clause, span, pre, post, spec)
        laterality = self._laterality(clause, span, pre, post, places, spec)
        if laterality is None and statement.index in eye_sides:
            laterality = eye_sides[statement.index]
        location = self._location(clause, pre, post, places, spec)
        return FindingMention(
            name=concept.id, term=concept.term, present=not negated, uncertain=uncertain, severity=severity,
            laterality=laterality, location=location, statement=statement.index, matched=text[first.start : last.end],
            score=round(hit.score, 4) if hit else 0.0, source=concept.source,
            codes=dict(hit.codes if hit else concept.codes), drawable=concept.id in self.drawable.get(modality, set()),
            cues=cues, start=first.start, end=last.end)

    @staticmethod
    def _governed(statement: Statement, at: int) -> tuple[bool, bool, list[str]]:
        """Negated, hedged, and by which cues: from the cue scopes, else (another backend) the statement's flags."""
        if not statement.scopes:
            return statement.negated, statement.uncertain, list(statement.cues)
        inside = [s for s in statement.scopes if s.scope_start <= at < s.scope_end]
        return (any(s.type == "negation" for s in inside), any(s.type == "uncertainty" for s in inside),
                list(dict.fromkeys(s.cue for s in inside)))

    def _inside(self, clause: Clause, span: Span, axis: str) -> str | None:
        """A modifier that is part of the finding's own name counts when the name without it is still a
        name of the finding ("moderate non-proliferative DR"), not otherwise ("small vessel disease")."""
        for modifier in clause.modifiers:
            inside = span.first <= modifier.first and modifier.stop <= span.stop
            if modifier.concept.attributes.get("axis") != axis or not inside:
                continue
            rest = tuple(t.norm for i, t in enumerate(clause.tokens[span.first : span.stop], span.first)
                         if not modifier.first <= i < modifier.stop)
            if any(c.id == span.concept.id for c, _, _ in self.terms.forms.get(rest, ())):
                return modifier.concept.attributes.get("value")
        return None

    @staticmethod
    def _phrase_in(tokens: list[Token], indices: list[int], phrases: Mapping[tuple[str, ...], str]) -> str | None:
        """The value of the longest phrase found in a run of tokens (indices in text order)."""
        words = [tokens[i].norm for i in indices]
        best = None
        for key, value in phrases.items():
            n = len(key)
            if any(tuple(words[j : j + n]) == key for j in range(len(words) - n + 1)) and (best is None or n > best[0]):
                best = (n, value)
        return best[1] if best else None

    def _severity(self, clause: Clause, span: Span, pre: list[int], post: list[int],
                  spec: FindingSpec | None) -> str | None:
        inside = self._inside(clause, span, "severity")
        if inside in SEVERITIES:
            return inside
        phrases = {}
        if spec is not None and spec.severities:
            levels = list(spec.severities)
            for level, words in spec.severity_words.items():  # macular hole grades small/medium/large: mild..severe
                value = level if level in SEVERITIES else \
                    SEVERITIES[min(levels.index(level), 2)] if level in levels else None
                for w in words:
                    if value and words_of(w):
                        phrases[words_of(w)] = value
        for window, order in ((pre, pre[::-1]), (post, post)):
            found = self._phrase_in(clause.tokens, window, phrases) if phrases else None
            if found:
                return found
            for i in order:
                modifier = clause.covering(clause.modifiers, i)
                if modifier and modifier.concept.attributes.get("axis") == "severity":
                    return modifier.concept.attributes.get("value")
        return None

    def _laterality(self, clause: Clause, span: Span, pre: list[int], post: list[int], places,
                    spec: FindingSpec | None) -> str | None:
        inside = self._inside(clause, span, "laterality")
        if inside in ("left", "right", "bilateral"):
            return inside
        for window in (pre[::-1], post):
            for i in window:
                modifier = clause.covering(clause.modifiers, i)
                if modifier is not None:
                    attrs = modifier.concept.attributes
                    if attrs.get("axis") == "laterality" and attrs.get("value") in ("left", "right", "bilateral"):
                        return attrs["value"]
                    # "bibasal", "biapical": both lungs
                    both_bases = clause.tokens[modifier.first].norm.startswith("bi")
                    if attrs.get("value") in ("basal", "apical") and both_bases:
                        return "bilateral"
                elif clause.tokens[i].norm == "both" and not clause.covering(clause.anatomy, i):
                    return "bilateral"
                place = next((m for a, b, m in places if a <= i < b), None)
                if place is not None and place.side:
                    return place.side
        if spec is not None and spec.bilateral_terms:  # "pleural effusions" is how the phantom says bilateral
            said = tuple(t.norm for t in clause.tokens[span.first : span.stop])
            if said in {words_of(t) for t in spec.bilateral_terms}:
                return "bilateral"
        return None

    def _location(self, clause: Clause, pre: list[int], post: list[int], places,
                  spec: FindingSpec | None) -> str | None:
        allowed = set(spec.locations) if spec is not None else set()
        window = pre + post
        if spec is not None and spec.location_words:
            phrases = {words_of(w): loc for loc, words in spec.location_words.items() for w in words if words_of(w)}
            found = self._phrase_in(clause.tokens, pre, phrases) or self._phrase_in(clause.tokens, post, phrases)
            if found:
                return found
        candidates = [m.location for a, b, m in places if m.location and any(a <= i < b for i in window)]
        preferred = [c for c in candidates if c in allowed]
        return (preferred or candidates or [None])[0]

    # -- the whole request -------------------------------------------------------------------
    @staticmethod
    def _compatible(a: FindingMention, b: FindingMention, fields=("laterality", "location", "severity")) -> bool:
        return all(getattr(a, f) is None or getattr(b, f) is None or getattr(a, f) == getattr(b, f) for f in fields)

    def _merge(self, mentions: list[FindingMention]) -> list[FindingMention]:
        """One mention per finding stated twice ("Cardiomegaly ... IMPRESSION: cardiomegaly"), attributes united."""
        merged: list[FindingMention] = []
        for mention in mentions:
            same = next((m for m in merged if m.name == mention.name and m.present == mention.present
                         and self._compatible(m, mention)), None)
            if same is None:
                merged.append(mention)
                continue
            update = {f: getattr(same, f) or getattr(mention, f) for f in ("laterality", "location", "severity")}
            update["uncertain"] = same.uncertain and mention.uncertain
            update["cues"] = list(dict.fromkeys(same.cues + mention.cues))
            update["score"] = max(same.score, mention.score)
            merged[merged.index(same)] = same.model_copy(update=update)
        return merged

    @staticmethod
    def _sides_meet(a: str | None, b: str | None) -> bool:
        return a is None or b is None or a == b or "bilateral" in (a, b)

    def _contradictions(self, findings: list[FindingMention], normal: bool) -> list[Contradiction]:
        out = []
        present = [f for f in findings if f.present]
        if normal and present:
            names = list(dict.fromkeys(f.name for f in present))
            out.append(Contradiction(
                kind="normal_with_findings", findings=names,
                message=f"the request calls the study normal but also asks for {', '.join(names)}"))
        for i, a in enumerate(findings):
            for b in findings[i + 1 :]:
                if a.name != b.name or not self._sides_meet(a.laterality, b.laterality) or \
                        (a.location and b.location and a.location != b.location):
                    continue
                if a.present != b.present:
                    out.append(Contradiction(kind="present_and_absent", findings=[a.name],
                                             message=f"{a.term} is both asked for and negated"))
                elif a.present and a.severity and b.severity and a.severity != b.severity:
                    out.append(Contradiction(kind="conflicting_attributes", findings=[a.name],
                                             message=f"{a.term} is said to be both {a.severity} and {b.severity}"))
        return out

    def _undrawable(self, finding: FindingMention, modality: str) -> str:
        ancestors, todo = [], list(self.concepts[finding.name].parents) if finding.name in self.concepts else []
        while todo:
            cid = todo.pop(0)
            if cid in self.concepts and cid not in ancestors:
                ancestors.append(cid)
                todo += self.concepts[cid].parents
        nearest = next((a for a in ancestors if a in self.drawable.get(modality, set())), None)
        hint = f"; the nearest finding it can draw is {nearest}" if nearest else ""
        return (f"{finding.term} ({finding.name}) is not among the findings the {modality} generator was trained on"
                f"{hint}")

    # -- stage 4 -----------------------------------------------------------------------------
    def map_visual_features(self, request: ParsedRequest, pathology: PathologyResult) -> VisualResult:
        modality = request.modality
        display = self.modalities[modality].display_name
        records: list[RetrievalRecord] = []
        descriptors = []
        for name in dict.fromkeys(f.name for f in pathology.findings if f.present):
            term = self.concepts[name].term if name in self.concepts else name.replace("_", " ")
            hits = self._search(records, "map_visual_features", f"{term} on {display}", modality, ["appearance"])
            hit = next((h for h in hits if h.finding == name), None)
            if hit is not None:
                description = (self._items.get(hit.id) or {}).get("description") or \
                    (self.concepts[hit.id].description if hit.id in self.concepts else "")
                descriptors.append(VisualDescriptor(finding=name, appearance_id=hit.id, description=description,
                                                    score=round(hit.score, 4)))
            else:  # no appearance for this pair: the finding's own definition is the best description there is
                descriptors.append(VisualDescriptor(finding=name, description=self.concepts[name].description
                                                    if name in self.concepts else ""))
        hits = self._search(records, "map_visual_features", request.text, modality, ["case"])
        cases = [{"id": h.id, "text": h.text, "score": round(h.score, 4), "source": h.source, "path": h.path,
                  "findings": h.findings} for h in hits]
        return VisualResult(descriptors=descriptors, cases=cases, retrievals=records)


__all__ = ["RuleReasoner", "TermIndex", "Token", "split_statements", "tokenize", "truncate"]
