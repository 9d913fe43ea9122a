"""`synthmed synthesize` under `accelerate launch` with two CPU processes: the data set one process makes, and a kill then resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPEC = ("text,modality,n\n"
        "Large left pleural effusion. No pneumothorax.,cxr,3\n"
        "Normal chest radiograph.,chest x-ray,2\n"
        "Right upper lobe nodule.,chest ct,2\n"
        "Several hard exudates.,fundus,1\n")
IMAGES = 8
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(spec: Path, out: Path, train: Path, processes: int, *extra: str) -> list[str]:
    """One process, or ``accelerate launch`` of ``processes`` (its --multi_gpu launcher is torchrun: on a CPU the ranks
    meet over gloo; ``--cpu`` would start one process)."""
    args = ["synthesize", str(spec), "--out", str(out), "--train-data", str(train), "--batch-size", "1", "--sample.steps=3",
            "--synthesize.verifier=false", "--no-progress", f"--knowledge.index_dir={spec.parent / 'kb'}",
            "--knowledge.case_manifests=[]", *extra]
    if processes == 1:
        return [sys.executable, "-m", "pipelines.cli", *args]
    accelerate = Path(sys.executable).with_name("accelerate")
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "pipelines.cli", *args]


def checks(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def manifest_rows(folder: Path) -> list[dict]:
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_data_set(one: Path, other: Path) -> None:
    """Same manifest rows (the source names its folder: both are called ``out``), the same image files byte for byte,
    one accepted draw per slot in slot order, and no shard file, marker or lock left."""
    assert manifest_rows(other) == manifest_rows(one)
    assert sorted(p.name for p in (other / "images").iterdir()) == sorted(p.name for p in (one / "images").iterdir())
    for path in (one / "images").iterdir():
        assert (other / "images" / path.name).read_bytes() == path.read_bytes(), path.name
    lines = checks(other / "checks.jsonl")
    assert Counter(c["index"] for c in lines if c["accepted"]) == Counter(range(IMAGES))
    assert [(c["index"], c["attempt"]) for c in lines] == sorted((c["index"], c["attempt"]) for c in lines)
    first = {c["index"]: c["seed"] for c in checks(one / "checks.jsonl") if c["accepted"]}
    assert {c["index"]: c["seed"] for c in lines if c["accepted"]} == first
    left = sorted(p.name for p in other.iterdir() if p.name.startswith(".") or ".rank" in p.name)
    assert left == [], left


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthesize_multiprocess")
    (folder / "spec.csv").write_text(SPEC, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def one_process(work, train_manifest) -> Path:
    out = work / "one" / "out"
    subprocess.run(command(work / "spec.csv", out, train_manifest, 1), check=True, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL)
    return out


@pytest.mark.slow
def test_two_processes_make_the_data_set_of_one(work, train_manifest, one_process):
    out = work / "two" / "out"
    done = subprocess.run(command(work / "spec.csv", out, train_manifest, 2, "--json"), check=True, cwd=REPO, env=ENV,
                          capture_output=True, text=True)
    summary = json.loads(done.stdout[done.stdout.index("{"):])  # rank 0 alone prints
    assert summary["processes"] == 2 and summary["accepted"] == IMAGES and summary["drawn_this_call"] == IMAGES
    assert json.loads((out / "summary.json").read_text()) == summary
    assert_same_data_set(one_process, out)


@pytest.mark.slow
def test_a_killed_rank_then_resume_gives_exactly_the_spec(work, train_manifest, one_process):
    out = work / "killed" / "out"
    proc = subprocess.Popen(command(work / "spec.csv", out, train_manifest, 2), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shard = out / "checks.rank1.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and not (shard.is_file() and len(checks(shard)) >= 1):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before rank 1 could be killed"
        os.kill(json.loads((out / ".lock.rank1").read_text())["pid"], signal.SIGKILL)  # its lock names it
        assert proc.wait(timeout=120) != 0  # the launcher stops the other rank and fails
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    drawn = [c["index"] for path in out.glob("checks*.jsonl") for c in checks(path)]
    assert 1 <= len(drawn) < IMAGES and not (out / "manifest.csv").exists()  # shards leave the manifest to the merge
    subprocess.run(command(work / "spec.csv", out, train_manifest, 2, "--resume"), check=True, cwd=REPO, env=ENV,
                   stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] and summary["accepted"] == IMAGES and summary["drawn_this_call"] == IMAGES - len(set(drawn))
    assert_same_data_set(one_process, out)


def test_the_merge_keeps_one_line_per_draw_in_slot_order(tmp_path):
    """Shard files in any order, a torn last line, and a merge cut short (its lines in checks.jsonl and in the shards)."""
    from pipelines.synthesize import OutputFolder

    folder = OutputFolder(tmp_path, rank=0, world=2)

    def line(index: int, attempt: int, accepted: bool = True) -> str:
        return json.dumps({"index": index, "attempt": attempt, "accepted": accepted}) + "\n"

    (tmp_path / "checks.jsonl").write_text(line(0, 0) + line(2, 0, False))
    (tmp_path / "checks.rank0.jsonl").write_text(line(2, 0, False) + line(4, 0) + line(2, 1) + line(0, 0))
    (tmp_path / "checks.rank1.jsonl").write_text(line(3, 0) + line(1, 0) + '{"index": 5, "att')
    assert folder.merge_checks()
    assert [(c["index"], c["attempt"]) for c in checks(tmp_path / "checks.jsonl")] == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (4, 0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checks.jsonl"]
    assert not folder.merge_checks()  # nothing left to merge
