"""Stage 2 with reward-guided candidates (``improve.selection.source=guided``): reward guidance's arithmetic, the guided
drafts (deterministic, batch-independent, the unguided DDIM draw as the scale goes to 0, a higher reward-classifier
likelihood than the unguided draw), and a real `synthmed improve` run that distils them."""

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler
from PIL import Image

from generator.ddim_logprob import ddim_step_with_logprob
from generator.errors import SynthmedError
from pipelines.cli import main as cli
from pipelines.config import load_config
from pipelines.improve import build_parts
from rlhf.ddpo import findings_log_likelihood, guidance_shift, output_for_x0, predicted_x0
from rlhf.trainer import DDPOTrainer, sample_seed
import test_improve
from test_improve import lines, settings, without_timing, write_profile

base_model = test_improve.base_model  # the tiny five-modality model (a module-scoped fixture)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_output_for_x0_inverts_predicted_x0_and_a_ddim_step_predicts_the_moved_x0(kind):
    torch.manual_seed(0)
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type=kind, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    x_t, output = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = scheduler.timesteps[3]
    alpha = scheduler.alphas_cumprod[int(t)]
    x0 = predicted_x0(output, x_t, alpha, kind)
    assert torch.allclose(x0, ddim_step_with_logprob(scheduler, output, t, x_t, eta=0.0).pred_original_sample, atol=1e-5)
    assert torch.allclose(output_for_x0(x0, x_t, alpha, kind), output, atol=1e-4)
    moved = x0 + 0.3 * torch.randn_like(x0)
    step = ddim_step_with_logprob(scheduler, output_for_x0(moved, x_t, alpha, kind), t, x_t, eta=0.0)
    assert torch.allclose(step.pred_original_sample, moved, atol=1e-4)


def test_guidance_shift_is_a_normalised_step_that_grows_as_the_noise_falls():
    grad = torch.zeros(3, 4, 8, 8)
    grad[0] = 1e-7  # a flat classifier's tiny gradient and a steep one's large one make steps of one size
    grad[1] = torch.randn(4, 8, 8) * 1e3
    for alpha in (torch.tensor(0.04), torch.tensor(0.81)):
        shift = guidance_shift(grad, 0.5, alpha)
        rms = shift.pow(2).mean(dim=(1, 2, 3)).sqrt()
        assert torch.allclose(rms[:2], torch.full((2,), 0.5 * float(alpha.sqrt())), rtol=1e-5)
        assert rms[2] == 0  # no gradient, no step
    assert torch.allclose(guidance_shift(grad, 0.5, torch.tensor(0.81))[1] / grad[1], torch.full_like(grad[1], 0.45 / grad[1].pow(2).mean().sqrt()))


def _trainer(tmp_path, base, **extra):
    cfg = load_config(write_profile(tmp_path, settings(base, **{"improve.selection.source": "guided", "improve.ddpo.steps": 3,
                                                               **extra})))
    parts = build_parts(cfg, progress=False, load_eval=False)
    ic = cfg.improve
    return DDPOTrainer(parts.model, parts.reward, ic.ddpo, ic.selection, Accelerator(cpu=True), None), parts


def _log_likelihood(trainer, images, items) -> np.ndarray:
    out = []
    with torch.no_grad():
        for image, it in zip(images, items):
            clf = trainer.reward.finding_scorer.classifiers[it.modality]
            value, _ = findings_log_likelihood(clf.differentiable_logits(image[None]), trainer._stated([it], clf.label_names))
            out.append(float(value))
    return np.array(out)


