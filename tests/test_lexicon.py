"""The shipped lexicon and the labelled query set: coverage of the phantoms, and retrieval accuracy."""

from collections import Counter
from pathlib import Path

import pytest
import yaml

from generator.phantoms import get_spec, phantom_modalities
from knowledge.lexicon import load_lexicon

QUERIES = Path(__file__).parent / "data" / "kb_queries.yaml"


@pytest.fixture(scope="module")
def concepts():
    return load_lexicon()


def test_size_and_kinds(concepts):
    kinds = Counter(c.kind for c in concepts)
    assert len(concepts) >= 150 and kinds["finding"] >= 60 and kinds["anatomy"] >= 50
    assert kinds["appearance"] and kinds["modifier"] and kinds["cue"]
    cues = {c.attributes["type"] for c in concepts if c.kind == "cue"}
    assert cues == {"negation", "uncertainty"}


def test_every_phantom_finding_and_location_is_a_concept(concepts):
    by_id = {c.id: c for c in concepts}
    location_names = {n.lower().replace(" ", "_") for c in concepts if c.kind == "anatomy" for n in [c.id, *c.names()]}
    location_names |= {c.attributes.get("phantom_location") for c in concepts if c.kind == "anatomy"}
    for modality in phantom_modalities():
        for name, spec in get_spec(modality).findings.items():
            assert name in by_id and by_id[name].kind == "finding", f"{modality}: no finding concept {name!r}"
            assert not by_id[name].modalities or modality in by_id[name].modalities, f"{name} lacks modality {modality}"
            assert f"{name}@{modality}" in by_id, f"no appearance {name}@{modality}"
            for location in spec.locations:
                assert location in location_names, f"{modality}: location {location!r} is not an anatomy concept"


def test_query_set_is_labelled_and_varied(concepts):
    queries = yaml.safe_load(QUERIES.read_text())
    ids = {c.id for c in concepts}
    assert len(queries) >= 200
    assert all(q["expected"] in ids for q in queries), [q for q in queries if q["expected"] not in ids][:5]
    categories = Counter(q["category"] for q in queries)
    for category in ("synonym", "abbreviation", "misspelling", "lay", "negated"):
        assert categories[category] >= 15, categories


@pytest.fixture(scope="module")
def retriever(concepts, embedder, tmp_path_factory):
    from knowledge.build import build_knowledge_base, load_retriever

    folder = tmp_path_factory.mktemp("shipped_kb")
    build_knowledge_base(folder, concepts, iter(()), embedder, "Flat", "Flat", progress=False)
    return load_retriever(folder, embedder, modalities=phantom_modalities())


def test_query_set_accuracy(retriever, concepts, capsys):
    from pipelines.commands.kb import evaluate_queries

    queries = yaml.safe_load(QUERIES.read_text())
    kind_of = {c.id: c.kind for c in concepts}
    stage = evaluate_queries(retriever, queries, kind_of)["groups"]["all"]  # as the agent stages search
    free = evaluate_queries(retriever, queries)["groups"]["all"]  # every kind competing
    with capsys.disabled():
        print(f"\nkb query set (n={stage['n']}): stage-kind top-1 {stage['top1']:.3f} top-5 {stage['top5']:.3f}; "
              f"all-kinds top-1 {free['top1']:.3f} top-5 {free['top5']:.3f}")
    assert stage["top5"] >= 0.90 and free["top5"] >= 0.90
