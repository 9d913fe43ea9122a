"""Which findings a text states as present or absent: a small matcher over the report vocabulary.

The finding scorer compares what a prompt asked for with what the classifier sees; when the caller
does not say what was asked for, it is read from the prompt here. The vocabulary is the phantom
report vocabulary (:mod:`generator.phantoms`: each finding's terms, plural terms and abbreviations)
plus a few synonyms the reports use in normal statements, and for any other label name (the real
data adapters' ``diabetic_macular_edema``, ``glioma``, ...) the name itself read as words.

    expected_findings("Small left pleural effusion. No pneumothorax.", "cxr")
    -> {"pleural_effusion": True, "pneumothorax": False}

How a text is read:

- spelling is folded to one form on both sides (haemorrhage/hemorrhage, oedema/edema,
  tumour/tumor, -isation/-ization), hyphens read as spaces, plurals match singulars;
  abbreviations (PTX, GGO, IRF, ...) match only in capitals, so "sol" or "ped" in a word do not;
- the text is cut into clauses at ``. ; : ! ?``; a negation never crosses a clause;
- a negation before a finding ("no", "without", "no evidence of", "negative for", ...) covers it and
  the findings listed after it ("No focal airspace opacity, effusion or pneumothorax"); the list ends
  at a word that describes something present (a size, side or severity: "no pneumothorax, large left
  effusion"), at "but"/"however"/"with"/..., or at the end of the clause;
- a negation after a finding ("pneumothorax is not seen", "... has resolved") covers the finding
  and the list just before it, back to the previous comma;
- hedged mentions ("possible consolidation", "nodule cannot be excluded") are uncertain and state
  nothing;
- pertinent normal statements deny findings ("Heart size is normal" -> no cardiomegaly), and a
  whole-study normal statement ("Normal chest radiograph.", "No acute cardiopulmonary abnormality.")
  denies every finding of the modality that the text does not state as present;
- a finding both affirmed and denied (``"No right effusion. Left pleural effusion."``) is present:
  negations are often side-specific, and the image must show the finding somewhere.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from generator.phantoms import PHANTOM_MODULES, get_spec

Status = Literal["present", "absent", "uncertain"]

# British -> American, applied to the text and to every term alike, so either spelling matches.
_SPELLING: tuple[tuple[str, str], ...] = (
    (r"haem", "hem"),
    (r"aem", "em"),  # ischaemic, anaemia
    (r"oed(?=em|ma)", "ed"),  # oedema, papilloedema
    (r"oesoph", "esoph"),
    (r"(tum|col|behavi)our", r"\1or"),
    (r"(fib|calib|cent)re\b", r"\1er"),
    (r"is(ation|ations|ed|ing)\b", r"iz\1"),  # neovascularisation, generalised, visualised
)

# Synonyms the phantom reports use beyond each FindingSpec's terms (mostly in normal statements).
EXTRA_TERMS: dict[str, dict[str, tuple[str, ...]]] = {
    "cxr": {"pleural_effusion": ("pleural fluid",), "pneumothorax": ("pneumothoraces",)},
    "chest_ct": {"nodule": ("nodule", "nodular opacity"), "pleural_effusion": ("pleural fluid",)},
    "brain_mri": {
        "hemorrhage": ("haemorrhage", "hematoma", "bleed"),
        "tumor": ("brain tumour", "intracranial tumour", "neoplasm"),
        "infarct": ("stroke",),
        "ms_lesions": ("demyelinating lesions", "demyelination", "multiple sclerosis lesions"),
    },
    "fundus": {
        "retinal_hemorrhage": ("haemorrhages", "retinal haemorrhage", "flame haemorrhages", "blot haemorrhages"),
        "hard_exudates": ("exudates",),
        "enlarged_cup": ("enlarged cup", "enlarged optic cup", "cupping", "increased cup-to-disc ratio"),
        "neovascularization": ("neovascularisation of the disc", "NVD", "NVE"),
        "papilledema": ("swollen optic disc", "swollen disc"),
    },
    "oct": {
        "intraretinal_fluid": ("intraretinal cysts", "cystoid macular oedema", "CMO", "CME"),
        "subretinal_fluid": ("subretinal fluid",),
        "drusen": ("drusenoid deposits",),
        "epiretinal_membrane": ("epiretinal membranes",),
    },
}

# Synonyms of label names used by the real-data adapters (generator/data/meddata.py), any modality.
LABEL_SYNONYMS: dict[str, tuple[str, ...]] = {
    "infiltration": ("infiltrate", "pulmonary infiltrate"),
    "lung_cancer": ("lung cancer", "malignant lung lesion", "lung malignancy"),
    "pituitary_tumor": ("pituitary tumour", "sellar mass", "pituitary adenoma"),
    "glioma": ("intra-axial mass consistent with glioma",),
    "meningioma": ("extra-axial mass consistent with meningioma",),
    "diabetic_macular_edema": ("diabetic macular oedema", "DME"),
    "diabetic_retinopathy": ("diabetic retinopathy", "DR"),
    "pleural_thickening": ("pleural thickening",),
}

# Phrases that only ever deny several findings at once ("no fluid", "no retinopathy"); affirmed,
# they are too vague to say which finding is meant, so they state nothing.
GROUP_TERMS: dict[str, dict[str, tuple[str, ...]]] = {
    "cxr": {"lung lesion": ("nodule", "mass")},
    "chest_ct": {"lung lesion": ("nodule", "mass")},
    "brain_mri": {
        "intra-axial or extra-axial mass": ("tumor",),
        "mass lesion": ("tumor",),
        "focal lesion": ("tumor", "infarct", "hemorrhage"),
    },
    "fundus": {
        "retinopathy": ("microaneurysms", "retinal_hemorrhage", "hard_exudates", "cotton_wool_spots", "neovascularization"),
        "diabetic retinopathy": ("microaneurysms", "retinal_hemorrhage", "hard_exudates", "cotton_wool_spots", "neovascularization"),
    },
    "oct": {
        "intraretinal or subretinal fluid": ("intraretinal_fluid", "subretinal_fluid"),
        "fluid": ("intraretinal_fluid", "subretinal_fluid"),
        "macular oedema": ("intraretinal_fluid",),
        "neovascular activity": ("choroidal_neovascularization",),
    },
}

# Pertinent normal statements: a phrase that says a finding is absent without negating its name.
NORMAL_PHRASES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "cxr": (
        (r"(heart|cardiac) size (is )?(normal|within normal limits)|normal (heart|cardiac) size|heart size and mediastinal contours are within normal limits", ("cardiomegaly",)),
        (r"costophrenic angles are (sharp|clear)", ("pleural_effusion",)),
    ),
    "chest_ct": ((r"pleural spaces are clear", ("pleural_effusion", "pneumothorax")),),
    "brain_mri": (
        (r"midline (structures )?(is |are )?(central|undisplaced|not displaced)|midline is undisplaced", ("midline_shift",)),
        (r"ventricles and sulci are (normal|appropriate)|ventricular system is normal in size", ("atrophy",)),
    ),
    "fundus": (
        (r"normal cup|healthy neuroretinal rim", ("enlarged_cup",)),
        (r"well defined (disc )?margins", ("papilledema",)),
    ),
    "oct": (
        (r"(the )?rpe is flat", ("pigment_epithelial_detachment",)),
        (r"vitreoretinal interface is unremarkable", ("epiretinal_membrane",)),
        (r"foveal (depression|contour|pit) is preserved|normal foveal (contour|pit|depression)", ("macular_hole",)),
    ),
}

# A whole-study normal statement: the clause starts with it and names no finding.
_STUDY_NORMAL = re.compile(
    r"^(?:(?:normal|unremarkable)\b.*\b(?:study|radiograph|x ray|ct|mri|mr|brain|lungs|fundus|photograph|oct|scan|appearance)\b"
    # only whole-study words: "no pleural disease" says nothing about a nodule
    r"|no (?:acute |active )?(?:(?:cardiopulmonary|intracranial|intrathoracic|pulmonary|macular|retinal|ocular) )?(?:abnormality|disease|pathology)\b"
    r"|no abnormality detected\b)"
)

_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|nor|negative for|free of|absence of|resolution of|resolved|rather than|instead of)\b"
)
_POST_NEGATION = re.compile(
    r"\b(?:(?:is|are|was|were|has been|have been)\s+)?(?:not\s+(?:seen|identified|present|demonstrated|visualized|evident|detected|shown)"
    r"|absent|(?:has|have)\s+resolved|ruled out|excluded)\b"
)
_PRE_UNCERTAIN = re.compile(
    r"\b(?:possible|possibly|probable|probably|likely|suspected|suspicious for|suspicion of|questionable|query|may represent|could represent|equivocal|cannot exclude|rule out)\b"
)
_POST_UNCERTAIN = re.compile(r"\b(?:cannot|can not|can't|not)\s+be\s+(?:excluded|ruled out)\b|\bnot\s+(?:excluded|ruled out)\b|\bis\s+suspected\b|\?")
# Where a pre-negation stops: something other than another absent item of the list follows.
_SCOPE_END = re.compile(r"\b(?:but|however|although|though|whereas|yet|except|apart from|aside from|other than|which|with|and there is|there is|there are)\b")
# Words that describe a present finding; a negated list never carries them.
_DESCRIBES_PRESENT = re.compile(
    r"\b(?:small|large|moderate|mild|minimal|severe|marked|extensive|dense|trace|patchy|left|right|bilateral|sided|medium|sized|shallow|tiny|big|new|\d+)\b"
)


def normalise(text: str) -> str:
    """Fold spelling variants and hyphens so British and American texts read alike (case kept)."""
    out = text.replace("-", " ").replace("‐", " ")
    for pattern, replacement in _SPELLING:
        out = re.sub(pattern, replacement, out, flags=re.IGNORECASE)
    return re.sub(r"[ \t]+", " ", out)


def _is_abbreviation(term: str) -> bool:
    return " " not in term and sum(c.isupper() for c in term) >= 2


def _term_pattern(term: str) -> str:
    """One term as a regex: spelling folded, any whitespace between words, optional plural."""
    if _is_abbreviation(term):
        body = re.escape(term) + "s?"
        return rf"(?<![\w]){body}(?![\w])"
    words = normalise(term).lower().split()
    last = words[-1]
    if last.endswith("s") and not last.endswith("ss") and len(last) > 4:
        words[-1] = re.escape(last[:-1]) + "s?"
    elif last.endswith("y") and len(last) > 3:  # opacity / opacities
        words[-1] = re.escape(last[:-1]) + "(?:y|ies)"
    elif last.endswith(("sis", "ss", "x", "ch", "sh")):
        words[-1] = re.escape(last) + "(?:es)?"
    else:
        words[-1] = re.escape(last) + "s?"
    body = r"\s+".join([re.escape(w) for w in words[:-1]] + [words[-1]])
    return rf"(?i:(?<![\w]){body}(?![\w]))"


@dataclass(frozen=True)
class FindingMention:
    name: str  # finding label, e.g. "pleural_effusion"
    status: Status
    span: str  # the words that matched, as normalised
    clause: str  # the clause it was found in, as normalised


@dataclass(frozen=True)
class _Vocabulary:
    pattern: re.Pattern  # one alternation over every term, longest first
    groups: dict[str, tuple[tuple[str, ...], bool]]  # regex group -> (finding names, deny-only)
    normal_phrases: tuple[tuple[re.Pattern, tuple[str, ...]], ...]
    labels: tuple[str, ...]


def vocabulary(modality: str, label_names: tuple[str, ...] | list[str] | None = None) -> dict[str, tuple[str, ...]]:
    """finding name -> the terms that name it, for the modality's phantom findings and ``label_names``."""
    names = list(label_names) if label_names is not None else (list(get_spec(modality).findings) if modality in PHANTOM_MODULES else [])
    spec = get_spec(modality) if modality in PHANTOM_MODULES else None
    extra = EXTRA_TERMS.get(modality, {})
    terms: dict[str, tuple[str, ...]] = {}
    for name in names:
        found: list[str] = []
        if spec is not None and name in spec.findings:
            finding = spec.findings[name]
            found += [*finding.terms, *finding.bilateral_terms]
        found += [*extra.get(name, ()), *LABEL_SYNONYMS.get(name, ()), name.replace("_", " ")]  # the label name read as words always matches
        terms[name] = tuple(dict.fromkeys(found))
    return terms


