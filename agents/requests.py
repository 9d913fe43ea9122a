"""Requests for the self-improvement loop: drawn from the findings each modality knows, written as a
clinician would, composed into the generator's words by the graph's own composition.

Each :class:`ImagePrompt` carries its **structured expectation** (finding -> present / absent, with
severity, side and location): the one reader of what a prompt asks for. The reward, the verifier and
the held-out evaluation all take it from here and never parse the text again.

Finding combinations (the normal study, each finding alone, each compatible pair) are split per
modality into training and held-out sets with a seed, or as ``improve.prompts.heldout`` names them: the
held-out prompts differ from the training prompts by *combination*, not only by wording. The normal
study always trains (it requests nothing, so it cannot measure "shows every requested finding").

What a modality's findings are comes from the phantom specifications, or, for a generator trained on
reports (the real profile), from its ``wording.json`` (:func:`wording_catalogue`): the labels its
captions word, in the lexicon's terms, paired only where its training images show them together; the
prompts are then composed in the captions' own words.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from generator.errors import UserError
from generator.fileio import write_text_atomic
from generator.phantoms import get_spec
from generator.phantoms.base import FindingSpec, side_away

from .prompts import SEVERITY_ORDER, _slots, compose_prompt, phantom_spec

NORMAL = "normal"


@dataclass(frozen=True)
class ImagePrompt:
    """One request and what the generator is given for it."""

    modality: str
    request: str  # the clinician's words
    prompt: str  # the generator's prompt (agents.prompts.compose_prompt, as `synthmed generate` sends it)
    negative: str  # the negative prompt of the same composition
    findings: tuple[dict, ...]  # structured expectation: {"name", "present", "severity", "laterality", "location", "stated"}
    # ("stated": False for the findings a normal study implies absent without naming them)
    key: str = field(default="")  # "<modality>:<present findings joined by +>" or "<modality>:normal"

    @property
    def expected(self) -> dict[str, bool]:
        """finding -> present (True) / absent (False): what the reward and the evaluator check."""
        return {f["name"]: bool(f["present"]) for f in self.findings}

    @property
    def generator_findings(self) -> tuple[dict, ...]:
        """What a generator with finding tokens is given (``generator.conditioning``): the present findings and the
        absences the request states, as a training manifest lists them (a normal study names only its negatives)."""
        return tuple(f for f in self.findings if f["present"] or f.get("stated", True))

    @property
    def present(self) -> list[str]:
        return [f["name"] for f in self.findings if f["present"]]

    def to_dict(self) -> dict:
        return {"modality": self.modality, "request": self.request, "prompt": self.prompt, "negative": self.negative,
                "findings": [dict(f) for f in self.findings], "key": self.key}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ImagePrompt":
        return cls(d["modality"], d["request"], d["prompt"], d["negative"], tuple(dict(f) for f in d["findings"]), d.get("key", ""))


def combination_key(modality: str, present: Iterable[str]) -> str:
    names = sorted(present)
    return f"{modality}:{'+'.join(names) if names else NORMAL}"


def _rng(*parts: int | str) -> np.random.Generator:
    return np.random.default_rng([p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts])


def _grade(fspec: FindingSpec, severity: str) -> str | None:
    """The spec's grade for a mild / moderate / severe request (matched by rank)."""
    if not fspec.severities:
        return None
    if severity in fspec.severities:
        return severity
    return fspec.severities[min(SEVERITY_ORDER.index(severity), len(fspec.severities) - 1)]


