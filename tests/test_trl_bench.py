"""`synthmed bench improve`: the pure parts of the trl reference bench, offline and without trl.

Settings matching (ours -> trl 0.23.1's DDPOConfig), the JSON summary, the trl environment's marker,
and the runner's adapters between trl's interfaces and our model (packing, the prompt book, the
hook), which must reproduce our sampler through diffusers' pipeline.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines import trl_bench
from pipelines.trl_bench import (
    bench_batches,
    ensure_trl_env,
    expected_marker,
    marker_matches,
    our_epochs,
    side_summary,
    summarise,
    trained_timesteps,
    trl_settings,
    trl_timestep_fraction,
)
from rlhf.config import DDPOConfig

# DDPOConfig's fields in trl 0.23.1 (trl/trainer/ddpo_config.py), so no test needs trl installed
TRL_0231_DDPO_FIELDS = {
    "exp_name", "run_name", "seed", "log_with", "tracker_kwargs", "accelerator_kwargs", "project_kwargs", "tracker_project_name",
    "logdir", "num_epochs", "save_freq", "num_checkpoint_limit", "mixed_precision", "allow_tf32", "resume_from", "sample_num_steps",
    "sample_eta", "sample_guidance_scale", "sample_batch_size", "sample_num_batches_per_epoch", "train_batch_size",
    "train_use_8bit_adam", "train_learning_rate", "train_adam_beta1", "train_adam_beta2", "train_adam_weight_decay",
    "train_adam_epsilon", "train_gradient_accumulation_steps", "train_max_grad_norm", "train_num_inner_epochs", "train_cfg",
    "train_adv_clip_max", "train_clip_range", "train_timestep_fraction", "per_prompt_stat_tracking",
    "per_prompt_stat_tracking_buffer_size", "per_prompt_stat_tracking_min_count", "async_reward_computation", "max_workers",
    "negative_prompts", "push_to_hub",
}


def trl_config_check(kw: dict) -> bool:
    """trl 0.23.1's DDPOTrainer._config_check on one process."""
    per_epoch = kw["sample_batch_size"] * kw["sample_num_batches_per_epoch"]
    return (kw["sample_batch_size"] >= kw["train_batch_size"] and kw["sample_batch_size"] % kw["train_batch_size"] == 0
            and per_epoch % (kw["train_batch_size"] * kw["train_gradient_accumulation_steps"]) == 0)


# -- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("samples", [1, 4, 12, 16, 30, 32, 40, 49])
@pytest.mark.parametrize("sample_batch, train_batch, accum", [(20, 8, 2), (16, 8, 1), (5, 3, 4), (64, 64, 1)])
def test_bench_batches_satisfy_trl_and_never_grow(samples, sample_batch, train_batch, accum):
    b = bench_batches(samples, sample_batch, train_batch, accum)
    assert samples % b["sample_batch_size"] == 0 and b["sample_batch_size"] % b["train_batch_size"] == 0
    assert samples % (b["train_batch_size"] * b["grad_accum_steps"]) == 0
    assert b["sample_batch_size"] <= max(sample_batch, 1) and b["train_batch_size"] <= train_batch and b["grad_accum_steps"] <= accum


def test_bench_batches_keep_settings_that_fit():
    assert bench_batches(32, 16, 8, 2) == {"sample_batch_size": 16, "train_batch_size": 8, "grad_accum_steps": 2}
    # the training batch is kept before the sampling batch (it shapes the update; the sampling batch only the speed)
    assert bench_batches(40, 20, 8, 2) == {"sample_batch_size": 8, "train_batch_size": 8, "grad_accum_steps": 1}


