"""`synthmed bench faults --kill`: the checks catch planted damage; rounds through real subprocesses pass;
regressions for what the harness found (doubled metrics lines and unsaved generator states after a resume
of `train vae|unet`, an unseeded UNet initialisation)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from generator.config import TrainConfig
from generator.training import RunDir, batch_indices, run_loop
from pipelines.faults import (
    SCENARIOS,
    Checks,
    check_leftovers,
    check_loads,
    kill_plan,
    Outcome,
    read_jsonl,
    run_bench,
    sequence_problem,
    strip_volatile,
)
from pipelines.cli import main


# -- the checks can fail ---------------------------------------------------------------------------
def test_a_torn_last_line_and_an_unparsable_line_are_failures(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 0.5}\n{"step": 20, "lo')
    checks = Checks()
    assert read_jsonl(path, checks) == [{"step": 10, "loss": 0.5}]
    assert any("truncated" in f for f in checks.failures) and any("line 2 does not parse" in f for f in checks.failures)
    path.write_text('{"step": 10}\n{"step": 20}\n')
    clean = Checks()
    assert read_jsonl(path, clean) == [{"step": 10}, {"step": 20}] and clean.failures == [] and clean.done == 2


def test_a_doubled_or_missing_step_is_named():
    assert sequence_problem("m", [10, 20, 30], range(10, 31, 10)) is None
    assert "doubled [10]" in sequence_problem("m", [10, 10, 20, 30], range(10, 31, 10))
    assert "missing [20]" in sequence_problem("m", [10, 30], range(10, 31, 10))
    assert "out of order" in sequence_problem("m", [20, 10, 30], range(10, 31, 10))


def test_leftover_temporaries_and_empty_files_are_failures_and_the_lock_is_not(tmp_path):
    (tmp_path / "final.json").write_text("{}")
    (tmp_path / ".lock").touch()
    clean = Checks()
    check_leftovers(tmp_path, clean)
    assert clean.failures == []
    (tmp_path / ".final.json.123.abcd1234.tmp.json").write_text("{")
    (tmp_path / "checkpoints" / ".tmp_step_0000020").mkdir(parents=True)
    (tmp_path / "model.safetensors").touch()
    checks = Checks()
    check_leftovers(tmp_path, checks)
    assert len(checks.failures) == 3
    assert any("tmp.json" in f for f in checks.failures) and any(".tmp_step_" in f for f in checks.failures)
    assert any("zero-length file" in f and "model.safetensors" in f for f in checks.failures)


def test_files_that_do_not_load_are_failures(tmp_path):
    (tmp_path / "a.json").write_text('{"a": ')
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    (tmp_path / "m.csv").write_text("a,b\n1,2\n3\n")
    (tmp_path / "ok.json").write_text("{}")
    checks = Checks()
    check_loads(tmp_path, checks)
    assert len(checks.failures) == 3 and checks.done == 4


def test_volatile_fields_and_the_round_folder_are_ignored_when_comparing(tmp_path):
    a = strip_volatile({"loss": 1.0, "seconds": 3.2, "time": 4, "run": f"{tmp_path}/x", "nested": {"created": "now", "n": 2}}, tmp_path)
    assert a == {"loss": 1.0, "run": "<work>/x", "nested": {"n": 2}}


def test_the_kill_moment_is_seeded_and_follows_the_reference_events(tmp_path):
    reference = Outcome(0, 10.0, False, 5, [(0.0, 0), (4.0, 2), (6.0, 5)], tmp_path / "log")
    moments = []
    for _ in range(2):
        due = kill_plan(random.Random(7), reference, 0)
        moments.append(next(t / 10 for t in range(0, 200) if due(t / 10, 5 if t >= 60 else 2 if t >= 40 else 0)))
    assert moments[0] == moments[1]


# -- regressions for what the harness found --------------------------------------------------------
def _noisy_run(run_dir, stop_after=None):
    """A loop whose loss draws from its own generator, as the VAE's and the UNet's do."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    x = torch.linspace(-1, 1, 24).reshape(8, 3)
    y = x.sum(1, keepdim=True)
    generator = torch.Generator().manual_seed(0)
    words = random.Random(0)
    cfg = TrainConfig(lr=0.05, batch_size=4, max_steps=12, warmup_steps=1, checkpoint_every=4, validate_every=100, ema_decay=0)

    def loss_fn(step, micro):
        idx = torch.from_numpy(batch_indices(8, 4, step, micro, 1, 0))
        noise = torch.randn(4, 1, generator=generator) * words.random()
        return torch.nn.functional.mse_loss(net(x[idx]) + noise, y[idx]), {}

    result = run_loop(RunDir(run_dir), cfg, [net], list(net.parameters()), loss_fn, progress=False, stop_after=stop_after,
                      generators=[generator, words])
    return net, result


