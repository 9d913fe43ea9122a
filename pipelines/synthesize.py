"""`synthmed synthesize`: a spec of requests drawn into a synthetic data set that any trainer reads.

A spec is a CSV (``text,modality,n``: free text, read for its findings by the graph's own reader,
:class:`agents.reader.FindingReader`) or a YAML mix (per modality: findings or finding pairs
with counts or shares, the normal share, severity and side weights; see ``docs/specs/``). Both are
expanded into one :class:`Slot` per image, each an :class:`agents.requests.ImagePrompt` carrying its
structured expectation, composed into the generator's words by the graph's own
:func:`agents.prompts.compose_prompt`.

What a run leaves in its folder:

- ``synthesize.json``: what the run is (spec digest, seed, model and adapter digests, sampler
  settings, format): a folder holding another spec's images is refused;
- ``requests.jsonl``: the expanded requests, one per image;
- ``images/``: ``<index>_<modality>.png`` (text chunks mark them synthetic) or ``.dcm`` (DICOM
  Secondary Capture, synthetic identity, ``DERIVED\\SECONDARY``);
- ``checks.jsonl``: one line per draw: request, expectation, seed, model and adapter digests, the
  verifier's verdict, the evaluator's probabilities (reported only, never used to accept), the
  nearest training image's SSIM and whether the draw was accepted;
- ``manifest.csv``: the accepted images in the project's manifest format (``path,text,modality,
  findings,source``), rewritten whole and atomically;
- ``summary.json``: counts, acceptance rate, images/s.

Memorisation gate: a draw whose SSIM to its nearest training image (:func:`rlhf.metrics.
pixel_memorisation`) is above the threshold is rejected and the image is drawn again with a new
seed, at most ``synthesize.max_tries`` draws in all. Image ``i`` of ``N`` draws try ``t`` with seed
``seed + t * N + i``: deterministic, whatever the batch, the shard or an interruption.

Resume: ``checks.jsonl`` is the progress record (a torn last line is dropped); images are written
whole (temporary file, fsync, rename) before their line, so an image without a line is drawn again
into the same name and nothing is doubled.

Several processes (``accelerate launch --multi_gpu --num_processes N -m pipelines.cli synthesize ...``;
on a machine without GPUs the ranks meet over gloo): rank ``r`` of ``N`` draws every ``N``-th slot
from ``r`` (:func:`shard_slots`) into its own ``checks.rank<r>.jsonl``, and seeds stay those of one
process. Rank 0 claims the folder and repairs what a kill left while the others wait (a collective
over the process group: every rank is at the same point, so the wait is short). Each rank leaves a
``.done.rank<r>.json`` marker when its shard is drawn; rank 0 waits for the markers, not for a
barrier, since one rank may finish hours before another (a resume after one rank was killed) and the
process group's collectives time out after 30 minutes, and because a marker says which rank is
missing: one whose lock nobody holds and that left no marker stopped, and rank 0 says to resume
instead of waiting for it. Rank 0 then folds every shard file into one ``checks.jsonl`` in slot
order (written whole, then the shard files removed: a merge cut short leaves duplicates that the
next merge drops) and writes ``manifest.csv`` and ``summary.json``. While shards draw, nothing but
their own checks file is written, so ``manifest.csv`` stays what the last complete run left.
"""

from __future__ import annotations

import csv
import difflib
import errno
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.requests import PromptSampler
from generator.errors import SynthmedError, UserError
from generator.fileio import atomic_open, atomic_write, json_default, write_json_atomic, write_text_atomic
from generator.runlock import LOCK_NAME, RunFolderInUseError, RunLock

log = logging.getLogger("synthmed.synthesize")

SEVERITIES = ("mild", "moderate", "severe")
SIDES = ("left", "right", "bilateral")
CSV_COLUMNS = ("text", "modality", "n")
MIX_KEYS = {"modalities", "negatives"}
MODALITY_KEYS = {"n", "normal", "findings", "severities", "sides", "negatives"}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
MAX_SPEC_IMAGES = 1_000_000  # images one spec may ask for: a typo like n=10000000000 stops here, not in memory


class SpecError(UserError):
    """A bad spec: the message names the file, the line and the field."""

    def __init__(self, path: str | os.PathLike, line: int | None, field_name: str, message: str):
        where = f"line {line}, " if line else ""
        super().__init__(f"{path}: {where}{field_name}: {message}")


