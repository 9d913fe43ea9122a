"""RadLex, the RSNA radiology lexicon, loaded into :class:`~knowledge.schema.Concept`.

Two formats are read; both go through the same classification.

- ``RadLex.owl`` as RSNA distributes it (RadLex 4.x: OWL in RDF/XML, written by the OWL API),
  also ``.owl.gz`` or the ``.zip`` RSNA ships. Classes are ``owl:Class`` elements or
  ``rdf:Description`` elements typed ``owl:Class``, with ``rdf:about`` ending in ``RID<digits>``
  (``http://www.radlex.org/RID/RID5352``; the older ``.../RID/#RID5352`` and BioPortal's
  ``http://radlex.org/RID/RID5352`` are accepted too). Names come from RadLex's own annotation
  properties ``Preferred_name``, ``Synonym`` and ``Definition`` (namespace
  ``http://www.radlex.org/RID/``, matched by local name) in the chosen ``xml:lang``, falling back
  to ``skos:prefLabel``/``skos:altLabel``/``skos:definition`` and ``rdfs:label`` (RadLex's
  ``rdfs:label`` is the RID itself, so a label that is a RID is never a name). RadLex's
  ``Preferred_name`` is English: with another language the term stays English and only the
  synonyms and definitions follow the language.
- The BioPortal CSV export of RADLEX (``RADLEX.csv``, or ``.csv.gz``): columns ``Class ID``,
  ``Preferred Label``, ``Synonyms`` (``|``-separated), ``Definitions``, ``Obsolete``, ``Parents``
  (``|``-separated IRIs); a BOM and any other columns (CUI, Semantic Types, property IRIs) are
  tolerated. BioPortal's synonyms carry no language, so German synonyms are kept.

Kept: the preferred name, synonyms (other preferred names, ``Synonym``, ``skos:altLabel``), the
first definition, is-a parents (``rdfs:subClassOf`` naming a class; restrictions such as
``Part_Of`` are not is-a and are dropped). Dropped: obsolete classes (``owl:deprecated true``,
an ``Obsolete`` column that is true, a RadLex ``*Obsolete*`` or ``Replaced_by`` annotation, a
name starting with "obsolete"), names in other languages (``Preferred_name_German`` etc.),
classes outside the mapped branches (procedures, devices, modalities, ...), and every other
annotation (FMAID, UMLS ids, comments, ...).

Kind comes from ancestry, so the file is read twice, streaming, never holding the tree: the first
pass keeps only ``RID -> parents``; the graph then decides each class's kind and whether
``roots`` reach it; the second pass keeps the names of the selected classes only. Branches
(:data:`BRANCHES`): RID3 anatomical entity -> anatomy; RID5 imaging observation and RID34785
clinical finding -> finding; RID6 RadLex descriptor -> modifier. A class under two branches takes
the first in that order. A modifier gets ``attributes`` ``axis`` (the name of its ancestor right
under RID6, e.g. "severity descriptor" -> "severity") and ``value`` (its own name).

Ids: ``radlex:RID5352`` (the RID as RadLex writes it), codes
``{"radlex": "RID5352"}``, source ``"radlex"``. Parents are kept when they name a live class of
the file, even one that a ``kinds`` or ``roots`` filter leaves out of the result.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import re
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from generator.errors import UserError

from .schema import Concept
from .vocab_utils import descendants, unique_names

log = logging.getLogger(__name__)

RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
RDFS = "{http://www.w3.org/2000/01/rdf-schema#}"
OWL = "{http://www.w3.org/2002/07/owl#}"
SKOS = "{http://www.w3.org/2004/02/skos/core#}"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
OWL_CLASS_IRI = "http://www.w3.org/2002/07/owl#Class"
_STANDARD_NS = (RDF, RDFS, OWL, SKOS)

# Top-level RadLex branches and the kind their descendants get, in priority order.
BRANCHES: dict[str, str] = {
    "RID5": "finding",  # imaging observation
    "RID34785": "finding",  # clinical finding
    "RID3": "anatomy",  # anatomical entity
    "RID6": "modifier",  # RadLex descriptor
}
RADLEX_KINDS = ("anatomy", "finding", "modifier")
CSV_COLUMNS = ("Class ID", "Preferred Label", "Synonyms", "Definitions", "Obsolete", "Parents")

_RID = re.compile(r"RID\d+")


class RadLexError(UserError):
    """Malformed RadLex input or arguments; the message names the file and the line."""


def radlex_concept_id(rid: str) -> str:
    """The concept id of a RID: ``RID5352`` -> ``radlex:RID5352``."""
    return f"radlex:{rid.upper()}"


@dataclass(slots=True)
class _Entry:
    """One class as read from the file."""

    rid: str
    line: int
    parents: list[str]
    term: str = ""
    synonyms: list[str] = field(default_factory=list)
    definition: str = ""
    obsolete: bool = False


@dataclass
class _Plan:
    kind: dict[str, str]  # selected RID -> kind, in file order
    axis: dict[str, str]  # modifier RID -> the RID of its axis class
    wanted: set[str]  # RIDs whose names the second pass keeps


def load_radlex_owl(
    path: str | Path,
    kinds: Iterable[str] | None = None,
    roots: Iterable[str | int] | None = None,
    *,
    language: str | None = "en",
    branches: Mapping[str, str] | None = None,
    stats: dict[str, int] | None = None,
) -> list[Concept]:
    """Concepts of a RadLex OWL (RDF/XML) file, in file order.

    ``kinds``: keep only these (anatomy, finding, modifier). ``roots``: keep only these RIDs
    ("RID1301", "radlex:RID1301", an IRI or 1301) and their descendants. ``language``: the
    ``xml:lang`` kept for names (None: all). ``branches``: RID -> kind, replacing
    :data:`BRANCHES`. ``stats``, if given, is filled with counts of what was kept and skipped.
    """
    path = Path(path)
    return _load(path, lambda counts: _owl_entries(path, language, counts), kinds, roots, branches, stats)


def load_radlex_csv(
    path: str | Path,
    kinds: Iterable[str] | None = None,
    roots: Iterable[str | int] | None = None,
    *,
    branches: Mapping[str, str] | None = None,
    stats: dict[str, int] | None = None,
) -> list[Concept]:
    """Concepts of a BioPortal RadLex CSV export, in file order; arguments as :func:`load_radlex_owl`."""
    path = Path(path)
    return _load(path, lambda counts: _csv_entries(path, counts), kinds, roots, branches, stats)


# --- shared: two passes, classification, concepts ------------------------------------------


def _load(
    path: Path,
    entries: Callable[[Counter], Iterator[_Entry]],
    kinds: Iterable[str] | None,
    roots: Iterable[str | int] | None,
    branches: Mapping[str, str] | None,
    stats: dict[str, int] | None,
) -> list[Concept]:
    if not path.is_file():
        raise RadLexError(f"{path}: no such file")
    wanted_kinds = set(kinds or ())
    if wanted_kinds - set(RADLEX_KINDS):
        unknown = sorted(wanted_kinds - set(RADLEX_KINDS))
        raise RadLexError(f"unknown kind(s) {unknown}; RadLex gives {', '.join(RADLEX_KINDS)}")
    branch_kinds = {_norm_rid(r): k for r, k in (BRANCHES if branches is None else branches).items()}
    if set(branch_kinds.values()) - set(RADLEX_KINDS):
        raise RadLexError(f"branches map to unknown kind(s) {sorted(set(branch_kinds.values()) - set(RADLEX_KINDS))}")
    root_rids = [_norm_rid(r) for r in roots or ()]

    # Pass 1: the parent graph only (cheap), in file order.
    counts: Counter = Counter()
    graph: dict[str, list[str]] = {}
    obsolete: set[str] = set()
    for entry in entries(counts):
        parents = graph.setdefault(entry.rid, [])
        for parent in entry.parents:
            if parent not in parents:
                parents.append(parent)
        if entry.obsolete:
            obsolete.add(entry.rid)
    if not graph:
        raise RadLexError(f"{path}: no RadLex classes (IRIs ending in RID<digits>) found")

    plan = _plan(path, graph, obsolete, wanted_kinds, root_rids, branch_kinds, counts)

    # Pass 2: names of the selected classes and of the modifier axis classes.
    records: dict[str, _Entry] = {}
    for entry in entries(Counter()):
        if entry.rid not in plan.wanted:
            continue
        known = records.get(entry.rid)
        if known is None:
            records[entry.rid] = entry
        else:  # the same class described twice: merge
            if not known.term:
                known.term = entry.term
            elif entry.term and entry.term != known.term:
                known.synonyms.append(entry.term)
            known.synonyms += entry.synonyms
            known.definition = known.definition or entry.definition

    concepts: list[Concept] = []
    for rid, kind in plan.kind.items():
        entry = records.get(rid)
        if entry is None or not entry.term:
            counts["unnamed"] += 1
            continue
        attributes: dict[str, str] = {}
        if kind == "modifier":
            axis_rid = plan.axis.get(rid, rid)
            axis = records.get(axis_rid)
            axis_term = axis.term if axis and axis.term else entry.term
            # "severity descriptor" -> "severity"; a branch root keeps its whole name
            name = axis_term.lower() if axis_rid in branch_kinds else _axis_name(axis_term)
            attributes = {"axis": name, "value": entry.term}
        concepts.append(
            Concept(
                id=radlex_concept_id(rid),
                kind=kind,  # type: ignore[arg-type]
                term=entry.term,
                synonyms=unique_names(entry.synonyms, exclude=entry.term),
                codes={"radlex": rid},
                parents=[radlex_concept_id(p) for p in graph[rid] if p in graph and p not in obsolete],
                description=entry.definition,
                attributes=attributes,
                source="radlex",
            )
        )
    counts["concepts"] = len(concepts)
    log.info("%s: %s", path.name, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if stats is not None:
        stats.update(counts)
    return concepts


def _plan(
    path: Path,
    graph: dict[str, list[str]],
    obsolete: set[str],
    kinds: set[str],
    roots: list[str],
    branches: dict[str, str],
    counts: Counter,
) -> _Plan:
    children: dict[str, list[str]] = defaultdict(list)
    for rid, parents in graph.items():
        for parent in parents:
            children[parent].append(rid)
    kind_of: dict[str, str] = {}
    for branch, kind in branches.items():  # priority order: the first branch reaching a class wins
        for rid in descendants(children, [branch]):
            kind_of.setdefault(rid, kind)
    allowed: set[str] | None = None
    if roots:
        unknown = [r for r in roots if r not in graph and r not in children]
        if unknown:
            raise RadLexError(f"{path}: root(s) {unknown} are not classes of this file")
        allowed = descendants(children, roots)

    selected: dict[str, str] = {}
    for rid in graph:
        kind = kind_of.get(rid)
        if rid in obsolete:
            counts["obsolete"] += 1
        elif kind is None:
            counts["outside_branches"] += 1
        elif allowed is not None and rid not in allowed:
            counts["outside_roots"] += 1
        elif kinds and kind not in kinds:
            counts["other_kinds"] += 1
        else:
            selected[rid] = kind

    # A modifier's axis is its ancestor right under a modifier branch root (e.g. "severity descriptor").
    axis: dict[str, str] = {}
    for branch in (b for b, k in branches.items() if k == "modifier"):
        axis[branch] = branch
        for axis_class in children.get(branch, ()):
            for rid in descendants(children, [axis_class]):
                axis.setdefault(rid, axis_class)
    axis = {rid: a for rid, a in axis.items() if selected.get(rid) == "modifier"}
    return _Plan(selected, axis, set(selected) | set(axis.values()))



def _axis_name(term: str) -> str:
    name = term.strip().lower()
    return name.removesuffix(" descriptor").strip() or name




def _iri_tail(iri: str) -> str:
    return re.split(r"[/#]", iri.strip())[-1]


def _rid(iri: str) -> str | None:
    """``RID5352`` from an IRI or name ending in it; None otherwise."""
    tail = _iri_tail(iri)
    return tail if _RID.fullmatch(tail) else None


def _looks_like_rid(iri: str) -> bool:
    return _iri_tail(iri).upper().startswith("RID")


def _norm_rid(value: str | int) -> str:
    text = str(value).strip()
    if text.isdigit():
        return f"RID{text}"
    tail = _iri_tail(text.split(":", 1)[1] if text.lower().startswith("radlex:") else text)
    if not re.fullmatch(r"(?i)rid\d+", tail):
        raise RadLexError(f"{value!r} is not a RadLex id (RID<digits>)")
    return "RID" + tail[3:]


@contextmanager
def _open_binary(path: Path, suffixes: tuple[str, ...]) -> Iterator[IO[bytes]]:
    """The file's bytes: plain, gzip, or the one matching member of a zip (RSNA ships a zip)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
    elif name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if m.lower().endswith(suffixes) and not m.startswith("__MACOSX")]
            if len(members) != 1:
                found = members or "none"
                raise RadLexError(f"{path}: expected one {'/'.join(suffixes)} file in the archive, found {found}")
            with archive.open(members[0]) as f:
                yield f
    else:
        with open(path, "rb") as f:
            yield f