@pytest.mark.parametrize("steps", range(2, 51))
def test_trl_trains_as_many_timesteps_as_ours(steps):
    from rlhf.trainer import DDPOTrainer

    for fraction in (0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 1.0):
        fake = SimpleNamespace(timesteps=list(range(steps)), cfg=SimpleNamespace(timestep_fraction=fraction, seed=0))
        ours = len(DDPOTrainer._train_timesteps(fake, 1, 0, 3))
        assert ours == trained_timesteps(steps, fraction)
        trl_fraction = trl_timestep_fraction(steps, ours)
        assert 0 < trl_fraction <= 1 and int(steps * trl_fraction) == ours  # trl: int(sample_num_steps * fraction)


def test_trl_settings_map_every_matched_field():
    ddpo = DDPOConfig(epochs=3, prompts_per_epoch=4, images_per_prompt=4, steps=10, eta=0.9, guidance=3.5, sample_batch_size=8,
                      train_batch_size=4, grad_accum_steps=2, inner_epochs=2, timestep_fraction=0.5, clip_range=2e-4,
                      adv_clip_max=4.0, lr=1e-4, weight_decay=0.01, max_grad_norm=0.5, seed=7)
    kw, notes = trl_settings(ddpo)
    assert set(kw) <= TRL_0231_DDPO_FIELDS
    assert kw["num_epochs"] == 3 and kw["seed"] == 7 and kw["mixed_precision"] == "no" and kw["log_with"] is None
    assert kw["sample_num_steps"] == 10 and kw["sample_eta"] == 0.9 and kw["sample_guidance_scale"] == 3.5
    assert kw["sample_batch_size"] * kw["sample_num_batches_per_epoch"] == 16  # samples per epoch
    assert (kw["train_batch_size"], kw["train_gradient_accumulation_steps"], kw["train_num_inner_epochs"]) == (4, 2, 2)
    assert (kw["train_learning_rate"], kw["train_adam_weight_decay"], kw["train_max_grad_norm"]) == (1e-4, 0.01, 0.5)
    assert (kw["train_clip_range"], kw["train_adv_clip_max"], kw["train_cfg"]) == (2e-4, 4.0, True)
    assert int(kw["sample_num_steps"] * kw["train_timestep_fraction"]) == notes["trained_timesteps"] == 5
    # group advantages: trl's tracker over per-group keys, buffer and minimum count K
    assert (kw["per_prompt_stat_tracking"], kw["per_prompt_stat_tracking_buffer_size"], kw["per_prompt_stat_tracking_min_count"]) == (True, 4, 4)
    assert kw["save_freq"] > 3  # no checkpoint inside the timed epochs
    assert trl_config_check(kw)


def test_trl_settings_other_advantages_and_no_guidance():
    tracker, _ = trl_settings(DDPOConfig(advantages="tracker", tracker_buffer=24, tracker_min_count=6, prompts_per_epoch=4,
                                         sample_batch_size=8, train_batch_size=8, grad_accum_steps=1))
    assert (tracker["per_prompt_stat_tracking_buffer_size"], tracker["per_prompt_stat_tracking_min_count"]) == (24, 6)
    batch, _ = trl_settings(DDPOConfig(advantages="batch", guidance=1.0, prompts_per_epoch=4, sample_batch_size=8,
                                       train_batch_size=8, grad_accum_steps=1))
    assert batch["per_prompt_stat_tracking"] is False and batch["train_cfg"] is False


@pytest.mark.parametrize("change, field", [({"logprob_reduce": "sum"}, "logprob_reduce"), ({"kl_weight": 0.01}, "kl_weight"),
                                           ({"sample_batch_size": 20}, "batch sizes"), ({"trainable": "findings"}, "trainable")])
def test_trl_settings_refuse_what_trl_cannot_run(change, field):
    settings = {"prompts_per_epoch": 4, "images_per_prompt": 4, "sample_batch_size": 8, "train_batch_size": 8, "grad_accum_steps": 1}
    ddpo = DDPOConfig(**{**settings, **change})
    with pytest.raises(ValueError, match=field):
        trl_settings(ddpo)


# -- the summary ----------------------------------------------------------------------------------