def test_guided_drafts_are_deterministic_batch_independent_and_raise_the_reward_classifiers_likelihood(base_model, tmp_path):
    from generator.sampling import sample

    trainer, parts = _trainer(tmp_path, base_model, **{"improve.selection.guidance_scale": 0.5})
    items = [p for p in parts.sampler.draw(8, 1, 0) if p.expected][:4]
    assert len(items) == 4
    indices = [3, 0, 7, 5]
    drafts = trainer.guided_drafts(items, indices, 1, progress=False)
    finals, images = drafts.finals, drafts.images
    assert finals.shape[0] == images.shape[0] == 4 and torch.isfinite(images).all()
    assert drafts.states.shape == drafts.targets.shape == (4, 3, *finals.shape[1:])
    # the recorded trajectory is the one taken: the last state stepped with the last guided output is the final latent
    last = ddim_step_with_logprob(parts.model.scheduler, drafts.targets[:, -1], trainer.timesteps[-1], drafts.states[:, -1], eta=0.0)
    assert torch.allclose(last.prev_sample, finals, atol=1e-5)
    trainer.cfg = trainer.cfg.model_copy(update={"sample_batch_size": 1})  # one at a time: the same drafts (views keyed by index)
    assert torch.allclose(trainer.guided_drafts(items, indices, 1, progress=False).finals, finals, atol=1e-4)

    # the unguided draw from the same noise: eta 0, the rollouts' steps and guidance
    cfg = trainer.cfg
    plain = torch.cat([sample(parts.model, [it.prompt], [it.modality], negative=[it.negative], guidance=cfg.guidance, steps=cfg.steps,
                              seed=sample_seed(cfg.seed, 1, i), eta=0.0, findings=[it.generator_findings]).images
                       for it, i in zip(items, indices)])
    guided = _log_likelihood(trainer, images, items)
    unguided = _log_likelihood(trainer, plain, items)
    assert guided.mean() > unguided.mean() + 0.05, (guided, unguided)
    assert (guided > unguided).sum() >= 3, (guided, unguided)

    trainer.selection = trainer.selection.model_copy(update={"guidance_scale": 1e-6})  # the scale to 0: the unguided draw
    faint = trainer.guided_drafts(items, indices, 1, progress=False).images
    assert torch.allclose(faint, plain, atol=1e-3)

    # guidance distillation: fitting the drafts' own steps brings the policy's guided prediction at those states closer to
    # the outputs the guided sampler took there
    trainer.selection = trainer.selection.model_copy(update={"target": "trajectory", "noise_draws": 3, "batch_size": 4})
    trainer.optimizer.param_groups[0]["lr"] = 1e-2

    def distance() -> float:
        from generator.sampling import guided_prediction

        with torch.no_grad():
            cond = trainer._conditioning(items)
            return float(sum(((guided_prediction(parts.model, drafts.states[:, j], trainer.timesteps[j].expand(4), cond, cfg.guidance)
                               - drafts.targets[:, j]) ** 2).mean() for j in range(3)))

    before = distance()
    seen = []
    for epoch in range(4):
        stats = trainer.selection_update(drafts.finals, items, np.ones(4), epoch, progress=False,
                                         trajectory=(drafts.states, drafts.targets))
        seen.append(distance())
    assert len(stats.steps) == 1 and np.isfinite(stats.steps[0]["loss"])
    # slowly (a rank-8 LoRA; the real runs' loss barely fell in 10 epochs, docs/improve/long_runs.md), but every step
    assert all(b < a for a, b in zip([before, *seen], seen)) and seen[-1] < 0.995 * before, (before, seen)
    with pytest.raises(SynthmedError, match="target=trajectory fits the guided drafts' own steps"):
        DDPOTrainer(parts.model, parts.reward, trainer.cfg, trainer.selection.model_copy(update={"source": "rollouts"}),
                    Accelerator(cpu=True), None)

    # a reward without the findings component has no classifier to guide by: refused when the trainer is built
    parts.reward.scorers.pop("findings")
    with pytest.raises(SynthmedError, match="improve.selection.source=guided needs the reward's findings component"):
        DDPOTrainer(parts.model, parts.reward, trainer.cfg, trainer.selection, Accelerator(cpu=True), None)


