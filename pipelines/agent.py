"""The agent graph assembled from a config: the parts built once, then one request per call.

``synthmed generate``, ``synthmed bench graph`` and ``synthmed eval --graph`` share this, so what
is measured is what users run.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.graph import build_graph, recursion_limit
from agents.nodes import settings_from



def new_trace_id() -> str:
    """Sortable by time, unique across processes."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def knowledge_retriever(cfg, progress: bool = True):
    """The configured knowledge base's retriever; the base is built first when it is not on disk
    (:func:`knowledge.open.open_knowledge_base`)."""
    from knowledge.open import open_knowledge_base

    return open_knowledge_base(cfg, build_if_absent=True, progress=progress)


def build_reasoner(cfg, retriever, drawable: dict[str, set[str]] | None = None, chat_model=None):
    from agents.rules import RuleReasoner
    from knowledge.open import lexicon_for

    a = cfg.agents
    rules = RuleReasoner(retriever, cfg.data.modalities, drawable, max_chars=a.max_chars, k=a.retrieval_k, lexicon=lexicon_for(cfg))
    if a.reasoner == "rules" and chat_model is None:
        return rules
    from agents.llm import LLMReasoner, make_chat_model

    known = {m: {item["id"] for item in retriever.concepts.items if item["kind"] == "finding"
                 and (not item.get("modalities") or m in item["modalities"])} for m in cfg.data.modalities}
    return LLMReasoner(chat_model or make_chat_model(a.llm), rules, a.llm.stages, known)


def finding_reader(cfg, retriever=None, progress: bool = True):
    """The one reader of findings in text (:class:`agents.reader.FindingReader`): the graph's rule reasoner on the
    configured knowledge base (built first when absent), whatever reasoning backend the graph runs."""
    from agents.reader import FindingReader
    from agents.rules import RuleReasoner
    from knowledge.open import lexicon_for

    a = cfg.agents
    retriever = retriever if retriever is not None else knowledge_retriever(cfg, progress=progress)
    return FindingReader(RuleReasoner(retriever, cfg.data.modalities, max_chars=a.max_chars, k=a.retrieval_k, lexicon=lexicon_for(cfg)))


def build_verifier(cfg, device: str = "cpu"):
    from agents.verifier import Verifier
    from rlhf.classifiers import load_finding_scorer

    from rlhf.evaluate import read_training_images

    v = cfg.agents.verifier
    scorer = load_finding_scorer(v.role, cfg.judges.classifier.out, device=device)
    # the reward's classifiers guide the draw of a request with reward guidance (small: loaded whether or not one asks)
    reward = scorer if v.role == "reward" else load_finding_scorer("reward", cfg.judges.classifier.out, device=device)
    alignment = None
    if v.use_alignment:
        from rlhf.alignment import load_alignment

        alignment = load_alignment(cfg.judges.alignment if cfg.judges.alignment.model else cfg.judges.alignment.out, device=device)
    training, note = {}, ""
    if v.use_memorisation:
        present = [m for m in v.training_data if Path(m).exists()]
        if present:
            training = read_training_images(present, cfg, cfg.model.image_size, limit=v.training_limit, first_wins=True)
            note = f"training images from {', '.join(present)}"
        else:
            note = (f"not checked: the generator's training images ({', '.join(v.training_data)}) are not on disk; "
                    "`synthmed train default` draws them")
    from agents.reader import lexicon_lineage
    from knowledge.open import lexicon_for

    return Verifier(scorer, alignment, v, cfg.judges.eval, training, note, lineage=lexicon_lineage(lexicon_for(cfg)), reward_scorer=reward)


