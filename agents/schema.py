"""What the reasoning stages hand each other: typed, validated, JSON-serialisable records.

Each stage of the graph (parse -> anatomy -> pathology -> visual features) returns one of these
models; the graph stores them in its state as plain dicts (``model_dump(mode="json")``), so that the
SQLite checkpointer keeps them readably and a trace shows exactly what each stage decided. The LLM
backend asks its chat model for these same models as structured output, so a stage's contract is
the same whichever backend ran it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from generator.errors import UserError

Laterality = Literal["left", "right", "bilateral"]
Severity = Literal["mild", "moderate", "severe"]
SEVERITY_ORDER: tuple[str, ...] = ("mild", "moderate", "severe")  # the order refinement escalates along


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageRecord(Record):
    """A reasoning stage's result. ``backend`` says who decided it ("rules", "llm", or "rules (llm fallback)");
    the backend sets it, the trace shows it, and it is not part of the schema a chat model is asked to fill."""

    backend: SkipJsonSchema[str] = "rules"


class RetrievalRecord(Record):
    """One retrieval call, as the trace shows it: the query, its filters and every hit returned."""

    stage: str  # localize_anatomy / assess_pathology / map_visual_features
    query: str
    kinds: list[str] = []
    modality: str | None = None
    hits: list[dict] = []  # knowledge.retriever.Hit.to_dict(): id, text, score, dense, exact, kind, source, codes, ...


class CueScope(Record):
    """One negation or uncertainty cue and the stretch of text it governs (character offsets into the request)."""

    cue: str  # cue concept id, e.g. "cue.neg.no"
    type: Literal["negation", "uncertainty"]
    start: int  # the cue's own words
    end: int
    scope_start: int  # the words it negates or hedges: "no [effusion or pneumothorax], but ..."
    scope_end: int


class Statement(Record):
    """One clause of the request, with its negation and uncertainty cues."""

    index: int
    text: str
    start: int  # character offsets into the (possibly truncated) request text
    end: int
    negated: bool = False  # "no effusion", "without pneumothorax", "resolved"
    uncertain: bool = False  # "possible", "cannot exclude", "?"
    cues: list[str] = []  # cue concept ids that fired, e.g. ["cue.neg.no"]
    scopes: list[CueScope] = []  # where each cue applies; one statement can hold a negated and a present finding


class ParsedRequest(StageRecord):
    """Stage 1: the request normalised."""

    text: str  # the text the stages read (after truncation)
    original_length: int  # characters in the request as given
    truncated: bool = False
    modality: str  # modality id, aliases resolved ("CXR" -> "cxr")
    modality_given: str  # what the user wrote
    statements: list[Statement]
    warnings: list[str] = []


class AnatomyMention(Record):
    """Stage 2: one place named in the request."""

    concept_id: str  # lexicon anatomy id, e.g. "right_lower_lobe"
    term: str
    location: str | None = None  # the phantom location id the concept maps to (attributes.phantom_location), if any
    side: Laterality | None = None  # the side the place lies on, if it has one
    statement: int  # index of the statement it was found in
    matched: str | None = None  # the surface form found in the text ("RLL")
    score: float = 0.0
    source: str = "lexicon"
    codes: dict[str, str] = {}
    start: int | None = None  # character offsets of `matched` in the request text, when known
    end: int | None = None


class AnatomyResult(StageRecord):
    region: str | None = None  # coarse region of the study, e.g. "chest", "brain", "retina"
    mentions: list[AnatomyMention] = []
    retrievals: list[RetrievalRecord] = []


class FindingMention(Record):
    """Stage 3: one normalised finding."""

    name: str  # lexicon finding id (= the phantom finding name where the generator knows it), e.g. "pleural_effusion"
    term: str  # preferred term
    present: bool = True  # False: negated ("no pneumothorax")
    uncertain: bool = False  # hedged ("possible", "cannot exclude")
    severity: Severity | None = None
    laterality: Laterality | None = None
    location: str | None = None  # phantom location id / anatomy id, e.g. "right_lower_lobe", "superotemporal"
    statement: int = 0  # index of the statement it came from
    matched: str | None = None  # surface form in the text ("PTX")
    score: float = 0.0  # retrieval score of the concept
    source: str = "lexicon"
    codes: dict[str, str] = {}  # RadLex / SNOMED CT codes, only as the vocabulary gives them
    drawable: bool = True  # the generator of this profile was trained on it (phantom catalogue of the modality)
    cues: list[str] = []  # cue concept ids that negate or hedge this finding
    start: int | None = None  # character offsets of `matched` in the request text, when known
    end: int | None = None


class Contradiction(Record):
    kind: Literal["normal_with_findings", "present_and_absent", "conflicting_attributes"]
    findings: list[str]  # finding names involved
    message: str


class PathologyResult(StageRecord):
    findings: list[FindingMention] = []
    normal: bool = False  # the request describes a normal study
    contradictions: list[Contradiction] = []
    warnings: list[str] = []
    retrievals: list[RetrievalRecord] = []


class VisualDescriptor(Record):
    finding: str  # finding name
    appearance_id: str | None = None  # lexicon appearance concept (<finding>@<modality>)
    description: str = ""  # how it looks on this modality
    score: float = 0.0


class VisualResult(StageRecord):
    descriptors: list[VisualDescriptor] = []
    cases: list[dict] = Field(default_factory=list)  # similar cases: id, text, score, source, path, findings
    retrievals: list[RetrievalRecord] = []


class StageError(UserError):
    """A request the stages cannot honour (unknown modality, empty text, a finding foreign to the modality,
    a contradiction configured to refuse). The message says what was wrong and how to fix it."""


__all__ = [
    "AnatomyMention", "AnatomyResult", "Contradiction", "CueScope", "FindingMention", "Laterality", "ParsedRequest",
    "PathologyResult", "RetrievalRecord", "SEVERITY_ORDER", "Severity", "StageError", "StageRecord", "Statement", "VisualDescriptor", "VisualResult",
]
