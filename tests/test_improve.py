"""`synthmed improve` end to end on a tiny generator with the shipped judges (CPU, offline): the run
directory, on-policy ratio, the KL at zero LoRA, resume after a kill, bad input, two processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from generator.config import ModelConfig
from generator.models import LatentDiffusion
from pipelines.cli import main as cli
from pipelines.config import load_config

TINY = ModelConfig(image_size=32, vae_channels=[8, 16], latent_channels=4, unet_channels=[16, 32], unet_attention_heads=2,
                   cross_attention_dim=32, text_max_length=16)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = LatentDiffusion(TINY, ["cxr", "chest_ct", "brain_mri", "fundus", "oct"])
    folder = tmp_path_factory.mktemp("base") / "model"
    model.save(folder)
    return folder


def settings(base: Path, **extra) -> dict:
    """A deterministic tiny loop: 2 modalities, 2 prompts x 2 images, 2 DDIM steps, one held-out prompt each."""
    tree = {
        "improve": {
            "base_model": str(base),
            "prompts": {"modalities": ["cxr", "oct"], "heldout_per_modality": 1, "test_per_modality": 0},
            "ddpo": {"epochs": 2, "prompts_per_epoch": 2, "images_per_prompt": 2, "steps": 2, "sample_batch_size": 4,
                     "train_batch_size": 8, "grad_accum_steps": 1, "timestep_fraction": 1.0, "clip_range": 0.2,
                     "logprob_reduce": "sum", "lr": 1e-3},
            "selection": {"threshold": 0.0, "require_verifier_pass": False, "max_per_epoch": 2, "batch_size": 2, "noise_draws": 1},
            "eval": {"every": 1, "images_per_prompt": 2, "steps": 2, "reference_per_finding": 2},
            "report_to": "none",
        },
        "agents": {"verifier": {"training_data": []}},
    }
    for dotted, value in extra.items():
        node = tree
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def write_profile(tmp_path: Path, tree: dict, name: str = "loop.yaml", extends: str = "tiny") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"extends": extends, **tree}))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_timing(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "seconds"}
        out.append(r)
    return out


def test_a_run_writes_its_directory_and_logs(base_model, tmp_path, capsys):
    profile = write_profile(tmp_path, settings(base_model, **{"improve.prompts.test_per_modality": 1}))
    assert cli(["improve", "--config", str(profile), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    run = tmp_path / "run"
    assert "plots:" in printed and str(run / "plots") in printed
    assert "; images that truly show the requests: " in printed  # the reference beside the best share
    assert "untouched test prompts, every requested finding shown: base " in printed
    for name in ("config.yaml", "metadata.json", "metrics.jsonl", "samples.jsonl", "heldout_prompts.jsonl", "combinations.json",
                 "grids/epoch_0001.png", "grids/epoch_0002.png", "plots/reward.png", "plots/heldout.png", "plots/training.png",
                 "final/lora.safetensors", "final/pytorch_lora_weights.safetensors", "best/lora.safetensors",
                 "checkpoints/epoch_0002/trainer_state.pt"):
        assert (run / name).is_file(), name
    records = lines(run / "metrics.jsonl")
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "eval" and records[0]["epoch"] == 0 and kinds[-1] == "end"
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert set(epochs[0]["reward"]) == {"total", "findings", "alignment", "selector", "quality"}
    assert set(epochs[0]["per_modality"]) == {"cxr", "oct"}
    # the rollouts read by the verifier's own classifiers (agents.verifier.role "verifier"), beside the reward's findings
    assert set(epochs[0]["verifier"]) == {"agreement", "pass"} and 0 <= epochs[0]["verifier"]["pass"]["mean"] <= 1
    assert epochs[0]["verifier"]["agreement"]["mean"] != epochs[0]["reward"]["findings"]["mean"]
    steps = [r for r in records if r["kind"] == "step" and r["stage"] == "ddpo"]
    assert steps and all(k in steps[0] for k in ("loss", "approx_kl", "clipfrac", "kl", "grad_norm", "lr"))
    # the first optimiser step of an epoch is on-policy: every ratio is 1
    first = next(r for r in steps if r["epoch"] == 1)
    assert first["ratio_min"] == pytest.approx(1.0, abs=1e-5) and first["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert first["approx_kl"] == pytest.approx(0.0, abs=1e-9)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    assert {"all_requested_shown", "fd", "ms_ssim", "clip_score", "selector_quality"} <= set(evals[0]["overall"])
    samples = lines(run / "samples.jsonl")
    assert len(samples) == 2 * 4
    s = samples[0]
    assert {"prompt", "modality", "expected", "seed", "reward", "components", "advantage", "selected"} <= set(s)
    assert {"findings/verifier_pass", "findings/verifier_agreement"} <= set(s["components"])
    assert "findings/prob/" not in json.dumps(s["expected"])
    # group advantages sum to 0 within each prompt's two images
    for e in (1, 2):
        adv = [x["advantage"] for x in samples if x["epoch"] == e]
        assert adv[0] + adv[1] == pytest.approx(0.0, abs=1e-6) and adv[2] + adv[3] == pytest.approx(0.0, abs=1e-6)
    combos = json.loads((run / "combinations.json").read_text())
    assert not set(combos["train"]) & set(combos["heldout"])
    heldout = lines(run / "heldout_prompts.jsonl")
    assert {h["key"] for h in heldout} <= set(combos["heldout"])
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["status"] == "finished" and meta["epochs_done"] == 2
    # how many held-out prompts run past the generator's token limit (16 in the tiny model: every one of them)
    assert meta["prompt_tokens"] == {"limit": 16, "heldout_truncated": len(heldout)}
    # inspection
    assert cli(["runs", "show", str(run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["epochs"]) == 2
    gain = shown["gain"]["rows"]
    assert set(gain) == {"cxr", "oct", "mean"}
    assert gain["mean"]["fd"]["base"] == pytest.approx(evals[0]["overall"]["fd"], rel=1e-6)
    # the reference: phantoms drawn to each held-out request, judged alike, logged once after the base's evaluation
    reference = [r for r in records if r["kind"] == "reference"]
    assert len(reference) == 1 and records.index(reference[0]) == 1 and reference[0]["epoch"] == 0
    assert reference[0]["source"] == "phantoms" and reference[0]["per_request"] == 8
    assert set(reference[0]["per_modality"]) == {"cxr", "oct"} and reference[0]["per_modality"]["oct"]["n"] == 8
    assert shown["reference"]["overall"] == reference[0]["overall"]
    assert gain["mean"]["all_requested_shown"]["reference"] == reference[0]["overall"]["all_requested_shown"]
    # finding by finding, for the base, the run and the reference alike
    for record in (evals[0], evals[-1], reference[0]):
        assert all(row["requested_shown_by_finding"] for row in record["per_modality"].values())
    findings = shown["findings"]
    assert findings["epoch"] == shown["gain"]["epoch"] and findings["never"]["of"] == len(findings["rows"]) > 0
    assert {r["modality"] for r in findings["rows"]} == {"cxr", "oct"}
    assert cli(["runs", "show", str(run)]) == 0
    out = capsys.readouterr().out
    assert "reference: phantoms drawn to each held-out request (8 per request)" in out
    assert "verifier agreement" in out and "verifier pass" in out
    assert "requested findings on the held-out prompts: share of the images asking for each that show it" in out
    # the untouched test prompts: held-out combinations worded apart, judged on the base first and on final/ and best/ last
    test = lines(run / "test_prompts.jsonl")
    assert len(test) == 2 and {t["key"] for t in test} <= set(combos["heldout"])
    assert not {t["prompt"] for t in test} & {h["prompt"] for h in heldout}
    tested = [r for r in records if r["kind"] == "test"]
    assert [(r["adapter"], r["epoch"]) for r in tested][0] == ("base", 0) and records.index(tested[0]) == 2
    ends = [(r["adapter"], r["epoch"]) for r in tested[1:]]
    best_epoch = json.loads((run / "best" / "metadata.json").read_text())["epoch"]
    assert ends == [("final", 2)] + ([("best", best_epoch)] if best_epoch else [])
    assert kinds.index("test", 3) > max(i for i, k in enumerate(kinds) if k == "epoch")  # after the last epoch, before the end
    assert tested[1]["overall"] != tested[0]["overall"] and set(tested[0]["per_modality"]) == {"cxr", "oct"}
    assert [t["adapter"] for t in shown["test"]] == ["base", *(["best"] if best_epoch else []), "final"]
    assert "untouched test prompts" in out
    # `runs test` judges the run again on the same prompts and seeds: the run's own figures, in test.json
    before = (run / "metrics.jsonl").read_bytes()
    assert cli(["runs", "test", str(run), "--json"]) == 0
    again = {r["adapter"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert set(again) == {"base", "best", "final"} and (run / "test.json").is_file()
    for r in tested:
        assert again[r["adapter"]]["overall"] == r["overall"], r["adapter"]
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing of the run's log changes
    # `runs test --split 1`: a further untouched split, over the held-out combinations, worded apart from the run's
    # held-out and test requests, with its own image seeds; its prompts saved beside its figures
    from agents.requests import load_prompts

    assert cli(["runs", "test", str(run), "--split", "1", "--per-modality", "2", "--json"]) == 0
    split = json.loads(capsys.readouterr().out)
    split_prompts = load_prompts(run / "test_split1_prompts.jsonl")
    own = [*load_prompts(run / "heldout_prompts.jsonl"), *load_prompts(run / "test_prompts.jsonl")]
    assert split["split"] == 1 and split["prompts"] == len(split_prompts) == 4  # 2 each for cxr and oct
    assert {p.key for p in split_prompts} <= set(combos["heldout"]) and not {p.prompt for p in split_prompts} & {p.prompt for p in own}
    assert split["seed"] != json.loads((run / "test.json").read_text())["seed"]
    assert [r["adapter"] for r in split["results"]] == ["base", "best", "final"]
    assert json.loads((run / "test_split1.json").read_text())["results"] == split["results"]
    assert (run / "metrics.jsonl").read_bytes() == before
    # `runs show` tabulates the split: each adapter against the split's own base, and whether it stays within the terms
    assert cli(["runs", "show", str(run), "--json"]) == 0
    (reading,) = json.loads(capsys.readouterr().out)["splits"]
    assert reading["split"] == 1 and [r["adapter"] for r in reading["rows"]] == ["base", "best", "final"]
    base_row, final_row = reading["rows"][0], reading["rows"][-1]
    assert base_row["within_terms"] is None and base_row["change"] == 0
    shares = [r["overall"]["all_requested_shown"] for r in split["results"]]
    assert final_row["change"] == pytest.approx(shares[-1] - shares[0])
    fd_change = split["results"][-1]["overall"]["fd"] / split["results"][0]["overall"]["fd"] - 1
    assert final_row["fd_change"] == pytest.approx(fd_change) and final_row["within_terms"] == (
        fd_change <= 0.10 and final_row["ms_ssim_change"] <= 0.05)
    assert cli(["runs", "show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "untouched test split 1 (4 prompts x 2 images" in shown
    assert "untouched test prompts, every adapter the run keeps" in shown and str(run / "test.json") in shown  # runs test's reading
    assert cli(["runs", "test", str(run), "--per-modality", "2"]) == 2
    assert "give --split N" in capsys.readouterr().err

    # `runs scale`: final/ at each scale on the held-out set, scale 1 its own last evaluation figure for figure; the kept
    # scale (the best share within the gain's terms) baked into scaled/ and judged once on the test prompts
    from safetensors.torch import load_file

    assert cli(["runs", "scale", str(run), "--adapter", "final", "--scales", "2,1", "--no-margin", "--json"]) == 0
    scaled = json.loads(capsys.readouterr().out)
    assert scaled["margin"] is False
    assert [r["scale"] for r in scaled["scales"]] == [1.0, 2.0] and scaled["epoch"] == 2
    one = scaled["scales"][0]
    assert all(one[k] == evals[-1]["overall"][k] for k in ("all_requested_shown", "fd", "ms_ssim")), (one, evals[-1]["overall"])
    assert scaled["scales"][1]["fd"] != one["fd"]  # twice the change: other images
    kept = [r for r in scaled["scales"] if "refused" not in r]
    assert scaled["scale"] == max(kept, key=lambda r: (r["all_requested_shown"], r["finding_accuracy"], -r["scale"]))["scale"]
    assert [r["chosen"] for r in scaled["scales"]].count(True) == 1 and (run / "scale.json").is_file()
    assert scaled["test"]["base"] == {k: tested[0]["overall"].get(k) for k in scaled["test"]["base"]} and scaled["test"]["scaled"]
    meta = json.loads((run / "scaled" / "metadata.json").read_text())
    assert meta["scale"] == scaled["scale"] and meta["adapter"] == "final"
    own, baked = load_file(str(run / "final" / "lora.safetensors")), load_file(str(run / "scaled" / "lora.safetensors"))
    assert own.keys() == baked.keys()
    for key in own:
        assert torch.allclose(baked[key], own[key] * (scaled["scale"] if "lora_B" in key else 1.0), atol=1e-6), key
    assert (run / "metrics.jsonl").read_bytes() == before
    assert cli(["runs", "show", str(run)]) == 0  # scale.json tabulated by runs show, the kept scale marked
    shown = capsys.readouterr().out.split("adapter strength (synthmed runs scale)")[1]
    assert f"final x{scaled['scale']:g}" in shown and "chosen" in shown and "untouched test prompts, once" in shown
    # a rerun that keeps no scale: with the margin (the default), a lone scale is the largest tried and never kept;
    # scale.json says so, and the earlier scaled/ goes with it
    assert cli(["runs", "scale", str(run), "--adapter", "final", "--scales", "1", "--json"]) == 0
    none_kept = json.loads(capsys.readouterr().out)
    assert none_kept["margin"] is True and none_kept["scales"][0]["refused"].startswith("no margin: the largest scale tried")
    assert none_kept["scale"] is None and none_kept["removed"] == str(run / "scaled") and not (run / "scaled").exists()
    assert json.loads((run / "scale.json").read_text())["scale"] is None and not (run / "scaled.removed").exists()
    assert (run / "metrics.jsonl").read_bytes() == before
    assert cli(["runs", "scale", str(run), "--scales", "0,1"]) == 2
    assert "adapter scales must be positive" in capsys.readouterr().err


def test_kl_to_the_base_is_zero_while_the_lora_weights_are_zero(base_model):
    from generator.ddim_logprob import ddim_step_with_logprob
    from generator.lora import LoraSpec, adapters_disabled, add_lora
    from generator.sampling import guided_conditioning, guided_prediction
    from rlhf.ddpo import gaussian_kl

    model = LatentDiffusion.load(base_model)
    add_lora(model.unet, LoraSpec(rank=4, alpha=4))
    model.scheduler.set_timesteps(4)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = guided_conditioning(model, ["effusion", "normal"], ["cxr", "oct"], ["", ""], 4.0)
    t = model.scheduler.timesteps[:2]
    prev = torch.randn_like(x)

    def kl() -> torch.Tensor:
        step = ddim_step_with_logprob(model.scheduler, guided_prediction(model, x, t, cond, 4.0), t, x, prev_sample=prev)
        with torch.no_grad(), adapters_disabled(model.unet):
            ref = ddim_step_with_logprob(model.scheduler, guided_prediction(model, x, t, cond, 4.0), t, x, prev_sample=prev)
        return gaussian_kl(step.mean, ref.mean, step.std)

    assert torch.equal(kl(), torch.zeros(2))
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    assert (kl() > 0).all()


@pytest.mark.slow
def test_kill_then_resume_gives_the_metrics_of_an_uninterrupted_run(base_model, tmp_path):
    from pipelines.improve import run_improve

    cfg = load_config(write_profile(tmp_path, settings(base_model, **{"improve.ddpo.kl_weight": 0.01,
                                                                      "improve.prompts.test_per_modality": 1,
                                                                      "improve.ddpo.lr_schedule": "cosine",
                                                                      "improve.ddpo.lr_min_ratio": 0.25})))
    whole = run_improve(cfg, tmp_path / "whole", progress=False)
    assert [r["adapter"] for r in lines(tmp_path / "whole" / "metrics.jsonl") if r["kind"] == "test"][:2] == ["base", "final"]
    assert whole["status"] == "finished"
    # the cosine schedule: 1e-3 at epoch 1, the floor (x0.25) at the last epoch; its horizon written into the run's config
    rates = sorted({(r["epoch"], round(r["lr"], 9)) for r in lines(tmp_path / "whole" / "metrics.jsonl") if r["kind"] == "step"})
    assert rates == [(1, 1e-3), (2, 2.5e-4)], rates
    assert load_config(tmp_path / "whole" / "config.yaml").improve.ddpo.lr_schedule_epochs == 2

    killed = tmp_path / "killed"
    with pytest.raises(SystemExit):  # mid-epoch 2, after its update: nothing of epoch 2 written
        run_improve(cfg, killed, progress=False, stop_after=lambda point, epoch: point == "update" and epoch == 2)
    assert [r["epoch"] for r in lines(killed / "metrics.jsonl") if r["kind"] == "epoch"] == [1]
    half = killed / "checkpoints" / ".state.json.999999999.0123abcd.tmp.json"  # a write the kill cut short (pid gone)
    half.write_text('{"epo')
    resumed = run_improve(cfg, killed, resume=True, progress=False)
    assert not half.exists()
    assert resumed["status"] == "finished"
    assert without_timing(lines(killed / "metrics.jsonl")) == without_timing(lines(tmp_path / "whole" / "metrics.jsonl"))
    assert lines(killed / "samples.jsonl") == lines(tmp_path / "whole" / "samples.jsonl")
    a, b = load_file(killed / "final" / "lora.safetensors"), load_file(tmp_path / "whole" / "final" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # killed after the logs of epoch 1 but before its checkpoint: those lines move aside, the epoch is redone once
    late = tmp_path / "late"
    with pytest.raises(SystemExit):
        run_improve(cfg, late, progress=False, stop_after=lambda point, epoch: point == "checkpoint" and epoch == 1)
    run_improve(cfg, late, resume=True, progress=False)
    assert without_timing(lines(late / "metrics.jsonl")) == without_timing(lines(tmp_path / "whole" / "metrics.jsonl"))
    assert (late / "metrics.jsonl.orphaned").is_file()
    for checkpoint in (late / "checkpoints").glob("epoch_*"):
        assert load_file(checkpoint / "lora.safetensors")  # every checkpoint loads


def test_bad_input_gives_one_clear_error_and_exit_code_2(base_model, tmp_path, capsys):
    def run(tree: dict, *args: str) -> str:
        profile = write_profile(tmp_path, tree, f"bad{len(list(tmp_path.iterdir()))}.yaml")
        assert cli(["improve", "--config", str(profile), "--no-progress", *args]) == 2
        return capsys.readouterr().err

    base = settings(base_model)
    assert "the held-out evaluator can never enter a reward" in run(settings(base_model, **{"improve.reward.weights": {"findings": 1.0, "evaluator": 0.5}}))
    assert "unknown reward component 'aesthetics'" in run(settings(base_model, **{"improve.reward.weights": {"aesthetics": 1.0}}))
    assert "unknown modality 'petct'" in run(settings(base_model, **{"improve.prompts.modalities": ["cxr", "petct"]}))
    assert "unknown finding(s) fracture" in run(settings(base_model, **{"improve.prompts.findings": {"cxr": ["fracture"]}}))
    assert "no held-out finding combination for oct" in run(settings(base_model, **{"improve.prompts.findings": {"oct": ["drusen"]}}))
    assert "improve.prompts.heldout.oct: 'fracture' is not a combination" in run(settings(base_model, **{"improve.prompts.heldout": {"oct": ["fracture"]}}))
    assert "improve.prompts.heldout.petct: 'petct' is not in improve.prompts.modalities" in run(settings(base_model, **{"improve.prompts.heldout": {"petct": ["x"]}}))
    assert "the wandb package is not installed" in run(base, "--report-to", "wandb")
    # resume with another config, another LoRA rank
    profile = write_profile(tmp_path, base, "ok.yaml")
    assert cli(["improve", "--config", str(profile), "--epochs", "1", "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 0
    capsys.readouterr()
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert cli(["improve", "--config", str(profile), "--epochs", "1", "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli(["improve", "--resume", str(tmp_path / "r"), "--config", str(profile), "--improve.ddpo.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "improve.ddpo.lr" in err and "differs" in err
    assert cli(["improve", "--resume", str(tmp_path / "r"), "--config", str(profile), "--lora.rank=2"]) == 2
    assert "lora.rank" in capsys.readouterr().err
    assert cli(["improve", "--resume", str(tmp_path / "r"), "--improve.ddpo.lr=0.5"]) == 2  # on the run's own settings
    assert "1 field(s): improve.ddpo.lr" in capsys.readouterr().err
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before  # nothing lost or added
    # more epochs for a run made with a profile of its own: the override applies to the run's settings, not the default's
    assert cli(["improve", "--resume", str(tmp_path / "r"), "--epochs", "2", "--no-progress"]) == 0
    assert [r["epoch"] for r in lines(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "epoch"] == [1, 2]


def test_a_nan_reward_stops_the_loop_naming_the_epoch_and_sample(base_model, tmp_path):
    from pipelines.improve import build_parts, run_improve
    from rlhf.trainer import NonFiniteError

    cfg = load_config(write_profile(tmp_path, settings(base_model)))
    parts = build_parts(cfg, progress=False)
    real = parts.reward.scorers["quality"].score

    def broken(images, prompts, modalities):
        scores, details = real(images, prompts, modalities)
        scores = scores.copy()
        scores[1] = np.nan  # a judge returning NaN for one image
        return scores, details

    parts.reward.scorers["quality"].score = broken
    with pytest.raises(NonFiniteError, match="non-finite reward in epoch 1 for sample 1"):
        run_improve(cfg, tmp_path / "nan", progress=False, parts=parts)
    assert [r["kind"] for r in lines(tmp_path / "nan" / "metrics.jsonl")] == ["eval", "reference"]  # epoch 0 only: nothing half written
    assert not (tmp_path / "nan" / "samples.jsonl").exists() or not (tmp_path / "nan" / "samples.jsonl").read_text()


def test_the_adapter_loads_in_synthmed_sample_and_stock_diffusers(base_model, tmp_path):
    from pipelines.improve import run_improve

    cfg = load_config(write_profile(tmp_path, settings(base_model, **{"improve.ddpo.epochs": 1})))
    run = Path(run_improve(cfg, tmp_path / "run", progress=False)["run"])
    out = tmp_path / "images"
    assert cli(["sample", "normal chest radiograph", "--modality", "cxr", "--n", "1", "--steps", "2", "--model", str(base_model),
                "--lora", str(run / "final"), "--out", str(out)]) == 0
    assert list(out.glob("*.png"))
    assert cli(["eval", "--model", str(base_model), "--lora", str(run), "--modalities", "cxr", "--prompts", "1", "--n-per-prompt", "2",
                "--reference-per-finding", "2", "--steps", "2", "--json", f"--run.runs_dir={tmp_path / 'evals'}"]) == 0
    assert (next((tmp_path / "evals").glob("*-eval-*")) / "eval.json").is_file()
    # stock diffusers: the same UNet with the adapter from pytorch_lora_weights.safetensors gives our outputs
    from generator.lora import load_lora

    ours = LatentDiffusion.load(base_model)
    load_lora(ours.unet, run / "final" / "lora.safetensors")
    stock = LatentDiffusion.load(base_model).unet
    state = load_file(run / "final" / "pytorch_lora_weights.safetensors")
    stock.load_lora_adapter({k.removeprefix("unet."): v for k, v in state.items()}, prefix=None, adapter_name="improved")
    x = torch.randn(1, 4, 16, 16)
    cond = ours.conditioner(["effusion"], ["cxr"])
    kwargs = dict(encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask, class_labels=cond.class_emb)
    with torch.no_grad():
        assert torch.allclose(ours.unet(x, torch.tensor([500]), **kwargs).sample, stock(x, torch.tensor([500]), **kwargs).sample, atol=1e-5)


@pytest.mark.slow
def test_two_processes_make_the_update_of_one_process_with_the_same_total_batch(base_model, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    one = write_profile(tmp_path, settings(base_model, **{"improve.ddpo.epochs": 1, "improve.ddpo.prompts_per_epoch": 2}), "one.yaml")
    two = write_profile(tmp_path, settings(base_model, **{"improve.ddpo.epochs": 1, "improve.ddpo.prompts_per_epoch": 1}), "two.yaml")
    subprocess.run([sys.executable, "-m", "pipelines.cli", "improve", "--config", str(one), "--run-dir", str(tmp_path / "one"),
                    "--no-progress"], check=True, cwd=REPO, env=env)
    accelerate = Path(sys.executable).with_name("accelerate")
    # accelerate's --multi_gpu launcher is torchrun; on a machine without GPUs the ranks meet over gloo (MULTI_CPU)
    subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "-m", "pipelines.cli", "improve", "--config", str(two), "--run-dir", str(tmp_path / "two"),
                    "--no-progress"], check=True, cwd=REPO, env=env)
    s1, s2 = lines(tmp_path / "one" / "samples.jsonl"), lines(tmp_path / "two" / "samples.jsonl")
    assert [s["prompt"] for s in s1] == [s["prompt"] for s in s2] and [s["seed"] for s in s1] == [s["seed"] for s in s2]
    assert {s["rank"] for s in s2} == {0, 1}  # each rank drew its own prompts
    assert np.allclose([s["reward"] for s in s1], [s["reward"] for s in s2], atol=1e-5)
    a, b = load_file(tmp_path / "one" / "final" / "lora.safetensors"), load_file(tmp_path / "two" / "final" / "lora.safetensors")
    moved = max(float((a[k]).abs().max()) for k in a if "lora_B" in k)
    assert moved > 0  # the update did something
    # Adam divides each gradient by its own running size, so the order in which two ranks' gradients are summed can move
    # a near-zero entry by ~1e-6 (measured 1.3e-6 against entries of 2e-3); a wrong update (e.g. one batch on every rank)
    # differs by the size of the entries
    for k in a:
        assert torch.allclose(a[k], b[k], atol=5e-6, rtol=1e-4), k


def test_the_guard_stops_the_loop_and_best_keeps_the_best_adapter(base_model, tmp_path):
    """Patience 1 on the evaluator's finding accuracy: the first evaluation where the training reward rose while
    the evaluator's figure fell stops the loop (this seeded tiny run: epoch 4; seeds 0-7 tried with the shipped judges
    of 2026-12-04, 4 the first to show it). The judges are used without their operating points (every label at 0.5, as
    for classifiers saved before them): at their own points the tiny model's images all fall on one side and the
    evaluator's figure never moves (seeds 0-15 tried)."""
    from pipelines.improve import run_improve

    judges = tmp_path / "classifiers"
    shutil.copytree(REPO / "rlhf" / "weights" / "classifiers", judges)
    for config in judges.glob("*/*/config.json"):
        saved = json.loads(config.read_text())
        saved.pop("thresholds")
        config.write_text(json.dumps(saved))
    cfg = load_config(write_profile(tmp_path, settings(base_model, **{
        "improve.ddpo.epochs": 4, "improve.ddpo.lr": 0.05, "improve.eval.every": 1, "improve.ddpo.seed": 4,
        "improve.guard.patience": 1, "improve.guard.metric": "finding_accuracy", "judges.classifier.out": str(judges)})))
    end = run_improve(cfg, tmp_path / "run", progress=False)
    records = lines(tmp_path / "run" / "metrics.jsonl")
    evals = {r["epoch"]: r["overall"] for r in records if r["kind"] == "eval"}
    rewards = {r["epoch"]: r["reward"]["total"]["mean"] for r in records if r["kind"] == "epoch"}
    hacked = [e for e in sorted(rewards) if e > 1 and rewards[e] > rewards[e - 1]
              and evals[e]["finding_accuracy"] < evals[e - 1]["finding_accuracy"]]
    assert hacked, "this seeded run is expected to show reward up while the evaluator goes down"
    assert end["status"] == "stopped_reward_hacking" and "reward hacking suspected" in end["message"]
    guard = [r for r in records if r["kind"] == "guard"]
    assert len(guard) == 1 and guard[0]["epoch"] == hacked[0] and "finding_accuracy fell" in guard[0]["message"]
    assert max(rewards) == hacked[0]  # no epoch after the stop
    best = json.loads((tmp_path / "run" / "best" / "metadata.json").read_text())
    base = evals[0]  # candidates: images within the gain's terms (FD at most 10% worse, MS-SSIM at most 0.05 higher)
    fits = {e for e, v in evals.items() if (v["fd"] is None or v["fd"] <= base["fd"] * 1.1)
            and (v["ms_ssim"] is None or v["ms_ssim"] <= base["ms_ssim"] + 0.05)}
    assert best["epoch"] == max(fits, key=lambda e: (evals[e]["all_requested_shown"] or 0, evals[e]["finding_accuracy"] or 0))
    assert all(("not_best_because" in r) == (r["epoch"] not in fits) for r in records if r["kind"] == "eval")
    assert json.loads((tmp_path / "run" / "metadata.json").read_text())["status"] == "stopped_reward_hacking"


