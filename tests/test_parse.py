"""The rule-based reasoning stages on a real knowledge base: the labelled request corpus (F1 >= 0.90),
negation scope, uncertainty, laterality, severity, abbreviations, truncation, errors, contradictions,
recorded retrievals and visual descriptors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agents.parse_eval import evaluate_corpus, finding_f1, finding_matches
from agents.reading import tokenize
from agents.rules import RuleReasoner
from agents.schema import ParsedRequest, StageError
from generator.errors import UserError
from generator.modalities import resolve_modality
from knowledge.build import build_knowledge_base, load_retriever
from knowledge.cases import Case
from knowledge.lexicon import load_lexicon
from knowledge.retriever import Retriever
from knowledge.terms import normalise

CORPUS = Path(__file__).parent / "data" / "parse_requests.yaml"
MODALITIES = ["cxr", "chest_ct", "brain_mri", "fundus", "oct"]
CASES = [
    Case("phantom:cxr:1",
         "Chest radiograph, PA view. Findings: large left pneumothorax. Impression: Large left pneumothorax.", "cxr",
         "cxr_1.png", [{"name": "pneumothorax", "present": True, "side": "left"}], "phantom:cxr"),
    Case("phantom:oct:1", "Macular OCT. Findings: subretinal fluid beneath the fovea.", "oct", "oct_1.png",
         [{"name": "subretinal_fluid", "present": True}], "phantom:oct"),
]


class RecordingRetriever:
    """The real retriever, with a log of the calls made to it (to check that every call is in the trace)."""

    def __init__(self, retriever: Retriever):
        self.inner, self.calls = retriever, []
        self.concepts, self.matcher = retriever.concepts, retriever.matcher

    def search(self, query, k=5, modality=None, kinds=None):
        self.calls.append((query, modality, list(kinds or [])))
        return self.inner.search(query, k, modality=modality, kinds=kinds)


@pytest.fixture(scope="module")
def retriever(tmp_path_factory, embedder) -> Retriever:
    folder = tmp_path_factory.mktemp("kb")
    # the reasoner asks only for these kinds (it reads cues and modifiers from the lexicon itself)
    concepts = [c for c in load_lexicon() if c.kind in ("anatomy", "finding", "appearance")]
    batch_size, embedder.batch_size = embedder.batch_size, 16  # same vectors, less padding: ~30% faster on a CPU
    try:
        build_knowledge_base(folder, concepts, iter(CASES), embedder, "Flat", "Flat", progress=False)
    finally:
        embedder.batch_size = batch_size
    return load_retriever(folder, embedder, modalities=MODALITIES)


@pytest.fixture(scope="module")
def reasoner(retriever) -> RuleReasoner:
    return RuleReasoner(retriever)


@pytest.fixture(scope="module")
def corpus() -> dict:
    return yaml.safe_load(CORPUS.read_text(encoding="utf-8"))


def read(reasoner: RuleReasoner, text: str, modality: str):
    request = reasoner.parse_request(text, modality)
    return request, reasoner.assess_pathology(request, reasoner.localize_anatomy(request))


def findings(reasoner: RuleReasoner, text: str, modality: str) -> dict:
    """name -> finding, for requests naming each finding once."""
    return {f.name: f for f in read(reasoner, text, modality)[1].findings}


# ---------------------------------------------------------------- the corpus
def test_corpus_size_and_labels(corpus):
    requests = corpus["requests"]
    per_modality = {m: sum(resolve_modality(r["modality"]) == m for r in requests) for m in MODALITIES}
    assert len(requests) >= 120 and min(per_modality.values()) >= 20, per_modality
    ids = {c.id: c for c in load_lexicon()}
    for entry in requests:
        modality = resolve_modality(entry["modality"])
        for label in entry["expected"]:
            assert label["name"] in ids and modality in ids[label["name"]].modalities, (entry["text"], label)
            assert set(label) <= {"name", "present", "laterality", "severity", "location", "uncertain"}, label


def test_corpus_f1(reasoner, corpus, capsys):
    report = evaluate_corpus(reasoner, corpus["requests"], resolve=resolve_modality)
    with capsys.disabled():
        print(f"\nparse corpus: F1 {report['overall']['f1']:.3f} (P {report['overall']['precision']:.3f}, "
              f"R {report['overall']['recall']:.3f}); normal-study flag accuracy {report['normal_accuracy']:.3f}")
        for modality, scores in report["by_modality"].items():
            print(f"  {modality:10s} F1 {scores['f1']:.3f}  P {scores['precision']:.3f}  R {scores['recall']:.3f}  "
                  f"({scores['requests']} requests)")
    assert not report["failed"], report["failed"]
    assert report["overall"]["f1"] >= 0.90, report["by_modality"]
    assert report["normal_accuracy"] >= 0.90


def test_corpus_errors(reasoner, corpus):
    assert len(corpus["errors"]) >= 3
    for entry in corpus["errors"]:
        with pytest.raises(StageError) as err:
            read(reasoner, entry["text"], entry["modality"])
        assert entry["error"] in str(err.value), (entry, str(err.value))


def test_finding_f1_by_hand():
    expected = [
        [{"name": "pleural_effusion", "present": True, "laterality": "left", "severity": "mild"},
         {"name": "pneumothorax", "present": False}],
        [{"name": "drusen", "present": True, "uncertain": True}],
    ]
    predicted = [
        [{"name": "pneumothorax", "present": False, "laterality": "right"},  # laterality not labelled: not judged
         {"name": "pleural_effusion", "present": True, "laterality": "left", "severity": "moderate"},  # wrong severity
         {"name": "consolidation", "present": True}],  # not asked for
        [{"name": "drusen", "present": True, "uncertain": True}],
    ]
    scores = finding_f1(predicted, expected)
    # tp 2 (pneumothorax, drusen), fp 2 (effusion with the wrong severity, consolidation), fn 1 (effusion)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (2, 2, 1)
    assert scores["precision"] == 0.5 and scores["recall"] == round(2 / 3, 4) and scores["f1"] == round(4 / 7, 4)
    hedged = {"name": "drusen", "present": True, "uncertain": True}
    assert not finding_matches({"name": "drusen", "present": True}, hedged)
    assert finding_f1([[]], [[]])["f1"] == 1.0
    with pytest.raises(ValueError, match="1 predicted requests but 2 expected"):
        finding_f1([[]], [[], []])


def test_tokens_are_the_term_matchers_words(corpus):
    for entry in corpus["requests"]:
        tokens = tokenize(entry["text"])
        assert [t.norm for t in tokens] == normalise(entry["text"])
        assert all(entry["text"][t.start : t.end] == t.surface for t in tokens)


# ---------------------------------------------------------------- negation and uncertainty
def test_negation_scope_is_per_finding(reasoner):
    both = findings(reasoner, "No pleural effusion or pneumothorax.", "cxr")
    assert not both["pleural_effusion"].present and not both["pneumothorax"].present
    contrast = findings(reasoner, "no effusion, but right lower lobe consolidation", "cxr")
    assert not contrast["pleural_effusion"].present and contrast["consolidation"].present
    new_item = findings(reasoner, "No effusion, large left PTX", "cxr")  # an item with its own size and side
    assert not new_item["pleural_effusion"].present and new_item["pneumothorax"].present
    listed = findings(reasoner, "No pleural effusion, pneumothorax, or focal consolidation", "cxr")
    assert not any(f.present for f in listed.values()) and len(listed) == 3
    after = findings(reasoner, "Right upper lobe consolidation without effusion", "chest_ct")
    assert after["consolidation"].present and not after["pleural_effusion"].present
    assert after["pleural_effusion"].cues == ["cue.neg.without"]


@pytest.mark.parametrize("text, name", [
    ("Pneumothorax has resolved.", "pneumothorax"),
    ("The left effusion is not seen today.", "pleural_effusion"),
    ("PE ruled out", "pulmonary_embolism"),
    ("CT negative for pulmonary embolism", "pulmonary_embolism"),
    ("Lungs free of consolidation", "consolidation"),
    ("Costophrenic angles clear of effusion", "pleural_effusion"),
    ("Resolved SRF after anti-VEGF", "subretinal_fluid"),
])
def test_negation_cues(reasoner, text, name):
    modality = "oct" if "SRF" in text else "chest_ct" if "PE" in text or "CT" in text else "cxr"
    found = findings(reasoner, text, modality)
    assert name in found and not found[name].present, found


@pytest.mark.parametrize("text, name", [
    ("?pneumothorax", "pneumothorax"),
    ("? left PTX", "pneumothorax"),
    ("Cannot exclude a small left pneumothorax", "pneumothorax"),
    ("A small left pneumothorax cannot be excluded.", "pneumothorax"),
    ("possible RLL consolidation", "consolidation"),
    ("r/o pneumonia", "pneumonia"),
    ("Right basal atelectasis vs consolidation", "consolidation"),
])
def test_uncertainty_cues(reasoner, text, name):
    found = findings(reasoner, text, "cxr")
    assert found[name].present and found[name].uncertain, found


def test_statements_and_scopes_in_the_parse(reasoner):
    request = reasoner.parse_request("Large right effusion with no pneumothorax; possible RLL pneumonia.", "CXR")
    assert request.modality == "cxr" and request.modality_given == "CXR"
    texts = [s.text for s in request.statements]
    assert texts == ["Large right effusion", "with no pneumothorax", "possible RLL pneumonia"]
    assert [(s.negated, s.uncertain) for s in request.statements] == [(False, False), (True, False), (False, True)]
    scope = request.statements[1].scopes[0]
    assert scope.cue == "cue.neg.without" and request.text[scope.scope_start : scope.scope_end] == "pneumothorax"
    assert ParsedRequest(**request.model_dump(mode="json")) == request  # the graph's state keeps it as a dict


# ---------------------------------------------------------------- attributes
@pytest.mark.parametrize("text, modality, name, laterality", [
    ("left-sided pneumothorax", "cxr", "pneumothorax", "left"),
    ("pneumothorax on the right", "cxr", "pneumothorax", "right"),
    ("bilateral pleural effusions", "cxr", "pleural_effusion", "bilateral"),
    ("effusions at both bases", "cxr", "pleural_effusion", "bilateral"),
    ("RLL consolidation", "cxr", "consolidation", "right"),
    ("lingular consolidation in the lingula", "chest_ct", "consolidation", "left"),
    ("drusen OS", "fundus", "drusen", "left"),
    ("Right eye: DME", "oct", "diabetic_macular_edema", "right"),
    ("papilloedema OU", "fundus", "papilledema", "bilateral"),
])
def test_laterality(reasoner, text, modality, name, laterality):
    assert findings(reasoner, text, modality)[name].laterality == laterality


@pytest.mark.parametrize("text, modality, name, severity", [
    ("trace left effusion", "cxr", "pleural_effusion", "mild"),
    ("tiny apical PTX", "cxr", "pneumothorax", "mild"),
    ("massive right pleural effusion", "cxr", "pleural_effusion", "severe"),
    ("marked cardiomegaly", "cxr", "cardiomegaly", "severe"),
    ("moderate-sized pneumothorax", "chest_ct", "pneumothorax", "moderate"),
    ("extensive ground-glass opacity", "chest_ct", "ground_glass_opacity", "severe"),
    ("a few microaneurysms", "fundus", "microaneurysms", "mild"),  # the phantom's own words
    ("several cotton wool spots", "fundus", "cotton_wool_spots", "moderate"),
    ("large full-thickness macular hole", "oct", "macular_hole", "severe"),  # phantom grades small/medium/large
    ("moderate non-proliferative diabetic retinopathy", "fundus", "non_proliferative_diabetic_retinopathy", "moderate"),
])
def test_severity_words(reasoner, text, modality, name, severity):
    assert findings(reasoner, text, modality)[name].severity == severity


def test_no_severity_from_a_name(reasoner):
    assert findings(reasoner, "small vessel disease", "brain_mri")["white_matter_hyperintensities"].severity is None


@pytest.mark.parametrize("text, modality, name, location", [
    ("RLL pneumonia", "cxr", "pneumonia", "right_lower_lobe"),
    ("LUL nodule", "chest_ct", "nodule", "left_upper_lobe"),
    ("nodule in the left upper zone", "cxr", "nodule", "left_upper_zone"),
    ("peripheral GGO", "chest_ct", "ground_glass_opacity", "peripheral"),
    ("left frontal glioma", "brain_mri", "glioma", "frontal"),
    ("right MCA territory infarct", "brain_mri", "infarct", "mca"),
    ("haemorrhages superotemporally", "fundus", "retinal_hemorrhage", "superotemporal"),
    ("IRF nasal to the fovea", "oct", "intraretinal_fluid", "parafoveal_nasal"),
])
def test_locations_and_abbreviations(reasoner, text, modality, name, location):
    assert findings(reasoner, text, modality)[name].location == location


def test_anatomy_mentions(reasoner):
    request = reasoner.parse_request("RLL consolidation and a left upper lobe nodule, OD", "chest_ct")
    anatomy = reasoner.localize_anatomy(request)
    assert anatomy.region == "chest"
    places = {m.concept_id: m for m in anatomy.mentions}
    assert set(places) == {"right_lower_lobe", "left_upper_lobe"}  # OD is an eye word, not a chest place
    assert places["right_lower_lobe"].matched == "RLL" and places["right_lower_lobe"].side == "right"
    assert places["left_upper_lobe"].location == "left_upper_lobe"
    assert request.text[places["right_lower_lobe"].start : places["right_lower_lobe"].end] == "RLL"
    frontal = reasoner.localize_anatomy(reasoner.parse_request("left frontal lobe", "mri")).mentions[0]
    assert (frontal.concept_id, frontal.location, frontal.side) == ("frontal_lobe", "frontal", "left")


def test_most_specific_finding_and_no_false_positives(reasoner):
    assert set(findings(reasoner, "small pericardial effusion", "chest_ct")) == {"pericardial_effusion"}
    assert set(findings(reasoner, "tension pneumothorax", "cxr")) == {"tension_pneumothorax"}
    assert findings(reasoner, "right lower lobe, left upper zone", "cxr") == {}  # places are not findings
    ptx = findings(reasoner, "PTX", "cxr")["pneumothorax"]
    assert ptx.matched == "PTX" and ptx.codes == {"snomed": "36118008"} and ptx.drawable and ptx.score > 0


def test_one_word_names_of_other_modalities(reasoner):
    _, brain = read(reasoner, "large mass in the left frontal lobe", "brain_mri")  # a chest name; here a tumour
    assert [f.name for f in brain.findings] == ["tumor"] and any("read 'mass' as" in w for w in brain.warnings)
    _, chest = read(reasoner, "small pulmonary haemorrhage, no pneumothorax", "chest_ct")  # a finding the lexicon lacks
    assert [(f.name, f.present) for f in chest.findings] == [("pneumothorax", False)]
    assert any("pulmonary haemorrhage" in w for w in chest.warnings)


def test_not_drawable_warns_with_the_nearest_drawable(reasoner):
    _, result = read(reasoner, "GBM in the right temporal lobe", "brain_mri")
    gbm = result.findings[0]
    assert gbm.name == "glioblastoma" and not gbm.drawable
    assert any("glioblastoma" in w and "nearest finding it can draw is tumor" in w for w in result.warnings)


# ---------------------------------------------------------------- input errors and contradictions
def test_truncation(retriever):
    reasoner = RuleReasoner(retriever, max_chars=60)
    text = "Small left pleural effusion with mild cardiomegaly. " + "Moderate pulmonary oedema. " * 3
    request = reasoner.parse_request(text, "cxr")
    assert request.truncated and request.original_length == len(text)
    assert request.text == "Small left pleural effusion with mild cardiomegaly."  # cut at a statement boundary
    assert len(request.warnings) == 1 and f"dropped {len(text) - len(request.text)}" in request.warnings[0]
    assert "statement boundary" in request.warnings[0]
    words = reasoner.parse_request("pneumothorax " * 10, "cxr")  # no statement boundary: a word boundary
    assert words.truncated and words.text.endswith("pneumothorax") and len(words.text) <= 60
    assert not reasoner.parse_request("small PTX", "cxr").truncated


def test_input_errors(reasoner):
    with pytest.raises(StageError, match="unknown modality 'ultrasound'.*cxr \\(aliases: chest x-ray"):
        reasoner.parse_request("small effusion", "ultrasound")
    for blank in ("", "  \n\t "):
        with pytest.raises(StageError, match="empty"):
            reasoner.parse_request(blank, "cxr")
    with pytest.raises(StageError) as err:
        read(reasoner, "OCT with a cup-to-disc ratio of 0.8 and a pleural effusion", "oct")
    assert "pleural_effusion" in str(err.value) and "cxr, chest_ct" in str(err.value)
    assert "cup" not in str(err.value)  # the cup belongs to OCT too
    with pytest.raises(StageError, match=r"enlarged_cup.*fundus, oct.*choose one of fundus, oct.*or remove it"):
        read(reasoner, "Chest CT, CDR 0.9", "chest_ct")


def test_contradictions_are_flagged_not_raised(reasoner):
    _, normal = read(reasoner, "Normal chest X-ray with a large left pneumothorax", "cxr")
    assert normal.normal and [c.kind for c in normal.contradictions] == ["normal_with_findings"]
    assert normal.contradictions[0].findings == ["pneumothorax"]
    _, both = read(reasoner, "Left pleural effusion. No pleural effusion.", "cxr")
    assert [c.kind for c in both.contradictions] == ["present_and_absent"]
    _, sides = read(reasoner, "Small left effusion; no right effusion.", "cxr")  # different sides: no contradiction
    assert not sides.contradictions and len(sides.findings) == 2
    _, sizes = read(reasoner, "Small left pneumothorax. Large left pneumothorax.", "cxr")
    assert [c.kind for c in sizes.contradictions] == ["conflicting_attributes"]
    _, plain = read(reasoner, "Normal CXR. No effusion.", "cxr")
    assert plain.normal and not plain.contradictions
    _, merged = read(reasoner, "Cardiomegaly. IMPRESSION: moderate cardiomegaly.", "cxr")
    assert [(f.name, f.severity) for f in merged.findings] == [("cardiomegaly", "moderate")]


# ---------------------------------------------------------------- retrieval records and visual features
def test_every_retrieval_is_recorded(retriever):
    recording = RecordingRetriever(retriever)
    reasoner = RuleReasoner(recording)
    text = "Large mass in the left frontal lobe. Scattered lesions; no haemorrhage."
    request = reasoner.parse_request(text, "brain_mri")
    anatomy = reasoner.localize_anatomy(request)
    pathology = reasoner.assess_pathology(request, anatomy)
    visual = reasoner.map_visual_features(request, pathology)
    records = anatomy.retrievals + pathology.retrievals + visual.retrievals
    assert [(r.query, r.modality, r.kinds) for r in records] == recording.calls
    assert {r.stage for r in records} == {"localize_anatomy", "assess_pathology", "map_visual_features"}
    assert all(r.hits and {"id", "score", "kind", "source"} <= set(r.hits[0]) for r in records if r.kinds != ["case"])


def test_visual_descriptors_and_cases(reasoner):
    request, pathology = read(reasoner, "Large left pneumothorax, no pleural effusion", "CXR")
    visual = reasoner.map_visual_features(request, pathology)
    assert [(d.finding, d.appearance_id) for d in visual.descriptors] == [("pneumothorax", "pneumothorax@cxr")]
    assert "pleural line" in visual.descriptors[0].description and visual.descriptors[0].score > 0
    assert visual.cases and visual.cases[0]["id"] == "phantom:cxr:1" and visual.cases[0]["path"] == "cxr_1.png"
    assert set(visual.cases[0]) == {"id", "text", "score", "source", "path", "findings"}
    assert [r.kinds for r in visual.retrievals] == [["appearance"], ["case"]]


def test_visual_features_without_a_case_library(retriever):
    no_cases = Retriever(retriever.concepts, retriever.embed, None, modalities=MODALITIES)
    reasoner = RuleReasoner(no_cases)
    request, pathology = read(reasoner, "SRF beneath the fovea", "oct")
    visual = reasoner.map_visual_features(request, pathology)
    assert [d.appearance_id for d in visual.descriptors] == ["subretinal_fluid@oct"]
    assert visual.cases == [] and visual.retrievals[-1].kinds == ["case"] and visual.retrievals[-1].hits == []


# ---------------------------------------------------------------- one reader of findings
def test_the_loops_requests_read_the_same_by_every_reader(reasoner):
    """The self-improvement loop's requests carry a structured expectation; the graph's reader of findings, reading the
    clinician's words and reading the composed prompt, agrees with it, so the reward, the verifier and `synthmed eval`
    all check what the request asks for."""
    from agents.reader import FindingReader
    from agents.requests import PromptSampler
    from generator.phantoms import catalogue
    from pipelines.config import load_config

    reader = FindingReader(reasoner)
    sampler = PromptSampler(load_config("tiny").improve.prompts, catalogue())
    items = sampler.draw(20, epoch=1, seed=0) + sampler.heldout() + sampler.test()  # 100 requests, as before the test set
    parents = {c.id: c.parents for c in load_lexicon()}

    def lifted(name: str, wanted: dict) -> str:
        """A subtype the graph names ("distal acinar emphysema": paraseptal_emphysema) agrees with its requested parent."""
        todo = [name]
        while todo:
            n = todo.pop()
            if n in wanted:
                return n
            todo += parents.get(n, [])
        return name

    disagreements = []
    for item in items:
        stated = {f["name"]: f["present"] for f in item.findings if f["stated"]}
        _, pathology = read(reasoner, item.request, item.modality)
        parsed = {lifted(f.name, stated): f.present for f in pathology.findings if not f.uncertain}
        if parsed != stated:
            disagreements.append(("rules", item.request, parsed, stated))
        present = {f["name"]: f for f in item.findings if f["present"]}
        for f in pathology.findings:  # attributes the graph reads back agree with the expectation where both state one
            want = present.get(f.name)
            if want and want["laterality"] and f.laterality and f.laterality != want["laterality"]:
                disagreements.append(("laterality", item.request, f.laterality, want["laterality"]))
        labels = catalogue()[item.modality]
        # the request states what the clinician wrote (a normal study: every finding absent); the composed prompt also
        # names what its phrases imply ("CNV ... with surrounding subretinal fluid")
        for text, want in ((item.request, stated if item.present else item.expected), (item.prompt, item.expected)):
            got = reader.expected(text, item.modality, labels)
            if got != want:
                disagreements.append(("reader", text, got, want))
    assert not disagreements, disagreements[:5]


def test_a_steered_model_steers_a_requests_text_as_its_expectation(reasoner):
    """``synthmed sample --lora RUN/steered TEXT`` reads the findings it steers by from the text (the graph's reader); the
    table was fitted on the requests' structured expectations. Read back from the clinician's words, with the lineage of
    kinds, the side-free offsets and what a finding implies (the run's sampler's, kept in the steered folder: "active
    CNV" is asked for with its subretinal fluid), every request steers by the features of its expectation."""
    import torch

    from agents.reader import FindingReader
    from agents.requests import PromptSampler
    from generator.phantoms import catalogue
    from generator.steering import OffsetTable, TableSteering, request_features
    from pipelines.config import load_config

    reader = FindingReader(reasoner)
    sampler = PromptSampler(load_config("tiny").improve.prompts, catalogue())
    items = sampler.draw(40, epoch=1, seed=0) + sampler.heldout() + sampler.test()
    vocab = sorted({f for item in items for f in request_features(item.modality, item.findings)})
    steering = TableSteering(OffsetTable(vocab, [999], torch.zeros(1, len(vocab), 1)), 1.0, implies=sampler.implications())
    steering.lineage = reader.lineage
    assert steering.implies["oct"]["choroidal_neovascularization"] == ["subretinal_fluid"]
    keep = ("name", "present", "laterality", "severity", "location")
    differ = []
    for item in items:
        read_back = [{k: v for k, v in f.model_dump().items() if k in keep and v is not None}
                     for f in reader.read(item.request, item.modality).findings if not f.uncertain]
        got, want = steering.features([item.modality] * 2, [read_back, list(item.findings)])
        if sorted(got) != sorted(want):
            differ.append((item.request, sorted(set(got) ^ set(want))))
    assert not differ, differ[:5]


def test_the_real_profiles_requests_read_the_same(reasoner):
    """The loop's requests for the real generator (its wording.json's labels, worded by the lexicon's terms, composed in
    the captions' words): the graph reads the clinician's words as the expectation, and the composed prompt never
    contradicts it (a model's normal caption may deny fewer findings than the request: "no radiographic evidence of
    pneumonia")."""
    import json

    from agents.reader import FindingReader
    from agents.requests import PromptSampler, wording_catalogue
    from generator.paths import shipped
    from knowledge.lexicon import load_lexicon
    from pipelines.config import load_config

    wording = json.loads((shipped("generator/weights/real") / "wording.json").read_text(encoding="utf-8"))
    concepts = load_lexicon()
    catalogue = {m: wording_catalogue(wording, m, concepts) for m in wording}
    labels = {m: list(c) for m, c in catalogue.items()}
    cfg = load_config("real").improve.prompts.model_copy(update={"modalities": sorted(wording), "heldout": {}})
    sampler = PromptSampler(cfg, labels, catalogue, wording)
    assert sampler.train_combos["fundus"] and ("diabetic_macular_edema", "diabetic_retinopathy") in \
        sampler.train_combos["fundus"] + sampler.heldout_combos["fundus"]  # seen together in its training images
    assert not any(len(c) == 2 for c in sampler.train_combos["brain_mri"] + sampler.heldout_combos["brain_mri"])  # never together
    reader = FindingReader(reasoner)
    training = sampler.draw(120, epoch=1, seed=0)
    assert not any(set(item.expected) & sampler.heldout_only[item.modality] for item in training)
    named = PromptSampler(cfg.model_copy(update={"heldout": {"chest_ct": ["lung_cancer"]}}), labels, catalogue, wording)
    assert named.heldout_only["chest_ct"] == {"lung_cancer"} and named.train_combos["chest_ct"] == [("nodule",)]
    assert all("lung_cancer" not in item.expected for item in named.draw(40, epoch=0, seed=0) if item.modality == "chest_ct")
    alone = PromptSampler(cfg.model_copy(update={"findings": {"chest_ct": ["lung_cancer"]}, "heldout": {"chest_ct": ["lung_cancer"]}}),
                          labels, catalogue, wording)
    assert "chest_ct" not in alone.train_modalities and "chest_ct" in {item.modality for item in alone.heldout()}
    assert "chest_ct" not in {item.modality for item in alone.draw(40, epoch=0, seed=0)}
    held = sampler.heldout()
    items = training + held
    disagreements = []
    for item in items:
        assert " Findings: " in item.prompt and item.prompt.startswith(tuple(wording[item.modality]["technique"].values()))
        want = {f["name"]: f["present"] for f in item.findings if f["stated"]} if item.present else item.expected
        judged = [name for name in labels[item.modality] if item in held or name not in sampler.heldout_only[item.modality]]
        got = reader.expected(item.request, item.modality, judged)  # a training request's unasked findings are not judged
        if got != want:
            disagreements.append(("request", item.request, got, want))
        got = reader.expected(item.prompt, item.modality, labels[item.modality])
        if any(got.get(name, present) != present for name, present in item.expected.items()) or \
                not all(got.get(name) for name in item.present):
            disagreements.append(("prompt", item.prompt, got, item.expected))
    assert not disagreements, disagreements[:5]


def test_every_caller_reads_the_parse_corpus_the_same(reasoner, corpus):
    """One reader of findings: for every request of the parse corpus, the graph (its pathology stage, then what the
    verifier checks), a finding scorer given prompts alone, and `synthmed synthesize` reading a CSV spec state the
    same findings, or all refuse the request."""
    from agents.reader import FindingReader, project
    from pipelines.synthesize import text_request
    from rlhf.scorers import build_scorer

    reader = FindingReader(reasoner)
    scorer = build_scorer("finding_reward", reader=reader)
    checked = refused = 0
    for item in corpus["requests"]:
        modality = resolve_modality(item["modality"], reasoner.modalities)
        labels = scorer.classifiers[modality].label_names
        try:
            request, pathology = read(reasoner, item["text"], item["modality"])
        except StageError:
            with pytest.raises(UserError):
                text_request(item["text"], item["modality"], None, reader, labels)
            refused += 1
            continue
        graph = project([f.model_dump() for f in pathology.findings], labels, reasoner.lineage, normal=pathology.normal)
        callers = {"reader": reader.expected(item["text"], item["modality"], labels),
                   "scorer": scorer.expected_for(item["text"], modality)}
        if graph and pathology.normal and any(graph.values()):  # the graph flags the contradiction, synthesize refuses it
            assert any(c.kind == "normal_with_findings" for c in pathology.contradictions)
            with pytest.raises(UserError, match="normal study with a finding"):
                text_request(item["text"], item["modality"], None, reader, labels)
        elif graph:  # synthesize refuses a text that states nothing it can draw
            callers["synthesize"] = text_request(item["text"], item["modality"], None, reader, labels).expected
        for name, got in callers.items():
            assert got == graph, (name, item["text"], got, graph)
        checked += 1
    assert checked >= 150 and refused == len(corpus["requests"]) - checked


def test_a_scorer_without_expected_findings_or_a_reader_says_what_to_give():
    import torch

    from rlhf.scorers import build_scorer

    scorer = build_scorer("finding_reward")
    with pytest.raises(UserError, match="expected=.*reader="):
        scorer.score(torch.zeros(1, 3, 64, 64), ["Left pleural effusion."], ["cxr"])


@pytest.mark.parametrize(
    "text, modality, expected",
    [
        ("Small left pleural effusion. No pneumothorax.", "cxr", {"pleural_effusion": True, "pneumothorax": False}),
        ("No focal airspace opacity, effusion or pneumothorax.", "cxr", {"consolidation": False, "pleural_effusion": False, "pneumothorax": False}),
        ("No pneumothorax, large left effusion.", "cxr", {"pneumothorax": False, "pleural_effusion": True}),
        ("Effusion and PTX are not seen.", "cxr", {"pleural_effusion": False, "pneumothorax": False}),
        ("Cardiomegaly without pulmonary edema.", "cxr", {"cardiomegaly": True, "pulmonary_edema": False}),
        ("Possible consolidation; nodule cannot be excluded.", "cxr", {}),
        ("Intracerebral hemorrhage, no ischemic infarct or tumour.", "brain_mri", {"hemorrhage": True, "infarct": False, "tumor": False}),
        ("Papilledema. No retinal hemorrhages.", "fundus", {"papilledema": True, "retinal_hemorrhage": False}),
        ("CNV with subretinal fluid; no IRF.", "oct", {"choroidal_neovascularization": True, "subretinal_fluid": True, "intraretinal_fluid": False}),
        ("Bilateral ground glass opacities.", "chest_ct", {"ground_glass_opacity": True}),
    ],
)
def test_reader_handles_spelling_abbreviations_lists_and_hedges(reasoner, text, modality, expected):
    from agents.reader import FindingReader

    got = FindingReader(reasoner).expected(text, modality)
    assert got == expected and list(got) == [n for n in FindingReader(reasoner).labels(modality) if n in expected]


def test_reader_whole_study_normal_and_the_real_datasets_labels(reasoner):
    from agents.reader import FindingReader
    from generator.phantoms import get_spec

    reader = FindingReader(reasoner)
    assert reader.expected("CXR PA. The lungs are clear. Impression: Normal chest radiograph.", "cxr") == \
        {name: False for name in get_spec("cxr").findings}
    # the real data adapters' labels: a kind of a label states its label present, the absence of a kind says nothing of it
    labels = ["diabetic_macular_edema", "diabetic_retinopathy"]
    assert reader.expected("Findings: no diabetic macular oedema; non-proliferative diabetic retinopathy.", "fundus", labels) == {
        "diabetic_macular_edema": False, "diabetic_retinopathy": True}
    assert reader.expected("No proliferative diabetic retinopathy.", "fundus", labels) == {}
    brain = ["glioma", "meningioma", "pituitary_tumor"]
    assert reader.expected("Brain MRI. Findings: intra-axial mass consistent with glioma.", "brain_mri", brain) == {"glioma": True}
    assert reader.expected("Brain MRI. Findings: no intracranial tumour.", "brain_mri", brain) == dict.fromkeys(brain, False)
    assert reader.expected("Axial T2-weighted FLAIR MRI of the brain. No haemorrhage.", "brain_mri") == {"hemorrhage": False}


@pytest.mark.parametrize("modality", MODALITIES)
def test_reader_reads_present_and_negated_findings_in_phantom_reports(reasoner, modality):
    """The phantom reports (the generator's captions) read back as the findings they were drawn with."""
    from agents.reader import FindingReader
    from generator.phantoms import NORMAL, get_spec, make_phantom

    reader = FindingReader(reasoner)
    names = [NORMAL, *get_spec(modality).findings]
    for i, finding in enumerate(names):
        for negatives in (0, 2):
            study = make_phantom(modality, [finding], size=32, seed=(21, i, negatives), negatives=negatives)
            stated = reader.expected(study.text, modality)
            present = {f.name for f in study.findings if f.present}
            negated = {f.name for f in study.findings if not f.present}
            assert {f for f, p in stated.items() if p} == present, study.text
            assert negated <= {f for f, p in stated.items() if not p}, study.text
            if finding == NORMAL:
                assert stated == dict.fromkeys(get_spec(modality).findings, False), study.text


def test_the_untouched_test_prompts_are_held_out_combinations_worded_apart():
    from agents.requests import PromptSampler
    from generator.phantoms import catalogue
    from pipelines.config import load_config

    cfg = load_config("tiny").improve.prompts
    sampler = PromptSampler(cfg, catalogue())
    held, test = sampler.heldout(), sampler.test()
    assert len(test) == cfg.test_per_modality * len(cfg.modalities)
    assert {t.key for t in test} <= sampler.combination_keys("heldout") and not {t.key for t in test} & sampler.combination_keys("train")
    assert not {t.prompt for t in test} & {h.prompt for h in held}  # no request of the test set is a held-out request
    assert [t.prompt for t in PromptSampler(cfg, catalogue()).test()] == [t.prompt for t in test]  # fixed per seed
    assert PromptSampler(cfg.model_copy(update={"test_per_modality": 0}), catalogue()).test() == []