def _epochs(totals, phases=("sampling", "reward", "update")):
    return [{"epoch": i + 1, "seconds": {**{p: t / (len(phases) + 1) for p in phases}, "total": t}, "reward_mean": 0.1 * i}
            for i, t in enumerate(totals)]


def test_side_summary_means_and_split():
    side = side_summary(_epochs([10.0, 14.0]), 0.25, 0.35)
    assert side["seconds_per_epoch"] == 12.0 and side["epoch_seconds"] == [10.0, 14.0]
    assert sum(side["split"].values()) == pytest.approx(12.0, abs=1e-3)
    assert side["split"]["other"] == pytest.approx(3.0, abs=1e-3)
    assert side["gain"] == pytest.approx(0.10)
    assert side_summary(_epochs([1.0]), None, 0.3)["gain"] is None
    with pytest.raises(ValueError):
        side_summary([], 0.1, 0.2)


def test_summarise_speedup_and_goal():
    ours = side_summary(_epochs([10.0, 10.0], ("sampling", "reward", "update", "selection")), 0.2, 0.30)
    trl = side_summary(_epochs([25.0, 27.0]), 0.2, 0.25)
    ours["cpu_seconds_ddpo"], trl["cpu_seconds_ddpo"] = [8.0, 8.0], [20.0, 24.0]
    result = summarise(ours, trl, {"epochs": 2})
    assert result["trl_version"] == "0.23.1"
    assert result["epoch_speedup_vs_trl"] == pytest.approx(26.0 / 10.0)  # trl seconds per epoch / ours
    assert result["epoch_speedup_vs_trl_without_selection"] == pytest.approx(26.0 / 8.0)
    assert result["cpu_speedup_vs_trl_ddpo"] == pytest.approx(22.0 / 8.0)
    assert result["gain_difference"] == pytest.approx(0.05)
    assert result["goal"] == {"speedup_at_least_2x": True, "gain_at_least_trl": True}
    slower = summarise(ours, side_summary(_epochs([15.0]), 0.2, 0.4), {})
    assert slower["goal"] == {"speedup_at_least_2x": False, "gain_at_least_trl": False}
    json.dumps(result)  # plain JSON


def test_summarise_without_trl():
    result = summarise(side_summary(_epochs([5.0]), 0.1, 0.1), None, {})
    assert result["trl"] is None and result["epoch_speedup_vs_trl"] is None and result["goal"] is None


