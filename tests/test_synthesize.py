"""`synthmed synthesize`: spec errors, expansion, output files and marking, the memorisation gate, DICOM, resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main

REPO = Path(__file__).resolve().parent.parent
FAST = ["--sample.steps=3", "--no-progress"]  # the shipped model, three denoising steps


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthesize")


@pytest.fixture(scope="module")
def spec(work) -> Path:
    return write(work / "spec.csv", "text,modality,n\n"
                 "Large left pleural effusion. No pneumothorax.,cxr,2\n"
                 "Normal chest radiograph.,chest x-ray,1\n"
                 "Right upper lobe nodule.,chest ct,1\n"
                 "Several hard exudates.,fundus,1\n")


@pytest.fixture(scope="module", autouse=True)
def knowledge_base(work):
    """CSV specs are read by the graph's reader on a knowledge base: one for the module, of the lexicon alone."""
    KB[:] = [f"--knowledge.index_dir={work / 'kb'}", "--knowledge.case_manifests=[]"]
    yield
    KB.clear()


KB: list[str] = []


def run(capsys, *args) -> tuple[int, str, str]:
    args = [*map(str, args)]
    code = main(["synthesize", *args, *[k for k in KB if k.split("=")[0] not in {a.split("=")[0] for a in args}]])
    out = capsys.readouterr()
    return code, out.out, out.err


def checks(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "checks.jsonl").read_text().splitlines() if line.strip()]


def manifest_rows(folder: Path) -> list[dict]:
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name,text,needle", [
    ("unknown_modality.csv", "text,modality,n\nLeft pleural effusion.,cxr,1\nLeft pleural effusion.,knee x-ray,2\n",
     "line 3, modality: unknown modality 'knee x-ray'"),
    ("negative.csv", "text,modality,n\nLeft pleural effusion.,cxr,-2\n", "line 2, n: a count cannot be negative"),
    ("contradiction.csv", "text,modality,n\nNormal chest radiograph. Large left pleural effusion.,cxr,1\n",
     "line 2, text: a normal study with a finding (pleural_effusion)"),
    ("missing.csv", "text,modality\nLeft pleural effusion.,cxr\n", "line 1, n: missing column 'n'"),
    ("nothing.csv", "text,modality,n\nA broken femur.,cxr,1\n", "line 2, text: no cxr finding recognised"),
    ("unknown_finding.yaml", "modalities:\n  cxr:\n    findings:\n      pleural_effusion: 2\n      pneumothorx: 1\n",
     "line 5, modalities.cxr.findings.pneumothorx: unknown cxr finding 'pneumothorx' (did you mean 'pneumothorax'?)"),
    ("negative.yaml", "modalities:\n  oct:\n    findings: {drusen: -1}\n", "line 3, modalities.oct.findings.drusen: a count or share cannot be negative"),
    ("contradiction.yaml", "modalities:\n  cxr:\n    findings:\n      normal+pneumothorax: 2\n",
     "line 4, modalities.cxr.findings.normal+pneumothorax: a normal study with a finding is a contradiction"),
    ("excluded.yaml", "modalities:\n  cxr:\n    n: 4\n    normal: 0.5\n    findings: {pleural_effusion: 0.6}\n",
     "line 4, modalities.cxr.normal: the normal share and the finding shares sum to 1.1"),
    ("unknown_modality.yaml", "modalities:\n  cxr: {normal: 1}\n  knee: {normal: 1}\n", "line 3, modalities.knee: unknown modality"),
])
def test_a_bad_spec_is_one_error_naming_line_and_field(work, capsys, name, text, needle):
    spec = write(work / name, text)
    code, _, err = run(capsys, spec, "--out", work / f"out_{name}", *FAST)
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (work / f"out_{name}").exists()  # nothing claimed, nothing loaded