# --- OWL (RDF/XML) ---------------------------------------------------------------------------


def _owl_entries(path: Path, language: str | None, counts: Counter) -> Iterator[_Entry]:
    """Classes of an RDF/XML file, streamed: each top-level element is dropped once read.

    The parser is fed line by line (as fast as ``iterparse``) so that every element is known by
    its line for error messages.
    """
    parser = ET.XMLPullParser(events=("start", "end"))
    root: ET.Element | None = None
    depth, line, start_line = 0, 1, 0
    with _open_binary(path, (".owl", ".rdf", ".xml")) as f:
        for chunk in iter(lambda: f.readline(1 << 16), b""):
            try:
                parser.feed(chunk)
                events = list(parser.read_events())
            except ET.ParseError as exc:
                raise RadLexError(f"{path}, line {exc.position[0]}: not well-formed XML ({exc})") from None
            for event, elem in events:
                if event == "start":
                    depth += 1
                    if depth == 1:
                        if elem.tag != RDF + "RDF":
                            raise RadLexError(
                                f"{path}, line {line}: not RDF/XML: the root element is <{_qname(elem.tag)}>, "
                                "expected <rdf:RDF>"
                            )
                        root = elem
                    elif depth == 2:
                        start_line = line
                    continue
                depth -= 1
                if depth == 1 and root is not None:
                    entry = _owl_entry(elem, path, start_line, language, counts)
                    root.clear()  # drop the element just read: memory stays flat
                    if entry is not None:
                        yield entry
            if chunk.endswith(b"\n"):
                line += 1
        try:
            parser.close()
        except ET.ParseError as exc:
            raise RadLexError(f"{path}, line {exc.position[0]}: not well-formed XML ({exc})") from None
    if root is None:
        raise RadLexError(f"{path}: empty file, not RDF/XML")