def test_our_epochs_leave_the_evaluation_out(tmp_path):
    lines = [
        {"kind": "eval", "epoch": 0, "overall": {"all_requested_shown": 0.2}},
        {"kind": "step", "epoch": 1, "step": 1},
        {"kind": "epoch", "epoch": 1, "reward": {"total": {"mean": 0.5}},
         "seconds": {"sampling": 3.0, "reward": 1.0, "update": 4.0, "selection": 1.0, "total": 9.5}},
        {"kind": "epoch", "epoch": 2, "reward": {"total": {"mean": 0.6}},
         "seconds": {"sampling": 3.0, "reward": 1.0, "update": 4.0, "selection": 1.0, "eval": 20.0, "total": 29.5}},
        {"kind": "eval", "epoch": 2, "overall": {"all_requested_shown": 0.3}},
        {"kind": "end", "epoch": 2},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    epochs, evals = our_epochs(path)
    assert [e["seconds"]["total"] for e in epochs] == [9.5, 9.5]
    assert "eval" not in epochs[1]["seconds"] and epochs[1]["reward_mean"] == 0.6
    assert evals == {0: {"all_requested_shown": 0.2}, 2: {"all_requested_shown": 0.3}}


# -- the trl environment ------------------------------------------------------------------------

def _fake_env(folder, marker: dict | str | None):
    python = trl_bench.env_python(folder)
    python.parent.mkdir(parents=True)
    python.write_text("")
    if marker is not None:
        (folder / trl_bench.ENV_MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    return python


def test_marker_matches_only_a_complete_env_for_this_trl_and_base(tmp_path):
    expected = expected_marker(["/base/site-packages"])
    assert expected["trl"] == "0.23.1" and expected["python"] == ".".join(map(str, sys.version_info[:3]))
    assert not marker_matches(tmp_path / "absent", expected)
    assert not marker_matches(tmp_path, expected)  # no python, no marker
    _fake_env(tmp_path / "ok", {**expected, "added": [], "created": "now"})
    assert marker_matches(tmp_path / "ok", expected)
    _fake_env(tmp_path / "old", {**expected, "trl": "0.22.0"})
    assert not marker_matches(tmp_path / "old", expected)
    _fake_env(tmp_path / "moved", {**expected, "base_site_packages": ["/elsewhere"]})
    assert not marker_matches(tmp_path / "moved", expected)
    _fake_env(tmp_path / "torn", '{"trl": "0.23')  # interrupted while writing
    assert not marker_matches(tmp_path / "torn", expected)
    _fake_env(tmp_path / "unfinished", None)  # the marker is written last
    assert not marker_matches(tmp_path / "unfinished", expected)


def test_ensure_trl_env_is_idempotent(tmp_path, monkeypatch):
    python = _fake_env(tmp_path / "env", expected_marker())

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a ready environment must not be rebuilt")

    monkeypatch.setattr(trl_bench.subprocess, "run", no_subprocess)
    said = []
    assert ensure_trl_env(tmp_path / "env", log=said.append) == python.resolve()
    assert len(said) == 1 and "0.23.1" in said[0]


def test_the_pth_file_adds_sites_with_their_own_pth_files():
    text = trl_bench.pth_lines(["/a/site-packages", "/b's/site-packages"])
    lines = text.splitlines()
    assert len(lines) == 2 and all(line.startswith("import site; site.addsitedir(") for line in lines)
    namespace: dict = {}
    added = []
    exec(lines[1].replace("import site; site.addsitedir", "added.append"), {"added": added}, namespace)
    assert added == ["/b's/site-packages"]


# -- the runner's adapters (imported without trl) ---------------------------------------------------

def test_runner_imports_without_trl():
    import importlib.util

    from pipelines import trl_ddpo_runner

    assert trl_ddpo_runner.TRL_VERSION == trl_bench.TRL_VERSION
    if importlib.util.find_spec("trl") is None:  # the main environment: the runner's pure parts still import
        assert trl_ddpo_runner.DDPOStableDiffusionPipeline is object


def test_pack_round_trip():
    from pipelines.trl_ddpo_runner import COND, PackLayout

    layout = PackLayout(tokens=7, width=4, class_dim=6)  # meta 15 values -> 4 rows
    assert layout.meta_rows == 4 and layout.length == 11
    g = torch.Generator().manual_seed(0)
    tokens, mask = torch.randn(3, 5, 4, generator=g), torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 1]])
    class_emb, ids = torch.randn(3, 6, generator=g), torch.tensor([4, 1, 300000])
    packed = layout.pack(tokens, mask, class_emb, ids, COND)
    out_tokens, out_mask, out_class, out_ids, kinds = layout.unpack(packed)
    assert torch.equal(out_tokens[:, :5], tokens) and not out_tokens[:, 5:].any()
    assert torch.equal(out_mask[:, :5], mask) and not out_mask[:, 5:].any()
    assert torch.equal(out_class, class_emb) and torch.equal(out_ids, ids) and bool((kinds == COND).all())
    with pytest.raises(ValueError, match="not packed"):
        layout.unpack(tokens)


def _item(modality, prompt, negative=""):
    from agents.requests import ImagePrompt

    return ImagePrompt(modality, prompt, prompt, negative, (), f"{modality}:x")


