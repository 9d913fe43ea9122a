"""The latent diffusion model: diffusers AutoencoderKL + UNet2DConditionModel + the conditioner.

A saved model is a folder::

    vae/              diffusers AutoencoderKL (config.json + safetensors)
    unet/             diffusers UNet2DConditionModel
    conditioner.safetensors   projections and modality table (text encoder weights are not copied)
    model.json        model config, modalities, text encoder name, latent scaling factor
    scheduler/        noise schedule (diffusers scheduler config)
    metadata.json     how it was trained (written by the trainer)

Images are 3-channel in [-1, 1]; grey modalities are replicated on the way in and averaged on
the way out, so one VAE serves every modality.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from .conditioning import Conditioner, TextEncoder
from .config import ModelConfig
from .errors import UserError
from .fileio import write_json_atomic

IMAGE_CHANNELS = 3


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    if cfg.vae_pretrained:
        return AutoencoderKL.from_pretrained(cfg.vae_pretrained, subfolder=cfg.vae_subfolder, torch_dtype=torch.float32)
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=IMAGE_CHANNELS,
        out_channels=IMAGE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(32, cfg.vae_channels[0]),
        sample_size=cfg.image_size,
    )


def latent_size(cfg: ModelConfig) -> int:
    return cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)


def add_class_input(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Give a UNet that has no class embedding (Stable Diffusion's) an identity one, so the
    conditioner's modality x text vector is added to its time embedding. The identity has no
    weights, and the conditioner's last layer starts at zero: the pretrained UNet's outputs are
    unchanged until training teaches it the modality."""
    if unet.class_embedding is None:
        if unet.config.class_embed_type is not None or getattr(unet.config, "addition_embed_type", None):
            raise UserError(f"UNet with class_embed_type={unet.config.class_embed_type!r} / addition_embed_type="
                            f"{unet.config.addition_embed_type!r} cannot take the modality vector; use one without")
        unet.class_embedding = torch.nn.Identity()
        unet.register_to_config(class_embed_type="identity")
    elif unet.config.class_embed_type != "identity":
        raise UserError(f"the UNet's class embedding is {unet.config.class_embed_type!r}; synthmed feeds a vector and needs "
                        "class_embed_type='identity' or none (which it adds)")
    return unet


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    if cfg.unet_pretrained:
        unet = UNet2DConditionModel.from_pretrained(cfg.unet_pretrained, subfolder=cfg.unet_subfolder, torch_dtype=torch.float32)
        if unet.config.cross_attention_dim != cfg.cross_attention_dim:
            raise UserError(f"model.cross_attention_dim is {cfg.cross_attention_dim} but the UNet in {cfg.unet_pretrained} "
                            f"attends to {unet.config.cross_attention_dim}-wide tokens; set model.cross_attention_dim: "
                            f"{unet.config.cross_attention_dim}")
        return add_class_input(unet)
    n = len(cfg.unet_channels)
    down = tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
    up = tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))
    return UNet2DConditionModel(
        sample_size=latent_size(cfg),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.unet_attention_heads,
        norm_num_groups=min(32, cfg.unet_channels[0]),
        class_embed_type="identity",  # the conditioner's fused modality x text vector is added to the time embedding
    )


def time_embed_dim(unet: UNet2DConditionModel) -> int:
    return int(unet.time_embedding.linear_2.out_features)


def timestep_spacing(cfg: ModelConfig) -> str:
    if cfg.timestep_spacing != "auto":
        return cfg.timestep_spacing
    return "trailing" if cfg.prediction_type == "v_prediction" else "leading"


def build_scheduler(cfg: ModelConfig) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing=timestep_spacing(cfg),
    )


