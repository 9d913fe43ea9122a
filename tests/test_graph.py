"""The whole agent graph on tiny models, with the real LangGraph runtime, the real SQLite checkpointer,
the real FAISS knowledge base and the real verifier: the path taken, the loop bound, a verification
that fails once and then passes, refusals, resuming after a crash, the trace read back."""

from __future__ import annotations

import json

import pytest
import torch

from agents.config import AgentsConfig, VerifierConfig
from agents.drawing import ImageGenerator, consecutive_runs
from agents.graph import build_graph, recursion_limit
from agents.nodes import after_verify, settings_from
from agents.traces import format_trace, list_traces, open_checkpointer, show_trace
from agents.verifier import Verifier
from generator.conditioning import TextEncoder
from generator.config import ModelConfig
from generator.models import LatentDiffusion
from knowledge.build import build_knowledge_base, load_retriever
from knowledge.lexicon import load_lexicon
from rlhf.classifiers import FindingScorer, fit_classifier, phantom_benchmark_rows
from rlhf.config import ClassifierConfig

TINY = ModelConfig(image_size=32, vae_channels=[8, 16], latent_channels=4, unet_channels=[16, 32], unet_attention_heads=2,
                   cross_attention_dim=32, text_max_length=16)
MODALITIES = ["cxr", "chest_ct", "brain_mri", "fundus", "oct"]
REASONING = ["parse_request", "localize_anatomy", "assess_pathology", "map_visual_features"]


@pytest.fixture(scope="module")
def retriever(tmp_path_factory, embedder):
    folder = tmp_path_factory.mktemp("kb")
    build_knowledge_base(folder, load_lexicon(), iter([]), embedder, "Flat", "Flat", progress=False)
    return load_retriever(folder, embedder, modalities=MODALITIES)


@pytest.fixture(scope="module")
def reasoner(retriever):
    from agents.rules import RuleReasoner

    return RuleReasoner(retriever)


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    model = LatentDiffusion(TINY, MODALITIES, text_encoder=TextEncoder(TINY.text_encoder, TINY.text_max_length)).eval()
    return ImageGenerator(model, {"cxr": 1, "chest_ct": 1, "brain_mri": 1, "fundus": 3, "oct": 1}, batch_size=4)


@pytest.fixture(scope="module")
def reward_scorer():
    cfg = ClassifierConfig(image_size=32, epochs=1, batch_size=16, convnet_widths=[8, 16], resnet_widths=[8, 16],
                           stem_patch=2, benchmark_per_finding=0, augment=False)
    classifier, _ = fit_classifier(cfg, "reward", "cxr", phantom_benchmark_rows("cxr", 2, 32, seed=3), progress=False)
    return FindingScorer({"cxr": classifier}, "reward")


@pytest.fixture(scope="module")
def verifier_scorer():
    cfg = ClassifierConfig(image_size=32, epochs=1, batch_size=16, verifier_widths=[12, 24], resnet_widths=[8, 16],
                           stem_patch=2, benchmark_per_finding=0, augment=False, val_fraction=0.4)
    classifier, _ = fit_classifier(cfg, "verifier", "cxr", phantom_benchmark_rows("cxr", 2, 32, seed=3), progress=False)
    return FindingScorer({"cxr": classifier}, "verifier")


def verifier_with(scorer, present: float, absent: float) -> Verifier:
    return Verifier(scorer, None, VerifierConfig(present_threshold=present, absent_threshold=absent, use_alignment=False))


class FailFirst(Verifier):
    """The real verifier, judging the first round with thresholds no image meets and later rounds with ones every image meets."""

    def __init__(self, scorer):
        super().__init__(scorer, None, VerifierConfig(use_alignment=False))
        self.calls = 0

    def verify(self, *args, **kwargs):
        self.calls += 1
        self.config = VerifierConfig(present_threshold=1.0, absent_threshold=0.0, use_alignment=False) if self.calls == 1 else \
            VerifierConfig(present_threshold=0.0, absent_threshold=1.0, use_alignment=False)
        return super().verify(*args, **kwargs)


