"""RadLex (OWL, BioPortal CSV) and SNOMED CT (RF2 Snapshot) loaders, on the fixtures in tests/data/vocab."""

from __future__ import annotations

import gzip
import shutil
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from knowledge.radlex import RadLexError, load_radlex_csv, load_radlex_owl
from knowledge.schema import Concept, validate_concept
from knowledge.snomed import GB_ENGLISH, SnomedError, load_snomed_rf2

VOCAB = Path(__file__).resolve().parent / "data" / "vocab"
OWL = VOCAB / "RadLex.owl"
CSV = VOCAB / "RADLEX.csv"
RF2 = VOCAB / "snomed_rf2"
TERMINOLOGY = RF2 / "Snapshot" / "Terminology"
CONCEPTS = TERMINOLOGY / "sct2_Concept_Snapshot_INT_20250101.txt"
DESCRIPTIONS = TERMINOLOGY / "sct2_Description_Snapshot-en_INT_20250101.txt"
RELATIONSHIPS = TERMINOLOGY / "sct2_Relationship_Snapshot_INT_20250101.txt"
LANGUAGE = RF2 / "Snapshot" / "Refset" / "Language" / "der2_cRefset_LanguageSnapshot-en_INT_20250101.txt"


def by_id(concepts: list[Concept]) -> dict[str, Concept]:
    ids = [c.id for c in concepts]
    assert len(ids) == len(set(ids)), "duplicate concept ids"
    return {c.id: c for c in concepts}


def assert_valid(concepts: list[Concept], source: str, system: str) -> None:
    assert concepts
    for c in concepts:
        assert validate_concept(c) == [], c
        assert c.source == source
        assert list(c.codes) == [system] and c.id == f"{system}:{c.codes[system]}"
        assert c.term.strip() and c.term not in c.synonyms


@pytest.fixture(scope="module")
def owl() -> dict[str, Concept]:
    return by_id(load_radlex_owl(OWL))


@pytest.fixture(scope="module")
def snomed_us() -> dict[str, Concept]:
    return by_id(load_snomed_rf2(RF2))


# --- RadLex OWL -------------------------------------------------------------------------------


def test_owl_concepts_are_valid(owl):
    assert_valid(list(owl.values()), "radlex", "radlex")


def test_owl_names_definitions_parents(owl):
    ptx = owl["radlex:RID5352"]
    assert (ptx.kind, ptx.term, ptx.codes) == ("finding", "pneumothorax", {"radlex": "RID5352"})
    assert ptx.synonyms == ["PTX", "collapsed lung"]
    assert ptx.description == "Fixture definition: air in the pleural space."
    assert ptx.parents == ["radlex:RID999910"]
    lung = owl["radlex:RID1301"]
    assert lung.synonyms == ["pulmo"]  # the German synonym and Preferred_name_German are dropped
    assert lung.parents == ["radlex:RID999901"]  # the Part_Of restriction is not an is-a parent
    assert lung.description == "Fixture definition: paired organ of respiration in the thorax."
    assert owl["radlex:RID58"].term == "liver"  # rdf:Description + rdf:type owl:Class
    assert owl["radlex:RID999922"].synonyms == ["marked"]
    assert owl["radlex:RID34539"].parents == ["radlex:RID34785", "radlex:RID999910"]
    skos = owl["radlex:RID999950"]  # skos fallbacks
    assert (skos.term, skos.synonyms) == ("pleural thickening", ["pleural fibrosis"])
    assert skos.description == "Fixture definition: thickened pleura."
    assert owl["radlex:RID999951"].term == "pleural plaque"  # rdfs:label fallback; the RID label is no name
    assert owl["radlex:RID3"].parents == ["radlex:RID1"]  # a live class of the file, though out of the result