def test_prompt_book_is_trls_tokenizer():
    from pipelines.trl_ddpo_runner import PromptBook, PromptSchedule

    book = PromptBook()
    a, b = _item("cxr", "left effusion"), _item("oct", "drusen", "no fluid")
    schedule = PromptSchedule([[a, b], [b]], repeats=2, book=book, per_group=True)
    keys = [schedule()[0] for _ in range(6)]
    assert keys[0] == keys[1] != keys[2] == keys[3] != keys[4]  # K in a row; each group its own key
    assert keys[4].startswith("2:0 | oct") and keys[2].startswith("1:1 | oct")
    with pytest.raises(RuntimeError):
        schedule()
    ids = book(keys, return_tensors="pt", padding="max_length", truncation=True, max_length=book.model_max_length).input_ids
    assert ids.shape == (6, 1) and 0 not in ids
    assert book.batch_decode(ids.numpy(), skip_special_tokens=True) == keys
    assert book([""]).input_ids.tolist() == [[0]] and book("").input_ids.tolist() == [[0]]  # trl's negative prompt
    assert book.items[int(ids[4, 0])] is b
    with pytest.raises(KeyError):
        book(["never given"])
    shared = PromptSchedule([[a, a]], repeats=1, book=PromptBook())
    assert shared()[0] == shared()[0]  # without per_group, the same words share trl's statistics


# -- the hook reproduces our sampler through diffusers' pipeline --------------------------------------

@pytest.fixture(scope="module")
def model():
    from generator.conditioning import TextEncoder
    from generator.config import ModelConfig
    from generator.models import LatentDiffusion

    cfg = ModelConfig(image_size=16, vae_channels=[8, 16], latent_channels=4, unet_channels=[16, 32], unet_attention_heads=2,
                      cross_attention_dim=32, text_max_length=16, prediction_type="v_prediction")
    torch.manual_seed(0)
    model = LatentDiffusion(cfg, ["cxr", "oct"], text_encoder=TextEncoder(cfg.text_encoder, cfg.text_max_length)).eval()
    torch.nn.init.normal_(model.conditioner.fuse[-1].weight, std=0.5)  # a class signal, so the packed vector matters
    model.vae.register_to_config(scaling_factor=0.7)
    model.scaling_factor = 0.7
    return model


def test_packed_conditioning_draws_our_images(model):
    """diffusers' own loop, fed trl's way (prompt_embeds from the "text encoder", one negative placeholder
    for all), draws what our sampler draws with per-request negatives: the hook carries mask, class
    vector and each request's negative."""
    from generator.lora import LoraSpec
    from generator.models import latent_size
    from generator.sampling import initial_noise, sample
    from pipelines.trl_ddpo_runner import SynthmedDDPOPipeline

    items = [_item("cxr", "moderate right pleural effusion", "no pneumothorax"), _item("oct", "drusen")]
    pipe = SynthmedDDPOPipeline(model, LoraSpec(rank=2, alpha=2.0))
    try:
        keys = [pipe.book.register(it) for it in items]
        embeds = pipe.text_encoder(pipe.tokenizer(keys).input_ids)[0]
        negative = pipe.text_encoder(pipe.tokenizer([""] * 2).input_ids)[0]
        assert embeds.shape == negative.shape == (2, pipe.layout.length, 32)
        size = latent_size(model.cfg)
        latents, _ = initial_noise(2, (4, size, size), 3)
        with torch.no_grad():
            theirs = pipe.sd_pipeline(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=4, guidance_scale=3.0,
                                      output_type="pt", height=16, width=16, latents=latents.clone()).images * 2 - 1
    finally:
        pipe.close()
    ours = sample(model, [it.prompt for it in items], [it.modality for it in items], negative=[it.negative for it in items],
                  guidance=3.0, steps=4, seed=3).images
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()


