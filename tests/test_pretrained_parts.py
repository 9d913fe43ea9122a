"""The parts the sd15 profile relies on, on tiny models: a pretrained UNet without a class embedding
gets the modality vector through an identity adapter, the UNet can train as LoRA on a frozen base
(merged on export), and the text encoder can be LoRA-tuned and saved with the model."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from generator.config import DataConfig, LoraConfig, ModelConfig, TrainConfig
from generator.conditioning import TextEncoder
from generator.models import LatentDiffusion, build_unet
from generator.sampling import sample
from generator.training import RunDir

TINY = ModelConfig(image_size=16, vae_channels=[8, 16], latent_channels=4, unet_channels=[16, 32], unet_attention_heads=2,
                   cross_attention_dim=32, text_max_length=16)


@pytest.fixture(scope="module")
def plain_unet_dir(tmp_path_factory):
    """A UNet saved the way Stable Diffusion's is: no class embedding."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                layers_per_block=1, cross_attention_dim=32, attention_head_dim=2, norm_num_groups=16)
    folder = tmp_path_factory.mktemp("sd") / "repo"
    unet.save_pretrained(folder / "unet")
    return folder


def test_a_unet_without_class_embedding_gets_an_identity_one(plain_unet_dir):
    cfg = TINY.model_copy(update={"unet_pretrained": str(plain_unet_dir), "unet_subfolder": "unet"})
    unet = build_unet(cfg)
    assert isinstance(unet.class_embedding, torch.nn.Identity) and unet.config.class_embed_type == "identity"
    plain = UNet2DConditionModel.from_pretrained(plain_unet_dir / "unet")
    x, t, tokens = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    with torch.no_grad():  # a zero class vector leaves the pretrained UNet's output as it was
        assert torch.allclose(unet(x, t, tokens, class_labels=torch.zeros(2, 64)).sample, plain(x, t, tokens).sample, atol=1e-6)
        assert not torch.allclose(unet(x, t, tokens, class_labels=torch.randn(2, 64)).sample, plain(x, t, tokens).sample, atol=1e-3)
    model = LatentDiffusion(cfg, ["cxr"])
    assert sample(model, ["effusion"], ["cxr"], steps=2).images.shape == (1, 3, 16, 16)


def test_mismatched_pretrained_parts_are_explained(plain_unet_dir):
    with pytest.raises(ValueError, match="set model.cross_attention_dim: 32"):
        build_unet(TINY.model_copy(update={"unet_pretrained": str(plain_unet_dir), "unet_subfolder": "unet", "cross_attention_dim": 768}))
    with pytest.raises(ValueError, match="model.vae_channels has 3 levels"):
        from generator.models import build_vae
        LatentDiffusion(TINY.model_copy(update={"vae_channels": [8, 16, 16]}), ["cxr"], vae=build_vae(TINY))


@pytest.fixture
def phantom_rows(tmp_path):
    from generator.data import iter_manifest
    from generator.phantoms.dataset import write_phantoms

    write_phantoms(tmp_path / "ph", ["cxr"], per_finding=1, size=32, progress=False)
    return list(iter_manifest(tmp_path / "ph" / "manifest.csv"))


def _run(tmp_path, name):
    run = RunDir(tmp_path / name)
    run.checkpoints.mkdir(parents=True)
    return run


def test_unet_lora_training_freezes_the_base_and_exports_merged(plain_unet_dir, phantom_rows, tmp_path):
    from generator.trainers import train_unet

    cfg = TINY.model_copy(update={"unet_pretrained": str(plain_unet_dir), "unet_subfolder": "unet"})
    torch.manual_seed(0)
    model = LatentDiffusion(cfg, ["cxr"])
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    train = TrainConfig(batch_size=2, max_steps=3, warmup_steps=0, checkpoint_every=3, validate_every=100, unet_lora=True, lr=1e-2)
    summary = train_unet(model, train, DataConfig(), phantom_rows, _run(tmp_path, "run"), tmp_path / "out", progress=False,
                         ship_dtype=torch.float32, lora_cfg=LoraConfig(rank=2, text_encoder_rank=2))
    assert summary["unet_lora"]["merged"] and (tmp_path / "out" / "unet_lora.safetensors").is_file()
    from safetensors.torch import load_file

    adapter = sum(v.numel() for v in load_file(tmp_path / "out" / "unet_lora.safetensors").values())
    conditioner = sum(p.numel() for p in model.conditioner.trainable_parameters())
    assert summary["trainable_parameters"] == adapter + conditioner and adapter < sum(v.numel() for v in base.values()) / 10
    merged = model.unet.state_dict()
    assert set(merged) == set(base)  # a plain UNet again, nothing of peft left
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(any(p in k for p in ("to_q", "to_k", "to_v", "to_out")) for k in changed)
    loaded = LatentDiffusion.load(tmp_path / "out")
    assert loaded.conditioner.text_encoder.lora["rank"] == 2
    a = sample(model.eval(), ["left effusion"], ["cxr"], steps=3, seed=1).images
    b = sample(loaded, ["left effusion"], ["cxr"], steps=3, seed=1).images
    assert torch.allclose(a, b, atol=1e-5)


def test_text_encoder_lora_trains_only_lora_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = LatentDiffusion(TINY, ["cxr"]).eval()
    before = model.conditioner(["small right effusion"], ["cxr"]).tokens
    params = model.conditioner.text_encoder.add_lora(4, 8.0)
    encoder = model.conditioner.text_encoder.model
    assert params and all("lora_" in n for n, p in encoder.named_parameters() if p.requires_grad)
    assert torch.allclose(model.conditioner(["small right effusion"], ["cxr"]).tokens, before, atol=1e-6)  # B = 0 at start
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.1)
    after = model.conditioner(["small right effusion"], ["cxr"]).tokens
    assert not torch.allclose(after, before, atol=1e-4)
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model.json").read_text())["text_encoder_lora"]["rank"] == 4
    loaded = LatentDiffusion.load(tmp_path / "m")
    assert torch.allclose(loaded.conditioner(["small right effusion"], ["cxr"]).tokens, after, atol=1e-6)
    with pytest.raises(ValueError, match="LoRA-tuned"):
        LatentDiffusion.load(tmp_path / "m", text_encoder=TextEncoder(TINY.text_encoder, TINY.text_max_length))
