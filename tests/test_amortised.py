"""Amortised reward guidance (rlhf.amortised): the request's features, the offset table's ridge fit, its lookup between
fitted timesteps, its file, and the table-steered draw (gamma 0: the plain sampler; the shifts measured along a steered
draw, recorded by the draw and measured against the model's own x0_hat at its states alike, are the table's own offsets,
so a table refitted to them is the table)."""

import json

import pytest
import torch

from generator.errors import UserError
from generator.models import LatentDiffusion, latent_size
from rlhf.amortised import OffsetTable, request_features, table_steered_draw
from rlhf.ddpo import predicted_x0
from test_improve import TINY


def test_request_features_name_present_findings_with_their_side_and_stated_absences_only():
    findings = [{"name": "pleural_effusion", "present": True, "laterality": "left"},
                {"name": "nodule", "present": True, "laterality": None},
                {"name": "pneumothorax", "present": False, "stated": True},
                {"name": "cardiomegaly", "present": False, "stated": False}]
    assert request_features("cxr", findings) == ["cxr|_bias", "cxr|pleural_effusion|present|left", "cxr|nodule|present|-",
                                                 "cxr|pneumothorax|absent"]


def _additive(seed=0, steps=(900, 500, 100)):
    g = torch.Generator().manual_seed(seed)
    vocab = ["cxr|_bias", "cxr|a|present|-", "cxr|b|present|-", "cxr|b|absent"]
    truth = torch.randn(len(steps), len(vocab), 2, 3, 3, generator=g)
    combos = [[0], [0, 1], [0, 2], [0, 3], [0, 1, 2], [0, 1, 3]]
    features = [[vocab[k] for k in c] for c in combos for _ in range(3)]
    shifts = torch.stack([truth[:, [vocab.index(f) for f in fs]].sum(1) for fs in features])
    return vocab, truth, features, shifts, list(steps)


def test_the_fit_recovers_an_additive_table_and_a_ridge_shrinks_it():
    vocab, truth, features, shifts, steps = _additive()
    table = OffsetTable.fit(features, shifts, steps, ridge=0.0)
    assert table.features == sorted(vocab)
    order = [table.index[f] for f in vocab]
    assert torch.allclose(table.weights[:, order], truth, atol=1e-4)
    assert min(table.r2(features, shifts)) > 0.9999
    noisy = shifts + 0.5 * torch.randn(shifts.shape, generator=torch.Generator().manual_seed(1))
    assert max(OffsetTable.fit(features, noisy, steps, ridge=0.0).r2(features, noisy)) < 0.99
    shrunk = OffsetTable.fit(features, shifts, steps, ridge=100.0)
    assert shrunk.weights.norm() < 0.5 * table.weights.norm()
    # a request's offset is the sum of its features' rows; a feature the table never saw adds nothing
    assert torch.allclose(table.offset([["cxr|_bias", "cxr|a|present|-", "cxr|c|present|left"]], 500),
                          truth[1, 0] + truth[1, 1], atol=1e-4)


def test_bad_fits_are_refused():
    vocab, truth, features, shifts, steps = _additive()
    with pytest.raises(UserError, match="ridge"):
        OffsetTable.fit(features, shifts, steps, ridge=-1.0)
    with pytest.raises(ValueError, match="do not match"):
        OffsetTable.fit(features[:-1], shifts, steps)
    with pytest.raises(UserError, match="no drafts"):
        OffsetTable.fit([], shifts[:0], steps)


def test_the_table_is_read_between_and_beyond_its_fitted_timesteps():
    vocab, truth, features, shifts, steps = _additive()
    table = OffsetTable(vocab, steps, truth)
    assert torch.equal(table.at(500), truth[1])
    assert torch.allclose(table.at(700), 0.5 * (truth[0] + truth[1]))
    assert torch.allclose(table.at(200), 0.25 * truth[1] + 0.75 * truth[2])
    assert torch.equal(table.at(999), truth[0]) and torch.equal(table.at(0), truth[2])