@lru_cache(maxsize=64)
def _compiled(modality: str, label_names: tuple[str, ...] | None) -> _Vocabulary:
    terms = vocabulary(modality, label_names)
    labels = tuple(terms)
    # (a blank term, from a blank label name, names nothing: it would match everywhere, or break the pattern)
    entries: list[tuple[str, tuple[str, ...], bool]] = [(t, (name,), False) for name, ts in terms.items() for t in ts
                                                         if normalise(t).split()]
    for phrase, names in GROUP_TERMS.get(modality, {}).items():
        kept = tuple(n for n in names if n in terms)
        if kept:
            entries.append((phrase, kept, True))
    # Longest first, so "pulmonary nodule" wins over "nodule" and "intraretinal or subretinal fluid" over "fluid".
    entries.sort(key=lambda e: -len(normalise(e[0])))
    groups: dict[str, tuple[tuple[str, ...], bool]] = {}
    parts = []
    for i, (term, names, deny_only) in enumerate(entries):
        groups[f"t{i}"] = (names, deny_only)
        parts.append(f"(?P<t{i}>{_term_pattern(term)})")
    pattern = re.compile("|".join(parts)) if parts else re.compile(r"(?!x)x")
    normal = tuple(
        (re.compile(rf"\b(?:{regex})\b"), tuple(n for n in names if n in terms))
        for regex, names in NORMAL_PHRASES.get(modality, ())
    )
    return _Vocabulary(pattern, groups, tuple(p for p in normal if p[1]), labels)