def _qname(tag: str) -> str:
    for prefix, ns in (("rdf", RDF), ("rdfs", RDFS), ("owl", OWL), ("skos", SKOS)):
        if tag.startswith(ns):
            return f"{prefix}:{tag[len(ns):]}"
    return tag.rpartition("}")[2]


def _lang_ok(lang: str | None, language: str | None) -> bool:
    if not language or not lang:
        return True
    return lang.lower().split("-")[0] == language.lower().split("-")[0]


def _owl_entry(elem: ET.Element, path: Path, line: int, language: str | None, counts: Counter) -> _Entry | None:
    is_class = elem.tag == OWL + "Class" or (
        elem.tag == RDF + "Description"
        and any(c.tag == RDF + "type" and c.get(RDF + "resource") == OWL_CLASS_IRI for c in elem)
    )
    if not is_class:
        return None
    where = f"{path}, line {line}"
    preferred: list[tuple[str, bool]] = []  # (name, in the chosen language)
    pref_labels: list[tuple[str, bool]] = []
    labels: list[tuple[str, bool]] = []
    synonyms: list[str] = []
    definitions: list[str] = []
    parents: list[str] = []
    obsolete = False
    for child in elem:
        tag = child.tag
        if tag == RDFS + "subClassOf":
            target = child.get(RDF + "resource")
            if target is None:  # <rdfs:subClassOf><owl:Class rdf:about=.../></rdfs:subClassOf>; restrictions have no IRI
                target = next((s.get(RDF + "about") for s in child if s.tag in (OWL + "Class", RDF + "Description")), None)
            if target:
                rid = _rid(target)
                if rid:
                    parents.append(rid)
                elif _looks_like_rid(target):
                    raise RadLexError(f"{where}: rdfs:subClassOf names {target!r}, not a RadLex id (RID<digits>)")
            continue
        text = _clean(child.text)
        local = tag.rpartition("}")[2]
        radlex_property = not tag.startswith(_STANDARD_NS)
        if tag == OWL + "deprecated":
            obsolete = obsolete or text.lower() in ("true", "1")
        elif radlex_property and ("obsolete" in local.lower() or local == "Replaced_by"):
            obsolete = True
        elif not text:
            continue
        elif radlex_property and local == "Preferred_name":
            preferred.append((text, _lang_ok(child.get(XML_LANG), language)))
        elif tag == SKOS + "prefLabel":
            pref_labels.append((text, _lang_ok(child.get(XML_LANG), language)))
        elif tag == RDFS + "label" and not _RID.fullmatch(text):  # RadLex's rdfs:label is the RID itself
            labels.append((text, _lang_ok(child.get(XML_LANG), language)))
        elif not _lang_ok(child.get(XML_LANG), language):
            continue
        elif (radlex_property and local == "Synonym") or tag == SKOS + "altLabel":
            synonyms.append(text)
        elif (radlex_property and local == "Definition") or tag == SKOS + "definition":
            definitions.append(text)

    iri = elem.get(RDF + "about") or elem.get(RDF + "ID") or ""
    rid = _rid(iri)
    if rid is None:
        if _looks_like_rid(iri):
            raise RadLexError(f"{where}: class {iri!r} does not end in a RadLex id (RID<digits>)")
        if preferred:
            raise RadLexError(f"{where}: class {preferred[0][0]!r} has no RID in its IRI (rdf:about={iri!r})")
        counts["non_radlex_classes"] += 1  # owl:Thing, imported or anonymous classes
        return None
    # Names in the chosen language first; RadLex's Preferred_name is English, so a class never
    # goes unnamed for want of one in another language.
    ranked = preferred + pref_labels + labels
    names = [n for n, ok in ranked if ok] + [n for n, ok in ranked if not ok][:1]
    term = names[0] if names else ""
    obsolete = obsolete or term.lower().startswith("obsolete")
    return _Entry(rid, line, parents, term, names[1:] + synonyms, definitions[0] if definitions else "", obsolete)