def _draft_ll(trainer, rollout, noise=None) -> tuple[float, list, torch.Tensor]:
    """The reward classifier's findings log likelihood of the rollouts redrawn over their last K steps by the current
    policy with each step's noise held (``noise``: the rollout policy's, returned by the first call)."""
    from generator.ddim_logprob import ddim_step_with_logprob
    from generator.sampling import guided_conditioning, guided_prediction
    from rlhf.ddpo import findings_log_likelihood

    model, cfg = trainer.model, trainer.cfg
    items = rollout.items
    steps, k = len(rollout.timesteps), cfg.draft_steps
    held = []
    with torch.no_grad():
        cond = guided_conditioning(model, [it.prompt for it in items], [it.modality for it in items], [it.negative for it in items], cfg.guidance)
        x = rollout.latents[:, steps - k]
        for n, j in enumerate(range(steps - k, steps)):
            t = rollout.timesteps[j].expand(len(items))
            mean = ddim_step_with_logprob(model.scheduler, guided_prediction(model, x, t, cond, cfg.guidance), t, x, eta=cfg.eta,
                                          prev_sample=rollout.latents[:, j + 1]).mean
            held.append(rollout.latents[:, j + 1] - mean if noise is None else noise[n])
            x = mean + held[-1]
        images = model.decode(x)
        total, count = 0.0, 0
        for i, it in enumerate(items):
            clf = trainer.reward.finding_scorer.classifiers[it.modality]
            value, has = findings_log_likelihood(clf.differentiable_logits(images[i:i + 1]), trainer._stated([it], clf.label_names))
            total += float(value.sum())
            count += int(has.sum())
    return total / max(count, 1), held, x