def test_owl_kinds_follow_ancestry(owl):
    kinds = {cid: c.kind for cid, c in owl.items()}
    for rid in ("3", "999901", "999902", "1301", "999903", "999904", "58"):
        assert kinds[f"radlex:RID{rid}"] == "anatomy"
    for rid in ("5", "34785", "999910", "5352", "999911", "34539", "999950", "999951"):
        assert kinds[f"radlex:RID{rid}"] == "finding"
    for rid in ("6", "999920", "999921", "999922"):
        assert kinds[f"radlex:RID{rid}"] == "modifier"
    # RadLex entity and the procedure branch lie outside the mapped branches
    assert not {"radlex:RID1", "radlex:RID999930", "radlex:RID999931"} & set(owl)


def test_owl_modifiers_have_axis_and_value(owl):
    assert owl["radlex:RID999922"].attributes == {"axis": "severity", "value": "severe"}
    assert owl["radlex:RID999920"].attributes == {"axis": "severity", "value": "severity descriptor"}
    assert owl["radlex:RID6"].attributes == {"axis": "radlex descriptor", "value": "RadLex descriptor"}


def test_owl_skips_deprecated_and_counts():
    stats: dict[str, int] = {}
    concepts = by_id(load_radlex_owl(OWL, stats=stats))
    assert "radlex:RID999940" not in concepts  # owl:deprecated true
    assert "radlex:RID999941" not in concepts  # "obsolete_..." name
    assert stats == {"obsolete": 2, "outside_branches": 3, "concepts": 19}


def test_owl_roots_and_kinds_filters():
    ids = lambda cs: {c.id for c in cs}  # noqa: E731
    lung = {"radlex:RID1301", "radlex:RID999903", "radlex:RID999904"}
    for root in ("RID1301", "radlex:RID1301", "http://www.radlex.org/RID/RID1301", 1301):
        assert ids(load_radlex_owl(OWL, roots=[root])) == lung
    modifiers = {"radlex:RID6", "radlex:RID999920", "radlex:RID999921", "radlex:RID999922"}
    assert ids(load_radlex_owl(OWL, kinds=["modifier"])) == modifiers
    # under "pleural abnormality" (imaging observation) but reached first by clinical finding: still a finding
    assert ids(load_radlex_owl(OWL, roots=["RID999910"], kinds=["finding"])) == {
        "radlex:RID999910", "radlex:RID5352", "radlex:RID999911", "radlex:RID34539", "radlex:RID999950", "radlex:RID999951"}
    assert ids(load_radlex_owl(OWL, roots=["RID1301"], kinds=["finding"])) == set()
    # a modifier keeps its axis when the axis class is filtered out
    (severe,) = load_radlex_owl(OWL, roots=["RID999922"])
    assert severe.attributes == {"axis": "severity", "value": "severe"}
    with pytest.raises(RadLexError, match="RID424242"):
        load_radlex_owl(OWL, roots=["RID424242"])
    with pytest.raises(RadLexError, match="appearance"):
        load_radlex_owl(OWL, kinds=["appearance"])


def test_owl_language_and_branch_options():
    german = by_id(load_radlex_owl(OWL, language="de"))  # RadLex's preferred names are English: they stay
    assert (german["radlex:RID1301"].term, german["radlex:RID1301"].synonyms) == ("lung", ["Lungenflügel"])
    assert german["radlex:RID1301"].description == ""
    assert german.keys() == by_id(load_radlex_owl(OWL)).keys()
    procedures = by_id(load_radlex_owl(OWL, branches={"RID999930": "finding"}))
    assert set(procedures) == {"radlex:RID999930", "radlex:RID999931"}


def test_owl_reads_gzip_and_zip(tmp_path, owl):
    gz = tmp_path / "RadLex.owl.gz"
    gz.write_bytes(gzip.compress(OWL.read_bytes()))
    archive = tmp_path / "RadLex_OWL.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(OWL, "RadLex_OWL/RadLex.owl")
        z.writestr("RadLex_OWL/readme.txt", "not read")
    assert by_id(load_radlex_owl(gz)) == owl
    assert by_id(load_radlex_owl(archive)) == owl