def _clauses(text: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<=[.;:!?])\s+|\n+|[.;!?]$", text) if c and c.strip()]


_GLUE_WORDS = {"or", "and", "nor", "and/or", "of", "the", "a", "an", "any"}


def _is_list_gap(gap: str, commas: bool = True) -> bool:
    """Is ``gap`` the glue between two absent items of one list ("effusion, nodule or mass")?

    It must hold a separator (a comma, "or", "and", "nor") and at most two plain modifiers
    ("focal", "abnormal FLAIR"), and nothing that describes a present finding."""
    if _DESCRIBES_PRESENT.search(gap) or _SCOPE_END.search(gap) or _PRE_NEGATION.search(gap):
        return False
    words = re.findall(r"[\w/]+", gap)
    separated = ("," in gap and commas) or any(w in ("or", "and", "nor", "and/or") for w in words)
    if "," in gap and not commas:
        return False
    return separated and len([w for w in words if w not in _GLUE_WORDS]) <= 2


def _negated_before(clause: str, matches: list[re.Match], k: int) -> bool:
    """Does a negation before match ``k`` reach it, directly or through a list of absent items?"""
    for j in range(k, -1, -1):
        left = matches[j - 1].end() if j > 0 else 0
        gap = clause[left : matches[j].start()]
        triggers = list(_PRE_NEGATION.finditer(gap))
        if triggers:
            return not _SCOPE_END.search(gap[triggers[-1].end() :])
        if j == 0 or not _is_list_gap(gap):
            return False
    return False