class PromptSampler:
    """Draws training requests per epoch and holds the fixed held-out requests of a run.

    ``labels``: per modality, the findings the reward classifier knows (a request asks only for what
    a judge can check). ``cfg`` is the ``improve.prompts`` section. ``catalogue`` and ``wording``: for a
    generator trained on reports, what each finding is (:func:`wording_catalogue`) and the words its captions
    use, in which the prompts are composed; elsewhere the phantom specifications and templates.
    """

    def __init__(self, cfg, labels: Mapping[str, Sequence[str]], catalogue: Mapping[str, Mapping[str, FindingSpec]] | None = None,
                 wording: Mapping | None = None):
        self.cfg = cfg
        self.wording = wording  # the generator's caption words (its wording.json): the prompts are composed in them
        # per modality, what each finding is and how a clinician words it: the model's own catalogue (a profile trained
        # on reports, :func:`wording_catalogue`) where given, else the phantom specification
        self.catalogue: dict[str, Mapping[str, FindingSpec]] = {m: dict(c) for m, c in (catalogue or {}).items()}
        for m in cfg.modalities:
            if m not in self.catalogue and phantom_spec(m) is not None:
                self.catalogue[m] = get_spec(m).findings
        unknown = [m for m in cfg.modalities if m not in self.catalogue]
        if unknown:
            raise UserError(f"improve.prompts.modalities: no finding catalogue for {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(m for m in labels if m in self.catalogue or phantom_spec(m) is not None))}")
        missing = [m for m in cfg.modalities if m not in labels]
        if missing:
            raise UserError(f"improve.prompts.modalities: no reward classifier for {', '.join(missing)}; "
                            "train one with `synthmed judges train classifier`")
        for section in ("findings", "heldout"):
            for m in getattr(cfg, section):
                if m not in cfg.modalities:
                    raise UserError(f"improve.prompts.{section}.{m}: {m!r} is not in improve.prompts.modalities ({', '.join(cfg.modalities)})")
        self.findings: dict[str, list[str]] = {}
        for m in cfg.modalities:
            known = [f for f in self.catalogue[m] if f in set(labels[m])]
            chosen = list(cfg.findings.get(m, known))
            bad = [f for f in chosen if f not in known]
            if bad:
                raise UserError(f"improve.prompts.findings.{m}: unknown finding(s) {', '.join(bad)}; "
                                f"{m} findings the reward classifier knows: {', '.join(known)}")
            if not chosen:
                raise UserError(f"improve.prompts.findings.{m} is empty; list at least one of {', '.join(known)}")
            self.findings[m] = chosen
        if sum(cfg.severities.values()) <= 0 or any(s not in SEVERITY_ORDER for s in cfg.severities):
            raise UserError(f"improve.prompts.severities: weights over {', '.join(SEVERITY_ORDER)} with a positive sum, got {cfg.severities}")
        self.train_combos: dict[str, list[tuple[str, ...]]] = {}
        self.heldout_combos: dict[str, list[tuple[str, ...]]] = {}
        for m in cfg.modalities:
            singles = [(f,) for f in self.findings[m]]
            pairs = [tuple(sorted(p)) for p in combinations(self.findings[m], 2) if self._compatible(m, p)] if cfg.max_findings >= 2 else []
            if m in cfg.heldout:
                held = [self._named_combination(m, c, singles + pairs) for c in cfg.heldout[m]]
            else:
                held = []
                rng = _rng(cfg.seed, "heldout-combinations", m)
                for group in (singles, pairs):
                    n = int(round(len(group) * cfg.heldout_fraction))
                    if group is singles and len(singles) > 1:
                        n = max(1, min(n, len(singles) - 1))  # every modality keeps a single held out and one to train on
                    held += [group[i] for i in sorted(rng.permutation(len(group))[:n])]
            self.heldout_combos[m] = held
            self.train_combos[m] = [c for c in singles + pairs if c not in held]
            if cfg.max_findings == 0:
                self.train_combos[m] = []
        # findings only the held-out combinations ask for (a modality with few labels: chest CT's one, the brain's three
        # exclusive tumours): training requests neither ask for them nor deny them, else the reward would teach the
        # model not to draw what the held-out prompts ask for ("No lung cancer" in every training request)
        self.heldout_only: dict[str, set[str]] = {
            m: {f for c in self.heldout_combos[m] for f in c} - {f for c in self.train_combos[m] for f in c} for m in cfg.modalities}
        # a modality left with no finding to ask for or deny (chest CT when its one label is held out) draws no training
        # requests: a request the finding reward cannot judge only pulls its images towards the other judges (the first
        # real run's chest CT: lung cancer shown 0.72 -> 0.19 and FD 186 -> 447 in 20 epochs of normal-study requests)
        self.train_modalities = [m for m in cfg.modalities if self.train_combos[m] or set(self.findings[m]) - self.heldout_only[m]]
        if not self.train_modalities:
            raise UserError("improve.prompts: every finding of every modality is held out, so no training request can be judged; "
                            "hold out fewer combinations (improve.prompts.heldout or heldout_fraction)")

    def _named_combination(self, modality: str, name: str, allowed: list[tuple[str, ...]]) -> tuple[str, ...]:
        combo = tuple(sorted(n.strip() for n in str(name).split("+")))
        if combo not in allowed:
            raise UserError(f"improve.prompts.heldout.{modality}: {name!r} is not a combination requests may ask for; "
                            f"choose from {', '.join('+'.join(c) for c in allowed)}")
        return combo

    # -- combinations -----------------------------------------------------------------------
    def _compatible(self, modality: str, pair: Sequence[str]) -> bool:
        a, b = (self.catalogue[modality][n] for n in pair)
        return b.name not in a.excludes and a.name not in b.excludes

    def combination_keys(self, split: str) -> set[str]:
        combos = self.train_combos if split == "train" else self.heldout_combos
        keys = {combination_key(m, c) for m, cs in combos.items() for c in cs}
        return keys | ({combination_key(m, ()) for m in self.cfg.modalities} if split == "train" else set())

    # -- one request ------------------------------------------------------------------------
    def make(self, modality: str, present: Sequence[str], rng: np.random.Generator, severities: Mapping[str, float] | None = None,
             sides: Mapping[str, float] | None = None, negatives: int | None = None, unasked: Iterable[str] = ()) -> ImagePrompt:
        """A request for ``present`` findings of ``modality`` with attributes and negatives drawn by ``rng``: severity
        grades weighted by ``severities`` (default: the config's), sides uniformly or weighted by ``sides`` (a side of
        weight 0 is not drawn where the finding has another), ``negatives`` pertinent negatives (default: the config's);
        the ``unasked`` findings are neither denied nor expected absent (a normal study says nothing of them)."""
        unasked = set(unasked)
        specs = self.catalogue[modality]
        severities = self.cfg.severities if severities is None else severities
        grades = list(severities)
        weights = np.array([severities[g] for g in grades], dtype=float)
        findings = []
        for name in present:
            fspec = specs[name]
            severity = _grade(fspec, grades[rng.choice(len(grades), p=weights / weights.sum())])
            side = None
            if fspec.sides and sides is None:
                side = str(rng.choice(fspec.sides))
            elif fspec.sides:
                allowed = [x for x in fspec.sides if sides.get(x, 0) > 0] or list(fspec.sides)
                p = np.array([sides.get(x, 1.0) for x in allowed], dtype=float)
                side = str(allowed[rng.choice(len(allowed), p=p / p.sum())])
            location = str(rng.choice(fspec.locations)) if fspec.locations else None
            findings.append({"name": name, "present": True, "severity": severity, "laterality": side, "location": location,
                             "stated": True})
        sided = {f["name"]: f["laterality"] for f in findings if f["laterality"] in ("left", "right")}
        for f in findings:  # a side another present finding sets (FindingSpec.side_away_from): the other side of its
            away = side_away(specs[f["name"]], sided)
            if away and f["laterality"]:
                f["laterality"] = away
        # pertinent negatives; one may name a finding a present one excludes ("no pneumothorax" beside an effusion), never
        # one the present findings' own phrases state ("choroidal neovascularisation with surrounding subretinal fluid")
        implied = self._implied(modality, findings)
        for name in sorted(implied - set(present)):  # asked for by the phrase that names it, so expected: never stated apart
            findings.append({"name": name, "present": True, "severity": None, "laterality": None, "location": None, "stated": False})
        # nor one a present finding may be drawn with (FindingSpec.accompanies: a mass's midline shift): no image could deny it
        accompanying = {name for n in present for name in specs[n].accompanies}
        candidates = [n for n in self.findings[modality] if n not in present and n not in implied and n not in unasked
                      and n not in accompanying]
        n_neg = min(self.cfg.negatives if negatives is None else negatives, len(candidates))
        negated = [candidates[i] for i in sorted(rng.permutation(len(candidates))[:n_neg])]
        if not present and unasked:  # "Normal study." would deny the unasked findings too: name each absent one instead
            negated = candidates
        for name in negated:
            findings.append({"name": name, "present": False, "severity": None, "laterality": None, "location": None, "stated": True})
        if not present:  # a normal study asks for every finding to be absent, stated or not
            for name in self.findings[modality]:
                if name not in negated and name not in unasked:
                    findings.append({"name": name, "present": False, "severity": None, "laterality": None, "location": None,
                                     "stated": False})
        stated = [f for f in findings if f["stated"]]
        # a normal study with nothing left to name (every finding unasked) still reads "Normal study.": the unasked findings
        # are not judged, whatever the text implies of them
        request = self._clinician_text(modality, stated, rng, normal=not present and (not unasked or not stated))
        composed = compose_prompt({"text": request}, {"findings": [{k: v for k, v in f.items() if k != "stated"} for f in stated]},
                                  modality, default_severity=None, wording=self.wording)
        return ImagePrompt(modality, request, composed["prompt"], composed["negative"], tuple(findings),
                           combination_key(modality, present))

    def implications(self) -> dict[str, dict[str, list[str]]]:
        """Per modality, each finding's implied ones (``FindingSpec.implies``), where it has any: what every request
        asking for the finding expects present beside it, named or not (a steered folder keeps them, so that a text
        that names the finding alone steers as the requests its table was fitted on: generator.steering)."""
        out = {m: {name: list(spec.implies) for name, spec in self.catalogue[m].items() if spec.implies}
               for m in self.cfg.modalities}
        return {m: v for m, v in out.items() if v}

    def _implied(self, modality: str, findings: list[dict]) -> set[str]:
        """Findings the present ones are drawn with and their phrases name (``FindingSpec.implies``): never stated absent
        beside them. Structured, not read from the phrases; tests/test_parse.py checks the graph's reader agrees."""
        specs = self.catalogue[modality]
        return {name for f in findings if f["present"] and f["name"] in specs for name in specs[f["name"]].implies}

    def _clinician_text(self, modality: str, findings: list[dict], rng: np.random.Generator, normal: bool = False) -> str:
        """How a clinician might write the request: synonyms, the spec's severity words, negatives last."""
        specs = self.catalogue[modality]
        parts = ["Normal study."] if normal else []
        for f in findings:
            fspec = specs[f["name"]]
            terms = [t for t in fspec.terms if not t.isupper()] or list(fspec.terms)
            if not f["present"]:
                parts.append(f"No {terms[int(rng.integers(len(terms)))]}.")
                continue
            if f["laterality"] == "bilateral" and fspec.bilateral_terms:
                terms = list(fspec.bilateral_terms)
            term = terms[int(rng.integers(len(terms)))]
            words = {
                "term": term,
                "severity": _pick(fspec.severity_words.get(f["severity"] or "", (f["severity"] or "",)), rng),
                "side": _pick(fspec.side_words.get(f["laterality"] or "", (f["laterality"] or "",)), rng),
                "location": _pick(fspec.location_words.get(f["location"] or "", ((f["location"] or "").replace("_", " "),)), rng),
            }
            # templates that describe only this finding: "... with surrounding vasogenic oedema" states a second one
            usable = [t for t in fspec.templates if _slots(t) <= set(words) and ("location" in _slots(t) or not f["location"])
                      and not any(w in t for w in (" with ", "involving", "surrounding"))]
            template = usable[0] if usable else "{severity} {side} {term}" + (" in the {location}" if f["location"] else "")
            text = " ".join(template.format(**words).split()).replace(" ,", ",")
            parts.append(text[:1].upper() + text[1:] + ".")
        return " ".join(parts)

    # -- batches ----------------------------------------------------------------------------
    def draw(self, n: int, epoch: int, seed: int) -> list[ImagePrompt]:
        """``n`` training requests for ``epoch``: modalities in turn (those with a finding to train on), a pure function of
        (seed, epoch, n)."""
        rng = _rng(seed, "train", epoch)
        out = []
        mods = self.train_modalities
        start = int(rng.integers(len(mods)))
        for i in range(n):
            m = mods[(start + i) % len(mods)]
            combos = self.train_combos[m]
            singles = [c for c in combos if len(c) == 1]
            pairs = [c for c in combos if len(c) == 2]
            if not combos or rng.random() < self.cfg.p_normal:
                present: tuple[str, ...] = ()
            elif pairs and (not singles or rng.random() < self.cfg.p_two):
                present = pairs[int(rng.integers(len(pairs)))]
            else:
                present = singles[int(rng.integers(len(singles)))]
            out.append(self.make(m, present, rng, unasked=self.heldout_only[m]))
        return out

    def heldout(self) -> list[ImagePrompt]:
        """The held-out requests: ``heldout_per_modality`` per modality, over its held-out combinations in turn."""
        return self._heldout_draw("heldout-prompts", self.cfg.heldout_per_modality)

    def test(self) -> list[ImagePrompt]:
        """The untouched test requests: ``test_per_modality`` per modality over the same held-out combinations, worded
        and drawn apart (a request whose text is a held-out request's is drawn again, up to 20 times); [] when 0."""
        if not self.cfg.test_per_modality:
            return []
        return self._heldout_draw("test-prompts", self.cfg.test_per_modality, avoid={p.prompt for p in self.heldout()})

    def test_split(self, number: int, per_modality: int, avoid: Iterable[str] = ()) -> list[ImagePrompt]:
        """A further untouched test split, ``number`` 1, 2, ... (``synthmed runs test --split``): ``per_modality`` requests
        per modality over the held-out combinations, drawn by a stream of their own and worded apart from the held-out and
        test requests and from ``avoid`` (a run's saved ones). Nothing in a run draws or reads it."""
        if number < 1 or per_modality < 1:
            raise UserError(f"a test split needs a number >= 1 and >= 1 request per modality, got split {number}, "
                            f"{per_modality} per modality")
        avoid = {*avoid, *(p.prompt for p in self.heldout()), *(p.prompt for p in self.test())}
        return self._heldout_draw(f"test-split-{number}", per_modality, avoid=avoid)

    def _heldout_draw(self, stream: str, per_modality: int, avoid: set[str] = frozenset()) -> list[ImagePrompt]:
        out = []
        for m in self.cfg.modalities:
            combos = self.heldout_combos[m]
            if not combos:
                raise UserError(f"no held-out finding combination for {m}: raise improve.prompts.heldout_fraction "
                                f"(now {self.cfg.heldout_fraction}) or list more findings in improve.prompts.findings.{m}")
            rng = _rng(self.cfg.seed, stream, m)
            order = rng.permutation(len(combos))
            for i in range(per_modality):
                combo = combos[order[i % len(combos)]]
                prompt = self.make(m, combo, rng)
                for _ in range(20):
                    if prompt.prompt not in avoid:
                        break
                    prompt = self.make(m, combo, rng)
                out.append(prompt)
        return out