def run(graph, text, modality, tmp_path, trace_id="t1", cfg=None, **settings):
    cfg = cfg or AgentsConfig(candidates=2, steps=2, out=str(tmp_path / "images"))
    s = settings_from(cfg, trace_id, 2, 4.0, **settings)
    return graph.invoke({"text": text, "modality": modality, "settings": s},
                        {"configurable": {"thread_id": trace_id}, "recursion_limit": recursion_limit(s["max_rounds"])})


def path_of(state) -> list[str]:
    return [e["node"] for e in state["events"]]


def test_pass_first_round_visits_every_stage_once_and_keeps_a_trace(tmp_path, reasoner, generator, reward_scorer):
    db = tmp_path / "traces.sqlite"
    saver = open_checkpointer(db)
    graph = build_graph(reasoner, generator, verifier_with(reward_scorer, 0.0, 1.0), saver)
    state = run(graph, "Chest X-ray: large left pleural effusion. No pneumothorax.", "CXR", tmp_path)
    assert path_of(state) == [*REASONING, "compose_prompt", "generate", "verify", "finish"]
    assert state["status"] == "passed" and state["request"]["modality"] == "cxr"
    found = {f["name"]: f for f in state["result"]["findings"]}
    assert found["pleural_effusion"]["present"] and found["pleural_effusion"]["laterality"] == "left"
    assert found["pleural_effusion"]["severity"] == "severe" and found["pneumothorax"]["present"] is False
    assert "left pleural effusion" in state["composition"]["prompt"].lower()
    assert "pneumothorax" in state["composition"]["negative"].lower()
    image = state["result"]["images"][0]
    assert image.endswith(".png") and (tmp_path / "images").exists()
    verdict = state["verdicts"][0]
    checked = {r["name"]: r for r in verdict["candidates"][0]["findings"]}
    assert checked["pleural_effusion"]["expected"] == "present" and 0 <= checked["pleural_effusion"]["probability"] <= 1
    assert checked["pneumothorax"]["expected"] == "absent"
    assert all(r["stage"] in REASONING for r in state["retrievals"]) and state["retrievals"]
    saver.conn.close()

    rows = list_traces(db)
    assert [r["trace_id"] for r in rows] == ["t1"] and rows[0]["status"] == "passed" and rows[0]["steps"] >= 9
    trace = show_trace(db, "t1")
    assert trace["stages"]["assess_pathology"]["findings"] and trace["verdicts"][0]["passed"]
    assert trace["retrievals"]["assess_pathology"][0]["hits"][0]["source"]
    text = format_trace(trace)
    assert "assess_pathology" in text and "round 0: pass" in text and "prompt:" in text
    json.dumps(trace)  # plain JSON all the way down


def test_loop_is_bounded_and_the_failing_verdict_is_recorded(tmp_path, reasoner, generator, reward_scorer):
    graph = build_graph(reasoner, generator, verifier_with(reward_scorer, 1.0, 0.0), open_checkpointer(tmp_path / "t.sqlite"))
    state = run(graph, "pleural effusion on the right", "cxr", tmp_path, max_rounds=3)
    assert path_of(state) == [*REASONING, "compose_prompt", "generate", "verify", "refine", "generate", "verify", "refine",
                              "generate", "verify", "finish"]
    assert state["status"] == "failed" and len(state["verdicts"]) == 3 and not state["result"]["verdict"]["passed"]
    assert state["result"]["images"], "a failed request still returns its best candidate"
    seeds = [c["seed"] for c in state["candidates"]]
    assert len(set(seeds)) == len(seeds) == 6, "every round reseeds"
    first = state["refinements"][0]["actions"]
    kinds = {a["action"] for a in first}
    assert {"emphasis", "negative_normal", "guidance", "reseed"} <= kinds
    emphasis = next(a for a in first if a["action"] == "emphasis")
    assert emphasis["finding"] == "pleural_effusion" and emphasis["severity"] == "severe"  # the user gave no severity
    guidance = [c["guidance"] for c in state["candidates"]]
    assert guidance[0] < guidance[2] < guidance[4]
    assert "Normal chest radiograph" in state["composition"]["negative"]