def _negated_after(clause: str, matches: list[re.Match], k: int) -> bool:
    """Does a negation after match ``k`` ("... is not seen") reach back to it, within its comma?"""
    for j in range(k, len(matches)):
        right = matches[j + 1].start() if j + 1 < len(matches) else len(clause)
        gap = clause[matches[j].end() : right]
        post = _POST_NEGATION.search(gap)
        if post is not None:
            before = gap[: post.start()]
            return len(before.split()) <= 3 and "," not in before and not _SCOPE_END.search(before)
        if j + 1 >= len(matches) or not _is_list_gap(gap, commas=False):
            return False
    return False


def _uncertain(clause: str, match: re.Match, index: "_ClauseIndex | None" = None) -> bool:
    """A hedge within a few words before ("possible ...") or after ("... cannot be excluded")."""
    index = index or _ClauseIndex(clause)
    hedge = index.hedge_before(match.start())
    if hedge is not None and index.words(hedge.end(), match.start()) <= 6 \
            and not _SCOPE_END.search(clause[hedge.end() : match.start()]):
        return True
    after = clause[match.end() : index.end_of_word_after(match.end(), 10)]  # a post hedge counts within 4 words
    post = _POST_UNCERTAIN.search(after)
    return post is not None and len(after[: post.start()].split()) <= 4 and "," not in after[: post.start()]