def test_owl_accepts_other_rdf_xml_shapes(tmp_path):
    # RadLex 3.x IRIs (".../RID/#RID3"), rdf:ID, a nested named parent, an anonymous class, a
    # metaclass without a RID, a class described twice, and a Replaced_by (obsolete) class.
    path = tmp_path / "radlex3.owl"
    path.write_text(
        """<?xml version="1.0"?>
<rdf:RDF xmlns="http://www.radlex.org/RID/#" xml:base="http://www.radlex.org/RID/"
     xmlns:owl="http://www.w3.org/2002/07/owl#" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     xmlns:rdfs="http://www.w3.org/2000/01/rdf-schema#">
  <owl:Class rdf:about="http://www.radlex.org/RID/#RID3"><Preferred_name>anatomical entity</Preferred_name></owl:Class>
  <owl:Class rdf:ID="RID10">
    <rdfs:subClassOf><owl:Class rdf:about="http://www.radlex.org/RID/#RID3"/></rdfs:subClassOf>
    <Preferred_name xml:lang="en">thing ten</Preferred_name>
  </owl:Class>
  <owl:Class><owl:unionOf rdf:parseType="Collection"><rdf:Description rdf:about="#RID3"/></owl:unionOf></owl:Class>
  <owl:Class rdf:about="http://www.radlex.org/RID/#pathophysiology_metaclass"/>
  <rdf:Description rdf:about="http://www.radlex.org/RID/#RID10">
    <rdf:type rdf:resource="http://www.w3.org/2002/07/owl#Class"/>
    <Synonym xml:lang="en">ten</Synonym>
  </rdf:Description>
  <owl:Class rdf:about="http://www.radlex.org/RID/#RID11">
    <rdfs:subClassOf rdf:resource="http://www.radlex.org/RID/#RID10"/>
    <Preferred_name xml:lang="en">eleven</Preferred_name>
    <Replaced_by rdf:resource="http://www.radlex.org/RID/#RID10"/>
  </owl:Class>
</rdf:RDF>
""",
        encoding="utf-8",
    )
    stats: dict[str, int] = {}
    concepts = by_id(load_radlex_owl(path, stats=stats))
    assert set(concepts) == {"radlex:RID3", "radlex:RID10"}
    ten = concepts["radlex:RID10"]
    assert (ten.term, ten.synonyms, ten.parents) == ("thing ten", ["ten"], ["radlex:RID3"])
    assert stats == {"non_radlex_classes": 2, "obsolete": 1, "concepts": 2}


def _edited(tmp_path: Path, old: str, new: str, name: str = "RadLex.owl") -> Path:
    text = OWL.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if needle in line)


def test_owl_errors_name_file_and_line(tmp_path):
    bad = _edited(tmp_path, 'rdf:about="http://www.radlex.org/RID/RID5352">', 'rdf:about="http://www.radlex.org/RID/pneumothorax">')
    line = _line_of(bad, "RID/pneumothorax")
    with pytest.raises(RadLexError, match=rf"RadLex\.owl, line {line}: class 'pneumothorax' has no RID"):
        load_radlex_owl(bad)
    bad = _edited(tmp_path, 'RID/RID999911">', 'RID/RIDabc">')
    with pytest.raises(RadLexError, match=rf"line {_line_of(bad, 'RIDabc')}: class .*RIDabc.*\(RID<digits>\)"):
        load_radlex_owl(bad)
    bad = _edited(tmp_path, 'rdf:resource="http://www.radlex.org/RID/RID999910"/>', 'rdf:resource="http://www.radlex.org/RID/RID"/>')
    with pytest.raises(RadLexError, match=r"line \d+: rdfs:subClassOf names"):
        load_radlex_owl(bad)
    bad = _edited(tmp_path, "<Synonym xml:lang=\"en\">PTX</Synonym>", "<Synonym xml:lang=\"en\">PTX</Synonm>")
    with pytest.raises(RadLexError, match=rf"RadLex\.owl, line {_line_of(bad, '</Synonm>')}: not well-formed XML"):
        load_radlex_owl(bad)
    truncated = tmp_path / "truncated.owl"
    truncated.write_text(OWL.read_text(encoding="utf-8")[:5000], encoding="utf-8")
    with pytest.raises(RadLexError, match=r"truncated\.owl, line \d+: not well-formed XML"):
        load_radlex_owl(truncated)
    html = tmp_path / "page.owl"
    html.write_text("<?xml version='1.0'?>\n<html><body>RadLex</body></html>\n", encoding="utf-8")
    with pytest.raises(RadLexError, match=r"page\.owl, line 2: not RDF/XML: the root element is <html>"):
        load_radlex_owl(html)
    with pytest.raises(RadLexError, match=r"RADLEX\.csv, line 1: not well-formed XML"):
        load_radlex_owl(CSV)
    no_classes = tmp_path / "empty.owl"
    no_classes.write_text('<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/>', encoding="utf-8")
    with pytest.raises(RadLexError, match=r"empty\.owl: no RadLex classes"):
        load_radlex_owl(no_classes)
    with pytest.raises(RadLexError, match="no such file"):
        load_radlex_owl(tmp_path / "absent.owl")
    assert issubclass(RadLexError, ValueError)


