"""`synthmed kb` in-process on tiny settings: build from a lexicon folder and phantom cases, search, eval, bench."""

import json

import pytest

from pipelines.cli import main

LEXICON = """
concepts:
  - {id: pneumothorax, kind: finding, term: pneumothorax, abbreviations: [PTX], modalities: [cxr, chest_ct],
     codes: {snomed: "36118008"}, description: Air in the pleural space.}
  - {id: drusen, kind: finding, term: drusen, modalities: [fundus, oct], description: Deposits under the RPE.}
  - {id: right_lower_lobe, kind: anatomy, term: right lower lobe, abbreviations: [RLL], modalities: [cxr, chest_ct]}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("kbcli")
    (root / "lex").mkdir()
    (root / "lex" / "a.yaml").write_text(LEXICON)
    assert main(["data", "phantoms", "--out", str(root / "ph"), "--per-finding", "1", "--size", "32",
                 "--modalities", "cxr", "oct", "--no-progress"]) == 0
    overrides = [f"--knowledge.lexicon_dir={root / 'lex'}", f"--knowledge.index_dir={root / 'kb'}",
                 f"--knowledge.case_manifests=[{root / 'ph' / 'manifest.csv'}]", "--knowledge.case_index=Flat"]
    assert main(["kb", "build", *overrides]) == 0
    return root, overrides


def test_build_writes_indexes_and_summary(built):
    root, _ = built
    summary = json.loads((root / "kb" / "build.json").read_text())
    assert summary["concepts"] == 3 and summary["cases"] > 10 and set(summary["cases_by_modality"]) == {"cxr", "oct"}


def test_search_json_with_alias_modality(built, capsys):
    _, overrides = built
    capsys.readouterr()
    assert main(["kb", "search", "PTX", "--modality", "chest x-ray", "--k", "3", "--json", *overrides]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["modality"] == "cxr" and out["hits"][0]["id"] == "pneumothorax"
    assert out["hits"][0]["codes"] == {"snomed": "36118008"}


def test_search_cases_table(built, capsys):
    _, overrides = built
    capsys.readouterr()
    assert main(["kb", "search", "subretinal fluid", "--modality", "oct", "--kinds", "case", *overrides]) == 0
    assert "case" in capsys.readouterr().out


def test_eval_on_a_query_file(built, tmp_path, capsys):
    _, overrides = built
    queries = tmp_path / "q.yaml"
    queries.write_text("- {query: PTX, expected: pneumothorax, category: abbreviation}\n- {query: RLL, expected: right_lower_lobe, modality: cxr, category: anatomy}\n")
    capsys.readouterr()
    assert main(["kb", "eval", "--queries", str(queries), "--json", *overrides]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stage"]["groups"]["all"]["top5"] == 1.0 and result["all_kinds"]["groups"]["all"]["top5"] == 1.0


def test_missing_index_and_unknown_modality_are_clear(tmp_path, built, capsys):
    _, overrides = built
    assert main(["kb", "search", "x", f"--knowledge.index_dir={tmp_path / 'none'}"]) == 2
    assert "synthmed kb build" in capsys.readouterr().err
    assert main(["kb", "search", "x", "--modality", "pet", *overrides]) == 2
    assert "known modalities" in capsys.readouterr().err


def test_bench_small(capsys):
    assert main(["kb", "bench", "--sizes", "2000", "--dim", "32", "--queries", "10", "--factories", "Flat", "HNSW32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["factory"] for r in result["rows"]] == ["Flat", "HNSW32"] and result["rows"][0]["recall_at_10"] == 1.0