def test_trl_loss_call_gets_the_same_unet_inputs(model):
    """trl's loss calls ``unet(latents, timesteps, embeds)`` positionally, negative placeholders first."""
    from generator.lora import LoraSpec
    from generator.sampling import guided_conditioning
    from pipelines.trl_ddpo_runner import SynthmedDDPOPipeline

    items = [_item("oct", "drusen", "no fluid"), _item("cxr", "cardiomegaly")]
    pipe = SynthmedDDPOPipeline(model, LoraSpec(rank=2, alpha=2.0))
    try:
        embeds = pipe.text_encoder(pipe.tokenizer([pipe.book.register(it) for it in items]).input_ids)[0]
        placeholder = pipe.text_encoder(pipe.tokenizer([""]).input_ids)[0].repeat(2, 1, 1)
        x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([501, 21])
        with torch.no_grad():
            theirs = pipe.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([placeholder, embeds])).sample
    finally:
        pipe.close()
    cond = guided_conditioning(model, [it.prompt for it in items], [it.modality for it in items], [it.negative for it in items], 3.0)
    with torch.no_grad():
        ours = model.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask,
                          class_labels=cond.class_emb).sample
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_epoch_timer_times_trls_phases_without_changing_them():
    from pipelines.trl_ddpo_runner import EpochTimer

    calls = []

    class FakeTrainer:
        def _generate_samples(self, iterations, batch_size):
            calls.append("sample")
            return ["samples"], ["pairs"]

        def compute_rewards(self, pairs, is_async=False):
            calls.append("reward")
            return zip(*[(torch.tensor([1.0, 3.0]), {"a": 1})])

        def _train_batched_samples(self, inner_epoch, epoch, global_step, batched):
            calls.append("update")
            return global_step + 1

        def step(self, epoch, global_step):
            self._generate_samples(1, 2)
            rewards, meta = self.compute_rewards(None)
            assert torch.cat(rewards).tolist() == [1.0, 3.0] and meta == ({"a": 1},)
            return self._train_batched_samples(0, epoch, global_step, [])

    trainer, seen, waited = FakeTrainer(), [], []
    timer = EpochTimer(trainer, seen.append, waited.append)
    assert trainer.step(0, 5) == 6 and trainer.step(1, 6) == 7
    assert calls == ["sample", "reward", "update"] * 2 and waited == [0, 1]
    assert [r["epoch"] for r in timer.epochs] == [1, 2] and seen == timer.epochs
    record = timer.epochs[0]
    assert set(record["seconds"]) == {"sampling", "reward", "update", "total"} and record["reward_mean"] == 2.0
    assert record["seconds"]["total"] >= max(v for k, v in record["seconds"].items() if k != "total")
    assert np.isfinite(record["cpu_seconds"])


# -- the command, our side only (trl's side needs its environment: see pipelines/trl_bench.py) --------

@pytest.mark.slow
def test_bench_improve_command_without_trl(tmp_path, capsys):
    from pipelines.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "improve", "--skip-trl", "--epochs", "1", "--prompts-per-epoch", "2", "--images-per-prompt", "2",
                 "--steps", "2", "--out", str(out), "--json", "--improve.prompts.modalities=[cxr]",
                 "--improve.prompts.heldout_per_modality=1", "--improve.prompts.test_per_modality=1", "--improve.eval.steps=2",
                 "--improve.selection.enabled=false"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((out / "bench.json").read_text())
    assert result["trl"] is None and result["epoch_speedup_vs_trl"] is None and result["trl_version"] == "0.23.1"
    s = result["settings"]
    assert (s["epochs"], s["samples_per_epoch"], s["steps"], s["threads"]) == (1, 4, 2, 1)
    assert s["adjusted_for_trl"]["sample_batch_size"] == {"configured": 20, "bench": 4}
    ours = result["ours"]
    assert ours["seconds_per_epoch"] > 0 and len(ours["epoch_seconds"]) == 1 and ours["cpu_seconds_ddpo"][0] > 0
    assert ours["gain"] == pytest.approx(ours["heldout_after"] - ours["heldout_base"])
