"""The latent diffusion generator on tiny seeded models: conditioning, training, sampling, persistence, resume."""

import json

import numpy as np
import pytest
import torch

from generator.config import ModelConfig, TrainConfig
from generator.conditioning import TextEncoder
from generator.ddim_logprob import ddim_step_with_logprob
from generator.models import LatentDiffusion, time_embed_dim
from generator.sampling import guidance_scales, sample
from generator.training import RunDir, batch_indices, diffusion_loss, run_loop

TINY = ModelConfig(image_size=16, vae_channels=[8, 16], latent_channels=4, unet_channels=[16, 32], unet_attention_heads=2,
                   cross_attention_dim=32, text_max_length=16)


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder(TINY.text_encoder, TINY.text_max_length)


@pytest.fixture
def model(text_encoder):
    torch.manual_seed(0)
    return LatentDiffusion(TINY, ["cxr", "oct"], text_encoder=text_encoder).eval()


def test_conditioning_shapes(model):
    cond = model.conditioner(["left pleural effusion", "normal"], ["cxr", "oct"])
    b, length, d = cond.tokens.shape
    assert (b, d) == (2, 32) and cond.mask.shape == (2, length) and cond.mask[:, -1].all()  # last token: modality
    assert cond.class_emb.shape == (2, time_embed_dim(model.unet))
    with pytest.raises(ValueError, match="has no embedding; the generator knows: cxr, oct"):
        model.conditioner(["x"], ["fundus"])


def test_modality_table_grows_on_load(model, tmp_path, text_encoder):
    model.save(tmp_path / "m")
    loaded = LatentDiffusion.load(tmp_path / "m", ["cxr", "oct", "dental"], text_encoder=text_encoder)
    assert loaded.modalities == ["cxr", "oct", "dental"] and loaded.new_modalities == ["dental"]
    old = model.conditioner.modality.embedding.weight
    assert torch.equal(loaded.conditioner.modality.embedding.weight[:2], old)


def test_save_load_round_trip_gives_identical_images(model, tmp_path, text_encoder):
    model.save(tmp_path / "m")
    loaded = LatentDiffusion.load(tmp_path / "m", text_encoder=text_encoder)
    a = sample(model, ["effusion"], ["cxr"], steps=3, seed=5).images
    b = sample(loaded, ["effusion"], ["cxr"], steps=3, seed=5).images
    assert torch.allclose(a, b, atol=1e-6)


