
import pytest

from pipelines.config import ConfigError, load_config, parse_overrides, save_config


def test_default_profile_is_tiny_and_offline_cpu():
    cfg = load_config()
    assert cfg.profile == "tiny"
    assert cfg.run.device == "cpu"
    assert set(cfg.data.modalities) >= {"cxr", "chest_ct", "brain_mri", "fundus", "oct"}


def test_dotted_overrides_both_spellings_and_types():
    cfg = load_config("tiny", ["--train.lr=1e-4", "--data.image_size", "128", "--phantoms.modalities=[cxr, oct]",
                               "--train.mixed_precision=no", "--data.augment.enabled=true"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.image_size == 128
    assert cfg.phantoms.modalities == ["cxr", "oct"]
    assert cfg.train.mixed_precision == "no"  # not YAML 1.1's False
    assert cfg.data.augment.enabled is True


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--train.lrr=1", "train.lrr: unknown field (from --train.lrr)"),
        ("--train.lrr=1", "did you mean 'train.lr'"),
        ("--train.lr=abc", "train.lr: Input should be a valid number"),
        ("--train.mixed_precision=fp8", "train.mixed_precision"),
        ("--data.image_size=3", "data.image_size: Input should be greater than or equal to 16"),
        ("--nosuch.field=1", "nosuch: unknown field"),
    ],
)
def test_bad_override_names_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert expected in str(err.value)


def test_bad_profile_value_names_field_and_file(tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("extends: tiny\ntrain:\n  batch_size: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(profile)
    assert "train.batch_size" in str(err.value) and "bad.yaml" in str(err.value)


def test_unknown_profile_lists_profiles():
    with pytest.raises(ConfigError, match="profiles in .*tiny"):
        load_config("nope")


def test_profile_extends_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: " + str(tmp_path / "b.yaml") + "\n")
    (tmp_path / "b.yaml").write_text("extends: " + str(tmp_path / "a.yaml") + "\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    for bad in ("3", "[tiny]", "''"):  # found by the fuzz test: an int crashed in pathlib
        (tmp_path / "c.yaml").write_text(f"extends: {bad}\n")
        with pytest.raises(ConfigError, match="'extends' names the profile this one builds on"):
            load_config(tmp_path / "c.yaml")
    real = load_config("real")
    assert real.run.device == "cpu"  # inherited from tiny
    assert real.data.augment.enabled and real.data.manifests


def test_new_modality_is_a_config_entry_added_to_the_defaults():
    cfg = load_config("tiny", {"data.modalities.dental": {"channels": 1, "display_name": "dental X-ray", "aliases": ["opg"]}})
    assert "dental" in cfg.data.modalities and "cxr" in cfg.data.modalities
    from generator.modalities import resolve_modality

    assert resolve_modality("OPG", cfg.data.modalities) == "dental"


def test_duplicate_alias_is_rejected():
    with pytest.raises(ConfigError, match="already used"):
        load_config("tiny", {"data.modalities.dental": {"channels": 1, "display_name": "d", "aliases": ["CXR"]}})


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["--train.lr=3e-4"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again.model_dump(exclude={"profile"}) == cfg.model_dump(exclude={"profile"})


def test_parse_overrides_leaves_other_arguments():
    overrides, rest = parse_overrides(["--out", "x", "--train.lr=1", "pos"])
    assert overrides == {"train.lr": 1} and rest == ["--out", "x", "pos"]
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.lr"])


def test_sd15_profile_describes_stable_diffusion_with_lora():
    cfg = load_config("sd15")
    m = cfg.model
    assert (m.unet_subfolder, m.vae_subfolder, m.cross_attention_dim, m.prediction_type) == ("unet", "vae", 768, "epsilon")
    assert len(m.vae_channels) == 4 and m.image_size == 256 and cfg.train.unet_lora and cfg.lora.text_encoder_rank > 0
    assert "BiomedBERT" in m.text_encoder and cfg.data.manifests  # inherits the real manifests