def test_a_resumed_training_run_logs_each_step_once_and_draws_what_the_uninterrupted_one_drew(tmp_path):
    straight_dir, killed_dir = tmp_path / "a", tmp_path / "b"
    for d in (straight_dir, killed_dir):
        (d / "checkpoints").mkdir(parents=True)
    straight, _ = _noisy_run(straight_dir)
    _noisy_run(killed_dir, stop_after=11)  # logged step 10 after the step-8 checkpoint, then killed
    with open(killed_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # and a torn line
    resumed, result = _noisy_run(killed_dir)
    assert result.resumed_from == 8
    lines = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 12]
    want = [json.loads(line) for line in (straight_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == [r["loss"] for r in want]
    assert torch.equal(resumed.weight, straight.weight)
    assert (killed_dir / "metrics.jsonl.orphaned").read_text().count("\n") == 2  # the doubled line and the torn one, kept aside


def test_the_unet_starts_from_the_same_weights_whatever_the_process_seed(tmp_path, monkeypatch):
    from generator.models import LatentDiffusion
    from pipelines.commands import train as train_cmd
    from pipelines.config import load_config

    from generator.config import ModelConfig

    tiny = {"image_size": 32, "vae_channels": [8, 16], "latent_channels": 4, "unet_channels": [16, 32], "unet_attention_heads": 2,
            "cross_attention_dim": 32, "text_max_length": 16}
    LatentDiffusion(ModelConfig(**tiny), ["cxr"]).vae.save_pretrained(tmp_path / "model" / "vae")
    cfg = load_config("tiny", {**{f"model.{k}": v for k, v in tiny.items()}, "train.out": str(tmp_path / "model")})
    seen = []
    monkeypatch.setattr("generator.trainers.train_unet",
                        lambda model, *a, **k: seen.append(torch.cat([p.flatten() for p in model.unet.parameters()])) or {})
    for seed in (1, 2):
        torch.manual_seed(seed)  # what a fresh process starts with: a random seed
        train_cmd._train_unet(cfg, [], None, tmp_path / "out", progress=False)
    assert torch.equal(seen[0], seen[1])


def test_validation_leaves_the_frozen_text_encoder_in_eval_mode(tmp_path):
    from generator.config import ModelConfig
    from generator.models import LatentDiffusion
    from generator.trainers import validation_samples
    from pipelines.config import load_config

    model = LatentDiffusion(ModelConfig(image_size=32, vae_channels=[8, 16], unet_channels=[16, 32], unet_attention_heads=2,
                                        cross_attention_dim=32, text_max_length=16), ["cxr"])
    model.train()
    model.conditioner.text_encoder.eval()  # as from_pretrained leaves it: no dropout in the frozen encoder
    validation_samples(model, RunDir(tmp_path), 1, load_config("tiny").data, steps=2)
    assert model.unet.training and not model.conditioner.text_encoder.model.training  # a resumed run sees the same modes


# -- rounds through real subprocesses ---------------------------------------------------------------
def _bench(tmp_path, slug: str, rounds: int = 1) -> dict:
    report = run_bench([slug], rounds=rounds, seed=1, out=tmp_path / "faults", progress=False)
    tally = report["commands"][SCENARIOS[slug].name]
    assert tally["failures"] == [], json.dumps(tally["failures"], indent=2)
    assert tally["rounds"] == rounds and tally["resumes_survived"] == rounds and tally["checks"] > 5
    assert tally["kills"] + tally["ended_before_kill"] >= rounds
    return tally


@pytest.mark.slow
def test_train_vae_survives_kills_through_the_cli(tmp_path, capsys):
    assert main(["bench", "faults", "--kill", "--rounds", "1", "--commands", "train-vae", "--out", str(tmp_path / "cli"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["failed_rounds"] == 0 and report["commands"]["train vae"]["kills"] >= 1
    assert json.loads((tmp_path / "cli" / "faults.json").read_text())["commands"].keys() == {"train vae"}
    assert not list((tmp_path / "cli" / "train-vae").glob("round-*"))  # passed rounds are cleaned up
    shutil.rmtree(tmp_path / "cli")


@pytest.mark.slow
@pytest.mark.parametrize("slug", ["improve", "synthesize"])  # the other commands: `synthmed bench faults --kill` (train vae: the CLI test above)
def test_each_command_survives_kills(tmp_path, slug):
    _bench(tmp_path, slug)


def test_unknown_commands_are_one_clear_error(capsys):
    assert main(["bench", "faults", "--kill", "--commands", "train-gan"]) == 2
    assert "unknown train-gan" in capsys.readouterr().err
