"""`synthmed train unet --init-from MODEL`: continue training an exported model (its UNet, conditioner
and VAE) with a fresh optimiser, into another folder; a model of another architecture is refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from generator.paths import shipped
from pipelines.cli import main


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("ph") / "phantoms"
    assert main(["data", "phantoms", "--out", str(out), "--per-finding", "1", "--size", "64", "--modalities", "cxr", "--no-progress"]) == 0
    return out / "manifest.csv"


def test_init_from_continues_the_shipped_model(tmp_path, tiny_manifest, capsys):
    base = shipped("generator/weights/default")
    out = tmp_path / "model"
    code = main(["train", "unet", "--init-from", str(base), "--data", str(tiny_manifest), f"--train.out={out}",
                 "--train.max_steps=2", "--train.batch_size=2", "--train.warmup_steps=1", "--train.validate_every=100",
                 f"--run.runs_dir={tmp_path / 'runs'}", "--no-progress"])
    assert code == 0, capsys.readouterr()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["steps"] == 2 and meta["init_from"] == str(base)
    before = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    # started from the shipped weights (a fresh UNet would be far away), and trained: not identical
    diffs = [float((after[k].float() - before[k].float()).abs().max()) for k in before]
    assert max(diffs) > 0
    assert max(diffs) < 0.05
    assert torch.equal(load_file(base / "vae" / "diffusion_pytorch_model.safetensors")["decoder.conv_out.weight"].float(),
                       load_file(out / "vae" / "diffusion_pytorch_model.safetensors")["decoder.conv_out.weight"].float())
    # the captions the 64-token limit cuts are counted (and said on stderr when there are any)
    import csv

    from generator.conditioning import TextEncoder

    texts = [r["text"] for r in csv.DictReader(open(tiny_manifest))]
    encoder = TextEncoder(max_length=64)
    expected = sum(len(encoder.tokenizer(t)["input_ids"]) > 64 for t in texts)
    assert meta["captions_truncated"] <= expected  # the validation rows are held back from training
    assert encoder.truncated(texts) == expected
    short = TextEncoder(max_length=12)
    assert short.truncated(["Chest X-ray.", texts[0] * 3]) == 1 and short.truncated([]) == 0
    assert short.token_lengths(["Chest X-ray."]) == [len(short.tokenizer("Chest X-ray.")["input_ids"])]


def test_a_caption_the_token_limit_cuts_is_warned_of_with_the_limit_that_keeps_it(tmp_path, tiny_manifest, capsys):
    out = tmp_path / "model"
    code = main(["train", "unet", "--init-from", str(shipped("generator/weights/default")), "--data", str(tiny_manifest),
                 f"--train.out={out}", "--model.text_max_length=12", "--train.max_steps=1", "--train.batch_size=2",
                 "--train.warmup_steps=1", "--train.validate_every=100", f"--run.runs_dir={tmp_path / 'runs'}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["captions_truncated"] > 0  # every phantom report is longer than 12 tokens
    assert f"warning: {meta['captions_truncated']} of " in err and "longer than model.text_max_length=12 tokens" in err
    longest = int(err.split("--model.text_max_length=")[1].split()[0])
    assert longest > 12


def test_init_from_refuses_another_architecture(tmp_path, tiny_manifest, capsys):
    code = main(["train", "unet", "--init-from", str(shipped("generator/weights/default")), "--data", str(tiny_manifest),
                 f"--train.out={tmp_path / 'model'}", "--model.unet_channels=[32,64,128]", f"--run.runs_dir={tmp_path / 'runs'}",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "architecture differs" in err and "unet_channels" in err


def test_init_from_needs_an_exported_model(tmp_path, tiny_manifest, capsys):
    code = main(["train", "unet", "--init-from", str(tmp_path), "--data", str(tiny_manifest), f"--train.out={tmp_path / 'm'}",
                 f"--run.runs_dir={tmp_path / 'runs'}", "--no-progress"])
    assert code == 2
    assert "not an exported model folder" in capsys.readouterr().err


def test_init_from_may_attend_to_more_prompt_tokens(tmp_path, tiny_manifest, capsys):
    """No weight depends on the prompt's token limit: a continued model may read longer captions (phantom reports
    with two findings run past 64 tokens), and the exported model keeps the new limit."""
    from generator.models import LatentDiffusion

    out = tmp_path / "model"
    code = main(["train", "unet", "--init-from", str(shipped("generator/weights/default")), "--data", str(tiny_manifest),
                 f"--train.out={out}", "--model.text_max_length=160", "--train.max_steps=1", "--train.batch_size=2",
                 "--train.warmup_steps=1", "--train.validate_every=100", f"--run.runs_dir={tmp_path / 'runs'}", "--no-progress"])
    assert code == 0, capsys.readouterr()
    assert json.loads((out / "model.json").read_text())["model"]["text_max_length"] == 160
    model = LatentDiffusion.load(out)
    long_text = "Spectral-domain OCT of the macula. " + "Findings: a small amount of intraretinal fluid at the fovea. " * 12
    tokens = model.conditioner.text_encoder.tokenizer([long_text], truncation=True, max_length=model.conditioner.text_encoder.max_length)
    assert model.conditioner.text_encoder.max_length == 160 and len(tokens["input_ids"][0]) == 160