def test_the_table_file_round_trips_and_a_damaged_or_foreign_one_is_refused(tmp_path):
    from safetensors.torch import save_file

    vocab, truth, features, shifts, steps = _additive()
    table = OffsetTable.fit(features, shifts, steps, ridge=0.5)
    path = table.save(tmp_path / "offsets.safetensors")
    back = OffsetTable.load(path)
    assert back.features == table.features and back.timesteps == steps and back.ridge == 0.5
    assert torch.equal(back.weights, table.weights)
    assert not list(tmp_path.glob("*.tmp*"))
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="damaged"):
        OffsetTable.load(tmp_path / "cut.safetensors")
    save_file({"weights": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(UserError, match="not a synthmed offset table"):
        OffsetTable.load(tmp_path / "foreign.safetensors")


def test_a_steered_draw_at_gamma_0_is_the_plain_sampler_and_its_shifts_are_the_tables_offsets():
    from generator.sampling import guided_conditioning, guided_prediction, sample

    torch.manual_seed(0)
    model = LatentDiffusion(TINY, ["cxr"])
    prompts = ["left pleural effusion", "no pneumothorax", "cardiomegaly"]
    features = [["cxr|_bias", "cxr|pleural_effusion|present|left"], ["cxr|_bias", "cxr|pneumothorax|absent"],
                ["cxr|_bias", "cxr|cardiomegaly|present|-"]]
    modalities, seeds, steps, guidance = ["cxr"] * 3, [11, 12, 13], 3, 3.0
    model.scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in model.scheduler.timesteps]
    vocab = sorted({f for fs in features for f in fs})
    latent = (TINY.latent_channels, latent_size(model.cfg), latent_size(model.cfg))
    table = OffsetTable(vocab, timesteps, 0.05 * torch.randn(steps, len(vocab), *latent, generator=torch.Generator().manual_seed(3)))

    with torch.no_grad():
        plain = table_steered_draw(model, table, 0.0, prompts, modalities, features, seeds, steps, guidance, batch_size=2)
        reference = torch.cat([sample(model, [p], ["cxr"], guidance=guidance, steps=steps, seed=s, eta=0.0).images
                               for p, s in zip(prompts, seeds)])
        assert torch.allclose(plain.images, reference, atol=1e-4)
        steered = table_steered_draw(model, table, 2.0, prompts, modalities, features, seeds, steps, guidance, batch_size=2,
                                     keep_trajectory=True)
        assert not torch.allclose(steered.images, plain.images, atol=1e-3)
        shifts = steered.shifts
        cond = guided_conditioning(model, prompts, modalities, [""] * 3, guidance)
        kind = model.scheduler.config.prediction_type
        for j, t in enumerate(model.scheduler.timesteps):  # the recorded shift is what the step's output carries over the model's own
            alpha = model.scheduler.alphas_cumprod[int(t)]
            own = predicted_x0(guided_prediction(model, steered.states[:, j], t.expand(3), cond, guidance).float(), steered.states[:, j], alpha, kind)
            assert torch.allclose(predicted_x0(steered.targets[:, j], steered.states[:, j], alpha, kind) - own, shifts[:, j], atol=1e-4)
    for j, t in enumerate(timesteps):
        assert torch.allclose(shifts[:, j], 2.0 * table.offset(features, t), atol=1e-4)
    refit = OffsetTable.fit(features, shifts / 2.0, timesteps, ridge=0.0)
    assert torch.allclose(refit.offset(features, timesteps[1]), table.offset(features, timesteps[1]), atol=1e-4)


# -- steering the sampler by a table (generator.steering: a steered folder, `synthmed runs steer`) ------------------
def _steering_parts(gamma: float = 1.5):
    torch.manual_seed(0)
    model = LatentDiffusion(TINY, ["cxr"])
    steps = 3
    model.scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in model.scheduler.timesteps]
    vocab = ["cxr|_bias", "cxr|atelectasis|present|-", "cxr|pleural_effusion|present|left", "cxr|pneumothorax|absent"]
    latent = (TINY.latent_channels, latent_size(model.cfg), latent_size(model.cfg))
    table = OffsetTable(vocab, timesteps, 0.1 * torch.randn(steps, len(vocab), *latent, generator=torch.Generator().manual_seed(5)))
    findings = [[{"name": "pleural_effusion", "present": True, "laterality": "left"}, {"name": "pneumothorax", "present": False}],
                [{"name": "atelectasis", "present": True, "location": "left_lower_lobe"}],
                []]
    return model, table, findings, steps