class LatentDiffusion(torch.nn.Module):
    """VAE + UNet + conditioner + noise schedule, and the latent scaling factor."""

    def __init__(self, cfg: ModelConfig, modalities: list[str], vae=None, unet=None, text_encoder: TextEncoder | None = None,
                 findings: tuple[list[str], list[str]] | None = None):
        """``findings``: the finding table's keys (``"<modality>:<finding>"``) and locations, for ``cfg.finding_tokens``
        (``generator.conditioning.finding_vocabulary`` of the training rows)."""
        super().__init__()
        self.cfg = cfg
        self.vae = vae if vae is not None else build_vae(cfg)
        self.unet = add_class_input(unet if unet is not None else build_unet(cfg))
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if factor != 2 ** (len(cfg.vae_channels) - 1):
            raise UserError(f"the VAE downsamples by {factor} but model.vae_channels has {len(cfg.vae_channels)} levels; "
                            f"list {len(self.vae.config.block_out_channels)} widths (the VAE's are {list(self.vae.config.block_out_channels)})")
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise UserError(f"the UNet takes {self.unet.config.in_channels} channels but the VAE makes "
                            f"{self.vae.config.latent_channels}-channel latents; set model.latent_channels to match")
        text_encoder = text_encoder if text_encoder is not None else TextEncoder(cfg.text_encoder, cfg.text_max_length)
        if cfg.finding_tokens and findings is None:
            raise UserError("model.finding_tokens needs the findings to make tokens of; give the training manifest's")
        self.conditioner = Conditioner(text_encoder, list(modalities), cfg.cross_attention_dim, time_embed_dim(self.unet),
                                       findings=findings if cfg.finding_tokens else None)
        self.scheduler = build_scheduler(cfg)
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        self.steering = None  # a generator.steering.TableSteering the sampler moves every step's x0_hat by (a steered folder)

    @property
    def modalities(self) -> list[str]:
        return self.conditioner.modality.names

    @property
    def finding_vocabulary(self) -> tuple[list[str], list[str]] | None:
        """The finding table's keys and locations, or None for a model conditioned on text alone."""
        table = self.conditioner.findings
        return (list(table.keys), list(table.locations)) if table is not None else None

    @property
    def finding_keys(self) -> list[str] | None:
        vocabulary = self.finding_vocabulary
        return vocabulary[0] if vocabulary is not None else None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # -- image <-> latent -----------------------------------------------------------------
    @staticmethod
    def to_rgb(images: torch.Tensor) -> torch.Tensor:  # (B, 1|3, H, W) -> (B, 3, H, W)
        return images.expand(-1, IMAGE_CHANNELS, -1, -1) if images.shape[1] == 1 else images

    def encode(self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(self.to_rgb(images).to(self.vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        return latents * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [-1, 1]
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample.clamp(-1, 1)

    # -- persistence ----------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        """Write the model folder; ``dtype=torch.float16`` halves the size for shipping."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        if dtype != torch.float32:
            for sub in ("vae", "unet"):
                path = folder / sub / "diffusion_pytorch_model.safetensors"
                save_file({k: v.to(dtype) for k, v in load_file(path).items()}, path)
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.conditioner.trainable_state_dict().items()}
        save_file(state, folder / "conditioner.safetensors")
        self.scheduler.save_pretrained(folder / "scheduler")
        meta = {
            "model": self.cfg.model_dump(mode="json"),
            "modalities": self.modalities,
            "scaling_factor": self.scaling_factor,
            "text_encoder": self.cfg.text_encoder,
            "text_encoder_lora": self.conditioner.text_encoder.lora,
        }
        vocabulary = self.finding_vocabulary
        if vocabulary is not None:  # the finding table's rows, by name (generator.conditioning)
            meta["findings"], meta["finding_locations"] = vocabulary
        write_json_atomic(folder / "model.json", meta)
        return folder

    @classmethod
    def load(
        cls, folder: str | os.PathLike, modalities: list[str] | None = None, text_encoder: TextEncoder | None = None,
        device: str | torch.device = "cpu", findings: tuple[list[str], list[str]] | None = None, finding_tokens: bool = False,
    ) -> "LatentDiffusion":
        """Load a saved model. ``modalities`` may list more than the save knew: the table grows; so may
        ``findings`` a finding table's keys. ``finding_tokens`` gives a model saved without a table one
        (``synthmed train unet --init-from`` with ``model.finding_tokens``)."""
        from .paths import shipped

        folder = shipped(folder)
        if not (folder / "model.json").is_file():
            raise FileNotFoundError(f"no synthmed model in {folder} (model.json missing); train it with `synthmed train default --config PROFILE` (the VAE, then the UNet, on the profile's data; "
                                    "`--config real` for the real profile), or `synthmed train unet` on a trained VAE")
        meta = json.loads((folder / "model.json").read_text())
        cfg = ModelConfig.model_validate(meta["model"])
        saved = list(meta["modalities"])
        wanted = saved + [m for m in (modalities or []) if m not in saved]
        saved_findings = (list(meta["findings"]), list(meta.get("finding_locations", []))) if "findings" in meta else None
        if finding_tokens or saved_findings is not None:
            cfg = cfg.model_copy(update={"finding_tokens": True})
            known = saved_findings or ([], [])
            wanted_keys, wanted_locations = findings or ([], [])
            findings = (known[0] + [k for k in wanted_keys if k not in known[0]],
                        known[1] + [k for k in wanted_locations if k not in known[1]])
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32, use_safetensors=True)  # never a pickled .bin
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32, use_safetensors=True)
        model = cls(cfg, wanted, vae=vae, unet=unet, text_encoder=text_encoder, findings=findings)
        lora = meta.get("text_encoder_lora")
        if lora:  # the saved conditioner carries the text encoder's LoRA weights
            if text_encoder is not None:
                raise UserError(f"{folder}'s text encoder is LoRA-tuned; load it without passing a shared text_encoder")
            model.conditioner.text_encoder.add_lora(lora["rank"], lora["alpha"], tuple(lora["targets"]))
            model.conditioner.text_encoder.requires_grad_(False)
        state = {k: v.float() for k, v in load_file(folder / "conditioner.safetensors").items()}
        model.new_modalities = model.conditioner.load_trainable_state_dict(state, saved, saved_findings)
        model.scaling_factor = float(meta["scaling_factor"])
        return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# A tuned finding table beside a LoRA adapter (`synthmed improve --improve.ddpo.trainable=findings`)