def _quote(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message stays one readable line whatever the spec holds."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-1]} ({len(str(value)):,} characters)"


def _near(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def synthmed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("synthmed")
    except PackageNotFoundError:
        return "0+unknown"


# ================================================================================ spec -> slots
@dataclass(frozen=True)
class Slot:
    """One image of the spec: its place, its request and where in the spec it came from."""

    index: int
    request: Any  # agents.requests.ImagePrompt
    origin: str  # "spec.csv:3" or "spec.yaml:cxr/pleural_effusion"

    def to_dict(self) -> dict:
        return {"index": self.index, "origin": self.origin, **self.request.to_dict()}


def read_spec(path: str | os.PathLike, cfg, seed: int, wording: dict | None = None) -> list[Slot]:
    """The spec at ``path`` (``.csv``, or ``.yaml``/``.yml``) expanded into slots; the first bad line is a :class:`SpecError`.
    ``wording``: the model's caption words (its wording.json), in which CSV requests are composed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec {path} not found: give a CSV (text,modality,n) or a YAML mix")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        requests = read_csv_spec(path, cfg, wording)
    elif suffix in (".yaml", ".yml"):
        requests = read_mix_spec(path, cfg, seed)
    else:
        raise UserError(f"spec {path}: unknown kind {suffix or '(no suffix)'}; use .csv (text,modality,n) or .yaml (a mix)")
    if not requests:
        raise UserError(f"spec {path} asks for no images (every count is 0)")
    return [Slot(i, request, origin) for i, (request, origin) in enumerate(requests)]


# -------------------------------------------------------------------------------- CSV rows
def read_csv_spec(path: Path, cfg, wording: dict | None = None) -> list[tuple[Any, str]]:
    """Rows ``text,modality,n``: each row's text read once, repeated ``n`` times in file order."""
    from generator.data.sources import csv_encoding, csv_read_error

    try:
        with open(path, newline="", encoding=csv_encoding(path)) as f:
            return _csv_spec_rows(path, csv.reader(f), cfg, wording)
    except (UnicodeError, csv.Error) as exc:
        raise UserError(csv_read_error(path, exc, "spec")) from None


def _csv_spec_rows(path: Path, reader, cfg, wording: dict | None = None) -> list[tuple[Any, str]]:
    from generator.modalities import resolve_modality

    out: list[tuple[Any, str]] = []
    findings_reader = None
    header = next(reader, None)
    if header is None:
        raise SpecError(path, 1, "header", f"empty file; the first line names the columns {','.join(CSV_COLUMNS)}")
    names = [h.strip().lower() for h in header]
    for col in CSV_COLUMNS:
        if col not in names:
            raise SpecError(path, 1, col, f"missing column {col!r}; a CSV spec has the columns {','.join(CSV_COLUMNS)} "
                            f"(found: {_quote(','.join(h.strip() for h in header))})")
    where = {col: names.index(col) for col in CSV_COLUMNS}
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = {col: (row[i].strip() if i < len(row) else "") for col, i in where.items()}
        try:
            n = int(cells["n"])
        except ValueError:
            raise SpecError(path, line, "n", f"a whole number of images >= 0, got {_quote(cells['n'])}") from None
        if n < 0:
            raise SpecError(path, line, "n", f"a count cannot be negative, got {n}")
        if len(out) + n > MAX_SPEC_IMAGES:
            raise SpecError(path, line, "n", f"the spec asks for {len(out) + n:,} images so far; a spec asks for at "
                            f"most {MAX_SPEC_IMAGES:,}: split it into several specs (or check this count)")
        try:
            modality = resolve_modality(cells["modality"], cfg.data.modalities)
        except UserError as exc:
            raise SpecError(path, line, "modality", str(exc)) from None
        if not cells["text"]:
            raise SpecError(path, line, "text", "empty; describe the image, e.g. \"Small left pleural effusion.\"")
        try:
            if findings_reader is None:  # the knowledge base is opened once, at the first text to read
                from .agent import finding_reader

                findings_reader = finding_reader(cfg, progress=False)
            request = text_request(cells["text"], modality, cfg.agents.default_severity, findings_reader, label_names(modality, cfg),
                                   wording)
        except UserError as exc:
            raise SpecError(path, line, "text", str(exc)) from None
        out += [(request, f"{path.name}:{line}")] * n
    return out


def label_names(modality: str, cfg) -> list[str] | None:
    """What a request may ask for: the profile's reward classifier's labels (the phantom catalogue for the default
    profile, the datasets' labels for the real one); None (the phantom catalogue) where it has no classifier."""
    from generator.paths import shipped
    from generator.phantoms import PHANTOM_MODULES

    meta = shipped(Path(cfg.judges.classifier.out) / "reward" / modality / "metadata.json")
    if meta.is_file():
        return json.loads(meta.read_text()).get("label_names", [])
    return None if modality in PHANTOM_MODULES else []


def text_request(text: str, modality: str, default_severity: str | None, reader, labels: Sequence[str] | None = None,
                 wording: dict | None = None):
    """A free-text request as an ImagePrompt, read by the graph's reader (:class:`agents.reader.FindingReader`):
    the findings it states present, with the severity, side and location the graph reads for them, and those it
    states absent; composed by the graph's :func:`agents.prompts.compose_prompt`. ``labels``: the findings that
    count (default: those the modality's generator was trained on)."""
    from agents.prompts import compose_prompt
    from agents.reader import project
    from agents.requests import ImagePrompt, combination_key
    from agents.schema import StageError

    try:
        pathology = reader.read(text, modality)
    except StageError as exc:
        raise UserError(str(exc)) from None
    labels = reader.labels(modality) if labels is None else list(labels)
    read = [f for f in pathology.findings if not f.uncertain]
    expected = reader.expected_from(pathology, labels)
    stated = project([f.model_dump() for f in read], labels, reader.lineage)  # without the whole-study normal
    present = [name for name, p in expected.items() if p]
    if pathology.normal and present:
        raise UserError(f"a normal study with a finding ({', '.join(present)}): {_quote(text)} says the study is normal "
                        "and names a finding; drop one of them")
    if not expected:
        named = sorted({f.name for f in read})
        why = f" (it names {', '.join(named)}, which no {modality} label is)" if named else ""
        raise UserError(f"no {modality} finding recognised in {_quote(text)}{why} and it does not say the study is normal; "
                        f"name findings ({', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''}) or write \"Normal study.\"")
    findings = []
    for name in present:  # the attributes of the finding the graph read for this label (itself, or a kind of it)
        mention = next(f for f in read if f.present and name in reader.lineage(f.name) | {f.name})
        findings.append({"name": name, "present": True, "severity": mention.severity, "laterality": mention.laterality,
                         "location": mention.location, "stated": True})
    for name in (n for n, p in expected.items() if not p):
        findings.append({"name": name, "present": False, "severity": None, "laterality": None, "location": None,
                         "stated": name in stated})
    composed = compose_prompt({"text": text}, {"findings": [{k: v for k, v in f.items() if k != "stated"} for f in findings
                                                            if f["stated"]]}, modality, default_severity=default_severity,
                              wording=wording)
    # the severity the composition assumed is part of what was asked for
    chosen = {f["name"]: f.get("severity") for f in composed["findings"]}
    findings = [{**f, "severity": chosen.get(f["name"], f["severity"]) if f["present"] else None} for f in findings]
    return ImagePrompt(modality, text, composed["prompt"], composed["negative"], tuple(findings), combination_key(modality, present))


# -------------------------------------------------------------------------------- YAML mix
def _yaml_lines(text: str, path: Path) -> tuple[Any, dict[tuple[str, ...], int]]:
    """The parsed YAML and the line of every mapping key, by key path."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SpecError(path, mark.line + 1 if mark else None, "yaml", str(getattr(exc, "problem", exc))) from None
    except RecursionError:  # "[[[[..." thousands deep
        raise SpecError(path, None, "yaml", "nested too deeply to read; a mix is modalities -> modality -> fields") from None
    lines: dict[tuple[str, ...], int] = {}

    def walk(node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = prefix + (str(key.value),)
                lines[here] = key.start_mark.line + 1
                walk(value, here)

    if root is not None:
        walk(root, ())
    return data, lines


def _largest_remainder(total: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Whole counts summing to ``total`` in proportion to ``shares`` (Hamilton's method, ties by order)."""
    raw = {k: total * v for k, v in shares.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    left = total - sum(counts.values())
    for k in sorted(raw, key=lambda k: -(raw[k] - counts[k]))[:left]:
        counts[k] += 1
    return counts


def _weights(value: Any, allowed: Sequence[str], path: Path, line: int | None, name: str) -> dict[str, float]:
    if isinstance(value, (list, tuple)):
        value = {v: 1.0 for v in value}
    if not isinstance(value, Mapping) or not value:
        raise SpecError(path, line, name, f"relative weights over {', '.join(allowed)}, e.g. {{{allowed[0]}: 1, {allowed[-1]}: 2}}")
    out = {}
    for k, w in value.items():
        if k not in allowed:
            raise SpecError(path, line, f"{name}.{k}", f"unknown value; use {', '.join(allowed)}{_near(k, allowed)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise SpecError(path, line, f"{name}.{k}", f"a weight >= 0, got {_quote(w)}")
        out[str(k)] = float(w)
    if sum(out.values()) <= 0:
        raise SpecError(path, line, name, "the weights sum to 0")
    return out


def read_mix_spec(path: Path, cfg, seed: int) -> list[tuple[Any, str]]:
    """A YAML mix expanded into requests: per modality, counts (or shares of ``n``) of the normal study and
    of each finding or ``a+b`` pair; wording, severity, side, location and negatives drawn with ``seed``."""
    from agents.requests import _rng
    from generator.modalities import resolve_modality
    from generator.phantoms import NORMAL, PHANTOM_MODULES, get_spec

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(path, None, "yaml", f"not UTF-8 text ({exc.reason} at byte {exc.start}); save the spec as UTF-8") from None
    data, lines = _yaml_lines(text, path)
    if not isinstance(data, Mapping) or not isinstance(data.get("modalities"), Mapping) or not data["modalities"]:
        raise SpecError(path, lines.get(("modalities",)), "modalities",
                        "a YAML spec is a mapping with `modalities:` holding one entry per modality (see docs/specs/example_mix.yaml)")
    for key in data:
        if key not in MIX_KEYS:
            raise SpecError(path, lines.get((str(key),)), str(key), f"unknown key; a mix has {', '.join(sorted(MIX_KEYS))}{_near(key, MIX_KEYS)}")
    top_negatives = data.get("negatives", cfg.improve.prompts.negatives)
    sampler_parts: dict[str, dict] = {}
    plan: list[tuple[str, tuple[str, ...], int]] = []  # (modality, present findings, count)
    for mkey, entry in data["modalities"].items():
        at = ("modalities", str(mkey))
        line = lines.get(at)
        name = f"modalities.{mkey}"
        try:
            modality = resolve_modality(str(mkey), cfg.data.modalities)
        except UserError as exc:
            raise SpecError(path, line, name, str(exc)) from None
        if modality not in PHANTOM_MODULES:
            raise SpecError(path, line, name, f"{modality} has no finding catalogue to mix from; use a CSV spec (text,modality,n)")
        if modality in sampler_parts:
            raise SpecError(path, line, name, f"{modality} is listed twice")
        if not isinstance(entry, Mapping):
            raise SpecError(path, line, name, "a mapping with findings (and n, normal, severities, sides, negatives)")
        for key in entry:
            if key not in MODALITY_KEYS:
                raise SpecError(path, lines.get(at + (str(key),)), f"{name}.{key}",
                                f"unknown key; use {', '.join(sorted(MODALITY_KEYS))}{_near(key, MODALITY_KEYS)}")
        spec = get_spec(modality)
        known = list(spec.findings)
        entries: dict[tuple[str, ...], Any] = {}
        findings = entry.get("findings") or {}
        if not isinstance(findings, Mapping):
            raise SpecError(path, lines.get(at + ("findings",)), f"{name}.findings", "a mapping finding (or a+b) -> count or share")
        for fkey, value in findings.items():
            fline = lines.get(at + ("findings", str(fkey)))
            fname = f"{name}.findings.{fkey}"
            parts = tuple(p.strip() for p in str(fkey).split("+"))
            if NORMAL in parts:
                raise SpecError(path, fline, fname, "a normal study with a finding is a contradiction; give the normal share as "
                                f"`normal:` of {mkey}")
            for p in parts:
                if p not in known:
                    raise SpecError(path, fline, fname, f"unknown {modality} finding {p!r}{_near(p, known)}; known: {', '.join(known)}")
            if len(parts) > 2 or len(set(parts)) != len(parts):
                raise SpecError(path, fline, fname, "one finding or a pair of two different findings (a+b)")
            if len(parts) == 2:
                a, b = (spec.findings[p] for p in parts)
                if b.name in a.excludes or a.name in b.excludes:
                    raise SpecError(path, fline, fname, f"{parts[0]} and {parts[1]} cannot be drawn together (they exclude each other)")
            combo = tuple(sorted(parts))
            if combo in entries:
                raise SpecError(path, fline, fname, f"{'+'.join(combo)} is listed twice")
            entries[combo] = (value, fline, fname)
        if "normal" in entry:
            entries[()] = (entry["normal"], lines.get(at + ("normal",)), f"{name}.normal")
        if not entries:
            raise SpecError(path, line, name, "no findings and no normal share: nothing to draw")
        kinds = set()
        for value, vline, vname in entries.values():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SpecError(path, vline, vname, f"a count (whole number) or a share (0.0-1.0), got {_quote(value)}")
            if value < 0:
                raise SpecError(path, vline, vname, f"a count or share cannot be negative, got {value}")
            if isinstance(value, float):
                kinds.add("share")
                if value > 1:
                    raise SpecError(path, vline, vname, f"a share is at most 1.0, got {value}; write a count as a whole number")
            elif value:
                kinds.add("count")
        n = entry.get("n")
        nline = lines.get(at + ("n",))
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise SpecError(path, nline, f"{name}.n", f"a whole number of images >= 0, got {_quote(n)}")
        if kinds == {"share", "count"}:
            raise SpecError(path, line, name, "mixes counts (whole numbers) and shares (0.0-1.0); use one kind per modality")
        if "share" in kinds:
            if n is None:
                raise SpecError(path, line, f"{name}.n", "shares need the modality's image count n")
            shares = {k: float(v[0]) for k, v in entries.items()}
            total = sum(shares.values())
            if () not in shares:
                if total > 1 + 1e-9:
                    raise SpecError(path, line, f"{name}.findings", f"the shares sum to {total:g} > 1")
                shares[()] = max(0.0, 1.0 - total)
            elif abs(total - 1) > 1e-6:
                raise SpecError(path, lines.get(at + ("normal",)), f"{name}.normal",
                                f"the normal share and the finding shares sum to {total:g}, not 1 (leave `normal` out to have the rest)")
            counts = _largest_remainder(n, shares)
        else:
            counts = {k: int(v[0]) for k, v in entries.items()}
            if n is not None and n != sum(counts.values()):
                raise SpecError(path, nline, f"{name}.n", f"n is {n} but the counts sum to {sum(counts.values())}")
        total = sum(c for _, _, c in plan) + sum(counts.values())
        if total > MAX_SPEC_IMAGES:
            raise SpecError(path, nline or line, f"{name}.n" if n is not None else name,
                            f"the spec asks for {total:,} images so far; a spec asks for at most "
                            f"{MAX_SPEC_IMAGES:,}: split it into several specs (or check the counts)")
        severities = _weights(entry["severities"], SEVERITIES, path, lines.get(at + ("severities",)), f"{name}.severities") \
            if "severities" in entry else dict(cfg.improve.prompts.severities)
        sides = _weights(entry["sides"], SIDES, path, lines.get(at + ("sides",)), f"{name}.sides") if "sides" in entry else None
        negatives = entry.get("negatives", top_negatives)
        if isinstance(negatives, bool) or not isinstance(negatives, int) or not 0 <= negatives <= 3:
            raise SpecError(path, lines.get(at + ("negatives",)) or lines.get(("negatives",)), f"{name}.negatives",
                            f"pertinent negatives per request: 0 to 3, got {_quote(negatives)}")
        sampler_parts[modality] = {"severities": severities, "sides": sides, "negatives": negatives, "origin": f"{path.name}:{mkey}"}
        plan += [(modality, combo, counts[combo]) for combo in sorted(counts, key=lambda c: (len(c), c))]

    sampler = MixSampler(list(sampler_parts), cfg)
    requests: list[tuple[Any, str]] = []
    for modality, combo, count in plan:
        part = sampler_parts[modality]
        rng = _rng(seed, "synthesize", modality, "+".join(combo) or NORMAL)
        for _ in range(count):
            request = sampler.make_weighted(modality, combo, rng, part["severities"], part["sides"], part["negatives"])
            requests.append((request, f"{part['origin']}/{'+'.join(combo) or NORMAL}"))
    order = _rng(seed, "synthesize-order").permutation(len(requests))  # a stopped run holds a balanced part of the mix
    return [requests[i] for i in order]


class MixSampler(PromptSampler):
    """The loop's request sampler with per-modality severity and side weights and negatives; wording and
    composition are the sampler's own (``_clinician_text``, ``_implied``, ``compose_prompt``)."""

    def __init__(self, modalities: list[str], cfg):
        from generator.phantoms import catalogue

        every = catalogue()
        prompts = cfg.improve.prompts.model_copy(update={"modalities": modalities, "findings": {m: every[m] for m in modalities},
                                                         "max_findings": 2})
        super().__init__(prompts, {m: every[m] for m in modalities})

    def make_weighted(self, modality: str, present: Sequence[str], rng: np.random.Generator, severities: Mapping[str, float],
                      sides: Mapping[str, float] | None, negatives: int):
        """:meth:`PromptSampler.make` with the mix's severity and side weights and its number of negatives."""
        return self.make(modality, present, rng, severities=severities, sides=sides, negatives=negatives)


# ================================================================================ the output folder
def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, or of every file under a folder (relative names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not files:
        h.update(f"not-a-file:{path}".encode())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _disk_error(exc: OSError, what: Path) -> UserError:
    return UserError(f"no space left writing {what}: free some space, then run the same command with --resume "
                     "(the images and checks written so far are kept; manifest.csv holds only complete rows)")


def _is_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


@dataclass
class Progress:
    """What ``checks.jsonl`` says was done: accepted draws per slot, and draws made per slot."""

    accepted: dict[int, dict] = field(default_factory=dict)  # slot index -> its accepted check record
    tries: dict[int, int] = field(default_factory=dict)  # slot index -> draws made
    rejected: int = 0  # rejected draws
    records: int = 0  # draws in all


class OutputFolder:
    """The files of one synthesize run (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, rank: int = 0, world: int = 1):
        self.root = Path(root)
        self.rank, self.world = rank, world
        self.shard = world > 1  # one of several processes: writes only its own checks file while drawing
        self.images = self.root / "images"
        self.identity_path = self.root / "synthesize.json"
        self.requests_path = self.root / "requests.jsonl"
        self.merged_checks_path = self.root / "checks.jsonl"
        self.checks_path = self.merged_checks_path if not self.shard else self.root / f"checks.rank{rank}.jsonl"  # where this process appends
        self.manifest_path = self.root / "manifest.csv"
        self.summary_path = self.root / "summary.json"
        self.lock_name = self.rank_lock(rank)  # held while this process writes here; rank 0's is a single run's

    @staticmethod
    def rank_lock(rank: int) -> str:
        return LOCK_NAME if rank == 0 else f"{LOCK_NAME}.rank{rank}"

    def done_path(self, rank: int) -> Path:
        """The marker rank ``rank`` leaves when its shard is drawn (its :class:`DrawSummary`)."""
        return self.root / f".done.rank{rank}.json"

    def image_path(self, slot: Slot, fmt: str) -> Path:
        return self.images / f"{slot.index:06d}_{slot.request.modality}.{'dcm' if fmt == 'dicom' else 'png'}"

    # -- claiming the folder ------------------------------------------------------------------
    def prepare(self, identity: dict, slots: Sequence[Slot], resume: bool) -> bool:
        """Make the folder this run's, or refuse; True when it resumes an earlier run of the same spec."""
        if self.identity_path.is_file():
            old = json.loads(self.identity_path.read_text(encoding="utf-8"))
            # paths and times may differ between runs of one spec; digests may not
            differ = [k for k in identity if k not in ("created", "version", "spec", "model", "adapters") and old.get(k) != identity[k]]
            if differ:
                what = ", ".join(f"{k} ({_short(old.get(k))} there, {_short(identity[k])} now)" for k in differ[:3])
                raise UserError(f"{self.root} holds another spec's images: {what} differ. Choose a new --out folder "
                                "(--resume continues only the same spec with the same settings)")
            if not resume:
                raise UserError(f"{self.root} already holds this spec's images; pass --resume to finish it, or choose a new --out")
            return True
        if self.root.exists() and any(not p.name.startswith(LOCK_NAME) for p in self.root.iterdir()):
            raise UserError(f"{self.root} is not empty and holds no synthesize run (no synthesize.json); choose a new or empty --out")
        self.images.mkdir(parents=True, exist_ok=True)
        try:
            write_text_atomic(self.requests_path, "".join(json.dumps(s.to_dict()) + "\n" for s in slots))
            write_json_atomic(self.identity_path, identity)  # last: a folder without it is not claimed yet
        except OSError as exc:
            if _is_full(exc):
                raise _disk_error(exc, self.root) from exc
            raise
        return False

    # -- progress -------------------------------------------------------------------------------
    def checks_files(self) -> list[Path]:
        """``checks.jsonl`` first, then the shards' ``checks.rank<r>.jsonl``."""
        return sorted(self.root.glob("checks*.jsonl"))

    @staticmethod
    def _whole_lines(path: Path, repair: bool) -> bytes:
        """The file's whole lines; with ``repair`` a torn last line (a kill mid-write) is cut off the file too, without it
        is only skipped (another process may be writing that line now)."""
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if repair and keep < len(data):
            log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - keep)
            with open(path, "r+b") as f:
                f.truncate(keep)
        return data[:keep]

    def read_checks(self, fmt: str, slots: Sequence[Slot], repair: bool = True) -> Progress:
        """Progress from every checks file. ``repair`` (only while no other process writes here): torn last lines are
        cut off, temporaries of interrupted writes removed."""
        progress = Progress()
        by_index = {s.index: s for s in slots}
        for path in self.checks_files():
            for line in self._whole_lines(path, repair).decode("utf-8").splitlines():
                if not line.strip():
                    continue
                rec = json.loads(line)
                i = int(rec["index"])
                progress.records += 1
                progress.tries[i] = max(progress.tries.get(i, 0), int(rec["attempt"]) + 1)
                if rec["accepted"]:
                    slot = by_index.get(i)
                    if slot is not None and self.image_path(slot, fmt).is_file():
                        progress.accepted[i] = rec
                    else:  # its image is gone: draw that try again
                        progress.tries[i] = int(rec["attempt"])
                else:
                    progress.rejected += 1
        if not repair:
            return progress
        for stale in self.images.glob(".*.tmp*"):  # temporary files of an interrupted write
            stale.unlink(missing_ok=True)
        for scratch in self.root.glob(".graph-*"):  # --through-graph's scratch folders
            shutil.rmtree(scratch, ignore_errors=True)
        return progress

    def append_checks(self, records: Sequence[dict]) -> None:
        """One write per batch, flushed to disk; on a full disk the file is cut back to its last whole line."""
        if not records:
            return
        text = "".join(json.dumps(r, default=json_default) + "\n" for r in records).encode("utf-8")
        size = self.checks_path.stat().st_size if self.checks_path.exists() else 0
        try:
            with open(self.checks_path, "ab") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            with open(self.checks_path, "r+b") as f:
                f.truncate(size)
            if _is_full(exc):
                raise _disk_error(exc, self.checks_path) from exc
            raise

    def merge_checks(self) -> bool:
        """Fold the shards' checks files (and ``checks.jsonl``) into ``checks.jsonl``: one line per draw, by slot, then try,
        written whole; then the shard files are removed. A draw found twice (a merge stopped before its clean-up, an image
        drawn again) is kept once, the later line. Lines are copied, not held: memory grows by 40 bytes a draw. False when
        there are no shard files. Only while no other process writes here."""
        files = self.checks_files()
        shards = [f for f in files if f != self.merged_checks_path]
        if not shards:
            return False
        keys, spans = [], []  # (index, attempt, read order), (file, offset, length) per line
        for f, path in enumerate(files):
            offset = 0
            for line in self._whole_lines(path, repair=True).splitlines(keepends=True):
                if line.strip():
                    rec = json.loads(line)
                    keys.append((int(rec["index"]), int(rec["attempt"]), len(keys)))
                    spans.append((f, offset, len(line)))
                offset += len(line)
        keys_a, spans_a = np.array(keys, dtype=np.int64).reshape(-1, 3), np.array(spans, dtype=np.int64).reshape(-1, 3)
        order = np.lexsort((keys_a[:, 2], keys_a[:, 1], keys_a[:, 0]))
        ordered = keys_a[order]
        last = np.ones(len(order), dtype=bool)  # the last line read of each (index, attempt)
        last[:-1] = (ordered[1:, 0] != ordered[:-1, 0]) | (ordered[1:, 1] != ordered[:-1, 1])
        try:
            with ExitStack() as stack, atomic_open(self.merged_checks_path, "wb") as out:
                handles = [stack.enter_context(open(path, "rb")) for path in files]
                for f, offset, length in spans_a[order[last]]:
                    handles[f].seek(offset)
                    out.write(handles[f].read(length))
        except OSError as exc:
            if _is_full(exc):
                raise _disk_error(exc, self.merged_checks_path) from exc
            raise
        for path in shards:
            path.unlink(missing_ok=True)
        return True

    def mark_done(self, summary: DrawSummary) -> None:
        """This rank's shard is drawn (every line of it on disk): its marker, with its summary."""
        write_json_atomic(self.done_path(self.rank), asdict(summary))

    def clear_done(self) -> None:
        """Remove every rank's marker: rank 0, before the ranks start, so that only this run's markers count."""
        for marker in self.root.glob(".done.rank*.json"):
            marker.unlink(missing_ok=True)

    def wait_for_ranks(self, poll_s: float = 1.0) -> list[DrawSummary]:
        """Rank 0: the other ranks' summaries, once every marker is there. A rank whose lock nobody holds and that left
        no marker has stopped before the end of its shard: a :class:`UserError` that says to resume."""
        waiting = set(range(1, self.world))
        said = False
        while waiting:
            for rank in sorted(waiting):
                if self.done_path(rank).is_file():
                    waiting.discard(rank)
                    continue
                try:
                    with RunLock(self.root, self.rank_lock(rank)):  # taken: its holder is gone
                        pass
                except RunFolderInUseError:
                    continue
                if not self.done_path(rank).is_file():  # it may have finished between the two looks
                    raise UserError(f"rank {rank} of {self.world} stopped before drawing its shard; run the same command "
                                    "with --resume to finish it (what it drew is kept)")
            if waiting:
                if not said:
                    log.info("rank 0 done; waiting for rank(s) %s", ", ".join(map(str, sorted(waiting))))
                    said = True
                time.sleep(poll_s)
        return [DrawSummary(**json.loads(self.done_path(r).read_text(encoding="utf-8"))) for r in range(1, self.world)]

    def write_manifest(self, slots: Sequence[Slot], accepted: Mapping[int, dict]) -> int:
        """The accepted images in the project's manifest format, whole or not at all."""
        from generator.data.records import MANIFEST_COLUMNS, findings_to_cell

        rows = 0
        try:
            with atomic_open(self.manifest_path, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(MANIFEST_COLUMNS)
                for slot in slots:
                    rec = accepted.get(slot.index)
                    if rec is None:
                        continue
                    p = slot.request
                    findings = [{"name": x["name"], "present": bool(x["present"]), "side": x.get("laterality"),
                                 "location": x.get("location"), "severity": x.get("severity")} for x in p.findings]
                    writer.writerow([rec["path"], p.prompt, p.modality, findings_to_cell(findings),
                                     f"synthetic:synthmed:{self.root.name}#{slot.index}"])
                    rows += 1
        except OSError as exc:
            if _is_full(exc):
                raise _disk_error(exc, self.manifest_path) from exc
            raise
        return rows


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:21] + "..."


# ================================================================================ marking images as synthetic
def synthetic_fields(slot: Slot, seed: int, model: dict) -> dict[str, str]:
    """What every file says about itself: software, version, synthetic, model, seed, request, prompt."""
    p = slot.request
    return {"software": f"synthmed {synthmed_version()}", "synthetic": "true", "model": model["path"], "model_sha256": model["sha256"],
            "adapters": ",".join(a["sha256"][:16] for a in model["adapters"]), "seed": str(seed), "modality": p.modality,
            "request": p.request, "prompt": p.prompt, "index": str(slot.index)}


def write_png(path: Path, image: np.ndarray, fields: Mapping[str, str]) -> Path:
    """PNG with text chunks: ``Software``, ``Comment`` (synthetic, not a patient) and one per field."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", fields["software"])
    info.add_text("Comment", "Synthetic image made by synthmed; not an image of a real patient.")
    for key, value in fields.items():
        if key != "software":
            info.add_itxt(key, str(value))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def dicom_dataset(image: np.ndarray, fields: Mapping[str, str], modality_code: str, window: tuple[float, float] | None):
    """A DICOM Secondary Capture object (PS3.3 A.8.1) of one 8-bit image: fresh UIDs, a synthetic patient,
    ImageType DERIVED\\SECONDARY, ConversionType SYN. Windowing reads back the very pixels stored: with the
    modality's window (CT: lung window in HU) the stored values are rescaled onto it."""
    import datetime

    from pydicom.dataset import FileMetaDataset
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    now = datetime.datetime.now(datetime.timezone.utc)
    date, clock = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"SYNTHMED_{synthmed_version()}"[:16]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: requests may hold any character
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, clock
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = date, clock, date, clock
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"SYN{int(fields['index']):07d}"[:16]
    ds.StudyDescription = "SYNTHETIC IMAGE - synthmed"
    ds.SeriesDescription = f"synthmed synthetic {fields['modality']}"[:64]
    # an identity no one can take for a person
    ds.PatientName = "SYNTHETIC^SYNTHMED"
    ds.PatientID = f"SYNTHMED-{int(fields['index']):06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic image: no patient"
    ds.Modality = modality_code
    ds.SeriesNumber = 1
    ds.InstanceNumber = int(fields["index"]) + 1
    ds.PatientOrientation = ""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "SYN"  # Secondary Capture Equipment: synthetic image
    ds.Manufacturer = "synthmed"
    ds.ManufacturerModelName = Path(fields["model"]).name[:64] or "synthmed"
    ds.SoftwareVersions = fields["software"][:64]
    ds.SecondaryCaptureDeviceManufacturer = "synthmed"
    ds.SecondaryCaptureDeviceManufacturerModelName = "synthmed synthesize"
    ds.SecondaryCaptureDeviceSoftwareVersions = fields["software"][:64]
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = (f"SYNTHETIC image made by {fields['software']}; not a real patient. seed={fields['seed']}; "
                        f"model sha256={fields['model_sha256'][:16]}; request: {fields['request']} | prompt: {fields['prompt']}")[:10240]

    rgb = image.ndim == 3
    ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if not rgb:
        centre, width = window if window is not None else (128.0, 256.0)  # (128, 256): the identity on 0..255
        # stored value v shows as v under the window: value = intercept + slope * v, chosen so
        slope = (width - 1.0) / 255.0
        intercept = (centre - 0.5) - 0.5 * (width - 1.0)
        if window is not None:
            ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
            ds.RescaleType = "HU" if modality_code == "CT" else "US"
        ds.WindowCenter, ds.WindowWidth = _ds(centre), _ds(width)
    ds.PixelData = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    return ds


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = repr(float(value))
    return text if len(text) <= 16 else f"{value:.10g}"


def write_dicom(path: Path, image: np.ndarray, fields: Mapping[str, str], modality_code: str, window: tuple[float, float] | None) -> Path:
    ds = dicom_dataset(image, fields, modality_code, window)
    return atomic_write(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))


# ================================================================================ judging draws
class Judge:
    """The memorisation gate, the verifier and the evaluator over one batch of draws.

    ``train_images``: modality -> (N, 3, H, W) in [-1, 1], the generator's training images. The
    evaluator's probabilities are reported only; acceptance is the gate's (and, with
    ``synthesize.require_verifier_pass``, the verifier's)."""

    def __init__(self, cfg, train_images: Mapping[str, Any], verifier=None, evaluators: Mapping[str, Any] | None = None,
                 train_note: str = ""):
        sc, ec = cfg.synthesize, cfg.judges.eval
        self.threshold = sc.memorisation_threshold if sc.memorisation_threshold is not None else ec.memorisation_pixel_threshold
        self.size = sc.memorisation_size if sc.memorisation_size is not None else ec.memorisation_pixel_size
        self.require_pass = sc.require_verifier_pass
        self.train_images = dict(train_images)
        self.verifier = verifier
        self.evaluators = dict(evaluators or {})
        self.train_note = train_note

    def judge(self, images, slots: Sequence[Slot], seeds: Sequence[int]) -> list[dict]:
        """Per draw: ``nearest_train_ssim``, ``nearest_train_index``, ``memorised``, ``verdict``, ``evaluator``, ``accepted``, ``rejected_because``."""
        from rlhf.metrics import pixel_memorisation

        n = len(slots)
        out: list[dict] = [{} for _ in range(n)]
        by_modality: dict[str, list[int]] = {}
        for i, s in enumerate(slots):
            by_modality.setdefault(s.request.modality, []).append(i)
        for modality, idx in by_modality.items():
            batch = images[idx]
            reference = self.train_images.get(modality)
            if reference is not None and len(reference):
                memo = pixel_memorisation(batch, reference, self.threshold, self.size)
                for j, i in enumerate(idx):
                    out[i] |= {"nearest_train_ssim": round(float(memo["max_ssim"][j]), 4), "nearest_train_index": int(memo["nearest_index"][j]),
                               "memorised": bool(memo["memorised"][j]), "gate_threshold": self.threshold}
            else:
                for i in idx:
                    out[i] |= {"nearest_train_ssim": None, "nearest_train_index": None, "memorised": False, "gate_threshold": self.threshold,
                               "gate_note": f"not checked: no {modality} training images ({self.train_note})"}
            evaluator = self.evaluators.get(modality)
            if evaluator is not None:
                probs = np.asarray(evaluator.predict_proba(batch))
                for j, i in enumerate(idx):
                    out[i]["evaluator"] = {name: round(float(probs[j, k]), 4) for k, name in enumerate(evaluator.label_names)}
            for j, i in enumerate(idx):
                out[i].setdefault("evaluator", None)
                verdict = None
                if self.verifier is not None:
                    p = slots[i].request
                    result = self.verifier.verify(batch[j:j + 1], p.prompt, modality, list(p.findings), seeds=[seeds[i]])
                    verdict = result["candidates"][0]
                    verdict.pop("path", None)
                    verdict.pop("candidate", None)
                    verdict.pop("memorisation", None)  # the gate's fields say it (the verifier's own check is off)
                out[i]["verdict"] = verdict
                reason = "memorised" if out[i]["memorised"] else \
                    "verifier" if self.require_pass and verdict is not None and not verdict["passed"] else None
                out[i]["accepted"] = reason is None
                out[i]["rejected_because"] = reason
        return out


# ================================================================================ drawing
class SamplerDrawer:
    """Draws batches straight from the generator (``generator.sampling.sample``), seeds chosen per image."""

    def __init__(self, model, cfg, guide=None):
        self.model = model
        self.sample_cfg = cfg.sample
        self.channels = {m: spec.channels for m, spec in cfg.data.modalities.items()}
        self.guide = guide  # rlhf.guidance.RewardGuide: draw with reward guidance (synthesize.reward_guidance)
        self.batch_size = cfg.synthesize.batch_size or cfg.sample.batch_size

    def draw(self, slots: Sequence[Slot], seeds: Sequence[int]):
        """(B, 3, H, W) in [-1, 1]; one sampler call per run of consecutive seeds (image i of a call uses seed + i). With a
        reward guide: each image reward-guided from its own seed (its noise and views), DDIM eta 0."""
        import torch

        from generator.sampling import sample

        sc = self.sample_cfg
        if self.guide is not None:
            from rlhf.guidance import reward_guided_draw, views_of_seeds

            draw = reward_guided_draw(
                self.model, self.guide, [s.request.prompt for s in slots], [s.request.modality for s in slots],
                [self.guide.stated(s.request.expected, s.request.modality) for s in slots], [int(x) for x in seeds],
                views_of_seeds(seeds), sc.steps, sc.guidance,
                negatives=[" ".join(x for x in (s.request.negative, sc.negative) if x) for s in slots],
                findings=[s.request.generator_findings for s in slots], batch_size=self.batch_size)
            return draw.images
        parts, start = [], 0
        while start < len(slots):
            end = start + 1
            while end < len(slots) and seeds[end] == seeds[end - 1] + 1:
                end += 1
            chunk = slots[start:end]
            negatives = [" ".join(x for x in (s.request.negative, sc.negative) if x) for s in chunk]
            with torch.inference_mode():
                out = sample(self.model, [s.request.prompt for s in chunk], [s.request.modality for s in chunk], negative=negatives,
                             guidance=sc.guidance, steps=sc.steps, seed=int(seeds[start]), sampler=sc.sampler, eta=sc.eta,
                             guidance_schedule=sc.guidance_schedule, precision=sc.precision,
                             findings=[s.request.generator_findings for s in chunk])
            parts.append(out.images.float().cpu())
            start = end
        return torch.cat(parts)


class GraphDrawer:
    """Draws each image through the agent graph (parse, ground, compose, generate, verify, refine), one request at a time.

    The graph reads the request's text itself; the spec's structured expectation is still what is checked."""

    def __init__(self, agent, folder: Path):
        self.agent = agent
        self.folder = folder
        self.traces: dict[int, dict] = {}  # slot index -> its trace id and what the graph made of it

    def draw(self, slots: Sequence[Slot], seeds: Sequence[int]):
        import tempfile

        from generator.data.imageio import load_image
        from rlhf.scorers import as_image_batch

        scratch = Path(tempfile.mkdtemp(prefix=".graph-", dir=self.folder))  # the gate decides what is kept, under images/
        images = []
        try:
            for slot, seed in zip(slots, seeds):
                state = self.agent.run(slot.request.request, slot.request.modality, n=1, seed=int(seed), out=str(scratch / str(slot.index)))
                result = state.get("result") or {}
                if state.get("status") == "refused" or not result.get("images"):
                    raise UserError(f"request {slot.index} ({slot.origin}): the agent graph refused it: {state.get('error')}")
                verdict = result.get("verdict") or {}
                self.traces[slot.index] = {"trace_id": state["settings"]["trace_id"], "graph_prompt": result.get("prompt"),
                                           "graph_passed": verdict.get("passed"), "graph_rounds": verdict.get("rounds")}
                images.append(load_image(result["images"][0]))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return as_image_batch(images)


def shard_slots(slots: Sequence[Slot], rank: int = 0, world: int = 1) -> list[Slot]:
    """The slots one process draws: every ``world``-th, from ``rank``."""
    if not 0 <= rank < world:
        raise UserError(f"shard rank {rank} outside 0..{world - 1}")
    return list(slots[rank::world])


@dataclass
class DrawSummary:
    requested: int = 0
    accepted: int = 0
    drawn: int = 0  # draws in this call
    rejected_memorised: int = 0
    rejected_verifier: int = 0
    unfilled: list[int] = field(default_factory=list)  # slots left without an image after max_tries
    seconds: float = 0.0
    resumed_from: int = 0  # slots already accepted when the call began


def draw_slots(
    slots: Sequence[Slot],
    all_slots: Sequence[Slot],
    drawer,
    judge: Judge,
    folder: OutputFolder,
    cfg,
    model_info: dict,
    seed: int,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> DrawSummary:
    """Draw ``slots`` (a shard of ``all_slots``) into ``folder``, in batches, redrawing rejected draws with new
    seeds; what the checks files already hold is not drawn again. A shard of several processes leaves
    ``manifest.csv`` to rank 0's merge."""
    from tqdm import tqdm

    sc = cfg.synthesize
    fmt = sc.format
    batch_size = sc.batch_size or cfg.sample.batch_size
    total = len(all_slots)
    done = folder.read_checks(fmt, all_slots, repair=not folder.shard)
    accepted = dict(done.accepted)
    tries = dict(done.tries)
    summary = DrawSummary(requested=len(slots), resumed_from=sum(1 for s in slots if s.index in accepted))
    queue = [s for s in slots if s.index not in accepted and tries.get(s.index, 0) < sc.max_tries]
    summary.unfilled = [s.index for s in slots if s.index not in accepted and tries.get(s.index, 0) >= sc.max_tries]
    windows = {m: spec.window for m, spec in cfg.data.modalities.items()}
    dicom_codes = {m: spec.dicom_modality for m, spec in cfg.data.modalities.items()}
    started = time.perf_counter()
    last_manifest = started
    bar = tqdm(total=len(slots), initial=summary.resumed_from, unit="img", desc="synthesize", disable=not progress, mininterval=1.0)
    while queue:
        batch, queue = queue[:batch_size], queue[batch_size:]
        seeds = [seed + tries.get(s.index, 0) * total + s.index for s in batch]
        images = drawer.draw(batch, seeds)
        uint8 = _to_uint8(images, [s.request.modality for s in batch], drawer_channels(cfg))
        judged = judge.judge(images, batch, seeds)
        records, redraw = [], []
        for slot, s_seed, array, verdict in zip(batch, seeds, uint8, judged):
            attempt = tries.get(slot.index, 0)
            tries[slot.index] = attempt + 1
            summary.drawn += 1
            rel = None
            if verdict["accepted"]:
                path = folder.image_path(slot, fmt)
                fields = synthetic_fields(slot, s_seed, model_info)
                try:
                    if fmt == "dicom":
                        write_dicom(path, array, fields, dicom_codes.get(slot.request.modality, "OT"), windows.get(slot.request.modality))
                    else:
                        write_png(path, array, fields)
                except OSError as exc:
                    if _is_full(exc):
                        raise _disk_error(exc, path) from exc
                    raise
                rel = path.relative_to(folder.root).as_posix()
            elif verdict["rejected_because"] == "memorised":
                summary.rejected_memorised += 1
            else:
                summary.rejected_verifier += 1
            p = slot.request
            record = {"index": slot.index, "attempt": attempt, "seed": s_seed, "accepted": verdict["accepted"],
                      "rejected_because": verdict["rejected_because"], "path": rel, "origin": slot.origin, "modality": p.modality,
                      "request": p.request, "prompt": p.prompt, "negative": p.negative, "expected": p.expected,
                      "findings": [dict(f) for f in p.findings], "model": model_info["path"], "model_sha256": model_info["sha256"],
                      "adapters": model_info["adapters"], "nearest_train_ssim": verdict["nearest_train_ssim"],
                      "nearest_train_index": verdict["nearest_train_index"], "memorised": verdict["memorised"],
                      "gate_threshold": verdict["gate_threshold"], "verdict": verdict["verdict"], "evaluator": verdict["evaluator"],
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if "gate_note" in verdict:
                record["gate_note"] = verdict["gate_note"]
            record |= getattr(drawer, "traces", {}).get(slot.index, {})
            records.append(record)
            if verdict["accepted"]:
                accepted[slot.index] = record
                bar.update(1)
            elif tries[slot.index] < sc.max_tries:
                redraw.append(slot)
            else:
                summary.unfilled.append(slot.index)
                bar.update(1)
                log.warning("image %d (%s) left out: rejected %d times (%s)", slot.index, slot.origin, sc.max_tries, verdict["rejected_because"])
        folder.append_checks(records)
        queue = redraw + queue  # redraws go first: a stopped run leaves few half-finished slots
        now = time.perf_counter()
        if not folder.shard and (now - last_manifest > 10 or not queue):
            folder.write_manifest(all_slots, accepted)
            last_manifest = now
        elapsed = now - started
        new = sum(1 for s in slots if s.index in accepted) - summary.resumed_from
        bar.set_postfix_str(f"{summary.drawn / max(elapsed, 1e-9):.2f} draws/s, accepted {new / max(summary.drawn, 1):.0%} of draws")
        if on_batch is not None:
            on_batch(summary.drawn)
    bar.close()
    if not folder.shard:
        folder.write_manifest(all_slots, accepted)
    summary.accepted = sum(1 for s in slots if s.index in accepted)
    summary.seconds = time.perf_counter() - started
    return summary


def drawer_channels(cfg) -> dict[str, int]:
    return {m: spec.channels for m, spec in cfg.data.modalities.items()}


def _to_uint8(images, modalities: list[str], channels: Mapping[str, int]) -> list[np.ndarray]:
    from generator.sampling import SampleOutput

    return SampleOutput(images).to_uint8(modalities, dict(channels))


# ================================================================================ the whole command
def model_identity(model_dir: str | os.PathLike, adapters: Sequence[str]) -> dict:
    from generator.lora import resolve_lora_path

    resolved = [resolve_lora_path(a) for a in adapters]
    return {"path": str(model_dir), "sha256": file_digest(model_dir),
            "adapters": [{"path": str(p), "sha256": file_digest(p)} for p in resolved]}


def run_identity(spec_path: Path, slots: Sequence[Slot], cfg, model_info: dict, seed: int, through_graph: bool) -> dict:
    """What makes two runs the same run: the expanded requests, seed, model, adapters, sampler settings, format, gate."""
    requests = hashlib.sha256("".join(json.dumps(s.to_dict(), sort_keys=True) + "\n" for s in slots).encode()).hexdigest()
    sc, s = cfg.synthesize, cfg.sample
    return {
        "requests_sha256": requests, "images": len(slots), "seed": seed, "format": sc.format, "through_graph": through_graph,
        "model_sha256": model_info["sha256"], "adapters_sha256": [a["sha256"] for a in model_info["adapters"]],
        "sampler": {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance, "guidance_schedule": s.guidance_schedule, "eta": s.eta,
                    "negative": s.negative, "precision": s.precision, **reward_guidance_identity(cfg, through_graph)},
        "gate": {"max_tries": sc.max_tries, "threshold": sc.memorisation_threshold if sc.memorisation_threshold is not None
                 else cfg.judges.eval.memorisation_pixel_threshold, "require_verifier_pass": sc.require_verifier_pass,
                 **verifier_identity(cfg, through_graph)},
        "spec": str(spec_path), "model": model_info["path"], "adapters": [a["path"] for a in model_info["adapters"]],
        "version": synthmed_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def verifier_identity(cfg, through_graph: bool) -> dict:
    """The verifier's classifiers where its verdict decides what is kept (the gate's verifier pass, the graph's choice):
    nothing for the reward's, the only ones before 2026-12-05 (so folders made before resume with them)."""
    role = cfg.agents.verifier.role
    decides = cfg.synthesize.require_verifier_pass or through_graph
    return {"verifier_role": role} if decides and role != "reward" else {}


def reward_guidance_identity(cfg, through_graph: bool) -> dict:
    """The reward guidance a run draws with, for its identity: nothing when off (so folders made before it resume)."""
    scale, views = ((cfg.agents.reward_guidance, cfg.agents.reward_guidance_views) if through_graph
                    else (cfg.synthesize.reward_guidance, cfg.synthesize.reward_guidance_views))
    return {"reward_guidance": scale, "reward_guidance_views": views} if scale > 0 else {}


def launched_processes(cpu: bool) -> tuple[int, int]:
    """(rank, number of processes) of this process: under ``accelerate launch`` (torchrun's ``WORLD_SIZE``) from accelerate's
    ``PartialState``, which joins the process group (gloo with ``cpu``: accelerate sees no group of CPU processes
    otherwise); (0, 1) when run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return 0, 1
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    if state.num_processes != world:
        raise UserError(f"WORLD_SIZE is {world} but accelerate joined {state.num_processes} process(es) "
                        f"(distributed type {state.distributed_type}); launch with `accelerate launch --multi_gpu`")
    return state.process_index, state.num_processes


def synthesize(
    cfg,
    spec_path: str | os.PathLike,
    out: str | os.PathLike,
    model_dir: str | None = None,
    train_data: Sequence[str] | None = None,
    through_graph: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Expand the spec, claim (or resume) ``out``, draw every image through the gate; the summary.

    Under ``accelerate launch`` each process draws its shard and rank 0 merges them (see the module docstring): rank 0
    returns the run's summary, the other ranks their shard's :class:`DrawSummary` with ``rank`` and ``processes``."""
    from generator.data.wording import read_wording
    from generator.paths import shipped

    sc = cfg.synthesize
    spec_path = Path(spec_path)
    model_dir = str(shipped(model_dir or cfg.train.out))  # the shipped model is found from any working folder
    slots = read_spec(spec_path, cfg, sc.seed, read_wording(model_dir))  # bad input fails here, before anything heavy is loaded
    model_info = model_identity(model_dir, list(cfg.sample.lora))
    identity = run_identity(spec_path, slots, cfg, model_info, sc.seed, through_graph)
    from generator.devices import device_name

    rank, world = launched_processes(cpu=device_name(cfg.run.device) == "cpu")
    folder = OutputFolder(out, rank, world)
    if world > 1:
        return _fill_shard(folder, cfg, spec_path, slots, identity, model_dir, model_info, train_data, through_graph, resume, progress)
    with RunLock(folder.root, folder.lock_name):  # one run at a time in ``out``
        resumed = _claim(folder, cfg, identity, slots, resume)
        started = time.perf_counter()
        summary = _draw_shard(folder, cfg, slots, model_dir, model_info, train_data, through_graph, progress)
        return _finish(folder, cfg, spec_path, slots, model_info, through_graph, resumed, [summary], started)


def _claim(folder: OutputFolder, cfg, identity: dict, slots: Sequence[Slot], resume: bool) -> bool:
    """Make the locked ``folder`` this run's, or resume it (temporaries of killed writers swept); True when resumed."""
    resumed = folder.prepare(identity, slots, resume)
    if resumed:
        from generator.fileio import sweep_temporaries

        sweep_temporaries(folder.root)
    else:
        from .config import save_config

        save_config(cfg, folder.root / "config.yaml")
    return resumed


def _fill_shard(folder: OutputFolder, cfg, spec_path: Path, slots: list[Slot], identity: dict, model_dir: str, model_info: dict,
                train_data: Sequence[str] | None, through_graph: bool, resume: bool, progress: bool) -> dict:
    """One of several processes: rank 0 claims and repairs the folder while the others wait, each draws its shard and
    leaves its marker, rank 0 waits for the markers and merges."""
    from accelerate.utils import gather_object

    started = time.perf_counter()
    lock = RunLock(folder.root, folder.lock_name)
    resumed, error = False, None
    try:
        lock.acquire()
        if folder.rank == 0:
            resumed = _claim(folder, cfg, identity, slots, resume)
            folder.read_checks(cfg.synthesize.format, slots)  # cut torn lines, remove temporaries: no rank draws yet
            folder.clear_done()
    except SynthmedError as exc:
        error = str(exc)
    try:
        errors = [e for e in gather_object([error]) if e]  # every rank waits here for rank 0's claim
        if errors:
            raise UserError(errors[0])
        summary = _draw_shard(folder, cfg, slots, model_dir, model_info, train_data, through_graph, progress and folder.rank == 0)
        if folder.rank:
            folder.mark_done(summary)
            return {"rank": folder.rank, "processes": folder.world, **asdict(summary)}
        summaries = [summary, *folder.wait_for_ranks()]
        return _finish(folder, cfg, spec_path, slots, model_info, through_graph, resumed, summaries, started)
    finally:
        lock.release()


def _draw_shard(folder: OutputFolder, cfg, slots: list[Slot], model_dir: str, model_info: dict, train_data: Sequence[str] | None,
                through_graph: bool, progress: bool) -> DrawSummary:
    """Draw this process's open slots (the generator is opened only when there are some)."""
    sc = cfg.synthesize
    mine = shard_slots(slots, folder.rank, folder.world)
    before = folder.read_checks(sc.format, slots, repair=not folder.shard)
    open_slots = [s for s in mine if s.index not in before.accepted and before.tries.get(s.index, 0) < sc.max_tries]
    if open_slots:
        return _draw(cfg, slots, mine, folder, model_dir, model_info, train_data, through_graph, progress)
    if not folder.shard:
        folder.write_manifest(slots, before.accepted)
    return DrawSummary(requested=len(mine), resumed_from=len(mine) - len(open_slots))


def _finish(folder: OutputFolder, cfg, spec_path: Path, slots: list[Slot], model_info: dict, through_graph: bool, resumed: bool,
            summaries: Sequence[DrawSummary], started: float) -> dict:
    """Merge the shards' checks (when there are any), write the manifest and ``summary.json``; the summary."""
    sc = cfg.synthesize
    merged = folder.merge_checks()
    done = folder.read_checks(sc.format, slots)
    if merged or folder.shard:
        folder.write_manifest(slots, done.accepted)
        folder.clear_done()
    seconds = time.perf_counter() - started
    drawn = sum(s.drawn for s in summaries)
    draw_seconds = max(s.seconds for s in summaries)  # the ranks draw side by side
    unfilled = [s.index for s in slots if s.index not in done.accepted and done.tries.get(s.index, 0) >= sc.max_tries]
    modalities = sorted({s.request.modality for s in slots})
    result = {
        "out": str(folder.root), "spec": str(spec_path), "images": len(slots), "accepted": len(done.accepted), "unfilled": unfilled,
        "draws": done.records, "rejected": done.rejected, "acceptance_rate": round(len(done.accepted) / max(done.records, 1), 4),
        "drawn_this_call": drawn, "rejected_memorised_this_call": sum(s.rejected_memorised for s in summaries),
        "rejected_verifier_this_call": sum(s.rejected_verifier for s in summaries), "seconds": round(seconds, 2),
        "draw_seconds": round(draw_seconds, 2), "images_per_s": round(drawn / draw_seconds, 3) if draw_seconds else None,
        "resumed": resumed, "resumed_from": sum(s.resumed_from for s in summaries), "processes": folder.world, "format": sc.format,
        "seed": sc.seed, "model": model_info["path"], "model_sha256": model_info["sha256"], "adapters": model_info["adapters"],
        "through_graph": through_graph, "manifest": str(folder.manifest_path), "checks": str(folder.merged_checks_path),
        "by_modality": {m: sum(1 for s in slots if s.request.modality == m and s.index in done.accepted) for m in modalities},
    }
    try:
        write_json_atomic(folder.summary_path, result)
    except OSError as exc:
        if _is_full(exc):
            raise _disk_error(exc, folder.summary_path) from exc
        raise
    return result


def _draw(cfg, slots: Sequence[Slot], mine: Sequence[Slot], folder: OutputFolder, model_dir: str, model_info: dict,
          train_data: Sequence[str] | None, through_graph: bool, progress: bool) -> DrawSummary:
    """Open the generator (or the agent graph) and the judges, then draw."""
    from generator.models import LatentDiffusion

    sc = cfg.synthesize
    device = _device(cfg, folder.world)
    modalities = sorted({s.request.modality for s in slots})
    agent = None
    try:
        if through_graph:
            from .agent import build_agent

            agent = build_agent(cfg, model_dir, draw=True, traces=str(folder.root / "traces.sqlite"), progress=progress)
            model = agent.generator.model
            drawer = GraphDrawer(agent, folder.root)
        else:
            model = LatentDiffusion.load(model_dir, list(cfg.data.modalities), device=device)
            if cfg.sample.lora:
                from generator.models import apply_model_adapters

                apply_model_adapters(model, list(cfg.sample.lora))
            drawer = SamplerDrawer(model, cfg)
        train_images, note = training_images(cfg, Path(model_dir), model.cfg.image_size, modalities, train_data, progress)
        missing = [m for m in modalities if m not in train_images]
        if missing and sc.require_training_images:
            raise UserError(f"no training images of {', '.join(missing)} to check memorisation against ({note}); pass --train-data "
                            "with the generator's training manifests, or set --synthesize.require_training_images=false")
        verifier = build_verifier(cfg, device) if sc.verifier else None
        if sc.reward_guidance > 0 and not through_graph:  # the reward's classifiers guide (the evaluator never does)
            from rlhf.classifiers import load_finding_scorer
            from rlhf.guidance import RewardGuide

            scorer = verifier.reward if verifier is not None else load_finding_scorer("reward", cfg.judges.classifier.out, device=device)
            drawer.guide = RewardGuide(scorer, sc.reward_guidance, sc.reward_guidance_views)
            for m in modalities:
                drawer.guide.labels(m)  # a modality without a reward classifier: one clear error before anything is drawn
        judge = Judge(cfg, train_images, verifier, load_evaluators(cfg, modalities, device), note)
        return draw_slots(mine, slots, drawer, judge, folder, cfg, model_info, sc.seed, progress)
    finally:
        if agent is not None:
            agent.close()


def _device(cfg, world: int) -> str:
    """``run.device``; with several processes on GPUs this process's own (accelerate's), and on the CPU the threads shared."""
    import torch

    from generator.devices import device_name

    device = device_name(cfg.run.device)
    if world == 1:
        return device
    if device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // world)))
        return device
    from accelerate import PartialState

    return str(PartialState().device)


def training_images(cfg, model_dir: Path, size: int, modalities: list[str], manifests: Sequence[str] | None,
                    progress: bool) -> tuple[dict, str]:
    """The generator's training images for the gate, found as `synthmed eval` finds them (--train-data, else
    the model's metadata.json), limited to ``synthesize.training_limit`` per modality."""
    from rlhf.evaluate import model_training_images, read_training_images

    if manifests:
        missing = [m for m in manifests if not Path(m).is_file()]
        if missing:
            raise UserError(f"--train-data manifest {missing[0]} not found")
        images = read_training_images(list(manifests), cfg, size, modalities, cfg.synthesize.training_limit)
        return images, f"training images from {', '.join(manifests)}"
    images = model_training_images(model_dir, size, cfg, progress)
    limit = cfg.synthesize.training_limit
    images = {m: (v[:limit] if limit else v) for m, v in images.items() if m in modalities}
    return images, f"the training images {model_dir}/metadata.json names"


def build_verifier(cfg, device: str):
    """The graph's verifier (its finding classifiers, alignment, quality), without its own memorisation check: the gate is that."""
    from .agent import build_verifier as agent_verifier

    quiet = cfg.model_copy(deep=True)
    quiet.agents.verifier.use_memorisation = False
    return agent_verifier(quiet, device)


def load_evaluators(cfg, modalities: Sequence[str], device: str) -> dict:
    """The held-out evaluator classifiers (as ``rlhf.evaluate.load_judges`` opens them), where they exist: reported, never used to accept."""
    from generator.paths import shipped
    from rlhf.classifiers import load_classifier

    out = {}
    for m in modalities:
        folder = shipped(Path(cfg.judges.classifier.out) / "evaluator" / m)
        if folder.is_dir():
            try:
                out[m] = load_classifier(folder, role="evaluator", device=device)
            except FileNotFoundError as exc:
                log.warning("no evaluator for %s: %s", m, exc)
    return out


__all__ = ["DrawSummary", "GraphDrawer", "Judge", "MixSampler", "OutputFolder", "SamplerDrawer", "Slot", "SpecError", "dicom_dataset",
           "draw_slots", "file_digest", "launched_processes", "read_csv_spec", "read_mix_spec", "read_spec", "shard_slots", "synthesize", "text_request",
           "write_dicom", "write_png"]