def test_user_severity_is_never_escalated(tmp_path, reasoner, generator, reward_scorer):
    graph = build_graph(reasoner, generator, verifier_with(reward_scorer, 1.0, 0.0))
    state = run(graph, "small right pleural effusion", "cxr", tmp_path, max_rounds=2)
    emphasis = next(a for a in state["refinements"][0]["actions"] if a["action"] == "emphasis")
    assert "severity" not in emphasis and "wording kept" in emphasis["applied"]
    assert "small right pleural effusion" in state["composition"]["prompt"].lower()


def test_verification_fails_once_then_passes(tmp_path, reasoner, generator, reward_scorer):
    verifier = FailFirst(reward_scorer)
    graph = build_graph(reasoner, generator, verifier, open_checkpointer(tmp_path / "t.sqlite"))
    state = run(graph, "moderate cardiomegaly", "cxr", tmp_path, max_rounds=3)
    assert path_of(state) == [*REASONING, "compose_prompt", "generate", "verify", "refine", "generate", "verify", "finish"]
    assert [v["passed"] for v in state["verdicts"]] == [False, True] and state["status"] == "passed"
    assert all(c["round"] == 1 for c in state["result"]["verdict"]["candidates"]), "the passing round's image is kept"


def test_router_is_a_pure_function_of_the_state():
    state = {"verdicts": [{"passed": False}], "round": 2, "settings": {"max_rounds": 3}}
    assert after_verify(state) == "refine"
    assert after_verify({**state, "round": 3}) == "finish"
    assert after_verify({**state, "verdicts": [{"passed": True}]}) == "finish"


@pytest.mark.parametrize("text,modality,needle", [
    ("Normal study. Large right pleural effusion.", "cxr", "contradictory"),
    ("cup-to-disc ratio 0.8", "chest CT", "fundus"),
    ("left pleural effusion", "ultrasound", "known modalities"),
    ("   ", "cxr", "empty"),
])
def test_bad_requests_are_refused_with_a_reason_and_traced(tmp_path, reasoner, generator, reward_scorer, text, modality, needle):
    db = tmp_path / "t.sqlite"
    graph = build_graph(reasoner, generator, verifier_with(reward_scorer, 0.0, 1.0), open_checkpointer(db))
    state = run(graph, text, modality, tmp_path)
    assert state["status"] == "refused" and needle in state["error"].lower()
    assert path_of(state)[-1] == "finish" and "generate" not in path_of(state)
    assert show_trace(db, "t1")["status"] == "refused"


def test_contradiction_resolved_when_configured(tmp_path, reasoner, generator, reward_scorer):
    graph = build_graph(reasoner, generator, verifier_with(reward_scorer, 0.0, 1.0))
    cfg = AgentsConfig(candidates=1, steps=2, out=str(tmp_path / "images"), contradiction="prefer_findings")
    state = run(graph, "Normal study. Large right pleural effusion.", "cxr", tmp_path, cfg=cfg)
    assert state["status"] == "passed" and not state["pathology"]["normal"]
    assert any("contradiction" in w for w in state["warnings"])


def test_long_request_is_truncated_and_the_trace_says_so(tmp_path, reasoner, generator, reward_scorer):
    graph = build_graph(reasoner, generator, verifier_with(reward_scorer, 0.0, 1.0))
    text = "Left pleural effusion. " + "The patient was seen in clinic and is otherwise well. " * 80
    state = run(graph, text, "cxr", tmp_path, cfg=AgentsConfig(candidates=1, steps=2, out=str(tmp_path / "i"), max_chars=200),
                stop_after="compose_prompt")
    assert state["request"]["truncated"] and state["request"]["original_length"] == len(text)
    assert any("truncat" in w.lower() for w in state["warnings"])
    assert path_of(state) == [*REASONING, "compose_prompt", "finish"] and not state.get("candidates")
    assert state["status"] == "composed" and state["result"]["images"] == []


class CrashOnce(ImageGenerator):
    def __init__(self, inner):
        super().__init__(inner.model, inner.channels, batch_size=inner.batch_size)
        self.crashed = False

    def draw(self, *args, **kwargs):
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("simulated crash while drawing")
        return super().draw(*args, **kwargs)