def test_a_training_step_lowers_the_loss_on_a_fixed_batch(model):
    model.train()
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.unet.parameters()] + [p for n, p in model.conditioner.named_parameters() if not n.startswith("text_encoder.")]
    optimiser = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(15):
        loss, _ = diffusion_loss(model, latents, ["a", "b", "c", "d"], ["cxr", "oct", "cxr", "oct"], torch.Generator().manual_seed(1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] * 0.9
    assert all(p.grad is None for p in model.conditioner.text_encoder.parameters())  # frozen


def test_seeds_guidance_and_negative_prompts(model):
    kw = dict(steps=3)
    a = sample(model, ["effusion", "cyst"], ["cxr", "oct"], seed=1, **kw).images
    assert torch.equal(a, sample(model, ["effusion", "cyst"], ["cxr", "oct"], seed=1, **kw).images)
    assert not torch.equal(a, sample(model, ["effusion", "cyst"], ["cxr", "oct"], seed=2, **kw).images)
    # image i uses seed + i: the second image alone with seed 2 equals the second of the pair
    single = sample(model, ["cyst"], ["oct"], seed=2, **kw).images
    assert torch.allclose(single[0], a[1], atol=1e-5)
    # guidance and negatives act only through the learned conditioning: give it some signal first
    torch.nn.init.normal_(model.conditioner.fuse[-1].weight, std=0.5)
    base = sample(model, ["effusion"], ["cxr"], seed=1, guidance=4.0, **kw).images
    assert not torch.allclose(base, sample(model, ["effusion"], ["cxr"], seed=1, guidance=1.0, **kw).images)
    assert not torch.allclose(base, sample(model, ["effusion"], ["cxr"], seed=1, guidance=4.0, negative="dense consolidation", **kw).images)
    assert sample(model, ["effusion"], ["cxr"], sampler="dpmpp", seed=1, **kw).images.shape == (1, 3, 16, 16)


def test_guidance_schedules():
    assert guidance_scales(4.0, 4, "constant") == [4.0] * 4
    linear = guidance_scales(4.0, 4, "linear")
    assert linear[-1] == 4.0 and linear == sorted(linear) and linear[0] > 1.0
    cosine = guidance_scales(4.0, 10, "cosine")
    assert cosine == sorted(cosine) and abs(cosine[-1] - 4.0) < 1e-9
    with pytest.raises(ValueError, match="unknown guidance schedule"):
        guidance_scales(4.0, 3, "step")


def test_trajectory_and_log_probs_rescore(model):
    out = sample(model, ["effusion", "cyst"], ["cxr", "oct"], steps=4, seed=0, eta=1.0, return_trajectory=True, guidance=1.0)
    assert out.latents.shape == (2, 5, 4, 8, 8) and out.log_probs.shape == (2, 4) and torch.isfinite(out.log_probs).all()
    # re-scoring a recorded step (as DDPO does) reproduces its log probability
    scheduler = model.scheduler
    t = out.timesteps[1]
    cond = model.conditioner(["effusion", "cyst"], ["cxr", "oct"])
    with torch.no_grad():
        eps = model.unet(out.latents[:, 1], t.expand(2), encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask,
                         class_labels=cond.class_emb).sample
    step = ddim_step_with_logprob(scheduler, eps, t, out.latents[:, 1], eta=1.0, prev_sample=out.latents[:, 2])
    assert torch.allclose(step.log_prob, out.log_probs[:, 1], atol=1e-4)
    with pytest.raises(ValueError, match="eta > 0"):
        sample(model, ["x"], ["cxr"], steps=2, return_trajectory=True)


def test_batch_order_is_a_pure_function_of_the_step():
    a = batch_indices(10, 4, step=7, micro=0, accum=1, seed=3)
    assert np.array_equal(a, batch_indices(10, 4, step=7, micro=0, accum=1, seed=3))
    epoch0 = np.concatenate([batch_indices(10, 5, s, 0, 1, 3) for s in range(2)])
    assert sorted(epoch0.tolist()) == list(range(10))  # each epoch is a permutation


def _linear_run(run_dir, stop_after=None):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    x = torch.linspace(-1, 1, 24).reshape(8, 3)
    y = x.sum(1, keepdim=True)
    cfg = TrainConfig(lr=0.05, batch_size=4, max_steps=6, warmup_steps=1, checkpoint_every=2, validate_every=100, ema_decay=0.9)

    def loss_fn(step, micro):
        idx = torch.from_numpy(batch_indices(8, 4, step, micro, 1, 0))
        return torch.nn.functional.mse_loss(net(x[idx]), y[idx]), {}

    result = run_loop(RunDir(run_dir), cfg, [net], list(net.parameters()), loss_fn, progress=False, stop_after=stop_after)
    return net, result


def test_resume_after_a_kill_continues_from_the_last_checkpoint(tmp_path):
    straight_dir, killed_dir = tmp_path / "a", tmp_path / "b"
    for d in (straight_dir, killed_dir):
        (d / "checkpoints").mkdir(parents=True)
    straight, _ = _linear_run(straight_dir)
    _, partial = _linear_run(killed_dir, stop_after=3)  # killed after step 3; last checkpoint: step 2
    assert partial.steps == 3 and RunDir(killed_dir).latest_checkpoint().name == "step_0000002"
    resumed, result = _linear_run(killed_dir)
    assert result.resumed_from == 2 and result.steps == 6
    assert torch.allclose(resumed.weight, straight.weight, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6  # appended across the kill


def test_lora_adapter_training_saves_only_the_adapter(model, tmp_path):
    from generator.config import DataConfig, LoraConfig
    from generator.lora_training import train_lora_adapter
    from generator.phantoms.dataset import write_phantoms
    from generator.data import iter_manifest

    write_phantoms(tmp_path / "ph", ["cxr"], per_finding=1, size=32, progress=False)
    rows = list(iter_manifest(tmp_path / "ph" / "manifest.csv"))
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    cfg = TrainConfig(batch_size=2, max_steps=2, warmup_steps=0, checkpoint_every=2, validate_every=10)
    summary = train_lora_adapter(model, LoraConfig(rank=2), cfg, DataConfig(), rows, run, tmp_path / "a.safetensors", progress=False)
    assert summary["steps"] == 2 and (tmp_path / "a.safetensors").stat().st_size < 200_000
    now = model.unet.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items() if k in now)  # base weights untouched


def test_each_process_draws_its_own_slice_of_one_global_batch():
    """Under accelerate every rank used to draw the same batch; now ranks split one global batch."""
    for step, micro in [(0, 0), (3, 1), (11, 0)]:
        ranks = [batch_indices(10, 4, step, micro, accum=2, seed=3, rank=r, world=2) for r in range(2)]
        assert not np.array_equal(ranks[0], ranks[1])
        together = batch_indices(10, 8, step, micro, accum=2, seed=3)
        assert np.array_equal(np.concatenate(ranks), together)  # what one process with the whole batch draws
    assert np.array_equal(batch_indices(10, 4, 7, 0, 1, 3, rank=0, world=1), batch_indices(10, 4, 7, 0, 1, 3))
    with pytest.raises(ValueError, match="rank 2"):
        batch_indices(10, 4, 0, 0, 1, 3, rank=2, world=2)
