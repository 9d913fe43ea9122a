"""`synthmed improve --improve.ddpo.trainable=findings`: the loop tunes a finding-token model's finding table (prompt
tuning) instead of, or beside, the UNet's LoRA; the tuned table is checkpointed, resumed, saved beside the adapter and
loaded with it by --lora; the KL's reference is the base model's own table."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from generator.errors import UserError
from generator.models import FINDING_TABLE_FILE, LatentDiffusion, apply_model_adapters
from pipelines.cli import main as cli
from pipelines.config import load_config
from test_improve import TINY, lines, settings, write_profile

KEYS = ["cxr:pleural_effusion", "cxr:pneumothorax", "cxr:cardiomegaly", "cxr:consolidation", "oct:drusen", "oct:macular_hole",
        "oct:subretinal_fluid"]


@pytest.fixture(scope="module")
def table_model(tmp_path_factory):
    torch.manual_seed(0)
    model = LatentDiffusion(TINY.model_copy(update={"finding_tokens": True}), ["cxr", "oct"], findings=(KEYS, ["foveal"]))
    with torch.no_grad():  # a trained model's pooled path is not zero: the table's vectors reach the class embedding too
        model.conditioner.finding_pool.weight.normal_(std=0.05)
        model.conditioner.fuse[-1].weight.normal_(std=0.05)
    folder = tmp_path_factory.mktemp("ft") / "model"
    model.save(folder)
    return folder


def tuning(base, **extra):
    return settings(base, **{"improve.ddpo.trainable": "findings", "improve.ddpo.lr": 5e-2, **extra})


def test_the_loop_tunes_the_finding_table_alone_and_saves_it_beside_the_adapter(table_model, tmp_path, capsys):
    profile = write_profile(tmp_path, tuning(table_model, **{"improve.ddpo.kl_weight": 0.5, "improve.selection.noise_draws": 2}))
    run = tmp_path / "run"
    assert cli(["improve", "--config", str(profile), "--run-dir", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    steps = [r for r in lines(run / "metrics.jsonl") if r["kind"] == "step"]
    ddpo = [r for r in steps if r["stage"] == "ddpo"]
    # the reference is the base model's table: zero while the tuned one equals it, then the table moves away (the adapter
    # cannot: it is not trained, so with the tuned table as reference the KL would stay 0)
    assert ddpo[0]["kl"] == 0.0 and ddpo[-1]["kl"] > 0
    assert any(r["stage"] == "selection" for r in steps)  # stage 2 trains the table too (two noise draws share its graph)
    capsys.readouterr()
    assert cli(["runs", "show", str(run)]) == 0
    assert "trains the finding table (prompt tuning; the LoRA stays zero)" in capsys.readouterr().out

    adapter = load_file(run / "final" / "lora.safetensors")
    assert all(torch.count_nonzero(v) == 0 for k, v in adapter.items() if "lora_B" in k)  # the UNet is the base's
    base = LatentDiffusion.load(table_model)
    tuned = load_file(run / "final" / FINDING_TABLE_FILE)
    original = base.conditioner.finding_state_dict()
    assert tuned.keys() == original.keys()
    assert not torch.equal(tuned["findings.embedding.weight"], original["findings.embedding.weight"])
    assert all(torch.equal(tuned[k], original[k]) for k in tuned if k.startswith("finding_pool."))  # shared: not tuned
    assert (run / "best" / FINDING_TABLE_FILE).is_file()
    assert all((c / FINDING_TABLE_FILE).is_file() for c in (run / "checkpoints").glob("epoch_*"))

    # --lora loads the table with the adapter: the conditioning a request gets is the tuned one
    stated = [{"name": "pleural_effusion", "present": True, "laterality": "left"}, {"name": "pneumothorax", "present": False}]
    before = base.conditioner(["Left pleural effusion."], ["cxr"], [stated]).tokens
    apply_model_adapters(base, [str(run / "final")])
    after = base.conditioner(["Left pleural effusion."], ["cxr"], [stated]).tokens
    assert not torch.allclose(before, after)
    assert all(torch.equal(base.conditioner.finding_state_dict()[k], tuned[k]) for k in tuned)
    out = tmp_path / "images"
    assert cli(["sample", "Left pleural effusion.", "--modality", "cxr", "--n", "1", "--steps", "2", "--model", str(table_model),
                "--lora", str(run), "--finding", "pleural_effusion:laterality=left", "--finding", "pneumothorax:present=false",
                "--out", str(out)]) == 0
    assert list(out.glob("*.png"))
    record = lines(out / "samples.jsonl")[-1]
    assert record["findings"] == [{"name": "pleural_effusion", "present": True, "laterality": "left"},
                                  {"name": "pneumothorax", "present": False}]

    # a model without a finding table cannot take it; two tuned tables cannot be combined
    plain = LatentDiffusion(TINY, ["cxr", "oct"])
    with pytest.raises(UserError, match="no finding table"):
        apply_model_adapters(plain, [str(run / "final")])
    with pytest.raises(UserError, match="a model holds one"):
        apply_model_adapters(LatentDiffusion.load(table_model), [str(run / "final"), str(run / "best")])
    with safe_open(str(run / "final" / FINDING_TABLE_FILE), framework="pt") as f:
        assert "cxr:pleural_effusion" in f.metadata()["findings"]


def test_a_killed_tuning_run_resumes_its_table(table_model, tmp_path):
    """Also: with no tolerance at all (FD 0%, MS-SSIM rise 0) an evaluation whose images moved the wrong way is no
    candidate for best/, and says why."""
    import json

    from pipelines.improve import run_improve

    cfg = load_config(write_profile(tmp_path, tuning(table_model, **{
        "improve.ddpo.kl_weight": 0.1, "improve.guard.fd_tolerance": 0.0,
        "improve.guard.best_ms_ssim_rise": 0.0, "improve.guard.patience": 10})))
    whole = run_improve(cfg, tmp_path / "whole", progress=False)
    evals = [r for r in lines(tmp_path / "whole" / "metrics.jsonl") if r["kind"] == "eval"]
    base = evals[0]["overall"]
    refused = [r for r in evals if "not_best_because" in r]
    assert refused and all(not r["best"] for r in refused)
    for r in evals[1:]:
        worse = r["overall"]["fd"] > base["fd"] or r["overall"]["ms_ssim"] > base["ms_ssim"]
        assert ("not_best_because" in r) == worse, r
    assert json.loads((tmp_path / "whole" / "best" / "metadata.json").read_text())["epoch"] not in {r["epoch"] for r in refused}

    killed = tmp_path / "killed"
    with pytest.raises(SystemExit):
        run_improve(cfg, killed, progress=False, stop_after=lambda point, epoch: point == "update" and epoch == 2)
    resumed = run_improve(cfg, killed, resume=True, progress=False)
    assert whole["status"] == resumed["status"] == "finished"
    a, b = load_file(killed / "final" / FINDING_TABLE_FILE), load_file(tmp_path / "whole" / "final" / FINDING_TABLE_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(lines(killed / "metrics.jsonl")) == strip(lines(tmp_path / "whole" / "metrics.jsonl"))


def test_the_reward_gradient_tunes_the_table_and_a_model_without_one_is_refused(table_model, tmp_path, capsys):
    from test_improve import TINY as tiny

    profile = write_profile(tmp_path, tuning(table_model, **{"improve.ddpo.objective": "draft", "improve.ddpo.epochs": 1}))
    run = tmp_path / "run"
    assert cli(["improve", "--config", str(profile), "--run-dir", str(run), "--no-progress", "--no-selection"]) == 0
    tuned = load_file(run / "final" / FINDING_TABLE_FILE)
    assert not torch.equal(tuned["findings.embedding.weight"],
                           LatentDiffusion.load(table_model).conditioner.finding_state_dict()["findings.embedding.weight"])

    torch.manual_seed(0)
    plain = tmp_path / "plain"
    LatentDiffusion(tiny, ["cxr", "oct"]).save(plain)
    profile = write_profile(tmp_path, tuning(plain), name="plain.yaml")
    capsys.readouterr()
    assert cli(["improve", "--config", str(profile), "--run-dir", str(tmp_path / "refused"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has none" in err and "model.finding_tokens" in err and err.count("\n") <= 3


@pytest.mark.parametrize("finding, message", [
    ("drusen", "no cxr finding of that name; it knows cardiomegaly, consolidation, pleural_effusion, pneumothorax"),
    ("pleural_effusion:side=left", "is not key=value with a key of present, laterality"),
    ("pleural_effusion:severity=huge", "severity must be one of mild, small, moderate, medium, severe, large"),
    (":laterality=left", "names no finding"),
])
def test_sample_reads_findings_and_refuses_what_the_model_cannot_read(table_model, tmp_path, capsys, finding, message):
    assert cli(["sample", "Effusion.", "--modality", "cxr", "--n", "1", "--steps", "2", "--model", str(table_model),
                "--finding", finding, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_sample_refuses_findings_for_a_model_without_finding_tokens(tmp_path, capsys):
    torch.manual_seed(0)
    LatentDiffusion(TINY, ["cxr"]).save(tmp_path / "plain")
    assert cli(["sample", "Effusion.", "--modality", "cxr", "--n", "1", "--steps", "2", "--model", str(tmp_path / "plain"),
                "--finding", "pleural_effusion", "--out", str(tmp_path / "out")]) == 2
    assert "--finding needs a model with finding tokens" in capsys.readouterr().err


def test_a_finding_table_file_that_does_not_fit_is_refused(table_model, tmp_path):
    from safetensors.torch import save_file

    from generator.models import load_finding_table, save_finding_table

    model = LatentDiffusion.load(table_model)
    save_finding_table(model, tmp_path / "ok.safetensors")
    load_finding_table(model, tmp_path / "ok.safetensors")  # its own table loads
    state = model.conditioner.finding_state_dict()
    state.pop("findings.state.weight")
    save_file(state, str(tmp_path / "short.safetensors"), metadata={"findings": "[]", "finding_locations": "[]"})
    with pytest.raises(UserError, match="do not fit: expected .*findings.state.weight"):
        load_finding_table(model, tmp_path / "short.safetensors")
    save_file(model.conditioner.finding_state_dict(), str(tmp_path / "anonymous.safetensors"))
    with pytest.raises(UserError, match="does not name its finding rows"):
        load_finding_table(model, tmp_path / "anonymous.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:100])
    with pytest.raises(UserError, match="damaged"):
        load_finding_table(model, tmp_path / "cut.safetensors")