# --- BioPortal CSV ----------------------------------------------------------------------------


def _csv_entries(path: Path, counts: Counter) -> Iterator[_Entry]:
    with _open_binary(path, (".csv",)) as raw:
        f = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")  # utf-8-sig: a BOM is dropped
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise RadLexError(f"{path}: empty file, expected BioPortal's CSV header ({', '.join(CSV_COLUMNS)})")
            names = [h.strip() for h in header]
            index: dict[str, int] = {}
            for i, name in enumerate(names):
                index.setdefault(name.lower(), i)
            missing = [c for c in CSV_COLUMNS if c.lower() not in index]
            if missing:
                raise RadLexError(f"{path}, line 1: missing column(s) {missing}; columns found: {names}")
            columns = [index[c.lower()] for c in CSV_COLUMNS]
            width = max(columns) + 1
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) < width:
                    raise RadLexError(f"{path}, line {line}: {len(row)} fields, the header has {len(names)}")
                cells = (row[i].strip() for i in columns)
                entry = _csv_entry(*cells, where=f"{path}, line {line}", line=line, counts=counts)
                if entry is not None:
                    yield entry
        except UnicodeDecodeError as exc:
            raise RadLexError(f"{path}, near line {reader.line_num + 1}: not UTF-8 ({exc.reason})") from None
        except csv.Error as exc:
            raise RadLexError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from None