class _ClauseIndex:
    """The hedges and word positions of one clause, found once: each finding's checks then look only at the few
    words around it, so a long clause with many findings reads in linear time, not quadratic (a 1 MB
    "pneumothorax, pneumothorax, ..." took minutes)."""

    def __init__(self, clause: str):
        self.hedges = list(_PRE_UNCERTAIN.finditer(clause))
        self.hedge_ends = [h.end() for h in self.hedges]
        runs = [(m.start(), m.end()) for m in re.finditer(r"\S+", clause)]  # the words of str.split()
        self.starts, self.ends = [a for a, _ in runs], [b for _, b in runs]
        self.length = len(clause)

    def hedge_before(self, at: int) -> re.Match | None:
        """The last hedge ending at or before ``at``."""
        i = bisect_right(self.hedge_ends, at)
        return self.hedges[i - 1] if i else None

    def words(self, a: int, b: int) -> int:
        """``len(clause[a:b].split())``."""
        return max(0, bisect_left(self.starts, b) - bisect_right(self.ends, a))

    def end_of_word_after(self, at: int, n: int) -> int:
        """Where the ``n``-th word after ``at`` ends (the clause's end if there are fewer)."""
        i = bisect_right(self.ends, at) + n - 1
        return self.ends[i] if i < len(self.ends) else self.length


def _negations(clause: str, matches: list[re.Match]) -> tuple[list[bool], list[bool]]:
    """``_negated_before`` and ``_negated_after`` of every match, each gap read once (a list of absent items
    takes the answer of its neighbour, so the walk along the list is not repeated for every item)."""
    before: list[bool] = []
    for j in range(len(matches)):
        left = matches[j - 1].end() if j > 0 else 0
        gap = clause[left : matches[j].start()]
        triggers = list(_PRE_NEGATION.finditer(gap))
        if triggers:
            before.append(not _SCOPE_END.search(gap[triggers[-1].end() :]))
        elif j == 0 or not _is_list_gap(gap):
            before.append(False)
        else:
            before.append(before[j - 1])
    after: list[bool] = [False] * len(matches)
    for j in range(len(matches) - 1, -1, -1):
        right = matches[j + 1].start() if j + 1 < len(matches) else len(clause)
        gap = clause[matches[j].end() : right]
        post = _POST_NEGATION.search(gap)
        if post is not None:
            head = gap[: post.start()]
            after[j] = len(head.split()) <= 3 and "," not in head and not _SCOPE_END.search(head)
        elif j + 1 >= len(matches) or not _is_list_gap(gap, commas=False):
            after[j] = False
        else:
            after[j] = after[j + 1]
    return before, after


def finding_mentions(text: str, modality: str, label_names: tuple[str, ...] | list[str] | None = None) -> list[FindingMention]:
    """Every finding the text mentions, with whether it is stated present, absent or uncertain."""
    vocab = _compiled(modality, tuple(label_names) if label_names is not None else None)
    mentions: list[FindingMention] = []
    for clause in _clauses(normalise(text)):
        matches = list(vocab.pattern.finditer(clause))
        low = clause.lower()  # same positions: the negation and hedge cues are matched in lower case
        affirmed = False
        index = _ClauseIndex(low)
        negated_before, negated_after = _negations(low, matches)
        for k, m in enumerate(matches):
            names, deny_only = vocab.groups[m.lastgroup]
            hedged = _uncertain(low, m, index)  # checked first: "cannot be excluded" holds a negation word
            negated = not hedged and (negated_before[k] or negated_after[k])
            status: Status = "absent" if negated else "uncertain" if hedged else "present"
            if deny_only and status != "absent":
                continue
            affirmed = affirmed or status == "present"
            mentions.extend(FindingMention(n, status, m.group(0), clause) for n in names)
        for regex, names in vocab.normal_phrases:
            hit = regex.search(low)
            if hit:
                mentions.extend(FindingMention(n, "absent", hit.group(0), clause) for n in names)
        if not affirmed and _STUDY_NORMAL.match(low):
            mentions.extend(FindingMention(n, "absent", clause, clause) for n in vocab.labels)
    return mentions


def expected_findings(text: str, modality: str, label_names: tuple[str, ...] | list[str] | None = None) -> dict[str, bool]:
    """finding name -> True (stated present) / False (stated absent); unstated and hedged findings are left out."""
    present: set[str] = set()
    absent: set[str] = set()
    for mention in finding_mentions(text, modality, label_names):
        if mention.status == "present":
            present.add(mention.name)
        elif mention.status == "absent":
            absent.add(mention.name)
    order = vocabulary(modality, label_names)
    return {name: name in present for name in order if name in present or name in absent}


__all__ = ["EXTRA_TERMS", "FindingMention", "GROUP_TERMS", "LABEL_SYNONYMS", "NORMAL_PHRASES", "expected_findings", "finding_mentions", "normalise", "vocabulary"]