def test_a_steered_sampler_draws_what_the_table_steered_draw_draws_and_at_gamma_0_the_base_bit_for_bit():
    from generator.sampling import sample
    from generator.steering import TableSteering

    model, table, findings, steps = _steering_parts()
    prompts, modalities = ["left pleural effusion, no pneumothorax", "atelectasis", "normal"], ["cxr"] * 3
    with torch.no_grad():
        base = sample(model, prompts, modalities, guidance=3.0, steps=steps, seed=20, findings=findings).images
        model.steering = TableSteering(table, 0.0)
        assert torch.equal(sample(model, prompts, modalities, guidance=3.0, steps=steps, seed=20, findings=findings).images, base)
        model.steering = TableSteering(table, 1.5)
        steered = sample(model, prompts, modalities, guidance=3.0, steps=steps, seed=20, findings=findings).images
        model.steering = None
        features = [request_features("cxr", f) for f in findings]
        drawn = table_steered_draw(model, table, 1.5, prompts, modalities, features, [20, 21, 22], steps, 3.0, batch_size=2).images
    assert torch.allclose(steered, drawn, atol=1e-5)
    assert (steered - base).abs().mean() > 1e-3


def test_steering_features_take_the_tables_side_free_offset_and_a_kinds_parent():
    from generator.steering import TableSteering

    model, table, findings, steps = _steering_parts()
    steering = TableSteering(table, 1.0)
    # the graph's reader gives atelectasis the side its lobe implies; the table knows it side-free
    read = [{"name": "atelectasis", "present": True, "laterality": "left"}, {"name": "pleural_effusion", "present": True, "side": "left"},
            {"name": "consolidation", "present": True, "uncertain": True}]
    assert steering.features(["cxr"], [read]) == [["cxr|_bias", "cxr|atelectasis|present|-", "cxr|pleural_effusion|present|left"]]
    # a kind the table lacks takes the kind of it the table has, where a lineage says which
    kind = [{"name": "plate_atelectasis", "present": True}]
    assert steering.features(["cxr"], [kind]) == [["cxr|_bias", "cxr|plate_atelectasis|present|-"]]
    steering.lineage = lambda name: {name, "atelectasis"} if name == "plate_atelectasis" else {name}
    assert steering.features(["cxr"], [kind]) == [["cxr|_bias", "cxr|atelectasis|present|-"]]
    assert steering.features(["cxr"], None) == [["cxr|_bias"]]
    # what a finding implies (the run's requests ask for it beside the finding) is added present unless stated
    steering.implies = {"cxr": {"pleural_effusion": ["atelectasis"]}}
    effusion = {"name": "pleural_effusion", "present": True, "laterality": "left"}
    assert steering.features(["cxr"], [[effusion]]) == [["cxr|_bias", "cxr|pleural_effusion|present|left", "cxr|atelectasis|present|-"]]
    assert steering.features(["cxr"], [[effusion, {"name": "atelectasis", "present": False}]]) == \
        [["cxr|_bias", "cxr|pleural_effusion|present|left", "cxr|atelectasis|absent"]]
    assert steering.features(["cxr"], [[{**effusion, "uncertain": True}]]) == [["cxr|_bias"]]
    assert steering.features(["oct"], [[effusion]]) == [["oct|_bias", "oct|pleural_effusion|present|left"]]