def test_a_mix_expands_to_its_counts_with_structured_expectations(tiny_config, work):
    from pipelines.synthesize import read_spec

    mix = write(work / "mix.yaml", "negatives: 1\nmodalities:\n"
                "  chest x-ray:\n    n: 10\n    normal: 0.3\n    findings: {pleural_effusion: 0.4, cardiomegaly+pneumothorax: 0.3}\n"
                "    sides: {left: 1}\n    severities: {severe: 1}\n"
                "  oct:\n    findings: {drusen: 2}\n    normal: 1\n")
    slots = read_spec(mix, tiny_config, seed=3)
    by_origin = Counter(s.origin.split(":", 1)[1] for s in slots)
    assert by_origin == {"chest x-ray/normal": 3, "chest x-ray/pleural_effusion": 4, "chest x-ray/cardiomegaly+pneumothorax": 3,
                         "oct/drusen": 2, "oct/normal": 1}
    assert [s.index for s in slots] == list(range(13))
    for s in slots:
        p = s.request
        present = [f for f in p.findings if f["present"]]
        assert p.key == f"{p.modality}:{'+'.join(sorted(f['name'] for f in present)) or 'normal'}"
        if s.origin.endswith("/normal"):
            assert not present and p.expected and not any(p.expected.values())
        for f in present:
            if f["name"] in ("pleural_effusion", "pneumothorax"):
                assert f["laterality"] == "left"
            if f["name"] == "pleural_effusion":
                assert f["severity"] == "severe" and "left" in p.prompt.lower()
    again = read_spec(mix, tiny_config, seed=3)
    assert [s.to_dict() for s in again] == [s.to_dict() for s in slots]  # a pure function of (spec, seed): resume relies on it


# ------------------------------------------------------------------------------------------ output, marking, gate
def test_png_output_manifest_checks_and_the_memorisation_gate(work, capsys, spec, train_manifest):
    out = work / "png"
    code, text, err = run(capsys, spec, "--out", out, "--train-data", train_manifest, *FAST)
    assert code == 0, err
    assert "5/5 images" in text
    rows = manifest_rows(out)
    assert [r["path"] for r in rows] == ["images/000000_cxr.png", "images/000001_cxr.png", "images/000002_cxr.png",
                                         "images/000003_chest_ct.png", "images/000004_fundus.png"]
    # the project's own reader takes it back, findings and all
    from generator.data import iter_manifest

    read = list(iter_manifest(out / "manifest.csv"))
    assert len(read) == 5 and read[0].modality == "cxr"
    assert {"name": "pleural_effusion", "present": True, "side": "left", "severity": "severe"}.items() <= read[0].findings[0].items()
    assert all(not f["present"] for f in read[2].findings) and read[2].findings

    lines = checks(out)
    assert [c["index"] for c in lines] == [0, 1, 2, 3, 4] and all(c["accepted"] for c in lines)
    first = lines[0]
    assert first["expected"] == {"pleural_effusion": True, "pneumothorax": False}
    assert first["seed"] == 0 and lines[4]["seed"] == 4
    assert len(first["model_sha256"]) == 64 and first["adapters"] == []
    assert first["verdict"]["findings"][0]["name"] == "pleural_effusion" and "passed" in first["verdict"]
    assert set(first["evaluator"]) >= {"pleural_effusion", "pneumothorax"}
    assert 0 < first["nearest_train_ssim"] < first["gate_threshold"]

    with Image.open(out / "images" / "000000_cxr.png") as im:
        chunks = dict(im.text)
        assert im.mode == "L" and im.size == (64, 64)
    assert chunks["synthetic"] == "true" and chunks["Software"].startswith("synthmed ") and chunks["seed"] == "0"
    assert chunks["prompt"] == first["prompt"] and chunks["model_sha256"] == first["model_sha256"]
    with Image.open(out / "images" / "000004_fundus.png") as im:
        assert im.mode == "RGB"

    # plant image 0 of this spec in the training set: the same spec draws it again, the gate rejects it and redraws
    planted = Path(train_manifest).parent / "planted.csv"  # beside the training images: their paths are relative
    rows_in = Path(train_manifest).read_text().splitlines()
    write(planted, "\n".join(rows_in + [f"{out / 'images' / '000000_cxr.png'},planted,cxr"]) + "\n")
    gated = work / "gated"
    code, text, err = run(capsys, spec, "--out", gated, "--train-data", planted, "--json", "--sample.steps=3")
    assert code == 0, err
    summary = json.loads(text)
    assert summary["accepted"] == 5 and summary["rejected"] == 1 and summary["draws"] == 6
    lines = checks(gated)
    rejected = [c for c in lines if not c["accepted"]]
    assert len(rejected) == 1 and rejected[0]["index"] == 0 and rejected[0]["rejected_because"] == "memorised"
    assert rejected[0]["nearest_train_ssim"] > 0.99 and rejected[0]["path"] is None
    redraw = [c for c in lines if c["index"] == 0 and c["accepted"]]
    assert len(redraw) == 1 and redraw[0]["attempt"] == 1 and redraw[0]["seed"] == 0 + 1 * 5 + 0
    assert redraw[0]["nearest_train_ssim"] < redraw[0]["gate_threshold"]
    assert len(manifest_rows(gated)) == 5

    # the folder is this spec's: refused without --resume, refused for another spec even with it, a no-op when complete
    code, _, err = run(capsys, spec, "--out", gated, "--train-data", planted, *FAST)
    assert code == 2 and "pass --resume" in err
    code, _, err = run(capsys, spec, "--out", gated, "--train-data", planted, "--resume", "--seed", "9", *FAST)
    assert code == 2 and "another spec" in err and "seed" in err
    code, text, err = run(capsys, spec, "--out", gated, "--train-data", planted, "--resume", "--json", "--sample.steps=3")
    assert code == 0 and json.loads(text)["drawn_this_call"] == 0 and len(checks(gated)) == 6


