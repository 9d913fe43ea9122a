"""Property-based fuzzing of the text inputs (Hypothesis): config profiles and dotted overrides, free-text requests
(the agent graph's rule reader, and the one reader of findings built on it) and knowledge-base queries.

The property: a result or one error of the project's class (``SynthmedError``), never another exception, a hang or
unbounded work; long inputs (1 MB) answer in bounded time. Examples are derandomised and budgeted as in
test_fuzz_files.py (``HYPOTHESIS_FUZZ_EXAMPLES`` multiplies them).
"""

from __future__ import annotations

import time

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from generator.errors import SynthmedError
from test_fuzz_files import MB, bounded, fuzz

unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
# control characters, NUL, BOM, right-to-left marks, combining marks, non-BMP, full-width and Turkish dotted I
odd_text = st.sampled_from(["", " ", "\x00", "\x1b[31m", "\u202e", "\ufeff", "e\u0301" * 50, "😀" * 20, "ＰＴＸ", "İ",
                            "\r\n\t\x0b\x0c", "no\x00 pneumothorax", "?" * 300, "." * 300, ", " * 300])
request_text = st.lists(st.sampled_from(["Small left pleural effusion.", "No pneumothorax", "possible", "without",
                                         "RLL", "PTX", "cannot be excluded", "large", "right", "bilateral", ",", ";",
                                         "-", "?", "Normal chest radiograph.", "drusen", "macular", "with"])
                        | unicode_text | odd_text, max_size=12).map(" ".join)
LONG = ["pneumothorax, " * 75_000, "No " * 350_000, "a" * MB, "Small left pleural effusion. " * 36_000,
        "no pneumothorax effusion consolidation " * 27_000, ("é" * 1000 + "\n") * 1000, "," * MB, "possible " * 116_000]


# ====================================================================================== 2. config
@pytest.fixture(scope="module")
def config_fields():
    """Every dotted field of the default config, to aim overrides and profiles at real keys."""
    from pipelines.config import SynthmedConfig

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from walk(value, f"{prefix}{key}.")
            yield f"{prefix}{key}"

    return sorted(walk(SynthmedConfig().model_dump(mode="json"), ""))


yaml_scalars = (st.integers(-2**70, 2**70) | st.floats() | st.booleans() | st.none() | unicode_text
                | st.sampled_from(["1e-4", "no", "yes", "~", "null", ".nan", "-.inf", "2020-01-01", "0x1F", "1_000"]))
yaml_trees = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(unicode_text | st.integers(), inner, max_size=3), max_leaves=8)
# Nesting thousands deep (about 2 s each for the YAML reader to give up): in the fixed example only.
DEEP = ["[" * 5000, "a: " * 3000 + "1", "{a: " * 3000 + "1" + "}" * 3000, "- " * 3000 + "1",
        "".join(f"{' ' * i}k{i}:\n" for i in range(400)) + " " * 400 + "v", "&a [*a]", "a: &a [*a, *a]"]


@st.composite
def profile_text(draw, fields) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        text = draw(unicode_text | st.sampled_from(["[" * 50, "{a: " * 30, "&a [*a]", "extends: tiny", "extends: nope",
                                                                             "extends: [1]", "!!python/object:os.system"]))
    elif kind == 1:
        return draw(st.binary(max_size=200))
    else:
        tree: dict = {}
        for dotted in draw(st.lists(st.sampled_from(fields) | unicode_text, max_size=4)):
            node = tree
            *parents, last = str(dotted).split(".")
            for part in parents:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else node
            node[last] = draw(yaml_trees)
        if draw(st.booleans()):
            tree["extends"] = draw(st.sampled_from(["tiny", "real", "nope", "profile.yaml", 3, None]))
        text = yaml.safe_dump(tree, allow_unicode=True) if draw(st.booleans()) else yaml.safe_dump(draw(yaml_trees))
    return text.encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"])), errors="replace")


@st.composite
def override_args(draw, fields) -> list[str]:
    args = []
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(fields) | unicode_text | st.sampled_from(["a.b", "data..x", "1.x", "train.lr.x"]))
        value = draw(unicode_text | yaml_scalars.map(lambda v: yaml.safe_dump(v).strip()))
        args += draw(st.sampled_from([[f"--{key}={value}"], [f"--{key}", value], [f"--{key}"], [key], [value]]))
    return args


@fuzz(100)
@given(data=st.data())
@example(data=None)  # the fixed hand-written cases below
def test_config_profiles_and_overrides(tmp_path, config_fields, data):
    from pipelines.config import load_config, parse_overrides, parse_value

    if data is None:  # deep nesting (found: RecursionError from the YAML reader), NUL, UTF-16, a self-reference
        cases = [(t.encode(), []) for t in DEEP] + [(b"run:\n  name: a\x00b\n", []), ("run: {name: é}".encode("utf-16"), []),
                                                    (b"extends: profile\n", []), (b"", ["--run.name=[[[[" + "[" * 5000])]
    else:
        cases = [(data.draw(profile_text(config_fields)), data.draw(override_args(config_fields)))]
    path = tmp_path / "profile.yaml"
    for text, args in cases:
        path.write_bytes(text)
        bounded(load_config, path, args, seconds=20)
        bounded(parse_overrides, args)
        for arg in args:
            bounded(parse_value, arg)