def test_a_steered_folder_loads_through_lora_and_bad_ones_are_refused(tmp_path, caplog):
    import json

    from generator.models import apply_model_adapters
    from generator.steering import STEERING_FILE, load_steering, save_steering

    model, table, findings, steps = _steering_parts()
    folder = save_steering(tmp_path / "steered", table, 1.25, {"run": "r"}, {"cxr": {"pleural_effusion": ["atelectasis"]}})
    assert sorted(p.name for p in folder.iterdir()) == ["offset_table.safetensors", "steering.json"]
    assert apply_model_adapters(model, [str(folder)]) == []  # no LoRA: the base, steered
    assert model.steering.gamma == 1.25 and torch.equal(model.steering.table.weights, table.weights)
    assert model.steering.implies == {"cxr": {"pleural_effusion": ["atelectasis"]}}
    assert json.loads((folder / STEERING_FILE).read_text())["run"] == "r"
    other = save_steering(tmp_path / "other", table, 1.0)
    with pytest.raises(UserError, match="steered folders"):
        apply_model_adapters(LatentDiffusion(TINY, ["cxr"]), [str(folder), str(other)])
    (other / STEERING_FILE).write_text(json.dumps({"format": "synthmed-steering-1", "gamma": -1, "table": "offset_table.safetensors"}))
    with pytest.raises(UserError, match="gamma must be a number"):
        load_steering(other)
    (other / STEERING_FILE).write_text(json.dumps({"format": "synthmed-steering-1", "gamma": 1, "implies": {"cxr": ["x"]}}))
    with pytest.raises(UserError, match="implies must map modality -> finding"):
        load_steering(other)
    (other / STEERING_FILE).write_text("{not json")
    with pytest.raises(UserError, match="cannot be read"):
        load_steering(other)
    (other / STEERING_FILE).write_text(json.dumps({"format": "synthmed-steering-1", "gamma": 1, "table": "gone.safetensors"}))
    with pytest.raises(UserError, match="holds no such file"):
        load_steering(other)
    # a run folder loads its best/; where the run keeps steered/ too, the log says how to draw with that
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    from generator.lora import LoraSpec, add_lora, save_lora

    plain = LatentDiffusion(TINY, ["cxr"])
    add_lora(plain.unet, LoraSpec(rank=2, alpha=2))
    save_lora(plain.unet, run / "best" / "lora.safetensors")
    save_steering(run / "steered", table, 1.0)
    with caplog.at_level("WARNING", logger="synthmed.generator"):
        apply_model_adapters(LatentDiffusion(TINY, ["cxr"]), [str(run)])
    assert f"name {run / 'steered'} to draw with that" in caplog.text
    wrong = OffsetTable(table.features, table.timesteps, torch.zeros(steps, len(table.features), 3, 2, 2))
    with pytest.raises(UserError, match="fitted for another model"):
        apply_model_adapters(LatentDiffusion(TINY, ["cxr"]), [str(save_steering(tmp_path / "wrong", wrong, 1.0))])


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_a_stock_diffusers_pipeline_steered_by_the_hook_draws_synthmeds_steered_images(guidance):
    from generator.bench import StockPipeline
    from generator.sampling import sample
    from generator.steering import TableSteering

    model, table, findings, steps = _steering_parts()
    prompts, modalities = ["left pleural effusion, no pneumothorax", "atelectasis", "normal"], ["cxr"] * 3
    steering = TableSteering(table, 1.5)
    with torch.no_grad():
        base = sample(model, prompts, modalities, guidance=guidance, steps=steps, seed=7).images
        model.steering = steering
        ours = sample(model, prompts, modalities, guidance=guidance, steps=steps, seed=7, findings=findings).images
        model.steering = None
    stock = StockPipeline(model)
    try:
        with steering.attach(stock.pipe, modalities, findings) as hook:
            theirs = stock(prompts, modalities, guidance, steps, 7)
            # diffusers' row layout: [negatives, prompts] under guidance, a prompt's images side by side
            assert hook.rows(6) == ([0, 1, 2, 0, 1, 2] if guidance > 1 else [0, 0, 1, 1, 2, 2])
            with pytest.raises(UserError, match="one modality and findings list per prompt"):
                hook.rows(4)
        plain = stock(prompts, modalities, guidance, steps, 7)  # the hook is off after the with block
    finally:
        stock.close()
    assert (ours - base).abs().mean() > 1e-3  # the steering moves the images...
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()  # ...and the hooked pipeline moves them alike
    assert torch.allclose(plain, base, atol=1e-4)


def test_attaching_a_steering_to_a_pipeline_it_does_not_fit_is_refused():
    from types import SimpleNamespace

    from generator.bench import StockPipeline
    from generator.steering import TableSteering

    model, table, findings, steps = _steering_parts()
    steering = TableSteering(table, 1.0)
    with pytest.raises(UserError, match="fitted for another model"):
        steering.attach(SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(in_channels=4, sample_size=64))), ["cxr"])
    stock = StockPipeline(model)
    try:
        with pytest.raises(UserError, match="one modality"):
            steering.attach(stock.pipe, [])
        stock.pipe.scheduler.register_to_config(prediction_type="flow")
        with pytest.raises(UserError, match="predicts 'flow'"):
            steering.attach(stock.pipe, ["cxr"])
    finally:
        stock.close()


