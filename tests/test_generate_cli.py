"""`synthmed generate` and `synthmed trace` in-process on the shipped models, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cli import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("generate")


def overrides(workdir: Path) -> list[str]:
    # a knowledge base of the lexicon alone (built on first use), traces and images under the test's folder
    return [f"--knowledge.index_dir={workdir / 'kb'}", "--knowledge.case_manifests=[]", f"--agents.traces={workdir / 'traces.sqlite'}",
            f"--agents.out={workdir / 'images'}", "--agents.candidates=2"]


def generate(workdir, capsys, *args) -> tuple[int, dict | str, str]:
    code = main(["generate", *args, *overrides(workdir)])
    captured = capsys.readouterr()
    try:
        return code, json.loads(captured.out), captured.err
    except json.JSONDecodeError:
        return code, captured.out, captured.err


def test_generate_json_and_the_trace_it_leaves(workdir, capsys):
    code, record, _ = generate(workdir, capsys, "Generate a CXR: large lt pleural effusion, no PTX.", "--modality", "chest x-ray",
                               "--steps", "3", "--max-rounds", "2", "--seed", "7", "--json")
    assert code == 0
    assert {"trace_id", "images", "report", "verdict", "findings"} <= set(record)
    found = {f["name"]: f for f in record["findings"]}
    assert found["pleural_effusion"] == {**found["pleural_effusion"], "present": True, "laterality": "left", "severity": "severe"}
    assert found["pneumothorax"]["present"] is False
    assert record["images"] and all(Path(p).is_file() for p in record["images"])
    assert set(record["report"]) >= {"history", "technique", "findings", "impression"}
    assert record["verdict"]["rounds"] in (1, 2) and record["verdict"]["candidates"][0]["findings"]

    assert main(["trace", "list", "--json", *overrides(workdir)[2:3]]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert record["trace_id"] in [r["trace_id"] for r in listed]
    assert main(["trace", "show", record["trace_id"], "--json", *overrides(workdir)[2:3]]) == 0
    trace = json.loads(capsys.readouterr().out)
    assert trace["stages"]["assess_pathology"]["findings"] and trace["retrievals"]["assess_pathology"]
    assert [e["node"] for e in trace["events"]][:5] == ["parse_request", "localize_anatomy", "assess_pathology",
                                                        "map_visual_features", "compose_prompt"]
    assert main(["trace", "show", record["trace_id"], *overrides(workdir)[2:3]]) == 0
    text = capsys.readouterr().out
    assert "== assess_pathology" in text and "prompt:" in text and "round 0" in text


def test_dry_run_composes_without_drawing(workdir, capsys):
    code, out, _ = generate(workdir, capsys, "OCT OD: SRF and a small PED, no IRF", "--modality", "oct", "--dry-run")
    assert code == 0 and "Findings:" in out and "images" not in out.lower().split("trace")[0]


@pytest.mark.parametrize("text,modality,needle", [
    ("left pleural effusion", "x-ray of the knee", "known modalities"),
    ("cup-to-disc ratio 0.8", "chest_ct", "cup"),
    ("", "cxr", "empty"),
])
def test_bad_requests_exit_2_with_a_clear_message(workdir, capsys, text, modality, needle):
    code, _, err = generate(workdir, capsys, text, "--modality", modality, "--dry-run")
    assert code == 2 and needle in err.lower()


def test_unknown_trace_is_a_clear_error(workdir, capsys):
    assert main(["trace", "show", "nope", *overrides(workdir)[2:3]]) == 2
    assert "no trace" in capsys.readouterr().err


def test_reward_guidance_from_the_command_line(workdir, capsys):
    code, record, _ = generate(workdir, capsys, "large left pleural effusion, no pneumothorax", "--modality", "cxr", "--steps", "3",
                               "--max-rounds", "1", "--seed", "3", "--reward-guidance", "0.1", "--json")
    assert code == 0 and record["images"] and all(Path(p).is_file() for p in record["images"])
    assert any(w.startswith("reward guidance (scale 0.1)") for w in record["warnings"])
    assert main(["trace", "show", record["trace_id"], "--json", *overrides(workdir)[2:3]]) == 0
    trace = json.loads(capsys.readouterr().out)
    assert trace["settings"]["reward_guidance"] == 0.1
    assert trace["candidates"] and all(c["reward_guidance"] == 0.1 for c in trace["candidates"])

    code, _, err = generate(workdir, capsys, "left pleural effusion", "--modality", "cxr", "--reward-guidance", "-1")
    assert code == 2 and "--reward-guidance must be a scale >= 0" in err