# --- RadLex CSV -------------------------------------------------------------------------------


def test_csv_matches_owl(owl):
    csv_concepts = by_id(load_radlex_csv(CSV))
    assert_valid(list(csv_concepts.values()), "radlex", "radlex")
    assert set(csv_concepts) == set(owl)
    for cid, c in csv_concepts.items():
        o = owl[cid]
        fields = ("kind", "term", "parents", "description", "attributes")
        assert [getattr(c, f) for f in fields] == [getattr(o, f) for f in fields], cid
        if cid != "radlex:RID1301":
            assert c.synonyms == o.synonyms, cid
    # BioPortal's synonyms carry no language: the German one stays
    assert csv_concepts["radlex:RID1301"].synonyms == ["pulmo", "Lungenflügel"]


def test_csv_bom_extra_and_reordered_columns(tmp_path):
    import csv

    with open(CSV, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    order = [7, 0, 10, 2, 1, 4, 3, 5, 6, 8, 9]  # shuffled, extra columns kept
    path = tmp_path / "radlex_bom.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f).writerows([[row[i] for i in order] + ["extra"] for row in rows])
    assert by_id(load_radlex_csv(path)) == by_id(load_radlex_csv(CSV))
    gz = tmp_path / "RADLEX.csv.gz"
    gz.write_bytes(gzip.compress(CSV.read_bytes()))
    assert by_id(load_radlex_csv(gz)) == by_id(load_radlex_csv(CSV))


def test_csv_filters_and_obsolete():
    stats: dict[str, int] = {}
    anatomy = load_radlex_csv(CSV, kinds=["anatomy"], roots=["RID3"], stats=stats)
    assert {c.id.removeprefix("radlex:RID") for c in anatomy} == {"3", "999901", "999902", "1301", "999903", "999904", "58"}
    assert stats["obsolete"] == 2  # Obsolete=true and an "obsolete_" name


def test_csv_errors_name_file_and_line(tmp_path):
    text = CSV.read_text(encoding="utf-8")
    missing = tmp_path / "missing.csv"
    missing.write_text(text.replace("Preferred Label", "Label", 1), encoding="utf-8")
    expected = r"missing\.csv, line 1: missing column\(s\) \['Preferred Label'\]; columns found: \['Class ID', 'Label', "
    with pytest.raises(RadLexError, match=expected):
        load_radlex_csv(missing)
    bad_id = tmp_path / "bad_id.csv"
    bad_id.write_text(text.replace("RID/RID999911,", "RID/RID99x911,", 1), encoding="utf-8")
    line = next(i for i, row in enumerate(bad_id.read_text(encoding="utf-8").splitlines(), 1) if "RID99x911" in row)
    with pytest.raises(RadLexError, match=rf"bad_id\.csv, line {line}: Class ID .*RID99x911.*\(RID<digits>\)"):
        load_radlex_csv(bad_id)
    short = tmp_path / "short.csv"
    short.write_text(text + "http://www.radlex.org/RID/RID999999,cut short\n", encoding="utf-8")
    with pytest.raises(RadLexError, match=rf"short\.csv, line {len(text.splitlines()) + 1}: 2 fields, the header has 11"):
        load_radlex_csv(short)
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(RadLexError, match=r"empty\.csv: empty file"):
        load_radlex_csv(empty)


# --- RadLex streaming -------------------------------------------------------------------------


def _big_owl(path: Path, n: int) -> None:
    """An n-class RadLex-shaped OWL: three branches, then a 4-ary tree under them."""
    parts = [
        '<?xml version="1.0"?>\n<rdf:RDF xmlns="http://www.radlex.org/RID/" xml:base="http://www.radlex.org/RID/"\n'
        '     xmlns:owl="http://www.w3.org/2002/07/owl#" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"\n'
        '     xmlns:rdfs="http://www.w3.org/2000/01/rdf-schema#">\n'
    ]
    for rid, name in ((3, "anatomical entity"), (5, "imaging observation"), (6, "RadLex descriptor")):
        parts.append(
            f'    <owl:Class rdf:about="http://www.radlex.org/RID/RID{rid}">\n'
            f'        <Preferred_name xml:lang="en">{name}</Preferred_name>\n    </owl:Class>\n'
        )
    for i in range(n):
        rid, parent = 100000 + i, (3, 5, 6)[i % 3] if i < 30 else 100000 + i // 4
        parts.append(
            f'    <owl:Class rdf:about="http://www.radlex.org/RID/RID{rid}">\n'
            f'        <rdfs:subClassOf rdf:resource="http://www.radlex.org/RID/RID{parent}"/>\n'
            f'        <Definition xml:lang="en">Generated definition {i}, about as long as a real RadLex definition is.</Definition>\n'
            f'        <Preferred_name xml:lang="en">generated term {i}</Preferred_name>\n'
            f'        <Preferred_name_German xml:lang="de">erzeugter Begriff {i}</Preferred_name_German>\n'
            f'        <Synonym xml:lang="en">synonym {i}</Synonym>\n'
            f'        <rdfs:label xml:lang="en">RID{rid}</rdfs:label>\n'
            "    </owl:Class>\n"
        )
    parts.append("</rdf:RDF>\n")
    path.write_text("".join(parts), encoding="utf-8")


def test_owl_streams_a_large_file_quickly(tmp_path):
    path = tmp_path / "RadLex.owl"
    _big_owl(path, 20_000)
    start = time.perf_counter()
    concepts = load_radlex_owl(path)
    seconds = time.perf_counter() - start
    assert len(concepts) == 20_003
    assert seconds < 8, f"20,000 classes (11 MB) took {seconds:.1f} s"  # ~1.5 s on an idle 2-core machine
    assert all(not validate_concept(c) for c in concepts[::500])


def test_owl_memory_stays_below_the_file_size(tmp_path):
    # tracemalloc slows allocation several-fold: a smaller file keeps the test quick. A parsed
    # tree costs ~7x the file size; the streaming loader holds the RID graph, about 0.5x.
    path = tmp_path / "RadLex.owl"
    _big_owl(path, 3_000)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        concepts = load_radlex_owl(path, roots=["RID100100"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert concepts and all(c.kind == "finding" for c in concepts)
    assert peak < 0.8 * size, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"


# --- SNOMED CT RF2 ----------------------------------------------------------------------------


def test_snomed_concepts_are_valid(snomed_us):
    assert_valid(list(snomed_us.values()), "snomed", "snomed")


def test_snomed_terms_synonyms_parents(snomed_us):
    ptx = snomed_us["snomed:36118008"]
    assert (ptx.kind, ptx.term, ptx.codes) == ("finding", "Pneumothorax", {"snomed": "36118008"})
    assert ptx.synonyms == ["Air in pleural space"]
    assert ptx.parents == ["snomed:999000041"]  # the inactive is-a and the finding-site relationship are not parents
    assert ptx.description == "Fixture definition: presence of air or gas in the pleural cavity."
    assert snomed_us["snomed:60046008"].description == ""  # its only text definition is inactive
    edema = snomed_us["snomed:19242006"]
    assert edema.term == "Pulmonary edema"  # the inactive refset row ("Edema of lung" preferred) is ignored
    assert edema.synonyms == ["Pulmonary oedema", "Edema of lung"]  # "Wet lung" is an inactive description
    assert snomed_us["snomed:999000014"].parents == ["snomed:999000012"]
    assert snomed_us["snomed:404684003"].parents == ["snomed:138875005"]  # the root, itself skipped


def test_snomed_kinds_from_semantic_tags(snomed_us):
    kinds = {cid.split(":")[1]: c.kind for cid, c in snomed_us.items()}
    assert {k for k, v in kinds.items() if v == "anatomy"} == {"123037004", "999000011", "999000012", "999000013", "999000014"}
    assert {k for k, v in kinds.items() if v == "modifier"} == {"999000051", "999000052", "999000053", "999000054"}
    assert kinds["999000031"] == kinds["999000032"] == "finding"  # morphologic abnormality
    assert kinds["999000021"] == kinds["404684003"] == "finding"  # finding
    assert kinds["36118008"] == kinds["64572001"] == "finding"  # disorder
    # procedure, attribute and the root's own tag are skipped
    assert not {"138875005", "116680003", "999000071", "999000081"} & set(kinds)


def test_snomed_modifiers_have_axis_and_value(snomed_us):
    severe = snomed_us["snomed:999000054"]
    assert severe.attributes == {"axis": "severities", "value": "Severe"}
    assert severe.synonyms == ["Severe (severity modifier)"]  # the FSN, less its semantic tag
    assert snomed_us["snomed:999000053"].attributes == {"axis": "severities", "value": "Mild"}
    assert snomed_us["snomed:999000051"].attributes == {"axis": "qualifier value", "value": "Qualifier value"}


def test_snomed_gb_versus_us(snomed_us):
    gb = by_id(load_snomed_rf2(RF2, language="en-GB"))
    assert gb["snomed:19242006"].term == "Pulmonary oedema"
    assert gb["snomed:19242006"].synonyms == ["Pulmonary edema", "Edema of lung"]
    assert (gb["snomed:999000032"].term, snomed_us["snomed:999000032"].term) == ("Oedema", "Edema")
    assert by_id(load_snomed_rf2(RF2, refset_id=GB_ENGLISH)) == gb
    assert gb.keys() == snomed_us.keys()


def test_snomed_without_language_refset_uses_fsn(tmp_path):
    concepts = by_id(load_snomed_rf2([CONCEPTS, DESCRIPTIONS, RELATIONSHIPS]))
    assert concepts["snomed:19242006"].term == "Pulmonary edema"
    assert concepts["snomed:999000054"].term == "Severe (severity modifier)"
    assert concepts["snomed:999000054"].synonyms == ["Severe"]
    assert concepts["snomed:36118008"].description == ""  # no text definition file given


def test_snomed_inactive_rows(snomed_us):
    stats: dict[str, int] = {}
    load_snomed_rf2(RF2, stats=stats)
    assert stats == {
        "inactive_concepts": 1, "inactive_is_a": 2, "inactive_descriptions": 1, "inactive_refset_rows": 2,
        "other_semantic_tags": 4, "concepts": 19,
    }
    assert "snomed:999000061" not in snomed_us
    everything = by_id(load_snomed_rf2(RF2, active_only=False))
    retired = everything["snomed:999000061"]
    assert (retired.term, retired.parents, retired.attributes) == ("Pneumothorax NOS", [], {"status": "inactive"})
    assert set(everything) - set(snomed_us) == {"snomed:999000061"}


def test_snomed_roots_and_kinds_filters():
    ids = lambda cs: {c.id.split(":")[1] for c in cs}  # noqa: E731
    body = {"123037004", "999000011", "999000012", "999000013", "999000014", "999000031", "999000032"}
    assert ids(load_snomed_rf2(RF2, roots=["123037004"])) == body
    assert ids(load_snomed_rf2(RF2, roots=[123037004], kinds=["anatomy"])) == body - {"999000031", "999000032"}
    assert ids(load_snomed_rf2(RF2, roots=["snomed:999000041"])) == {"999000041", "36118008", "60046008"}
    modifiers = {"999000051", "999000052", "999000053", "999000054"}
    assert ids(load_snomed_rf2(RF2, kinds=["modifier", "anatomy"])) == modifiers | (body - {"999000031", "999000032"})
    (mild,) = load_snomed_rf2(RF2, roots=["999000053"])
    assert mild.attributes == {"axis": "severities", "value": "Mild"}  # axis named though outside the result
    with pytest.raises(SnomedError, match=r"root\(s\) \[999000061\] are not active concepts"):
        load_snomed_rf2(RF2, roots=["999000061"])
    with pytest.raises(SnomedError, match="appearance"):
        load_snomed_rf2(RF2, kinds=["appearance"])


def _copy_release(tmp_path: Path) -> Path:
    folder = tmp_path / "release"
    shutil.copytree(RF2, folder)
    return folder


def _edit_line(path: Path, line: int, edit) -> None:
    lines = path.read_bytes().decode("utf-8").split("\r\n")  # RF2 lines end in CRLF
    lines[line - 1] = edit(lines[line - 1])
    path.write_bytes("\r\n".join(lines).encode("utf-8"))


def test_snomed_errors_name_file_and_line(tmp_path):
    folder = _copy_release(tmp_path)
    descriptions = folder / DESCRIPTIONS.relative_to(RF2)
    _edit_line(descriptions, 7, lambda row: row.rsplit("\t", 1)[0])
    expected = r"sct2_Description_Snapshot-en_INT_20250101\.txt, line 7: expected 9 tab-separated columns, found 8"
    with pytest.raises(SnomedError, match=expected):
        load_snomed_rf2(folder)

    folder = _copy_release(tmp_path / "b")
    concepts = folder / CONCEPTS.relative_to(RF2)
    _edit_line(concepts, 4, lambda row: row.replace("\t1\t", "\tyes\t", 1))
    with pytest.raises(SnomedError, match=r"sct2_Concept_Snapshot_INT_20250101\.txt, line 4: active must be 0 or 1, found 'yes'"):
        load_snomed_rf2(folder)
    _edit_line(concepts, 4, lambda row: row.replace("\tyes\t", "\t1\t", 1))
    _edit_line(concepts, 5, lambda row: "x" + row)
    with pytest.raises(SnomedError, match=r"line 5: id 'x\d+' is not an SCTID"):
        load_snomed_rf2(folder)
    _edit_line(concepts, 1, lambda row: row.replace("definitionStatusId", "definitionStatus"))
    with pytest.raises(SnomedError, match=r"sct2_Concept_Snapshot_INT_20250101\.txt, line 1: not an RF2 concept file"):
        load_snomed_rf2(folder)

    folder = _copy_release(tmp_path / "c")
    (folder / RELATIONSHIPS.relative_to(RF2)).unlink()
    with pytest.raises(SnomedError, match=r"missing RF2 Snapshot file\(s\) \['sct2_Relationship_\*Snapshot_\*\.txt'\]"):
        load_snomed_rf2(folder)
    shutil.copy(CONCEPTS, folder / "sct2_Concept_Snapshot_INT_20240101.txt")
    with pytest.raises(SnomedError, match="several sct2_Concept_"):
        load_snomed_rf2(folder)
    with pytest.raises(SnomedError, match="no such file"):
        load_snomed_rf2([CONCEPTS, DESCRIPTIONS, tmp_path / "sct2_Relationship_Snapshot_INT_20250101.txt"])
    with pytest.raises(SnomedError, match="not an RF2 Snapshot file"):
        load_snomed_rf2([CONCEPTS, DESCRIPTIONS, RELATIONSHIPS, VOCAB / "README.md"])
    assert issubclass(SnomedError, ValueError)


def test_snomed_explicit_files_equal_folder(snomed_us):
    files = [CONCEPTS, DESCRIPTIONS, RELATIONSHIPS, LANGUAGE, TERMINOLOGY / "sct2_TextDefinition_Snapshot-en_INT_20250101.txt"]
    assert by_id(load_snomed_rf2(files)) == snomed_us
    assert by_id(load_snomed_rf2(RF2 / "Snapshot")) == snomed_us
