"""`synthmed bench generate`: synthmed's sampler against the stock diffusers pipeline on the same weights."""

import pytest
import torch

from generator.bench import StockPipeline, bench_generate
from generator.config import ModelConfig
from generator.conditioning import TextEncoder
from generator.models import LatentDiffusion
from generator.sampling import sample

TINY = ModelConfig(image_size=16, vae_channels=[8, 16], latent_channels=4, unet_channels=[16, 32], unet_attention_heads=2,
                   cross_attention_dim=32, text_max_length=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = LatentDiffusion(TINY, ["cxr", "oct"], text_encoder=TextEncoder(TINY.text_encoder, TINY.text_max_length)).eval()
    torch.nn.init.normal_(model.conditioner.fuse[-1].weight, std=0.5)  # a class signal, so the injected vector matters
    model.vae.register_to_config(scaling_factor=0.7)
    model.scaling_factor = 0.7
    return model


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_stock_pipeline_draws_the_same_images(model, guidance):
    prompts, modalities = ["left pleural effusion", "drusen"], ["cxr", "oct"]
    ours = sample(model, prompts, modalities, guidance=guidance, steps=4, seed=3).images
    stock = StockPipeline(model)
    try:
        theirs = stock(prompts, modalities, guidance, 4, 3)
    finally:
        stock.close()
    assert theirs.shape == ours.shape
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # the hook is gone after close: the UNet no longer receives the class vector
    again = sample(model, prompts, modalities, guidance=guidance, steps=4, seed=3).images
    assert torch.equal(again, ours)


def test_without_the_hook_the_stock_pipeline_cannot_drive_this_unet(model):
    """The UNet needs the modality-and-text vector; the pipeline alone does not pass one."""
    stock = StockPipeline(model)
    stock.close()
    stock._extra = None
    with pytest.raises(ValueError, match="class_labels"):
        stock.pipe(prompt_embeds=torch.zeros(1, 4, 32), negative_prompt_embeds=torch.zeros(1, 4, 32), num_inference_steps=1,
                   guidance_scale=2.0, output_type="pt", height=16, width=16)


def test_bench_reports_the_ratio(model):
    result = bench_generate(model, n=3, batch_size=2, steps=2, guidance=2.0, repeats=1, progress=False)
    assert result["speedup_vs_diffusers"] == pytest.approx(
        result["diffusers"]["seconds_per_image"] / result["synthmed"]["seconds_per_image"], rel=0.01)
    assert result["max_abs_diff"] < 1e-3
    for side in ("synthmed", "diffusers"):
        assert result[side]["images_per_second"] > 0 and result[side]["peak_memory_mb"] >= 0


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16")
def test_bf16_draws_what_fp32_draws_within_rounding(model):
    """``precision="bf16"`` (what ``auto`` picks on a CPU with native bf16): the same images to within bf16's
    rounding, as float32; a trajectory for DDPO stays fp32 whatever is asked."""
    prompts, modalities = ["left pleural effusion", "drusen"], ["cxr", "oct"]
    exact = sample(model, prompts, modalities, guidance=3.0, steps=4, seed=3).images
    rounded = sample(model, prompts, modalities, guidance=3.0, steps=4, seed=3, precision="bf16").images
    assert rounded.dtype == torch.float32 and 0 < (rounded - exact).abs().max() < 0.1
    result = bench_generate(model, n=2, batch_size=2, steps=2, guidance=2.0, repeats=1, progress=False, precision="bf16")
    assert result["precision"] == "bfloat16" and result["fp32_max_abs_diff"] < 1e-3 and result["max_abs_diff"] < 0.1
    a = sample(model, prompts, modalities, steps=3, seed=1, eta=1.0, return_trajectory=True, precision="bf16")
    b = sample(model, prompts, modalities, steps=3, seed=1, eta=1.0, return_trajectory=True)
    assert torch.equal(a.log_probs, b.log_probs) and torch.equal(a.images, b.images)


def test_an_unknown_precision_is_one_clear_error(model):
    from generator.errors import UserError

    with pytest.raises(UserError, match="unknown precision 'fp8'"):
        sample(model, ["x"], ["cxr"], steps=1, precision="fp8")


def test_bench_refuses_guidance_below_one(model):
    with pytest.raises(ValueError, match="only guides above 1"):
        bench_generate(model, n=1, guidance=0.5, progress=False)


def test_bench_generate_command(model, tmp_path, capsys):
    import json

    from pipelines.cli import main

    model.save(tmp_path / "m")
    assert main(["bench", "generate", "--model", str(tmp_path / "m"), "--n", "2", "--batch", "2", "--steps", "2",
                 "--guidance", "2", "--repeats", "1", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["speedup_vs_diffusers"] > 0 and result["n"] == 2 and result["fp32_max_abs_diff"] < 1e-3
    assert result["max_abs_diff"] < (1e-3 if result["precision"] == "float32" else 0.1)  # sample.precision: auto
    assert main(["bench", "generate", "--model", str(tmp_path / "m"), "--n", "1", "--steps", "1", "--repeats", "1"]) == 0
    assert "speedup_vs_diffusers" in capsys.readouterr().out


def test_sample_sheet_command(model, tmp_path, capsys):
    from PIL import Image

    from pipelines.cli import main

    model.save(tmp_path / "m")
    out = tmp_path / "sheet.png"
    assert main(["sample-sheet", "--model", str(tmp_path / "m"), "--per-cell", "1", "--steps", "1", "--out", str(out)]) == 0
    width, height = Image.open(out).size
    assert width > 400 and height > 200  # 2 modalities x (phantom + 1 generated row), 9 columns for cxr
    assert main(["sample-sheet", "--model", str(tmp_path / "m"), "--modalities", "fundus", "--out", str(out)]) == 2
    assert "no embedding for fundus; it knows cxr, oct" in capsys.readouterr().err