# ------------------------------------------------------------------------------------------ DICOM
def test_dicom_secondary_capture_reads_back_with_its_tags_and_pixels(work, capsys, spec, train_manifest, tiny_config):
    import pydicom
    from pydicom import config as dicom_config

    from generator.data.imageio import load_image, read_dicom

    out = work / "dicom"
    code, _, err = run(capsys, spec, "--out", out, "--train-data", train_manifest, "--format", "dicom", *FAST)
    assert code == 0, err
    rows = manifest_rows(out)
    assert [Path(r["path"]).suffix for r in rows] == [".dcm"] * 5
    png = work / "png" / "images"  # the same spec and seeds drawn as PNG by the test above (if it ran)
    expected_codes = {"cxr": "DX", "chest_ct": "CT", "fundus": "OP"}
    uids = set()
    old = dicom_config.settings.reading_validation_mode
    dicom_config.settings.reading_validation_mode = dicom_config.RAISE
    try:
        for row, check in zip(rows, checks(out)):
            path = out / row["path"]
            ds = pydicom.dcmread(path)
            pydicom.dataset.validate_file_meta(ds.file_meta, enforce_standard=True)
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" == ds.file_meta.MediaStorageSOPClassUID
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
            uids |= {ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}
            assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.ConversionType == "SYN"
            assert ds.Modality == expected_codes[row["modality"]]
            assert str(ds.PatientName) == "SYNTHETIC^SYNTHMED" and ds.PatientID.startswith("SYNTHMED-")
            assert ds.Manufacturer == "synthmed" and ds.SoftwareVersions.startswith("synthmed ")
            assert check["request"] in ds.ImageComments and f"seed={check['seed']}" in ds.ImageComments
            stored = ds.pixel_array
            assert stored.shape[:2] == (64, 64) and stored.dtype == np.uint8
            window = tiny_config.data.modalities[row["modality"]].window
            # the project's loader shows the very pixels stored, with the file's window and with the modality's
            assert np.array_equal(read_dicom(path), stored)
            assert np.array_equal(load_image(path, window=window), stored)
            twin = png / Path(row["path"]).with_suffix(".png").name
            if twin.is_file():
                assert np.array_equal(np.asarray(Image.open(twin)), stored)
    finally:
        dicom_config.settings.reading_validation_mode = old
    assert len(uids) == 15  # fresh UIDs everywhere
    assert main(["data", "check", str(out / "manifest.csv")]) == 0  # through the loader and transforms as trainers read it
    capsys.readouterr()


