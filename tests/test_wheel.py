"""A regular (non-editable) install works from any folder.

Builds the wheel of this checkout, installs it with ``--no-deps`` into a fresh virtual environment that
borrows the test environment's dependencies (a ``.pth`` line, as the trl bench's environment does), and
runs ``sample``, ``generate --dry-run`` and ``eval`` on a tiny setting from an empty temporary folder:
the profiles and shipped weights must come from the installed package, and every file the commands
write must land in that folder (the workspace), never in site-packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("generator", "knowledge", "rlhf", "agents", "pipelines", "configs")

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, timeout: int = 600, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SYNTHMED_HOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"), **extra_env)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)], cwd=root)
    wheels = list(dist.glob("synthmed-*.whl"))
    assert len(wheels) == 1, f"expected one wheel, got {wheels}"
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # the dependencies (torch, diffusers, ...) come from this test's environment; synthmed itself from the wheel
    (site / "synthmed-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheels[0])], cwd=root)
    work = root / "elsewhere"
    work.mkdir()
    return {"python": python, "synthmed": env_dir / "bin" / "synthmed", "site": site, "work": work, "wheel": wheels[0]}


def test_the_wheel_ships_profiles_and_weights_and_imports_from_site_packages(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert "configs/tiny.yaml" in names
    assert any(n.startswith("generator/weights/default/unet/") and n.endswith(".safetensors") for n in names)
    assert any(n.startswith("rlhf/weights/") and n.endswith(".safetensors") for n in names)
    # the real profile: generator, its caption wording and model card, and every judge
    assert {"generator/weights/real/model.json", "generator/weights/real/wording.json", "generator/weights/real/MODEL_CARD.md",
            "rlhf/weights/real/classifiers/evaluator/cxr/model.safetensors", "rlhf/weights/real/selector/metadata.json"} <= names
    assert any(n.startswith("rlhf/weights/real/clip/") and n.endswith(".safetensors") for n in names)
    out = _run([str(installed["python"]), "-c", "import generator, pipelines, configs; print(generator.__file__); print(configs.__file__)"],
               cwd=installed["work"]).stdout.split()
    for path in out:
        assert Path(path).resolve().is_relative_to(installed["site"].resolve()), f"{path} was not imported from the installed wheel"


def test_sample_generate_and_eval_run_from_another_folder_and_write_only_there(installed):
    work, synthmed, site = installed["work"], str(installed["synthmed"]), installed["site"]
    before = {p: _files(site / p) for p in PACKAGES}
    _run([synthmed, "sample", "left pleural effusion", "--modality", "cxr", "--n", "1", "--steps", "3", "--out", "samples"], cwd=work)
    assert len(list((work / "samples").glob("*.png"))) == 1
    _run([synthmed, "sample", "Brain MRI. Findings: intra-axial mass consistent with glioma.", "--config", "real", "--modality",
          "brain_mri", "--n", "1", "--steps", "3", "--out", "real"], cwd=work)
    assert len(list((work / "real").glob("*.png"))) == 1
    # SYNTHMED_HOME names the workspace wherever the command starts
    _run([synthmed, "sample", "left pleural effusion", "--modality", "cxr", "--n", "1", "--steps", "3", "--out", "samples"],
         cwd=installed["wheel"].parent, SYNTHMED_HOME=str(work / "home"))
    assert len(list((work / "home" / "samples").glob("*.png"))) == 1
    generated = _run([synthmed, "generate", "left pleural effusion, no pneumothorax", "--modality", "cxr", "--dry-run"], cwd=work)
    assert "pleural_effusion" in generated.stdout and "synthmed trace show" in generated.stdout
    assert (work / "data" / "kb").is_dir(), "the knowledge base is built in the workspace"
    _run([synthmed, "eval", "--modalities", "cxr", "--prompts", "2", "--n-per-prompt", "1", "--reference-per-finding", "1",
          "--steps", "3", "--no-progress"], cwd=work)
    reports = list((work / "runs").glob("*-eval-*/eval.json"))
    assert reports, "eval wrote no report into the workspace's runs/"
    generated = json.loads(reports[0].read_text())["modalities"]["cxr"]["generated"]
    assert generated["nearest_train_ssim"] is not None, "eval found the shipped model's training images (its metadata.json)"
    after = {p: _files(site / p) for p in PACKAGES}
    for p in PACKAGES:
        assert after[p] == before[p], f"the commands wrote into site-packages/{p}: {sorted(after[p] - before[p])[:5]}"