# ====================================================================================== 5. free-text requests
class NoHits:
    """A retriever that finds nothing: the rule reader still runs every stage on its lexicon."""

    matcher = None
    concepts = None

    def search(self, query, k=5, modality=None, kinds=None):
        return []


@pytest.fixture(scope="module")
def reasoner():
    from agents.rules import RuleReasoner

    return RuleReasoner(NoHits())


MODALITY_NAMES = st.sampled_from(["cxr", "CXR", "chest x-ray", "oct", "fundus", "brain_mri", "chest_ct", "", "nope",
                                  "\x00", "mri"])


def read_request(reasoner, text, modality):
    request = reasoner.parse_request(text, modality)
    pathology = reasoner.assess_pathology(request, reasoner.localize_anatomy(request))
    return reasoner.map_visual_features(request, pathology)


@fuzz(150)
@given(text=request_text, modality=MODALITY_NAMES)
def test_request_reader(reasoner, text, modality):
    bounded(read_request, reasoner, text, modality, seconds=10)


@pytest.mark.parametrize("text", LONG, ids=range(len(LONG)))
def test_request_reader_long_text_is_bounded(reasoner, text):
    """1 MB requests: the reader keeps its first max_chars characters (a warning in the trace) in bounded time."""
    result = bounded(read_request, reasoner, text, "cxr", seconds=10)
    request = reasoner.parse_request(text, "cxr")
    assert request.truncated and len(request.text) <= reasoner.max_chars and request.warnings, result


@fuzz(150)
@given(text=request_text, modality=MODALITY_NAMES, labels=st.sampled_from([None, (), ("glioma", "meningioma"),
                                                                         ("", "x\x00"), ("no_tumor",)]))
def test_finding_reader(reasoner, text, modality, labels):
    """The one reader of findings (what synthesize, the scorers and the verifier read) on any text: a label -> bool
    dict over the given labels, or one clear error."""
    from agents.reader import FindingReader

    result = bounded(FindingReader(reasoner).expected, text, modality, labels, seconds=10)
    if not isinstance(result, SynthmedError):
        assert all(isinstance(v, bool) for v in result.values()) and (labels is None or set(result) <= set(labels))


@pytest.mark.parametrize("text", LONG, ids=range(len(LONG)))
def test_finding_reader_long_text_is_bounded(reasoner, text):
    from agents.reader import FindingReader

    start = time.perf_counter()
    result = bounded(FindingReader(reasoner).expected, text, "cxr", seconds=10)
    assert isinstance(result, (dict, SynthmedError)), (result, time.perf_counter() - start)


# ====================================================================================== 6. knowledge queries
@pytest.fixture(scope="module")
def retriever(tmp_path_factory, embedder):
    from knowledge.build import build_knowledge_base, load_retriever
    from knowledge.cases import Case
    from knowledge.schema import Concept

    concepts = [
        Concept("pneumothorax", "finding", "pneumothorax", ["collapsed lung"], ["PTX"], ["pnuemothorax"], ["cxr"]),
        Concept("pleural_effusion", "finding", "pleural effusion", [], [], [], ["cxr", "chest_ct"]),
        Concept("drusen", "finding", "drusen", [], [], [], ["fundus", "oct"]),
        Concept("right_lower_lobe", "anatomy", "right lower lobe", [], ["RLL"], [], ["cxr", "chest_ct"]),
        Concept("left", "modifier", "left", [], ["L"], [], [], attributes={"axis": "laterality", "value": "left"}),
    ]
    cases = [Case("m:1", "Chest radiograph. Large left pneumothorax.", "cxr", "a.png", [{"name": "pneumothorax"}], "phantom:cxr")]
    folder = tmp_path_factory.mktemp("kb")
    build_knowledge_base(folder, concepts, iter(cases), embedder, "Flat", "Flat", progress=False)
    return load_retriever(folder, embedder, modalities=["cxr", "chest_ct", "brain_mri", "fundus", "oct"])


ks = st.integers(-3, 12) | st.sampled_from([0, 1000, 1001, 10**6, 10**12, 2**63, True, 2.5, "5", None])


@fuzz(80)
@given(query=request_text | odd_text, k=ks, modality=st.sampled_from([None, "cxr", "oct", "nope", "", "CXR"]),
       kinds=st.sampled_from([None, [], ["finding"], ["case"], ["anatomy", "case"], ["nope"], "finding"]))
@example(query="pneumothorax", k=10**12, modality=None, kinds=None)  # found: faiss asked for 10^12 results
@example(query="pneumothorax", k=-2, modality=None, kinds=None)  # found: hits[:-2] silently dropped the best hits
def test_knowledge_query(retriever, query, k, modality, kinds):
    hits = bounded(retriever.search, query, k, modality=modality, kinds=kinds, seconds=20)
    if isinstance(hits, list):
        assert 1 <= k and len(hits) <= k
        assert all(h.score == h.score for h in hits)  # no NaN scores


@pytest.mark.parametrize("query", [LONG[0], LONG[2], "x" * 20_001], ids=range(3))
def test_knowledge_query_long_text_is_refused(retriever, query):
    from generator.errors import UserError

    error = bounded(retriever.search, query, 5, seconds=10)
    assert isinstance(error, UserError) and "characters" in str(error), error