def test_a_gamma_per_modality_steers_each_modality_by_its_own_and_0_leaves_it_bit_for_bit(tmp_path):
    from generator.sampling import sample
    from generator.steering import TableSteering, load_steering, save_steering

    torch.manual_seed(0)
    model = LatentDiffusion(TINY, ["cxr", "oct"])
    model.scheduler.set_timesteps(3)
    timesteps = [int(t) for t in model.scheduler.timesteps]
    vocab = ["cxr|_bias", "cxr|pleural_effusion|present|left", "oct|_bias", "oct|drusen|present|-"]
    latent = (TINY.latent_channels, latent_size(model.cfg), latent_size(model.cfg))
    table = OffsetTable(vocab, timesteps, 0.1 * torch.randn(3, len(vocab), *latent, generator=torch.Generator().manual_seed(5)))
    prompts, modalities = ["left pleural effusion", "drusen"], ["cxr", "oct"]
    findings = [[{"name": "pleural_effusion", "present": True, "laterality": "left"}], [{"name": "drusen", "present": True}]]

    def draw(steering):
        model.steering = steering
        try:
            return sample(model, prompts, modalities, guidance=3.0, steps=3, seed=4, findings=findings).images
        finally:
            model.steering = None

    with torch.no_grad():
        base, shared = draw(None), draw(TableSteering(table, 1.5))
        split = draw(TableSteering(table, 1.5, gammas={"oct": 0.0}))
        other = draw(TableSteering(table, 0.0, gammas={"cxr": 1.5, "oct": 0.5}))
        half = draw(TableSteering(table, 0.5))
    assert torch.equal(split[1], base[1]) and torch.allclose(split[0], shared[0], atol=1e-6)  # oct untouched, cxr at 1.5
    assert torch.allclose(other[0], shared[0], atol=1e-6) and torch.allclose(other[1], half[1], atol=1e-6)
    assert (shared[1] - base[1]).abs().mean() > 1e-3
    # the folder keeps them; a negative or non-numeric one is refused
    folder = save_steering(tmp_path / "steered", table, 1.5, gammas={"oct": 0.0})
    assert load_steering(folder).gammas == {"oct": 0.0} and load_steering(folder).gamma_for("cxr") == 1.5
    info = json.loads((folder / "steering.json").read_text())
    for bad in ({"oct": -1}, {"oct": "x"}, ["oct"]):
        (folder / "steering.json").write_text(json.dumps({**info, "gammas": bad}))
        with pytest.raises(UserError, match="gammas must map modality"):
            load_steering(folder)


def test_per_modality_gammas_take_each_modalitys_best_within_its_own_terms_else_0():
    from types import SimpleNamespace

    from pipelines.config import load_config
    from pipelines.table_steer import per_modality_gammas

    def figures(share, fd):
        return {"all_requested_shown": share, "finding_accuracy": share, "fd": fd, "ms_ssim": 0.5}

    base = {"per_modality": {"cxr": figures(0.1, 100.0), "oct": figures(0.5, 100.0), "fundus": figures(0.2, 100.0)}}
    lines = [{"scale": g, "per_modality": {"cxr": figures(0.1 + 0.1 * g, 100.0 + 2 * g),  # rises within the terms
                                           "oct": figures(0.4, 100.0),  # never beats its base
                                           "fundus": figures(0.2 + 0.1 * g, 100.0 + 6 * g)}}  # FD past +10% from gamma 2
             for g in (1.0, 2.0, 3.0)]
    sweep = SimpleNamespace(base=base, cfg=load_config("tiny"))
    gammas, why = per_modality_gammas(sweep, lines, margin=True)
    assert gammas == {"cxr": 2.0, "oct": 0.0, "fundus": 0.0}  # cxr: 3 is the largest tried, so no margin above it
    assert "beats its base" in why["oct"] and "within the gain's terms" in why["fundus"]
    assert per_modality_gammas(sweep, lines, margin=False)[0] == {"cxr": 3.0, "oct": 0.0, "fundus": 1.0}
    # a run that holds one modality's FD to its own tolerance (improve.guard.modality_fd_tolerance) holds these to it
    cfg = load_config("tiny", {"improve.guard.modality_fd_tolerance": 0.5})
    assert per_modality_gammas(SimpleNamespace(base=base, cfg=cfg), lines, margin=False)[0] == {"cxr": 3.0, "oct": 0.0, "fundus": 3.0}
