"""The project's own lexicon: YAML files in ``knowledge/lexicon/``, loaded and checked.

Each file holds ``concepts:``, a list of :class:`~knowledge.schema.Concept` fields. Loading
checks every concept and every cross-reference (an appearance's finding, parents) and stops
with one message listing all problems, each naming the file and the concept. More files (a new
modality's findings) may be loaded with a folder; they are checked together with it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import yaml

from generator.config import default_modalities
from generator.errors import UserError

from .schema import Concept, validate_concept

LEXICON_DIR = Path(__file__).resolve().parent / "lexicon"


class LexiconError(UserError):
    pass


def load_lexicon(
    folder: str | Path = LEXICON_DIR, known_modalities: Iterable[str] | None = None, extra_files: Iterable[str | Path] = ()
) -> list[Concept]:
    """All concepts of a lexicon folder and of ``extra_files``, validated, in file then declaration order.
    ``known_modalities``: the modality ids concepts may name (default: the built-in ones)."""
    folder = Path(folder)
    modalities = set(known_modalities if known_modalities is not None else default_modalities())
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise LexiconError(f"no lexicon files (*.yaml) in {folder}")
    missing = [str(f) for f in extra_files if not Path(f).is_file()]
    if missing:
        raise LexiconError(f"lexicon file(s) not found: {', '.join(missing)}")
    files += [Path(f) for f in extra_files]
    concepts: list[Concept] = []
    origin: dict[str, str] = {}
    problems: list[str] = []
    for path in files:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        entries = data.get("concepts") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            problems.append(f"{path.name}: expected a top-level 'concepts:' list")
            continue
        for entry in entries:
            try:
                concept = Concept.from_dict(entry, source="lexicon")
            except (TypeError, ValueError) as exc:
                problems.append(f"{path.name}: {exc}")
                continue
            problems += [f"{path.name}: {p}" for p in validate_concept(concept, modalities)]
            concepts.append(concept)
            origin.setdefault(concept.id, path.name)
    counts = Counter(c.id for c in concepts)
    problems += [f"concept id {cid!r} defined {n} times" for cid, n in counts.items() if n > 1]
    ids = set(counts)
    for c in concepts:
        if c.finding and c.finding not in ids:
            problems.append(f"{origin[c.id]}: {c.id!r} describes unknown finding {c.finding!r}")
        for parent in c.parents:
            if parent not in ids:
                problems.append(f"{origin[c.id]}: {c.id!r} has unknown parent {parent!r}")
    if problems:
        raise LexiconError("lexicon problems:\n  " + "\n  ".join(problems))
    return concepts