# ------------------------------------------------------------------------------------------ resume, full disk
@pytest.mark.slow
def test_resume_after_kill_gives_exactly_the_spec(work, capsys, train_manifest):
    spec = write(work / "resume.yaml", "modalities:\n  cxr:\n    normal: 3\n    findings: {pleural_effusion: 4, pneumothorax: 3}\n"
                 "  oct:\n    findings: {drusen: 2}\n")
    out = work / "resume"
    args = ["synthesize", str(spec), "--out", str(out), "--train-data", str(train_manifest), "--batch-size", "1",
            "--synthesize.verifier=false", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "checks.jsonl").is_file() and len(checks(out)) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = len(checks(out))
    assert 3 <= done_before < 12
    code, text, err = run(capsys, *args[1:], "--resume", "--json")
    assert code == 0, err
    summary = json.loads(text)
    assert summary["resumed"] and summary["accepted"] == 12 and summary["drawn_this_call"] >= 12 - done_before
    accepted = Counter(c["index"] for c in checks(out) if c["accepted"])
    assert accepted == Counter(range(12))  # none missing, none doubled
    rows = manifest_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(p.relative_to(out).as_posix() for p in (out / "images").iterdir())
    assert len(rows) == 12 and Counter(r["modality"] for r in rows) == {"cxr": 10, "oct": 2}


def test_a_full_disk_is_a_clear_error_and_the_manifest_holds_only_whole_rows(work, capsys, spec, train_manifest, monkeypatch):
    import errno

    import pipelines.synthesize as synth

    real = synth.write_png
    written = []

    def fill_up(path, image, fields):
        if len(written) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        return real(path, image, fields)

    monkeypatch.setattr(synth, "write_png", fill_up)
    out = work / "full"
    common = ["--out", out, "--train-data", train_manifest, "--batch-size", "2", "--synthesize.verifier=false", *FAST]
    code, _, err = run(capsys, spec, *common)
    assert code == 2 and "no space left" in err and "--resume" in err
    assert len(checks(out)) == 2  # the batch that failed left no line
    if (out / "manifest.csv").exists():
        assert len(manifest_rows(out)) == 2
    monkeypatch.setattr(synth, "write_png", real)
    code, _, err = run(capsys, spec, *common, "--resume")
    assert code == 0, err
    assert len(manifest_rows(out)) == 5 and Counter(c["index"] for c in checks(out) if c["accepted"]) == Counter(range(5))


# ------------------------------------------------------------------------------------------ through the agent graph
@pytest.mark.slow
def test_through_the_graph_each_image_has_a_trace(work, capsys, train_manifest):
    spec = write(work / "graph.csv", "text,modality,n\nLarge left pleural effusion. No pneumothorax.,cxr,1\nSeveral drusen.,oct,1\n")
    out = work / "graph"
    code, text, err = run(capsys, spec, "--out", out, "--train-data", train_manifest, "--through-graph", "--json", "--sample.steps=3",
                          "--agents.max_rounds=1", "--agents.candidates=1", f"--knowledge.index_dir={work / 'kb'}",
                          "--knowledge.case_manifests=[]")
    assert code == 0, err
    assert json.loads(text)["accepted"] == 2
    lines = checks(out)
    assert all(c["trace_id"] and c["graph_prompt"] for c in lines) and (out / "traces.sqlite").is_file()
    assert lines[0]["expected"] == {"pleural_effusion": True, "pneumothorax": False}  # the spec's expectation is what is checked
    assert len(manifest_rows(out)) == 2 and not list(out.glob(".graph-*"))