def test_a_crashed_request_resumes_from_its_last_checkpoint(tmp_path, reasoner, generator, reward_scorer):
    db = tmp_path / "t.sqlite"
    graph = build_graph(reasoner, CrashOnce(generator), verifier_with(reward_scorer, 0.0, 1.0), open_checkpointer(db))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(graph, "left pneumothorax", "cxr", tmp_path)
    resumed = graph.invoke(None, {"configurable": {"thread_id": "t1"}, "recursion_limit": 30})
    assert resumed["status"] == "passed"
    nodes = path_of(resumed)
    assert nodes.count("parse_request") == 1 and nodes.count("generate") == 1, "the stages done before the crash are not rerun"


def test_consecutive_seed_runs():
    assert consecutive_runs([4, 5, 6, 9, 10], 2) == [[4, 5], [6], [9, 10]]


def test_verifier_refuses_the_held_out_evaluator_and_flags_a_copy(reward_scorer, generator, tmp_path):
    from rlhf.classifiers import fit_classifier as fit

    cfg = ClassifierConfig(image_size=32, epochs=1, batch_size=16, convnet_widths=[8, 16], resnet_widths=[8, 16],
                           stem_patch=2, benchmark_per_finding=0, augment=False)
    evaluator, _ = fit(cfg, "evaluator", "cxr", phantom_benchmark_rows("cxr", 1, 32, seed=4), progress=False)
    with pytest.raises(ValueError, match="held-out evaluator"):
        Verifier(FindingScorer({"cxr": evaluator}, "evaluator"))

    paths, images, _ = generator.draw("Chest radiograph. Findings: left pneumothorax.", "cxr", [0, 1], tmp_path)
    blank = -torch.ones(1, 3, 32, 32)
    verifier = Verifier(reward_scorer, None, VerifierConfig(present_threshold=0.0, use_alignment=False),
                        training_images={"cxr": images[:1]})
    verdict = verifier.verify(torch.cat([images, blank]), "left pneumothorax", "cxr",
                              [{"name": "pneumothorax", "present": True}], paths=[*paths, "blank"], seeds=[0, 1, 2])
    copy, other, empty = verdict["candidates"]
    assert copy["memorisation"]["nearest_ssim"] > 0.99 and not copy["passed"] and any("memorisation" in f for f in copy["failures"])
    assert other["memorisation"]["checked"] and other["memorisation"]["nearest_ssim"] < copy["memorisation"]["nearest_ssim"]
    assert empty["quality"]["blank"] and not empty["passed"]
    assert verdict["best"] != 2, "a blank image is never the best candidate"


def test_the_verifier_reads_each_finding_at_the_reward_classifiers_operating_point(reward_scorer, generator, tmp_path):
    from rlhf.classifiers import FindingClassifier

    base = reward_scorer.classifiers["cxr"]
    _, images, _ = generator.draw("Chest radiograph. Findings: left pneumothorax.", "cxr", [0], tmp_path)
    findings = [{"name": "pneumothorax", "present": True}, {"name": "nodule", "present": False}]
    p = reward_scorer.operating_points("cxr")
    assert set(p) == set(base.label_names)
    observed = {}
    for threshold in (0.0, 1.0):  # every label's point at 0 (all shown) and at 1 (none shown)
        clf = FindingClassifier(base.network, base.label_names, base.image_size, base.temperature, "reward", "cxr",
                                base.architecture, thresholds=[threshold] * len(base.label_names))
        verdict = Verifier(FindingScorer({"cxr": clf}, "reward"), None, VerifierConfig(use_alignment=False)).verify(
            images, "left pneumothorax, no nodule", "cxr", findings)
        rows = {r["name"]: r for r in verdict["candidates"][0]["findings"]}
        assert rows["pneumothorax"]["threshold"] == threshold and rows["nodule"]["threshold"] == threshold
        observed[threshold] = (rows["pneumothorax"]["pass"], rows["nodule"]["pass"])
    assert observed == {0.0: (True, False), 1.0: (False, True)}
    # a threshold set in the config overrides the classifier's own
    verdict = Verifier(reward_scorer, None, VerifierConfig(present_threshold=0.0, use_alignment=False)).verify(
        images, "left pneumothorax", "cxr", findings[:1])
    assert verdict["candidates"][0]["findings"][0]["threshold"] == 0.0


