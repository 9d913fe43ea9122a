"""SNOMED CT, from an RF2 Snapshot release, loaded into :class:`~knowledge.schema.Concept`.

Format: RF2 (Release Format 2) as in SNOMED International's Release File Specification, the
layout of the International Edition since 2017 (e.g. ``SnomedCT_InternationalRF2_PRODUCTION_
20250101T120000Z``) and of national editions built on it. Files are UTF-8, tab-separated, with a
header row; none of their fields is quoted (terms may hold ``"``). Read, found by name anywhere
under the folder given (the release puts them in ``Snapshot/Terminology/`` and
``Snapshot/Refset/Language/``), or passed as a list of paths:

- ``sct2_Concept_Snapshot_*.txt``: concept ids and their ``active`` flag;
- ``sct2_Description_Snapshot-<lang>_*.txt``: fully specified names (FSN, typeId
  900000000000003001) and synonyms (900000000000013009);
- ``sct2_Relationship_Snapshot_*.txt``: the inferred relationships, of which only is-a
  (116680003) is read;
- optional ``der2_cRefset_LanguageSnapshot-<lang>_*.txt``: which synonym is preferred
  (900000000000548007) in a dialect (US English 900000000000509007 by default, GB English
  900000000000508004);
- optional ``sct2_TextDefinition_Snapshot-<lang>_*.txt``: definitions, where a concept has one.

Only active rows count (``active == "1"``) in every file; inactive concepts are dropped unless
``active_only=False`` (they are then marked ``attributes["status"] = "inactive"``).
Kept per concept: the preferred term (the dialect's preferred synonym, else the FSN without
its semantic tag), every other active synonym and the FSN without its tag as synonyms, the text
definition, is-a parents. Kind comes from the FSN's semantic tag (:data:`SEMANTIC_TAGS`):
body structure -> anatomy; disorder, finding, morphologic abnormality -> finding; qualifier value
-> modifier, with ``attributes`` ``axis`` (the name of its ancestor two levels under the root,
e.g. "severities") and ``value`` (its term). Concepts with any other tag (procedure, substance,
organism, ...) are skipped and counted. Dropped: every other relationship type, descriptions
in other languages, acceptability beyond "preferred", history and other refsets.

Streaming: files are read line by line, keeping only what the result needs: the concept ids,
the is-a graph, the ids of preferred descriptions in the chosen dialect, and the names of the
concepts that the ``roots`` filter lets through (all of them when there is none).

Ids: ``snomed:<sctid>``, codes ``{"snomed": sctid}``, source ``"snomed"``.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from generator.errors import UserError

from .schema import Concept
from .vocab_utils import descendants, unique_names

log = logging.getLogger(__name__)

FSN = "900000000000003001"
SYNONYM = "900000000000013009"
DEFINITION = "900000000000550004"
PREFERRED = "900000000000548007"
ACCEPTABLE = "900000000000549004"
US_ENGLISH = "900000000000509007"
GB_ENGLISH = "900000000000508004"
IS_A = "116680003"
ROOT = 138875005  # SNOMED CT Concept

DIALECTS = {"en": US_ENGLISH, "en-us": US_ENGLISH, "en-gb": GB_ENGLISH}
SEMANTIC_TAGS: dict[str, str] = {
    "body structure": "anatomy",
    "disorder": "finding",
    "finding": "finding",
    "morphologic abnormality": "finding",
    "qualifier value": "modifier",
}
SNOMED_KINDS = ("anatomy", "finding", "modifier")

_COMPONENT = ("id", "effectiveTime", "active", "moduleId")
_DESCRIPTION = (*_COMPONENT, "conceptId", "languageCode", "typeId", "term", "caseSignificanceId")
COLUMNS: dict[str, tuple[str, ...]] = {
    "concept": (*_COMPONENT, "definitionStatusId"),
    "description": _DESCRIPTION,
    "text_definition": _DESCRIPTION,
    "language": (*_COMPONENT, "refsetId", "referencedComponentId", "acceptabilityId"),
    "relationship": (
        *_COMPONENT, "sourceId", "destinationId", "relationshipGroup", "typeId", "characteristicTypeId", "modifierId"
    ),
}
# File name patterns; "*Snapshot" also admits editions that tag it (UK: "UKCLSnapshot").
PATTERNS: dict[str, str] = {
    "concept": "sct2_Concept_*Snapshot_*.txt",
    "description": "sct2_Description_*Snapshot-{lang}_*.txt",
    "text_definition": "sct2_TextDefinition_*Snapshot-{lang}_*.txt",
    "language": "der2_cRefset_Language*Snapshot-{lang}_*.txt",
    "relationship": "sct2_Relationship_*Snapshot_*.txt",
}
REQUIRED = ("concept", "description", "relationship")

_TAG = re.compile(r"\s*\(([^()]+)\)\s*$")


class SnomedError(UserError):
    """Malformed or missing RF2 input; the message names the file and the line."""


@dataclass(slots=True)
class _Names:
    fsn: str = ""
    fsn_preferred: bool = False
    preferred: str = ""
    synonyms: list[str] = field(default_factory=list)


def load_snomed_rf2(
    folder_or_files: str | Path | Iterable[str | Path],
    language: str = "en",
    kinds: Iterable[str] | None = None,
    roots: Iterable[str | int] | None = None,
    active_only: bool = True,
    *,
    refset_id: str | None = None,
    semantic_tags: Mapping[str, str] | None = None,
    stats: dict[str, int] | None = None,
) -> list[Concept]:
    """Concepts of an RF2 Snapshot, in concept-file order.

    ``folder_or_files``: the release (or its Snapshot folder), or the RF2 files themselves.
    ``language``: "en" (US preferred terms), "en-US" or "en-GB"; the part before "-" picks the
    description files. ``refset_id`` overrides the language refset (another dialect).
    ``kinds``: keep only these (anatomy, finding, modifier). ``roots``: keep only these concepts
    and their descendants. ``active_only``: drop inactive concepts. ``semantic_tags``: tag ->
    kind, replacing :data:`SEMANTIC_TAGS`. ``stats``, if given, is filled with counts of what
    was kept and skipped.
    """
    lang = language.lower().split("-")[0]
    refset = refset_id or DIALECTS.get(language.lower())
    tag_kinds = {t.lower(): k for t, k in (SEMANTIC_TAGS if semantic_tags is None else semantic_tags).items()}
    if set(tag_kinds.values()) - set(SNOMED_KINDS):
        unknown = sorted(set(tag_kinds.values()) - set(SNOMED_KINDS))
        raise SnomedError(f"semantic_tags map to unknown kind(s) {unknown}")
    wanted_kinds = set(kinds or ())
    if wanted_kinds - set(SNOMED_KINDS):
        unknown = sorted(wanted_kinds - set(SNOMED_KINDS))
        raise SnomedError(f"unknown kind(s) {unknown}; SNOMED CT gives {', '.join(SNOMED_KINDS)}")
    root_ids = [_norm_sctid(r) for r in roots or ()]
    files = _release_files(folder_or_files, lang)
    counts: Counter = Counter()

    # 1. Concepts: id -> active, in file order (the order of the result).
    status: dict[int, bool] = {}
    for path in files["concept"]:
        for line, row in _rows(path, "concept"):
            active = _active(row[2], path, line)
            if active or not active_only:
                status[_int(row[0], path, line, "id")] = active
            else:
                counts["inactive_concepts"] += 1

    # 2. Active is-a relationships between loaded concepts.
    parents: dict[int, list[int]] = defaultdict(list)
    for path in files["relationship"]:
        for line, row in _rows(path, "relationship"):
            if row[7] != IS_A:
                continue
            if not _active(row[2], path, line):
                counts["inactive_is_a"] += 1
                continue
            source, target = _int(row[4], path, line, "sourceId"), _int(row[5], path, line, "destinationId")
            if source in status and target in status and target not in parents[source]:
                parents[source].append(target)
    children: dict[int, list[int]] = defaultdict(list)
    for child, ps in parents.items():
        for parent in ps:
            children[parent].append(child)

    allowed: set[int] | None = None
    if root_ids:
        unknown = [r for r in root_ids if r not in status]
        if unknown:
            where = ", ".join(str(p) for p in files["concept"])
            raise SnomedError(f"root(s) {unknown} are not {'active ' if active_only else ''}concepts of {where}")
        allowed = descendants(children, root_ids)
    # Candidate modifier axes: the concepts two levels under the root ("Severities" under "Qualifier value").
    axis_candidates = {g for top in children.get(ROOT, ()) for g in children.get(top, ())}

    # 3. Language refset: the descriptions preferred in the chosen dialect.
    preferred: set[int] = set()
    refset_rows = 0
    for path in files["language"] if refset else ():
        for line, row in _rows(path, "language"):
            if row[4] != refset:
                continue
            refset_rows += 1
            if _active(row[2], path, line) and row[6] == PREFERRED:
                preferred.add(_int(row[5], path, line, "referencedComponentId"))
            elif row[2] == "0":
                counts["inactive_refset_rows"] += 1
    if refset and files["language"] and not refset_rows:
        where = ", ".join(map(str, files["language"]))
        log.warning("no rows of language refset %s in %s: preferred terms fall back to FSNs", refset, where)

    # 4. Descriptions of the concepts that may be kept (and of the axis candidates).
    names: dict[int, _Names] = {}
    for path in files["description"]:
        for line, row in _rows(path, "description"):
            if not _active(row[2], path, line):
                counts["inactive_descriptions"] += 1
                continue
            type_id = row[6]
            if type_id != FSN and type_id != SYNONYM:
                continue
            concept = _int(row[4], path, line, "conceptId")
            if concept not in status:
                continue
            if allowed is not None and concept not in allowed and concept not in axis_candidates:
                continue
            if row[5].lower().split("-")[0] != lang:
                continue
            entry = names.get(concept)
            if entry is None:
                entry = names[concept] = _Names()
            term = " ".join(row[7].split())
            is_preferred = bool(preferred) and _int(row[0], path, line, "id") in preferred
            if type_id == FSN:
                if not entry.fsn or (is_preferred and not entry.fsn_preferred):  # one FSN per dialect
                    entry.fsn, entry.fsn_preferred = term, is_preferred
            else:
                entry.synonyms.append(term)
                if is_preferred and not entry.preferred:
                    entry.preferred = term

    # 5. Kinds from semantic tags, then the filters.
    selected: dict[int, str] = {}
    skipped_tags: Counter = Counter()
    for concept in status:
        if allowed is not None and concept not in allowed:
            counts["outside_roots"] += 1
            continue
        entry = names.get(concept)
        if entry is None or not entry.fsn:
            counts["no_fsn"] += 1
            continue
        tag = _semantic_tag(entry.fsn)
        kind = tag_kinds.get(tag.lower())
        if kind is None:
            counts["other_semantic_tags"] += 1
            skipped_tags[tag or "(none)"] += 1
        elif wanted_kinds and kind not in wanted_kinds:
            counts["other_kinds"] += 1
        else:
            selected[concept] = kind
    if skipped_tags:
        log.info("skipped semantic tags: %s", ", ".join(f"{t} {n}" for t, n in skipped_tags.most_common()))

    axis: dict[int, int] = {}
    for candidate in sorted(axis_candidates):
        entry = names.get(candidate)
        if entry and tag_kinds.get(_semantic_tag(entry.fsn).lower()) == "modifier":
            for concept in descendants(children, [candidate]):
                axis.setdefault(concept, candidate)

    # 6. Text definitions of the kept concepts (optional file).
    definitions: dict[int, str] = {}
    for path in files["text_definition"]:
        for line, row in _rows(path, "text_definition"):
            if row[2] != "1" or row[6] != DEFINITION or row[5].lower().split("-")[0] != lang:
                continue
            concept = _int(row[4], path, line, "conceptId")
            if concept in selected and (concept not in definitions or _int(row[0], path, line, "id") in preferred):
                definitions[concept] = " ".join(row[7].split())

    concepts: list[Concept] = []
    for concept, kind in selected.items():
        entry = names[concept]
        fsn_term = _strip_tag(entry.fsn)
        term = entry.preferred or fsn_term
        attributes: dict[str, str] = {}
        if kind == "modifier":
            axis_entry = names.get(axis[concept]) if concept in axis else None
            axis_name = (axis_entry.preferred or _strip_tag(axis_entry.fsn)) if axis_entry else _semantic_tag(entry.fsn)
            attributes = {"axis": axis_name.lower(), "value": term}
        if not status[concept]:
            attributes["status"] = "inactive"
        concepts.append(
            Concept(
                id=f"snomed:{concept}",
                kind=kind,  # type: ignore[arg-type]
                term=term,
                synonyms=unique_names([*entry.synonyms, fsn_term], exclude=term),
                codes={"snomed": str(concept)},
                parents=[f"snomed:{p}" for p in parents.get(concept, ())],
                description=definitions.get(concept, ""),
                attributes=attributes,
                source="snomed",
            )
        )
    counts["concepts"] = len(concepts)
    log.info("SNOMED CT: %s", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if stats is not None:
        stats.update(counts)
    return concepts


def _release_files(folder_or_files: str | Path | Iterable[str | Path], lang: str) -> dict[str, list[Path]]:
    """The RF2 files by role: found by name under a folder, or sorted out of a list of paths."""
    patterns = {role: pattern.format(lang=lang) for role, pattern in PATTERNS.items()}
    files: dict[str, list[Path]] = {role: [] for role in PATTERNS}
    if isinstance(folder_or_files, (str, Path)) and Path(folder_or_files).is_dir():
        folder = Path(folder_or_files)
        for role, pattern in patterns.items():
            found = sorted(folder.rglob(pattern))
            if len(found) > 1:  # two releases side by side: refuse to guess
                names = [str(p) for p in found]
                raise SnomedError(f"{folder}: several {pattern} files: {names}; pass the files to load explicitly")
            files[role] = found
        where = str(folder)
    else:
        paths = [Path(folder_or_files)] if isinstance(folder_or_files, (str, Path)) else [Path(p) for p in folder_or_files]
        for path in paths:
            if not path.is_file():
                raise SnomedError(f"{path}: no such file")
            role = next((r for r, pattern in patterns.items() if path.match(pattern)), None)
            if role is None:
                expected = sorted(patterns.values())
                raise SnomedError(f"{path}: not an RF2 Snapshot file this loader reads; expected names like {expected}")
            files[role].append(path)
        where = ", ".join(map(str, paths))
    missing = [patterns[role] for role in REQUIRED if not files[role]]
    if missing:
        raise SnomedError(f"{where}: missing RF2 Snapshot file(s) {missing}")
    return files


def _rows(path: Path, role: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every data row, the header checked and each row's width too."""
    expected = COLUMNS[role]
    width = len(expected)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)  # RF2 never quotes: '"' is text
        try:
            header = next(reader, None)
            if header is None:
                raise SnomedError(f"{path}: empty file, expected the RF2 header row")
            if tuple(h.strip() for h in header) != expected:
                raise SnomedError(
                    f"{path}, line 1: not an RF2 {role} file: expected columns {list(expected)}, found {header}"
                )
            for row in reader:
                if len(row) != width:
                    if not row or row == [""]:
                        continue  # blank line
                    found = len(row)
                    raise SnomedError(f"{path}, line {reader.line_num}: expected {width} tab-separated columns, found {found}")
                yield reader.line_num, row
        except UnicodeDecodeError as exc:
            raise SnomedError(f"{path}, near line {reader.line_num + 1}: not UTF-8 ({exc.reason})") from None
        except csv.Error as exc:
            raise SnomedError(f"{path}, line {reader.line_num}: {exc}") from None


def _active(value: str, path: Path, line: int) -> bool:
    if value == "1":
        return True
    if value == "0":
        return False
    raise SnomedError(f"{path}, line {line}: active must be 0 or 1, found {value!r}")


def _int(value: str, path: Path, line: int, column: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SnomedError(f"{path}, line {line}: {column} {value!r} is not an SCTID") from None


def _norm_sctid(value: str | int) -> int:
    text = str(value).strip()
    text = text.split(":", 1)[1] if text.lower().startswith("snomed:") else text
    if not text.isdigit():
        raise SnomedError(f"{value!r} is not an SCTID")
    return int(text)


def _semantic_tag(fsn: str) -> str:
    """'disorder' from 'Pneumothorax (disorder)'; '' when the FSN has none."""
    match = _TAG.search(fsn)
    return match.group(1).strip() if match else ""


def _strip_tag(fsn: str) -> str:
    match = _TAG.search(fsn)
    return fsn[: match.start()].strip() if match and match.start() > 0 else fsn