def test_a_lora_adapter_is_applied_and_named_in_every_record(work, capsys, train_manifest, tiny_config):
    import torch

    from generator.lora import LoraSpec, add_lora, lora_parameters, save_lora
    from generator.models import LatentDiffusion
    from pipelines.synthesize import file_digest

    model = LatentDiffusion.load(tiny_config.train.out, list(tiny_config.data.modalities))
    add_lora(model.unet, LoraSpec(rank=2))
    with torch.no_grad():
        for p in lora_parameters(model.unet):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    adapter = save_lora(model.unet, work / "adapter.safetensors")
    spec = write(work / "lora.csv", "text,modality,n\nLarge left pleural effusion.,cxr,1\n")
    out = work / "lora"
    common = ["--out", out, "--train-data", train_manifest, "--synthesize.verifier=false", *FAST]
    code, _, err = run(capsys, spec, *common, "--lora", adapter)
    assert code == 0, err
    (line,) = checks(out)
    assert [a["sha256"] for a in line["adapters"]] == [file_digest(adapter)]
    with Image.open(out / line["path"]) as im:
        assert im.text["adapters"] == file_digest(adapter)[:16]
        with_lora = np.asarray(im)
    code, _, err = run(capsys, spec, *common, "--resume")  # the same spec without the adapter is another run
    assert code == 2 and "adapters_sha256" in err
    plain = work / "plain"
    code, _, err = run(capsys, spec, "--out", plain, "--train-data", train_manifest, "--synthesize.verifier=false", *FAST)
    assert code == 0, err
    with Image.open(plain / checks(plain)[0]["path"]) as im:
        assert not np.array_equal(np.asarray(im), with_lora)


def test_reward_guidance_draws_towards_each_requests_findings_and_is_part_of_the_run(work, capsys, train_manifest):
    spec = write(work / "guided.csv", "text,modality,n\nLarge left pleural effusion. No pneumothorax.,cxr,2\n"
                 "Several hard exudates.,fundus,2\n")
    folders = {}
    for name, extra in (("plain", []), ("guided", ["--reward-guidance", "0.3"])):
        folders[name] = work / f"rg_{name}"
        code, _, err = run(capsys, spec, "--out", folders[name], "--train-data", train_manifest, *FAST, *extra)
        assert code == 0, err

    def present_probability(folder) -> float:  # the verifier's probability of each requested finding, over the images
        return float(np.mean([r["probability"] for c in checks(folder) for r in c["verdict"]["findings"] if r["expected"] == "present"]))

    plain, guided = checks(folders["plain"]), checks(folders["guided"])
    assert [c["seed"] for c in guided] == [c["seed"] for c in plain] and [c["expected"] for c in guided] == [c["expected"] for c in plain]
    assert present_probability(folders["guided"]) > present_probability(folders["plain"]) + 0.05
    assert json.loads((folders["guided"] / "synthesize.json").read_text())["sampler"]["reward_guidance"] == 0.3
    assert "reward_guidance" not in json.loads((folders["plain"] / "synthesize.json").read_text())["sampler"]
    # the guidance is part of what the run is: resuming the guided folder without it is another run
    code, _, err = run(capsys, spec, "--out", folders["guided"], "--train-data", train_manifest, "--resume", *FAST)
    assert code == 2 and "sampler" in err
    code, _, err = run(capsys, spec, "--out", work / "rg_bad", "--reward-guidance", "-0.5", *FAST)
    assert code == 2 and "--reward-guidance must be a scale >= 0" in err


def test_the_verifiers_classifiers_are_part_of_a_run_only_where_its_verdict_decides():
    """A folder whose kept images the verifier chose resumes only with the same verifier classifiers; folders made before
    the verifier role (judged with the reward's) keep their identity."""
    from pipelines.config import load_config
    from pipelines.synthesize import verifier_identity

    assert verifier_identity(load_config("tiny"), through_graph=False) == {}  # verdicts reported only
    assert verifier_identity(load_config("tiny", {"synthesize.require_verifier_pass": True}), False) == {"verifier_role": "verifier"}
    assert verifier_identity(load_config("tiny"), through_graph=True) == {"verifier_role": "verifier"}  # the graph keeps its choice
    assert verifier_identity(load_config("tiny", {"agents.verifier.role": "reward"}), True) == {}