def test_a_prompt_longer_than_the_generator_reads_is_warned_of(tmp_path, reasoner, generator, reward_scorer):
    """The UNet attends to model.text_max_length tokens (16 in this tiny model): the trace names what it never sees."""
    graph = build_graph(reasoner, generator, verifier_with(reward_scorer, 0.0, 1.0))
    cfg = AgentsConfig(candidates=1, steps=2, out=str(tmp_path / "i"))
    state = run(graph, "Large right pleural effusion.", "cxr", tmp_path, cfg=cfg, stop_after="compose_prompt")
    prompt = state["composition"]["prompt"]
    encoder = generator.model.conditioner.text_encoder
    n = len(encoder.tokenizer(prompt)["input_ids"])
    assert n > encoder.max_length == 16
    cut = [w for w in state["warnings"] if w.startswith("prompt truncated by the generator")]
    assert len(cut) == 1 and f"it is {n} tokens and the model reads 16" in cut[0]
    tail = cut[0].split('never sees "')[1].split('";')[0]
    assert tail and prompt.lower().replace(" ", "").endswith(tail.replace(" ", ""))
    # a limit the prompt fits in: no such warning
    encoder.max_length = 512
    try:
        state = run(graph, "Large right pleural effusion.", "cxr", tmp_path / "b", trace_id="t2", cfg=cfg, stop_after="compose_prompt")
    finally:
        encoder.max_length = 16
    assert not [w for w in state["warnings"] if w.startswith("prompt truncated by the generator")]


def test_reward_guidance_draws_each_candidate_towards_what_the_request_states_and_says_so(tmp_path, reasoner, generator,
                                                                                          reward_scorer):
    from types import SimpleNamespace

    from rlhf.guidance import RewardGuide

    saver = open_checkpointer(tmp_path / "traces.sqlite")
    graph = build_graph(reasoner, generator, verifier_with(reward_scorer, 1.0, 0.0), saver)  # fails: every round drawn
    text = "Chest X-ray: large left pleural effusion. No pneumothorax."
    cfg = AgentsConfig(candidates=3, steps=3, max_rounds=1, out=str(tmp_path / "images"))
    plain = run(graph, text, "cxr", tmp_path, trace_id="plain", cfg=cfg)
    guided = run(graph, text, "cxr", tmp_path, trace_id="guided", cfg=cfg, reward_guidance=0.5)
    saver.conn.close()
    assert plain["settings"]["reward_guidance"] == 0 and guided["settings"]["reward_guidance"] == 0.5
    assert [c["seed"] for c in guided["candidates"]] == [c["seed"] for c in plain["candidates"]]
    assert all(c["reward_guidance"] == 0.5 for c in guided["candidates"])
    assert not any("reward_guidance" in c for c in plain["candidates"])
    assert any("reward guidance (scale 0.5)" in w and "not independent evidence" in w for w in guided["warnings"])
    assert not any("reward guidance" in w for w in plain["warnings"])
    trace = format_trace(show_trace(tmp_path / "traces.sqlite", "guided"))
    assert "reward-guided (scale 0.5)" in trace and "not independent evidence" in trace
    # the candidates are the guided sampler's, from the composed prompt, the candidates' seeds and what the verifier reads
    # the request to state (this tiny classifier is too flat to show the likelihood rising; tests/test_guided.py shows it
    # on trained ones, through the same function)
    from agents.drawing import read_images

    guide = RewardGuide(reward_scorer, 0.5)
    expected = {"pleural_effusion": True, "pneumothorax": False}
    composition = guided["composition"]
    _, again, _ = generator.draw(composition["prompt"], "cxr", [c["seed"] for c in guided["candidates"]], tmp_path / "again",
                                 negative=composition["negative"], guidance=guided["guidance"], steps=3, reward_guide=guide,
                                 expected=expected)
    drawn = read_images([c["path"] for c in guided["candidates"]])
    assert torch.equal(drawn, again)
    assert (drawn - read_images([c["path"] for c in plain["candidates"]])).abs().mean() > 0.01

    # each image depends on its own seed only, whatever the batch (its views are drawn from its seed too)
    one_by_one = ImageGenerator(generator.model, generator.channels, batch_size=1)
    _, batched, _ = generator.draw("left pleural effusion", "cxr", [4, 5, 6], tmp_path / "b", steps=3, reward_guide=guide,
                                   expected=expected)
    _, single, _ = one_by_one.draw("left pleural effusion", "cxr", [5, 6, 4], tmp_path / "s", steps=3, reward_guide=guide,
                                   expected=expected)
    assert (batched - single[[2, 0, 1]]).abs().max() <= 2 / 127.5  # the same up to a rounding at 8 bits

    # the held-out evaluator never guides; a modality without a reward classifier is one clear error
    with pytest.raises(ValueError, match="held-out evaluator must never guide"):
        RewardGuide(SimpleNamespace(role="evaluator", classifiers={}), 0.1)  # an evaluator-role scorer, as rlhf.classifiers builds
    with pytest.raises(ValueError, match="scale must be > 0"):
        RewardGuide(reward_scorer, 0.0)
    from generator.errors import UserError

    with pytest.raises(UserError, match="no reward-role finding classifier for modality 'oct'"):
        generator.draw("macular hole", "oct", [0], tmp_path / "o", steps=2, reward_guide=guide, expected={})


