"""The concept schema shared by the project's lexicon, the RadLex and SNOMED CT loaders and the index.

A concept is one medical idea with every name people use for it. Kinds:

- ``anatomy``: where (lung zones and lobes, brain lobes, optic disc, retinal layers, ...);
- ``finding``: what (pleural effusion, drusen, ...), with synonyms, abbreviations, misspellings;
- ``appearance``: how a finding looks on one modality (``finding`` names it, ``modalities`` has one entry);
- ``modifier``: severity, laterality, distribution, size words (``attributes["axis"]``, ``attributes["value"]``);
- ``cue``: negation and uncertainty words (``attributes["type"]`` is ``negation`` or ``uncertainty``).

Codes are only ever copied from a vocabulary or written where the team is sure of them; an
empty ``codes`` is honest, an invented code is a defect.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from generator.errors import UserError

Kind = Literal["anatomy", "finding", "appearance", "modifier", "cue"]
KINDS: tuple[str, ...] = ("anatomy", "finding", "appearance", "modifier", "cue")
CODE_SYSTEMS = ("radlex", "snomed")
CODE_PATTERNS = {"radlex": re.compile(r"^RID\d+$"), "snomed": re.compile(r"^\d{6,18}$")}
ID_PATTERN = re.compile(r"^(?:[a-z0-9][a-z0-9_.:@-]*|radlex:RID\d+)$")  # RadLex ids keep their native "RID"


@dataclass
class Concept:
    id: str  # unique: "pleural_effusion", "pleural_effusion@cxr", "radlex:RID34539", "snomed:60046008"
    kind: Kind
    term: str  # preferred term
    synonyms: list[str] = field(default_factory=list)  # other names, lay terms included
    abbreviations: list[str] = field(default_factory=list)  # "PTX", "CTR", "GGO"
    misspellings: list[str] = field(default_factory=list)  # common ones: "pnuemothorax"
    modalities: list[str] = field(default_factory=list)  # modality ids it applies to; empty: all
    codes: dict[str, str] = field(default_factory=dict)  # {"radlex": "RID5352", "snomed": "36118008"}
    parents: list[str] = field(default_factory=list)  # is-a parents, concept ids
    description: str = ""  # definition, or for an appearance how it looks on the modality
    finding: str | None = None  # for an appearance: the finding concept id it describes
    attributes: dict[str, str] = field(default_factory=dict)  # modifier axis/value, cue type, ...
    source: str = "lexicon"  # "lexicon", "radlex", "snomed", "cases"

    def names(self) -> list[str]:
        """Every surface form, preferred term first."""
        seen: dict[str, None] = {}
        for name in [self.term, *self.synonyms, *self.abbreviations, *self.misspellings]:
            if name and name not in seen:
                seen[name] = None
        return list(seen)

    def embedding_text(self) -> str:
        """What the embedder reads: the names, then the description."""
        names = "; ".join(self.names())
        return f"{names}. {self.description}".strip() if self.description else names

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "", [], {})} | {"id": self.id, "kind": self.kind, "term": self.term}

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "Concept":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"concept {d.get('id', '?')!r}: unknown field(s) {sorted(unknown)}")
        values = dict(d)
        for key in ("id", "term", "kind"):
            if not isinstance(values.get(key), str):
                # YAML reads a bare no/on/off/yes as a boolean: quote such terms
                raise UserError(f"concept {d.get('id', '?')!r}: {key} must be a string, got {values.get(key)!r} (quote it in YAML)")
        if source is not None and "source" not in values:
            values["source"] = source
        for key in ("synonyms", "abbreviations", "misspellings", "modalities", "parents"):
            values[key] = [str(v) for v in values.get(key) or []]
        values["codes"] = {str(k): str(v) for k, v in (values.get("codes") or {}).items()}
        values["attributes"] = {str(k): str(v) for k, v in (values.get("attributes") or {}).items()}
        return cls(**values)


def validate_concept(c: Concept, known_modalities: set[str] | None = None) -> list[str]:
    """Problems with one concept, as messages naming it (empty when it is sound)."""
    problems = []
    if not ID_PATTERN.match(c.id):
        problems.append(f"{c.id!r}: id must be lower-case letters, digits and _ . : @ - (or radlex:RID<digits>)")
    if c.kind not in KINDS:
        problems.append(f"{c.id!r}: kind {c.kind!r} is not one of {', '.join(KINDS)}")
    if not c.term.strip():
        problems.append(f"{c.id!r}: empty term")
    for system, code in c.codes.items():
        if system not in CODE_SYSTEMS:
            problems.append(f"{c.id!r}: unknown code system {system!r}; use {', '.join(CODE_SYSTEMS)}")
        elif not CODE_PATTERNS[system].match(code):
            problems.append(f"{c.id!r}: {system} code {code!r} is malformed")
    if known_modalities is not None:
        unknown = set(c.modalities) - known_modalities
        if unknown:
            problems.append(f"{c.id!r}: unknown modalities {sorted(unknown)}; known: {sorted(known_modalities)}")
    if c.kind == "appearance" and (not c.finding or len(c.modalities) != 1):
        problems.append(f"{c.id!r}: an appearance names its finding and exactly one modality")
    if c.kind == "modifier" and not {"axis", "value"} <= set(c.attributes):
        problems.append(f"{c.id!r}: a modifier has attributes axis and value")
    if c.kind == "cue" and c.attributes.get("type") not in ("negation", "uncertainty"):
        problems.append(f"{c.id!r}: a cue has attributes.type negation or uncertainty")
    return problems
