"""Finding tokens (`model.finding_tokens`): a learned token per finding a request states, built from its structured
findings (never a second parse of its text); trained from a manifest's findings column, given by the loop, the
held-out evaluation and the graph when sampling."""

import csv
import json

import pytest
import torch
import yaml

from agents.requests import ImagePrompt
from generator.conditioning import FINDING_SIDES, FindingTable, finding_vocabulary
from generator.data.records import ManifestRow, findings_from_cell
from generator.models import LatentDiffusion
from generator.paths import shipped
from generator.sampling import sample
from pipelines.cli import main


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("ph") / "phantoms"
    assert main(["data", "phantoms", "--out", str(out), "--per-finding", "1", "--size", "64", "--modalities", "cxr", "--no-progress"]) == 0
    return out / "manifest.csv"


def test_a_token_is_the_sum_of_the_finding_and_what_it_states():
    torch.manual_seed(0)
    table = FindingTable(["cxr:pleural_effusion", "cxr:mass", "oct:drusen"], ["right_lower_lobe"], 8)
    findings = [
        [{"name": "pleural_effusion", "present": True, "laterality": "left", "severity": "large", "location": "right_lower_lobe"},
         {"name": "mass", "present": False},
         {"name": "nodule", "present": True},  # not in the table: no token
         {"name": "mass", "present": True, "uncertain": True}],  # hedged: states nothing
        None,  # text alone
        [{"name": "drusen", "present": True, "side": "bilateral", "severity": "mild"}],  # a manifest's "side"
    ]
    tokens, mask = table(findings, ["cxr", "cxr", "oct"])
    assert tokens.shape == (3, 2, 8) and mask.tolist() == [[1, 1], [0, 0], [1, 0]]
    w = table.embedding.weight
    effusion = w[0] + table.state.weight[1] + table.side.weight[FINDING_SIDES.index("left")] + table.severity.weight[2] \
        + table.location.weight[0]
    torch.testing.assert_close(tokens[0, 0], effusion)
    torch.testing.assert_close(tokens[0, 1], w[1] + table.state.weight[0])
    torch.testing.assert_close(tokens[2, 0], w[2] + table.state.weight[1] + table.side.weight[2] + table.severity.weight[0])
    assert tokens[1].abs().sum() == 0 and tokens[2, 1].abs().sum() == 0
    # the same finding in another modality is another row: a chest X-ray "drusen" is nothing the table knows
    none, none_mask = table([[{"name": "drusen", "present": True}]], ["cxr"])
    assert none.shape == (1, 0, 8) and none_mask.shape == (1, 0)


def test_a_request_gives_its_present_findings_and_the_absences_it_states():
    findings = ({"name": "pleural_effusion", "present": True, "laterality": "left", "stated": True},
                {"name": "atelectasis", "present": True, "stated": False},  # implied by the effusion's phrase
                {"name": "pneumothorax", "present": False, "stated": True},
                {"name": "mass", "present": False, "stated": False})  # a normal study's unnamed absence
    prompt = ImagePrompt("cxr", "r", "p", "n", findings)
    assert [f["name"] for f in prompt.generator_findings] == ["pleural_effusion", "atelectasis", "pneumothorax"]


def test_init_from_adds_a_finding_table_that_sampling_and_saving_keep(tmp_path, tiny_manifest, capsys):
    out = tmp_path / "model"
    code = main(["train", "unet", "--init-from", str(shipped("generator/weights/default")), "--data", str(tiny_manifest),
                 f"--train.out={out}", "--model.finding_tokens=true", "--train.max_steps=2", "--train.batch_size=4",
                 "--train.warmup_steps=1", "--train.validate_every=100", f"--run.runs_dir={tmp_path / 'runs'}", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rows = [ManifestRow(r["path"], r["text"], r["modality"], findings_from_cell(r["findings"])) for r in csv.DictReader(open(tiny_manifest))]
    keys, locations = finding_vocabulary(rows)
    meta = json.loads((out / "model.json").read_text())
    assert meta["model"]["finding_tokens"] is True
    assert set(meta["findings"]) <= set(keys) and len(meta["findings"]) >= len(keys) - 2  # validation rows are held back
    assert all(k.startswith("cxr:") for k in meta["findings"])
    model = LatentDiffusion.load(out)
    assert model.finding_keys == meta["findings"]

    prompt = "Chest X-ray. Left pleural effusion. No pneumothorax."
    stated = [{"name": "pleural_effusion", "present": True, "laterality": "left", "severity": "moderate"},
              {"name": "pneumothorax", "present": False}]
    text = model.conditioner([prompt], ["cxr"])
    both = model.conditioner([prompt], ["cxr"], [stated])
    assert both.tokens.shape[1] == text.tokens.shape[1] + 2 and both.mask[0, -2:].tolist() == [1, 1]
    assert not torch.equal(both.class_emb, text.class_emb)  # trained two steps: the pooled path has left zero
    plain = sample(model, [prompt], ["cxr"], steps=2, seed=3).images
    told = sample(model, [prompt], ["cxr"], steps=2, seed=3, findings=[stated]).images
    assert not torch.allclose(plain, told)

    # saved and loaded by name: the same conditioning; a table that grows keeps the rows it knew
    model.save(tmp_path / "again")
    again = LatentDiffusion.load(tmp_path / "again")
    torch.testing.assert_close(again.conditioner([prompt], ["cxr"], [stated]).tokens, both.tokens)
    grown = LatentDiffusion.load(out, ["cxr", "oct"], findings=(["oct:drusen"], ["foveal"]))
    assert grown.finding_keys == meta["findings"] + ["oct:drusen"]
    torch.testing.assert_close(grown.conditioner([prompt], ["cxr"], [stated]).tokens, both.tokens)

    # a model conditioned on text alone ignores findings
    base = LatentDiffusion.load(shipped("generator/weights/default"))
    assert base.finding_keys is None
    torch.testing.assert_close(base.conditioner([prompt], ["cxr"], [stated]).tokens, base.conditioner([prompt], ["cxr"]).tokens)


def test_the_loop_gives_a_finding_token_model_each_requests_findings(tmp_path, capsys):
    from tests.test_improve import TINY, settings

    torch.manual_seed(0)
    keys = ["cxr:pleural_effusion", "cxr:pneumothorax", "cxr:cardiomegaly", "oct:drusen", "oct:macular_hole"]
    model = LatentDiffusion(TINY.model_copy(update={"finding_tokens": True}), ["cxr", "oct"], findings=(keys, ["foveal"]))
    model.save(tmp_path / "base")
    tree = settings(tmp_path / "base")
    tree["improve"]["ddpo"]["epochs"] = 1
    profile = tmp_path / "loop.yaml"
    profile.write_text(yaml.safe_dump({"extends": "tiny", **tree}))
    seen = []
    original = FindingTable.forward

    def spy(self, findings, modalities):
        seen.append([[f["name"] for f in (s or ())] for s in findings])
        return original(self, findings, modalities)

    FindingTable.forward = spy
    try:
        assert main(["improve", "--config", str(profile), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0, \
            capsys.readouterr().err
    finally:
        FindingTable.forward = original
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    asked = {name for s in samples for name, e in s["expected"].items() if e["present"]}
    given = {name for batch in seen for names in batch for name in names}
    assert asked and asked <= given  # rollouts, update and stage 2 were given the requests' findings