def wording_catalogue(wording: Mapping, modality: str, concepts: Iterable[Any] = ()) -> dict[str, FindingSpec]:
    """What requests of ``modality`` may ask for when its generator was trained on reports (the real profile): the
    labels its ``wording.json`` words, each worded by the lexicon's term and synonyms (``concepts``, the knowledge
    base's; else the label's own name), graded by the grades the captions word (``label|grade``, mildest first
    alphabetically: mild < moderate < severe, non_proliferative < proliferative), and drawn together only with the
    labels its training images show with it (``together``).

    The graph composes the generator's prompt from these requests in the captions' own words
    (:func:`agents.prompts.compose_prompt` with the wording)."""
    w = wording[modality]
    names = [k for k in w["present"] if "|" not in k]
    together = {tuple(sorted(p.split("+"))) for p in w.get("together", [])}
    by_id = {c.id: c for c in concepts if getattr(c, "kind", "") == "finding" and (not c.modalities or modality in c.modalities)}
    out = {}
    for name in names:
        concept = by_id.get(name)
        terms = [concept.term, *concept.synonyms] if concept else [name.replace("_", " ")]
        grades = sorted(k.split("|", 1)[1] for k in w["present"] if k.startswith(name + "|"))
        out[name] = FindingSpec(
            name=name, terms=tuple(dict.fromkeys(t for t in terms if t and not t.isupper())),
            templates=("{severity} {term}",), severities=tuple(grades),
            severity_words={g: (g.replace("_", "-"),) for g in grades},
            excludes=tuple(o for o in names if o != name and tuple(sorted((name, o))) not in together))
    return out


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))] if options else ""


def save_prompts(prompts: Sequence[ImagePrompt], path: str | Path) -> Path:
    return write_text_atomic(path, "".join(json.dumps(p.to_dict()) + "\n" for p in prompts))


def load_prompts(path: str | Path) -> list[ImagePrompt]:
    path = Path(path)
    prompts = [ImagePrompt.from_dict(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts: the held-out set is empty")
    return prompts


__all__ = ["ImagePrompt", "NORMAL", "PromptSampler", "combination_key", "load_prompts", "save_prompts", "wording_catalogue"]
