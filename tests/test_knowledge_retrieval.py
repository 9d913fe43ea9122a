"""Exact-term matching, dense + exact fusion, filters, cases and the build/load round trip."""

import pytest

from knowledge.build import add_cases, build_knowledge_base, load_retriever
from knowledge.cases import Case
from knowledge.lexicon import LexiconError, load_lexicon
from knowledge.retriever import UnknownModalityError
from knowledge.schema import Concept, validate_concept
from knowledge.terms import TermMatcher, normalise

CONCEPTS = [
    Concept("pneumothorax", "finding", "pneumothorax", ["collapsed lung"], ["PTX"], ["pnuemothorax"], ["cxr", "chest_ct"],
            {"snomed": "36118008"}, description="Air in the pleural space."),
    Concept("pleural_effusion", "finding", "pleural effusion", ["fluid in the pleural space"], [], ["plueral effusion"],
            ["cxr", "chest_ct"], {"snomed": "60046008"}, description="Fluid collection between the pleural layers."),
    Concept("pulmonary_edema", "finding", "pulmonary oedema", ["pulmonary edema", "water on the lungs"], [], [], ["cxr"],
            description="Fluid in the lung interstitium and alveoli."),
    Concept("drusen", "finding", "drusen", ["macular drusen"], [], ["drusin"], ["fundus", "oct"],
            description="Yellow deposits under the retinal pigment epithelium."),
    Concept("right_lower_lobe", "anatomy", "right lower lobe", [], ["RLL"], [], ["cxr", "chest_ct"]),
    Concept("pneumothorax@cxr", "appearance", "pneumothorax on chest X-ray", [], [], [], ["cxr"], finding="pneumothorax",
            description="A thin visceral pleural line with no lung markings beyond it."),
    Concept("left", "modifier", "left", ["left-sided"], ["L"], [], [], attributes={"axis": "laterality", "value": "left"}),
    Concept("no", "cue", "no", ["without", "negative for"], [], [], [], attributes={"type": "negation"}),
]
CASES = [
    Case("m:2", "Chest radiograph. Findings: large left pneumothorax.", "cxr", "a.png", [{"name": "pneumothorax"}], "phantom:cxr"),
    Case("m:3", "Macular OCT. Findings: subretinal fluid.", "oct", "b.png", [{"name": "subretinal_fluid"}], "phantom:oct"),
]


@pytest.fixture(scope="module")
def kb(tmp_path_factory, embedder):
    folder = tmp_path_factory.mktemp("kb")
    summary = build_knowledge_base(folder, CONCEPTS, iter(CASES), embedder, "Flat", "Flat", progress=False)
    assert summary["concepts"] == len(CONCEPTS) and summary["cases"] == 2
    return folder, load_retriever(folder, embedder, modalities=["cxr", "chest_ct", "brain_mri", "fundus", "oct"])


def test_normalisation_folds_british_spelling_and_punctuation():
    assert normalise("Pulmonary Oedema, haemorrhage; tumour's") == ["pulmonary", "edema", "hemorrhage", "tumor"]


def test_term_matcher_abbreviation_misspelling_and_coverage():
    matcher = TermMatcher([c.names() for c in CONCEPTS])
    assert matcher.match("PTX")[0].form == "PTX"
    assert matcher.match("small right PTX")[0].coverage < 1
    assert not matcher.match("pnuemothorax")[0].fuzzy  # listed misspelling: exact
    fuzzy = matcher.match("pneumothoraks")
    assert 0 in fuzzy and fuzzy[0].fuzzy and fuzzy[0].strength < matcher.match("pneumothorax")[0].strength
    assert 2 in matcher.match("pulmonary edema")  # American query, British preferred term


@pytest.mark.parametrize(
    "query, expected",
    [("PTX", "pneumothorax"), ("pnuemothorax on the left", "pneumothorax"), ("no pneumothorax", "pneumothorax"),
     ("water on the lungs", "pulmonary_edema"), ("RLL", "right_lower_lobe"), ("drusin", "drusen"),
     ("small left pleural effusion", "pleural_effusion")],
)
def test_search_top1(kb, query, expected):
    _, retriever = kb
    hits = retriever.search(query, k=5, kinds=["finding", "anatomy"])
    assert hits[0].id == expected, [(h.id, round(h.score, 3)) for h in hits]


def test_hits_carry_provenance_for_traces(kb):
    _, retriever = kb
    hit = retriever.search("PTX", k=1)[0]
    assert hit.id == "pneumothorax" and hit.kind == "finding" and hit.source == "lexicon"
    assert hit.codes == {"snomed": "36118008"} and hit.matched == "PTX" and hit.exact > 0
    assert set(hit.to_dict()) >= {"id", "text", "score", "kind", "source", "codes"}


def test_modality_and_kind_filters(kb):
    _, retriever = kb
    assert all("oct" in h.modalities or not h.modalities for h in retriever.search("fluid", k=8, modality="oct"))
    cases = retriever.search("left pneumothorax", k=2, kinds=["case"])
    assert cases[0].kind == "case" and cases[0].path == "a.png" and cases[0].findings
    assert all(h.kind == "appearance" for h in retriever.search("pleural line", k=3, kinds=["appearance"]))
    with pytest.raises(UnknownModalityError, match="unknown modality 'pet'; known modalities: brain_mri, chest_ct, cxr"):
        retriever.search("x", modality="pet")
    with pytest.raises(ValueError, match="unknown kind"):
        retriever.search("x", kinds=["organ"])
    with pytest.raises(ValueError, match="empty query"):
        retriever.search("  ")


def test_incremental_case_add_and_dimension_mismatch(kb, embedder, tmp_path):
    folder, _ = kb
    added = add_cases(folder, iter([Case("m:9", "Brain MRI: glioma.", "brain_mri", "c.png", [], "x"), CASES[0]]), embedder)
    assert added == 1  # known ids are not added twice
    retriever = load_retriever(folder, embedder)
    assert retriever.search("glioma", k=1, kinds=["case"])[0].id == "m:9"

    class Other:
        dim, name = 512, "other"

    from knowledge.index import KnowledgeIndexError

    with pytest.raises(KnowledgeIndexError, match="512-d.*synthmed kb build"):
        load_retriever(folder, Other())
    with pytest.raises(KnowledgeIndexError, match="no knowledge base"):
        load_retriever(tmp_path / "empty", embedder)


def test_schema_and_lexicon_validation(tmp_path):
    bad = Concept("Bad Id", "finding", "x", codes={"snomed": "RID12", "icd": "1"}, modalities=["xray"])
    problems = " ".join(validate_concept(bad, {"cxr"}))
    assert "id must be" in problems and "malformed" in problems and "unknown code system" in problems and "xray" in problems
    (tmp_path / "a.yaml").write_text(
        "concepts:\n"
        "  - {id: effusion@cxr, kind: appearance, term: e, finding: nosuch, modalities: [cxr]}\n"
        "  - {id: dup, kind: finding, term: d, parents: [ghost]}\n"
        "  - {id: dup, kind: finding, term: d2}\n"
    )
    with pytest.raises(LexiconError) as err:
        load_lexicon(tmp_path)
    text = str(err.value)
    assert "unknown finding 'nosuch'" in text and "unknown parent 'ghost'" in text and "'dup' defined 2 times" in text