def test_the_verifiers_own_classifiers_judge_what_the_rewards_guided(tmp_path, reasoner, generator, reward_scorer, verifier_scorer):
    """With agents.verifier.role "verifier" the draw is guided by the reward's classifiers and judged by another network."""
    config = VerifierConfig(present_threshold=1.0, absent_threshold=0.0, use_alignment=False)
    own = Verifier(verifier_scorer, None, config, reward_scorer=reward_scorer)
    assert own.role == "verifier" and own.reward is reward_scorer and own.independent_of_reward
    same = verifier_with(reward_scorer, 1.0, 0.0)
    assert same.reward is reward_scorer and not same.independent_of_reward
    text = "Chest X-ray: large left pleural effusion. No pneumothorax."
    cfg = AgentsConfig(candidates=2, steps=3, max_rounds=1, out=str(tmp_path / "images"))
    states = {name: run(build_graph(reasoner, generator, v), text, "cxr", tmp_path / name, trace_id=name, cfg=cfg, reward_guidance=0.5)
              for name, v in (("own", own), ("same", same))}
    from agents.drawing import read_images

    # the same guide (the reward's classifiers) draws the same candidates whichever network then judges them
    drawn = {name: read_images([c["path"] for c in st["candidates"]]) for name, st in states.items()}
    assert torch.equal(drawn["own"], drawn["same"])
    verdicts = {name: st["verdicts"][0] for name, st in states.items()}
    assert verdicts["own"]["tools"]["finding_classifier"] == "verifier" and verdicts["same"]["tools"]["finding_classifier"] == "reward"
    own_p = [r["probability"] for c in verdicts["own"]["candidates"] for r in c["findings"] if r["checked"]]
    same_p = [r["probability"] for c in verdicts["same"]["candidates"] for r in c["findings"] if r["checked"]]
    assert own_p != same_p  # another network's reading
    assert any("trained apart from it" in w for w in states["own"]["warnings"])
    assert not any("not independent evidence" in w for w in states["own"]["warnings"])
    assert any("not independent evidence" in w for w in states["same"]["warnings"])

    # a verifier without the reward's classifiers cannot guide: the request is refused with the reason (it still draws
    # without guidance); and only the reward role may guide
    bare = Verifier(verifier_scorer, None, config)
    assert bare.reward is None
    refused = run(build_graph(reasoner, generator, bare), text, "cxr", tmp_path / "bare", trace_id="bare", cfg=cfg, reward_guidance=0.5)
    assert refused["status"] == "refused" and "reward guidance needs the reward-role finding classifiers" in refused["error"]
    assert not refused.get("candidates") and [e["node"] for e in refused["events"]][-2:] == ["generate", "finish"]
    assert run(build_graph(reasoner, generator, bare), text, "cxr", tmp_path / "bare", trace_id="bare2", cfg=cfg)["verdicts"]
    with pytest.raises(ValueError, match="reward_scorer must hold the reward-role classifiers"):
        Verifier(verifier_scorer, None, config, reward_scorer=verifier_scorer)