FINDING_TABLE_FILE = "findings.safetensors"


def save_finding_table(model: LatentDiffusion, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """The model's finding table (and its pooled path) as one safetensors file; the row names in its metadata."""
    keys, locations = model.finding_vocabulary or ([], [])
    meta = {"findings": json.dumps(keys), "finding_locations": json.dumps(locations),
            **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(model.conditioner.finding_state_dict(), str(path), metadata=meta)
    return Path(path)


def load_finding_table(model: LatentDiffusion, path: str | os.PathLike) -> None:
    """Load a tuned finding table saved by `save_finding_table` onto the model's, rows by name."""
    from safetensors import safe_open

    from .safeload import check_safetensors

    check_safetensors(path, "tuned finding table", "use the findings.safetensors an improve run wrote beside its adapter")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        keys, locations = json.loads(meta["findings"]), json.loads(meta["finding_locations"])
    except (KeyError, ValueError):
        raise UserError(f"{path} does not name its finding rows (no 'findings' metadata); it was not written by synthmed") from None
    state = load_file(str(path), device=str(model.device))
    model.conditioner.load_finding_state_dict(state, keys, locations)


def apply_model_adapters(model: LatentDiffusion, paths: list[str] | tuple[str, ...]) -> list[str]:
    """`generator.lora.apply_adapters` on the model's UNet, and for an adapter written with a tuned finding table
    (``findings.safetensors`` beside its ``lora.safetensors``) that table too. A steered folder (``synthmed runs steer``:
    ``steering.json``, generator.steering) sets the model's steering and loads the LoRA it holds, where it holds one.
    Two tuned tables, or two steered folders, cannot be combined: naming two is an error."""
    from .lora import apply_adapters, resolve_lora_path
    from .steering import is_steered_folder, load_steering

    steered = [p for p in paths if is_steered_folder(p)]
    if len(steered) > 1:
        raise UserError(f"{len(steered)} of the adapters are steered folders ({', '.join(map(str, steered))}); a model "
                        "steers by one offset table: name one of them")
    loras = [p for p in paths if p not in steered or (Path(p) / "lora.safetensors").is_file()]
    tables = [resolve_lora_path(p).with_name(FINDING_TABLE_FILE) for p in loras]
    tables = [t for t in tables if t.is_file()]
    if len(tables) > 1:
        raise UserError(f"{len(tables)} of the adapters carry a tuned finding table ({', '.join(map(str, tables))}); "
                        "a model holds one: name one of them")
    steering = load_steering(steered[0]) if steered else None
    if steering is not None:
        steering.check(model)
    for p in paths:  # a run folder reads as its best/; a table-stage run's policy is its steered/, which must be named
        if not is_steered_folder(p) and is_steered_folder(Path(p) / "steered") and not (Path(p) / "lora.safetensors").is_file():
            logging.getLogger("synthmed.generator").warning(
                "%s is a run folder: its best/ adapter is loaded. The run also keeps steered/ (its offset table, gamma chosen "
                "on the held-out set: `synthmed runs show` compares them); name %s to draw with that", p, Path(p) / "steered")
    names = apply_adapters(model.unet, loras)
    for table in tables:
        load_finding_table(model, table)
    if steering is not None:
        model.steering = steering
    return names