@pytest.mark.parametrize("views", [1, 3])
def test_the_draft_objective_raises_the_reward_classifiers_likelihood_on_the_same_rollouts(base_model, tmp_path, views):
    """DRaFT-K: the held noise makes the differentiated image the rollout's own (value unchanged), and a few
    reward-gradient steps raise the reward classifier's log likelihood of the expected findings (of the image as
    decoded, also when the gradient comes from jittered views of it)."""
    from accelerate import Accelerator

    from pipelines.improve import build_parts
    from rlhf.trainer import DDPOTrainer

    cfg = load_config(write_profile(tmp_path, settings(base_model, **{"improve.ddpo.objective": "draft", "improve.ddpo.draft_steps": 2,
                                                                     "improve.ddpo.lr": 5e-3, "improve.ddpo.steps": 3,
                                                                     "improve.ddpo.draft_views": views})))
    ic = cfg.improve
    parts = build_parts(cfg, progress=False, load_eval=False)
    trainer = DDPOTrainer(parts.model, parts.reward, ic.ddpo, ic.selection, Accelerator(cpu=True), None)
    prompts = parts.sampler.draw(4, 1, 0)
    prompts = [p for p in prompts if p.expected] or prompts
    items = [p for p in prompts for _ in range(2)]
    rollout = trainer.rollout(items, list(range(len(items))), 1, progress=False)
    before, noise, final = _draft_ll(trainer, rollout)
    assert torch.allclose(final, rollout.latents[:, -1], atol=1e-5)  # held noise: the redraw is the rollout's own image
    lora_before = [p.detach().clone() for p in trainer.params]
    for _ in range(4):
        stats = trainer.draft_update(rollout, 1, progress=False)
    assert all(s["stage"] == "draft" and np.isfinite(s["grad_norm"]) and s["grad_norm"] > 0 for s in stats.steps)
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, trainer.params))
    after, _, moved = _draft_ll(trainer, rollout, noise)
    assert not torch.allclose(moved, final)
    assert after > before + 1e-3, (before, after)


def test_a_draft_run_logs_its_steps_and_refuses_a_reward_without_findings(base_model, tmp_path, capsys):
    profile = write_profile(tmp_path, settings(base_model, **{"improve.ddpo.objective": "draft", "improve.ddpo.epochs": 2,
                                                             "improve.ddpo.kl_weight": 0.5}))
    assert cli(["improve", "--config", str(profile), "--run-dir", str(tmp_path / "run"), "--no-progress", "--no-selection"]) == 0
    steps = [r for r in lines(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "step"]
    assert steps and all(r["stage"] == "draft" and "findings_log_likelihood" in r for r in steps)
    assert steps[0]["kl"] == 0.0 and steps[-1]["kl"] > 0  # zero while the LoRA is zero, then the adapter moves away
    assert cli(["runs", "show", str(tmp_path / "run")]) == 0