def _clean(text: str | None) -> str:
    """Whitespace collapsed: names and definitions may wrap over lines."""
    return " ".join((text or "").split())


def _split(cell: str) -> list[str]:
    return [_clean(part) for part in cell.split("|") if part.strip()]


def _csv_entry(
    class_id: str, label: str, synonyms: str, definitions: str, obsolete: str, parents: str,
    *, where: str, line: int, counts: Counter,
) -> _Entry | None:
    if not class_id:
        raise RadLexError(f"{where}: empty Class ID")
    rid = _rid(class_id)
    if rid is None:
        if _looks_like_rid(class_id):
            raise RadLexError(f"{where}: Class ID {class_id!r} does not end in a RadLex id (RID<digits>)")
        counts["non_radlex_classes"] += 1
        return None
    parent_rids = []
    for iri in _split(parents):
        parent = _rid(iri)
        if parent:
            parent_rids.append(parent)
        elif _looks_like_rid(iri):
            raise RadLexError(f"{where}: parent {iri!r} is not a RadLex id (RID<digits>)")
    label = _clean(label)
    names = ([label] if label and not _RID.fullmatch(label) else []) + _split(synonyms)
    term = names[0] if names else ""
    defs = _split(definitions)
    is_obsolete = obsolete.lower() in ("true", "1", "yes") or term.lower().startswith("obsolete")
    return _Entry(rid, line, parent_rids, term, names[1:], defs[0] if defs else "", is_obsolete)