def test_a_guided_run_distils_its_drafts_and_logs_them(base_model, tmp_path, capsys):
    profile = write_profile(tmp_path, settings(base_model, **{"improve.selection.source": "guided", "improve.ddpo.epochs": 1,
                                                             "improve.selection.max_per_epoch": 4, "improve.selection.passes": 2,
                                                             "improve.selection.fit": "guided",
                                                             "improve.eval.reference_per_request": 0,
                                                             "improve.prompts.test_per_modality": 1}))
    run = tmp_path / "run"
    assert cli(["improve", "--config", str(profile), "--run-dir", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    assert "guided drafts" in capsys.readouterr().out
    records = lines(run / "metrics.jsonl")
    epoch = next(r for r in records if r["kind"] == "epoch")
    assert epoch["seconds"]["guided"] > 0 and epoch["selected"] == 4  # threshold 0, no verifier: every draft is a candidate
    assert set(epoch["guided_reward"]) == set(epoch["reward"])
    assert [r["stage"] for r in records if r["kind"] == "step"] == ["ddpo"] + ["selection"] * 4  # 2 passes of 2 steps
    samples = lines(run / "samples.jsonl")
    assert all("guided" in s and np.isfinite(s["guided"]["reward"]) for s in samples)
    assert sum(s["selected"] for s in samples) == 4
    assert (run / "grids" / "epoch_0001_guided.png").is_file()
    guided = [r for r in records if r["kind"] == "guided"]  # the held-out requests drawn by the guided sampler, once
    assert len(guided) == 1 and guided[0]["epoch"] == 0 and set(guided[0]["per_modality"]) == {"cxr", "oct"}
    base = next(r for r in records if r["kind"] == "eval" and r["epoch"] == 0)
    assert guided[0]["overall"]["fd"] != base["overall"]["fd"]  # its own images, not the base's
    assert cli(["runs", "show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "guided findings" in shown  # the drafts' reward beside the rollouts'
    assert "reward-guided drafts of the base" in shown and "guided " in shown.split("seconds per epoch")[1]
    # the untouched test prompts drawn by the guided sampler on the base: a test row, which `runs test` reproduces
    tested = {r["adapter"]: r for r in records if r["kind"] == "test"}
    assert {"base", "guided", "final"} <= set(tested) and tested["guided"]["epoch"] == 0
    assert tested["guided"]["scale"] == 0.1 and tested["guided"]["overall"] != tested["base"]["overall"]
    assert "base, reward-guided 0.100 (epoch 0)" in shown.split("untouched test prompts")[1]
    assert cli(["runs", "test", str(run), "--json"]) == 0
    again = {r["adapter"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert again["guided"]["overall"] == tested["guided"]["overall"] and again["base"]["overall"] == tested["base"]["overall"]



def test_a_table_target_run_fits_the_offset_table_to_every_epochs_drafts_and_resumes_it(base_model, tmp_path, capsys):
    """improve.selection.target=table with stage 1 off (objective none): the base's guided drafts join the offset table's
    data each epoch (kept in the checkpoint), the selection waits for table_warmup drafts and then fits the selected
    requests' table-steered draws, with the last epoch's again (table_replay, kept in the checkpoint too), the table as of
    the last epoch is saved in the run folder, and a run killed mid-epoch resumes to the metrics of an uninterrupted one."""
    from pipelines.improve import run_improve
    from rlhf.amortised import OffsetTable

    # the shipped `table` profile (objective none, guided drafts, target table, 32 requests x 1 step a batch), at the
    # tiny loop's sizes: 2 selected a batch, one pass
    cfg = load_config(write_profile(tmp_path, settings(base_model, **{"improve.selection.max_per_epoch": 2,
                                                                      "improve.selection.passes": 1,
                                                                      "improve.selection.table_warmup": 5,
                                                                      "improve.selection.table_replay": 1,
                                                                      "improve.ddpo.epochs": 3,
                                                                      "improve.eval.reference_per_request": 0,
                                                                      "improve.prompts.test_per_modality": 1,
                                                                      "improve.num_threads": 0}),  # the worker's 1 thread
                                    extends="table"))
    ic = cfg.improve
    assert (ic.ddpo.objective, ic.selection.source, ic.selection.target, cfg.lora.include_out) == ("none", "guided", "table", True)
    end = run_improve(cfg, tmp_path / "whole", progress=False)
    records = lines(tmp_path / "whole" / "metrics.jsonl")
    # the table profile ends by steering (improve.eval.steer_gammas): each gamma judged on the held-out set, steer.json
    steer = json.loads((tmp_path / "whole" / "steer.json").read_text())
    assert [g["gamma"] for g in steer["gammas"]] == ic.eval.steer_gammas == [1, 1.25, 1.5, 1.75, 2]
    assert end["steered"]["gamma"] == steer["gamma"] and end["steered"]["heldout"] == steer["heldout"]
    assert (tmp_path / "whole" / "steered").is_dir() == (steer["gamma"] is not None)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [e["offset_table"]["drafts"] for e in epochs] == [4, 8, 12]  # 2 prompts x 2 images an epoch, every epoch's kept
    assert all(len(e["offset_table"]["r2"]) == 2 and e["offset_table"]["features"] >= 2 for e in epochs)
    # the warm-up: 4 drafts < 5, so epoch 1 selects nothing and trains nothing; epochs 2 and 3 fit 2 selected each, and
    # epoch 3 epoch 2's 2 again (the replay): 1 step of 2, then 2 of 2
    assert [e["offset_table"]["fitted"] for e in epochs] == [False, True, True] and [e["selected"] for e in epochs] == [0, 2, 2]
    assert [e["offset_table"].get("replayed") for e in epochs] == [None, 0, 2]
    samples = lines(tmp_path / "whole" / "samples.jsonl")
    assert not any(s["selected"] for s in samples if s["epoch"] == 1)
    # objective none: no stage-1 step, the rollouts judged all the same
    assert [(r["stage"], r["epoch"]) for r in records if r["kind"] == "step"] == [("selection", 2), ("selection", 3), ("selection", 3)]
    assert all(e["n_samples"] == 4 and e["reward"]["total"]["mean"] is not None for e in epochs)
    assert cli(["runs", "show", str(tmp_path / "whole")]) == 0
    shown = capsys.readouterr().out
    assert "table drafts" in shown and "offset_table.safetensors" in shown  # the reward table's columns; the table's file
    state = torch.load(tmp_path / "whole" / "checkpoints" / "epoch_0003" / "trainer_state.pt", weights_only=True)
    pool = state["trainer"]["offset_pool"]
    assert len(pool["features"]) == 12 and pool["shifts"].shape[:2] == (12, 2)
    # the replay keeps the last epoch's selected requests (their sample indices) with their steered draws' steps
    (kept,) = state["trainer"]["replay"]
    assert kept["epoch"] == 3 and kept["indices"] == [s["index"] for s in samples if s["epoch"] == 3 and s["selected"]]
    assert kept["states"].shape[:2] == (2, 2) and kept["states"].dtype == torch.float16 and kept["step_norm"].shape == (2,)
    # the saved table is the one the last checkpoint's drafts give: refitted from them, it is the same to the last bit
    saved = OffsetTable.load(tmp_path / "whole" / "offset_table.safetensors")
    refit = OffsetTable.fit(pool["features"], pool["shifts"].float(), saved.timesteps, cfg.improve.selection.table_ridge)
    assert saved.features == refit.features and torch.equal(saved.weights, refit.weights)
    _steer_the_run(tmp_path / "whole", saved, base_model, tmp_path, capsys)

    killed = tmp_path / "killed"
    with pytest.raises(SystemExit):
        run_improve(cfg, killed, progress=False, stop_after=lambda point, epoch: point == "update" and epoch == 3)
    run_improve(cfg, killed, resume=True, progress=False)
    assert without_timing(lines(killed / "metrics.jsonl")) == without_timing(records)


def _steer_the_run(run, saved, base_model, tmp_path, capsys):
    """`synthmed runs steer` on a table-stage run: gamma x its table chosen on the held-out set, written to steered/,
    judged once on the test prompts as `runs test` judges it, shown by `runs show`, drawn by `synthmed sample --lora`."""
    from rlhf.amortised import OffsetTable

    assert cli(["runs", "steer", str(run), "--gammas", "0.02,0.01", "--no-margin", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [g["gamma"] for g in out["gammas"]] == [0.01, 0.02] and out["gamma"] in (0.01, 0.02)
    assert out["heldout"]["base"]["all_requested_shown"] == next(r for r in lines(run / "metrics.jsonl")
                                                                 if r["kind"] == "eval")["overall"]["all_requested_shown"]
    steered = run / "steered"
    assert sorted(p.name for p in steered.iterdir()) == ["metadata.json", "offset_table.safetensors", "steering.json"]
    info = json.loads((steered / "steering.json").read_text())
    # with what the run's requests imply (oct: choroidal neovascularisation is asked for with its subretinal fluid)
    assert info["gamma"] == out["gamma"] and info["implies"]["oct"]["choroidal_neovascularization"] == ["subretinal_fluid"]
    assert torch.equal(OffsetTable.load(steered / "offset_table.safetensors").weights, saved.weights)
    # `runs test` judges it beside the run's base and adapters, figure for figure as `runs steer` did once
    assert cli(["runs", "test", str(run)]) == 0
    assert f"steered: base + table x{out['gamma']:g} (table of epoch 3)" in capsys.readouterr().out
    rows = {r["adapter"]: r for r in json.loads((run / "test.json").read_text())["results"]}
    assert list(rows)[0] == "base" and list(rows)[-1] == "steered" and rows["steered"]["gamma"] == out["gamma"]
    for key in ("all_requested_shown", "fd", "ms_ssim"):
        assert rows["steered"]["overall"][key] == pytest.approx(out["test"]["steered"][key])
    assert cli(["runs", "show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "table steering (synthmed runs steer)" in shown and f"base + table x{out['gamma']:g} " in shown
    # `synthmed sample --lora steered/`: the base moved by the table at the kept gamma, for the findings it is given
    _, finding, _, side = next(f.split("|") for f in saved.features if f.startswith("cxr|") and "|present|" in f)
    stated = {"name": finding, "present": True, **({"laterality": side} if side != "-" else {})}
    finding += f":laterality={side}" if side != "-" else ""
    drawn = {}
    for name, lora in (("plain", []), ("steered", ["--lora", str(steered), "--finding", finding])):  # the base reads text alone
        assert cli(["sample", "A finding.", "--modality", "cxr", "--n", "2", "--steps", "2", "--model", str(base_model), *lora,
                    "--out", str(tmp_path / name)]) == 0
        drawn[name] = [np.asarray(Image.open(p)) for p in sorted((tmp_path / name).glob("*.png"))]
    record = lines(tmp_path / "steered" / "samples.jsonl")[-1]
    assert record["steering"]["gamma"] == out["gamma"] and record["findings"] == [stated]
    assert record["steering"]["steered_by"] == ["cxr|_bias", "|".join(["cxr", stated["name"], "present", side])]
    assert any((a != b).any() for a, b in zip(drawn["plain"], drawn["steered"]))
    assert cli(["sample", "A finding.", "--modality", "cxr", "--n", "1", "--steps", "2", "--model", str(base_model),
                "--lora", str(steered), "--finding", "no_such_finding", "--out", str(tmp_path / "bad")]) == 2
    assert "steering table" in capsys.readouterr().err
    # `synthmed eval --lora steered/` evaluates the steered policy and says so
    assert cli(["eval", "--model", str(base_model), "--lora", str(steered), "--modalities", "cxr", "--prompts", "1",
                "--n-per-prompt", "2", "--reference-per-finding", "2", "--steps", "2", "--json",
                f"--run.runs_dir={tmp_path / 'evals'}"]) == 0
    capsys.readouterr()
    evaluated = next((tmp_path / "evals").glob("*-eval-*"))
    assert json.loads((evaluated / "eval.json").read_text())["steering"]["gamma"] == out["gamma"]
    assert f"(steered by its offset table x{out['gamma']:g})" in (evaluated / "eval.md").read_text()
    # --per-modality: each modality's gamma on its own held-out images, and the held-out set drawn with them together
    assert cli(["runs", "steer", str(run), "--gammas", "0.02,0.01", "--no-margin", "--per-modality", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    split = out["per_modality"]
    assert set(split["gammas"]) == {"cxr", "oct"} and set(split["gammas"].values()) <= {0.0, 0.01, 0.02}
    assert set(split["why"]) == {"cxr", "oct"} and isinstance(split["kept"], bool) and "all_requested_shown" in split["heldout"]
    assert [g["gamma"] for g in out["gammas"]] == [0.01, 0.02]  # the sweep's lines, as without --per-modality
    info = json.loads((steered / "steering.json").read_text())
    assert info.get("gammas") == out.get("modality_gammas") == (split["gammas"] if split["kept"] else None)
    assert split["kept"] or split["refused"]
    assert cli(["runs", "show", str(run)]) == 0  # steer.json with its per-modality choice reads back
    assert "a gamma per modality (--per-modality)" in capsys.readouterr().out
    # a run without a table has nothing to steer by
    (run / "offset_table.safetensors").rename(run / "aside.safetensors")
    assert cli(["runs", "steer", str(run)]) == 2
    assert "has no offset table" in capsys.readouterr().err
    (run / "aside.safetensors").rename(run / "offset_table.safetensors")


def test_the_table_regression_starts_at_1_with_the_adapter_at_zero_and_falls(base_model, tmp_path):
    """selection.target=table: the base's guided drafts record guidance's shift at every state; the table fitted to them
    steers the base's draws, and the selection fits the policy's x0_hat to those draws' with each step's error divided by
    its mean squared offset: 1.0 while the adapter gives nothing (every selected request in one batch, every moved step
    visited once), less as it learns."""
    trainer, parts = _trainer(tmp_path, base_model, **{"improve.selection.target": "table", "improve.selection.batch_size": 4,
                                                        "improve.selection.guidance_scale": 0.5})
    items = [p for p in parts.sampler.draw(8, 1, 0) if p.expected][:4]
    indices = [0, 1, 2, 3]
    drafts = trainer.guided_drafts(items, indices, 1, progress=False, base=True)
    assert drafts.shifts.shape == drafts.states.shape and drafts.shifts[:, 1:].abs().amax() > 0
    trainer.keep_offset_drafts(items, drafts.shifts)
    table = trainer.offset_table()
    steered = trainer.table_drafts(items, indices, 1, table)
    norm = steered.shifts.pow(2).mean(dim=(0, 2, 3, 4))
    moved = int((norm > 1e-3 * norm.max()).sum())
    trainer.selection = trainer.selection.model_copy(update={"noise_draws": moved})
    trainer.optimizer.param_groups[0]["lr"] = 1e-2
    losses = [trainer.selection_update(steered.finals, items, np.linspace(0.1, 2.0, 4), epoch, progress=False,
                                       trajectory=(steered.states, steered.targets), step_norm=norm).steps[0]["loss"]
              for epoch in range(4)]
    assert losses[0] == pytest.approx(1.0, abs=1e-4), losses  # the rewards do not weigh: the target is the request's
    assert losses[-1] < losses[0], losses


def test_the_drafts_regression_starts_at_1_with_the_adapter_at_zero_and_falls(base_model, tmp_path):
    """selection.target=drafts: the table's regression on the base's guided drafts themselves: the policy's x0_hat at each
    state a draft passed against the draft's (the base's plus guidance's shift there), each step's error divided by the
    step's mean squared shift: 1.0 while the adapter gives nothing, whatever the rewards, and less as it learns."""
    trainer, parts = _trainer(tmp_path, base_model, **{"improve.selection.target": "drafts", "improve.selection.batch_size": 4,
                                                        "improve.selection.guidance_scale": 0.5})
    items = [p for p in parts.sampler.draw(8, 1, 0) if p.expected][:4]
    drafts = trainer.guided_drafts(items, [0, 1, 2, 3], 1, progress=False, base=True)
    norm = drafts.shifts.pow(2).mean(dim=(0, 2, 3, 4))
    moved = int((norm > 1e-3 * norm.max()).sum())
    assert moved >= 2
    trainer.selection = trainer.selection.model_copy(update={"noise_draws": moved})
    trainer.optimizer.param_groups[0]["lr"] = 1e-2
    losses = [trainer.selection_update(drafts.finals, items, np.linspace(0.1, 2.0, 4), epoch, progress=False,
                                       trajectory=(drafts.states, drafts.targets), step_norm=norm).steps[0]["loss"]
              for epoch in range(4)]
    assert losses[0] == pytest.approx(1.0, abs=1e-4), losses
    assert losses[-1] < losses[0], losses


def test_a_drafts_target_run_fits_the_base_drafts_in_the_regressions_units(base_model, tmp_path, capsys):
    """The loop's wiring of target=drafts: the drafts are the base's (objective none: nothing trains before the selection)
    and, in one batch, every draft is visited once at each of the steps guidance moved (3 steps; the first, at t=999,
    moves x0_hat by ~sqrt(alpha_t), nothing): the selection's first step is exactly the regression's 1.0."""
    profile = write_profile(tmp_path, settings(base_model, **{
        "improve.selection.source": "guided", "improve.selection.target": "drafts", "improve.ddpo.objective": "none",
        "improve.ddpo.steps": 3, "improve.ddpo.epochs": 1, "improve.selection.max_per_epoch": 4,
        "improve.selection.batch_size": 4, "improve.selection.noise_draws": 2, "improve.selection.passes": 2,
        "improve.selection.threshold": 0, "improve.selection.require_verifier_pass": False,
        "improve.selection.guidance_scale": 0.5, "improve.eval.reference_per_request": 0,
        "improve.prompts.test_per_modality": 0}))
    run = tmp_path / "run"
    assert cli(["improve", "--config", str(profile), "--run-dir", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    records = lines(run / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["stage"] for r in steps] == ["selection"] * 2 and all(r["samples"] == 4 for r in steps)
    assert steps[0]["loss"] == pytest.approx(1.0, abs=1e-4), steps  # not the output's units ("trajectory": ~1e-2)
    assert steps[1]["loss"] < steps[0]["loss"], steps
    assert next(r for r in records if r["kind"] == "epoch")["selected"] == 4
    samples = lines(run / "samples.jsonl")
    assert all("guided" in s for s in samples) and sum(s["selected"] for s in samples) == 4


def test_a_table_or_trajectory_target_needs_guided_drafts_and_a_run_needs_something_to_train(base_model, tmp_path, capsys):
    for target in ("table", "drafts"):
        (tmp_path / target).mkdir()
        profile = write_profile(tmp_path / target, settings(base_model, **{"improve.selection.target": target}))
        assert cli(["improve", "--config", str(profile), "--run-dir", str(tmp_path / target / "run"), "--no-progress"]) == 2
        assert f"improve.selection.target={target}" in capsys.readouterr().err
    (tmp_path / "idle").mkdir()
    idle = write_profile(tmp_path / "idle", settings(base_model, **{"improve.ddpo.objective": "none", "improve.selection.enabled": False}))
    assert cli(["improve", "--config", str(idle), "--run-dir", str(tmp_path / "idle_run"), "--no-progress"]) == 2
    assert "nothing would be trained" in capsys.readouterr().err
    (tmp_path / "replay").mkdir()  # the table's warm-up and replay without the table: refused, not ignored
    replay = write_profile(tmp_path / "replay", settings(base_model, **{"improve.selection.table_replay": 2}))
    assert cli(["improve", "--config", str(replay), "--run-dir", str(tmp_path / "replay_run"), "--no-progress"]) == 2
    assert "need improve.selection.target=table" in capsys.readouterr().err
    assert not (tmp_path / "replay_run" / "metrics.jsonl").exists()
    assert not (tmp_path / "idle_run" / "metrics.jsonl").exists()


def test_a_run_calibrates_reward_guidance_on_the_held_out_set_and_confirms_it_on_the_test_set(base_model, tmp_path, capsys):
    """improve.eval.guidance_scales: a guided line per scale at epoch 0, the best share within the gain's terms calibrated
    (a scale that wrecks the images is refused, naming why), its untouched test line, guidance.json, and `runs test`."""
    profile = write_profile(tmp_path, settings(base_model, **{"improve.ddpo.epochs": 1, "improve.eval.reference_per_request": 0,
                                                             "improve.prompts.test_per_modality": 1,
                                                             "improve.eval.guidance_scales": [50.0, 0.01]}))
    run = tmp_path / "run"
    assert cli(["improve", "--config", str(profile), "--run-dir", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    records = lines(run / "metrics.jsonl")
    guided = {r["scale"]: r for r in records if r["kind"] == "guided"}
    assert set(guided) == {0.01, 50.0} and all(r["epoch"] == 0 for r in guided.values())  # stage 2 draws none: only these
    base = next(r for r in records if r["kind"] == "eval" and r["epoch"] == 0)
    assert guided[50.0]["calibrated"] is False and guided[50.0]["overall"]["fd"] > 1.1 * base["overall"]["fd"]
    assert guided[50.0]["not_calibrated_because"].startswith("FD ")
    assert guided[0.01]["calibrated"] is True
    tested = {r["adapter"]: r for r in records if r["kind"] == "test"}
    assert tested["guided"]["scale"] == 0.01 and tested["guided"]["epoch"] == 0
    saved = json.loads((run / "guidance.json").read_text())
    assert saved["reward_guidance"] == 0.01 and [s["scale"] for s in saved["scales"]] == [0.01, 50.0]
    assert saved["heldout"]["guided"]["fd"] == guided[0.01]["overall"]["fd"]
    assert saved["test"]["guided"]["all_requested_shown"] == tested["guided"]["overall"]["all_requested_shown"]
    assert "--reward-guidance 0.01" in saved["use"]
    assert "base reward-guided at 0.01" in printed and "guidance.json" in printed
    assert cli(["runs", "show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "reward guidance calibrated on the held-out prompts" in shown and "calibrated reward guidance: 0.010" in shown
    assert "FD " in shown.split("reward-guided 50")[1].splitlines()[0]  # the refused scale says why
    assert "base, reward-guided 0.010 (epoch 0)" in shown
    assert cli(["runs", "test", str(run), "--json"]) == 0
    again = {r["adapter"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert again["guided"]["scale"] == 0.01 and again["guided"]["overall"] == tested["guided"]["overall"]
    # generate and synthesize with this run's adapter, drawing without guidance, are told of the calibrated scale
    from pipelines.commands.common import calibrated_guidance_note

    for given in (run, run / "best", run / "final" / "lora.safetensors"):
        assert "add --reward-guidance 0.01 " in calibrated_guidance_note([str(given)], 0.0)
    assert calibrated_guidance_note([str(run / "best")], 0.05) is None  # a scale given: the user's choice
    assert calibrated_guidance_note([str(tmp_path / "elsewhere.safetensors")], None) is None


def test_guidance_calibration_and_steering_refuse_bad_scales(base_model, tmp_path, capsys):
    for key, bad, why in (("guidance_scales", [0.1, 0.0], "above 0"), ("guidance_scales", [0.1, 0.1], "distinct"),
                          ("steer_gammas", [1.0, -1.0], "every steering gamma must be above 0"),
                          ("steer_gammas", [1.25], "steer by the offset table a run with improve.selection.target=table"),
                          ("steer_per_modality", True, "which is empty")):
        profile = write_profile(tmp_path, settings(base_model, **{f"improve.eval.{key}": bad}), name=f"bad{len(why)}.yaml")
        assert cli(["improve", "--config", str(profile), "--run-dir", str(tmp_path / "never"), "--no-progress"]) == 2
        assert why in capsys.readouterr().err
        assert not (tmp_path / "never").exists()  # refused before the run folder is made