def build_generator(cfg, model_path: str | None = None, device: str = "cpu"):
    from agents.drawing import ImageGenerator
    from generator.models import LatentDiffusion

    path = model_path or cfg.train.out
    model = LatentDiffusion.load(path, list(cfg.data.modalities), device=device)
    if cfg.sample.lora:
        from generator.models import apply_model_adapters

        apply_model_adapters(model, list(cfg.sample.lora))
        if model.steering is not None:  # the graph names kinds of findings ("plate atelectasis"): the table's by lineage
            from agents.reader import lexicon_lineage
            from knowledge.open import lexicon_for

            model.steering.lineage = lexicon_lineage(lexicon_for(cfg))
    channels = {m: spec.channels for m, spec in cfg.data.modalities.items()}
    s = cfg.sample
    return ImageGenerator(model, channels, s.sampler, s.eta, s.batch_size, s.guidance_schedule, source=str(path), precision=s.precision)


def drawable_findings(cfg, wording: dict | None = None) -> dict[str, set[str]]:
    """Findings the generator of this profile learnt: those its training captions word (``wording``, a model's
    wording.json), else the phantom catalogue; with the reward classifier's labels."""
    from generator.paths import shipped
    from generator.phantoms import catalogue

    found = {m: set(names) for m, names in catalogue().items()}
    found |= {m: set(w["present"]) for m, w in (wording or {}).items()}
    root = shipped(Path(cfg.judges.classifier.out) / "reward")
    for folder in root.glob("*") if root.is_dir() else []:
        meta = folder / "metadata.json"
        if meta.is_file():
            import json

            found.setdefault(folder.name, set()).update(json.loads(meta.read_text()).get("label_names", []))
    return found


@dataclass
class Agent:
    """The compiled graph and its parts."""

    cfg: Any
    graph: Any
    reasoner: Any
    generator: Any
    verifier: Any
    checkpointer: Any
    timings: dict = field(default_factory=dict)  # seconds to build each part

    def run(self, text: str, modality: str, trace_id: str | None = None, **settings) -> dict:
        """One request through the graph; the final state (with ``result``)."""
        trace_id = trace_id or new_trace_id()
        s = settings_from(self.cfg.agents, trace_id, self.cfg.sample.steps, self.cfg.sample.guidance, self.cfg.sample.negative, **settings)
        config = {"configurable": {"thread_id": trace_id}, "recursion_limit": recursion_limit(s["max_rounds"])}
        return self.graph.invoke({"text": text, "modality": modality, "settings": s}, config)

    def close(self) -> None:
        conn = getattr(self.checkpointer, "conn", None)
        if conn is not None:
            conn.close()


def build_agent(cfg, model_path: str | None = None, draw: bool = True, traces: str | None = None, progress: bool = True,
                chat_model=None) -> Agent:
    """Every part from ``cfg``: retriever (building the knowledge base if absent), reasoner, generator and
    verifier (skipped with ``draw=False``: reasoning and composition only), SQLite checkpointer."""
    from agents.traces import open_checkpointer

    from generator.devices import device_name

    device = device_name(cfg.run.device)
    timings = {}
    started = time.perf_counter()
    retriever = knowledge_retriever(cfg, progress)
    timings["retriever"] = time.perf_counter() - started
    from generator.data.wording import read_wording
    from generator.paths import shipped

    wording = read_wording(shipped(model_path or cfg.train.out))  # a model trained on reports words prompts as they do
    reasoner = build_reasoner(cfg, retriever, drawable_findings(cfg, wording), chat_model)
    generator = verifier = None
    if draw:
        started = time.perf_counter()
        generator = build_generator(cfg, model_path, device)
        timings["generator"] = time.perf_counter() - started
        started = time.perf_counter()
        verifier = build_verifier(cfg, device)
        timings["verifier"] = time.perf_counter() - started
    saver = open_checkpointer(traces or cfg.agents.traces) if traces != "" else None
    graph = build_graph(reasoner, generator, verifier, saver, cfg.agents, cfg.data.modalities, wording)
    return Agent(cfg, graph, reasoner, generator, verifier, saver, timings)


__all__ = ["Agent", "build_agent", "build_generator", "build_reasoner", "build_verifier", "drawable_findings",
           "knowledge_retriever", "new_trace_id"]
