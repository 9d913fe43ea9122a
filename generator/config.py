"""Typed configuration sections owned by the generator package.

Each field states its unit and scope. The sections are plain pydantic models; loading YAML
profiles and command-line overrides is done once, for the whole tree, by ``pipelines.config``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModalityConfig(Section):
    """One imaging modality. A new modality is a new entry here, never a code change."""

    channels: Literal[1, 3]  # 1: grey, 3: RGB; images are converted to this on load
    display_name: str  # human-readable name, e.g. "chest X-ray"
    aliases: list[str] = []  # other names users type ("CXR", "chest x-ray"); matched case-insensitively
    window: tuple[float, float] | None = None  # DICOM (centre, width) in stored units (HU for CT); None: use the file's own
    clahe: bool = False  # contrast-limited adaptive histogram equalisation at load time
    region: str | None = None  # the anatomical region a study shows ("chest", "retina"); the graph's anatomy stage reports it
    # what "left" / "right" name: sides of the body, or (eye) the one eye a study shows, which the technique line then names
    laterality: Literal["body", "eye"] = "body"
    example_prompt: str = ""  # a typical report: the prompt of validation grids and `bench generate`; empty: the display name
    dicom_modality: str = Field("OT", pattern=r"^[A-Z]{2,16}$")  # DICOM Modality (0008,0060) of its synthetic DICOM files

    def example(self) -> str:
        """The example report, or the display name when there is none."""
        return self.example_prompt or f"{self.display_name}."


def default_modalities() -> dict[str, ModalityConfig]:
    return {
        "cxr": ModalityConfig(
            channels=1,
            display_name="chest X-ray",
            aliases=["chest x-ray", "chest xray", "chest radiograph", "x-ray", "xray", "cxr", "radiograph", "dx"],
            region="chest",
            example_prompt="Chest radiograph, PA view. Findings: large left pleural effusion.",
            dicom_modality="DX",
        ),
        "chest_ct": ModalityConfig(
            channels=1,
            display_name="chest CT",
            aliases=["chest ct", "ct chest", "ct", "thoracic ct", "lung ct", "ct thorax"],
            window=(-600.0, 1500.0),  # lung window
            region="chest",
            example_prompt="Axial CT thorax, lung window. Findings: right upper lobe mass.",
            dicom_modality="CT",
        ),
        "brain_mri": ModalityConfig(
            channels=1,
            display_name="brain MRI",
            aliases=["brain mri", "mri brain", "mri", "head mri", "brain mr", "mr"],
            region="brain",
            example_prompt="Axial FLAIR MRI of the brain. Findings: left frontal tumour with surrounding oedema.",
            dicom_modality="MR",
        ),
        "fundus": ModalityConfig(
            channels=3,
            display_name="colour fundus photograph",
            aliases=["fundus photograph", "fundus photo", "color fundus", "colour fundus", "retinal photograph", "cfp"],
            region="retina",
            laterality="eye",
            example_prompt="Colour fundus photograph. Findings: numerous hard exudates at the macula.",
            dicom_modality="OP",
        ),
        "oct": ModalityConfig(
            channels=1,
            display_name="retinal OCT",
            aliases=["retinal oct", "macular oct", "optical coherence tomography", "oct b-scan", "sd-oct"],
            region="retina",
            laterality="eye",
            example_prompt="Macular OCT. Findings: large subretinal fluid.",
            dicom_modality="OPT",
        ),
    }


class AugmentConfig(Section):
    """Light, label-preserving augmentation for training. No flips: they would swap laterality."""

    enabled: bool = False
    rotate_deg: float = Field(5.0, ge=0, le=45)  # maximum absolute rotation, degrees
    scale: float = Field(0.05, ge=0, le=0.5)  # maximum relative zoom in or out
    translate: float = Field(0.04, ge=0, le=0.5)  # maximum shift, fraction of the image side
    brightness: float = Field(0.05, ge=0, le=0.5)  # maximum additive change, fraction of the [0, 1] range
    contrast: float = Field(0.05, ge=0, le=0.5)  # maximum relative contrast change


class DataConfig(Section):
    image_size: int = Field(64, ge=16, le=4096)  # pixels; square output after aspect-preserving resize + pad
    modalities: dict[str, ModalityConfig] = Field(default_factory=default_modalities)
    manifests: list[str] = []  # training manifests (CSV, parquet, image folder); empty: phantoms.out
    clahe_clip_limit: float = Field(2.0, gt=0)  # CLAHE contrast limit, used for modalities with clahe: true
    clahe_tiles: int = Field(8, ge=1, le=64)  # CLAHE tile grid per side
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    skip_bad: bool = False  # skip unreadable rows (counted, listed next to the output) instead of stopping
    num_workers: int = Field(0, ge=0)  # DataLoader worker processes per device

    @field_validator("modalities")
    @classmethod
    def _aliases_unique(cls, modalities: dict[str, ModalityConfig]) -> dict[str, ModalityConfig]:
        seen: dict[str, str] = {}
        for name, spec in modalities.items():
            for alias in [name, *spec.aliases]:
                key = normalise_modality_text(alias)
                if seen.get(key, name) != name:
                    raise ValueError(f"alias {alias!r} of modality {name!r} is already used by {seen[key]!r}")
                seen[key] = name
        return modalities


class PhantomConfig(Section):
    out: str = "data/phantoms"  # output folder of `synthmed data phantoms`, relative to the working directory
    per_finding: int = Field(8, ge=1)  # studies per (modality, finding), the normal study counting as a finding
    size: int = Field(128, ge=32, le=2048)  # pixels, square
    seed: int = Field(0, ge=0)
    modalities: list[str] = ["cxr", "chest_ct", "brain_mri", "fundus", "oct"]
    negatives: int = Field(1, ge=0, le=5)  # most pertinent negatives ("no pneumothorax") stated per report


class TrainConfig(Section):
    """Optimisation settings shared by the generator's trainers (VAE, UNet, LoRA)."""

    lr: float = Field(1e-4, gt=0)  # peak learning rate after warm-up
    batch_size: int = Field(16, ge=1)  # images per device per step
    grad_accum_steps: int = Field(1, ge=1)  # micro-batches per optimiser step
    max_steps: int = Field(1000, ge=1)  # optimiser steps
    warmup_steps: int = Field(100, ge=0)  # linear warm-up, optimiser steps; cosine decay after
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)  # gradient clipping, L2 norm over all trainable parameters
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # "no" on CPU; bf16 on recent GPUs
    seed: int = Field(0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)  # UNet exponential moving average; 0 turns EMA off
    text_dropout: float = Field(0.1, ge=0, le=1)  # share of prompts replaced by "" (classifier-free guidance)
    finding_dropout: float = Field(0.2, ge=0, le=1)  # share of the rest trained on their text alone (model.finding_tokens)
    prompt_augment: bool = True  # shuffle report sentences and vary case/punctuation during training
    kl_weight: float = Field(1e-6, ge=0)  # VAE: weight of the KL term against the reconstruction loss
    validate_every: int = Field(500, ge=1)  # optimiser steps between validation sample grids
    checkpoint_every: int = Field(500, ge=1)  # optimiser steps between resumable checkpoints
    keep_checkpoints: int = Field(2, ge=1)  # newest resumable checkpoints kept
    val_fraction: float = Field(0.05, ge=0, lt=1)  # share of the manifest held back for validation
    out: str = "generator/weights/default"  # where the trained model is exported
    # `train unet` on a frozen (usually pretrained) UNet: LoRA adapters (section lora) and the conditioner
    # learn; the export merges the adapters into the UNet and also writes them alone (unet_lora.safetensors)
    unet_lora: bool = False


class ModelConfig(Section):
    """Shape of the latent diffusion model: VAE, UNet, conditioning, noise schedule."""

    image_size: int = Field(64, ge=16)  # pixels, square; the VAE downsamples by 2**(len(vae_channels) - 1)
    text_encoder: str = "packaged:all-MiniLM-L6-v2"  # BERT-like transformers model (name or folder); packaged MiniLM offline
    text_max_length: int = Field(64, ge=8, le=512)  # tokens kept from each prompt
    vae_pretrained: str | None = None  # a diffusers AutoencoderKL folder or hub id instead of training one
    vae_subfolder: str | None = None  # inside vae_pretrained, e.g. "vae" for a Stable Diffusion repository
    vae_channels: list[int] = [32, 64, 128]  # VAE block widths, one per resolution
    latent_channels: int = Field(4, ge=1)
    unet_pretrained: str | None = None  # a diffusers UNet2DConditionModel folder or hub id (e.g. SD 1.5's unet)
    unet_subfolder: str | None = None  # inside unet_pretrained, e.g. "unet"
    unet_channels: list[int] = [64, 128, 256]  # UNet block widths; attention at every level but the last
    unet_layers_per_block: int = Field(1, ge=1)
    unet_attention_heads: int = Field(4, ge=1)
    cross_attention_dim: int = Field(384, ge=8)  # width of the conditioning tokens seen by cross-attention
    # a learned token per finding the request states (and a pooled one in the class embedding), from the structured
    # findings (a manifest's findings column; a request's expectation when sampling): generator.conditioning
    finding_tokens: bool = False
    # v-prediction by default: with the cosine schedule the first sampling step sits at an SNR of ~1e-9,
    # where an epsilon model's x0 = (x - sqrt(1-a) eps) / sqrt(a) multiplies any error in eps by ~1e4
    # (the blotches of the first CPU model); v keeps x0 = sqrt(a) x - sqrt(1-a) v well conditioned.
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    # where sampling starts: "auto" = "trailing" (from pure noise, Lin et al. 2024) for v-prediction and
    # "leading" for epsilon, which must not start at zero SNR
    timestep_spacing: Literal["auto", "trailing", "leading", "linspace"] = "auto"
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"  # the last is the cosine schedule
    num_train_timesteps: int = Field(1000, ge=10)


class SampleConfig(Section):
    sampler: Literal["ddim", "dpmpp"] = "ddim"  # DDIM (with eta, log probabilities) or DPM-Solver++ (2M)
    steps: int = Field(25, ge=1)  # denoising steps
    guidance: float = Field(4.0, ge=0)  # classifier-free guidance scale; 1 = no guidance
    guidance_schedule: Literal["constant", "linear", "cosine"] = "constant"  # scale over the steps: constant, or rising from 1 to guidance
    eta: float = Field(0.0, ge=0, le=1)  # DDIM stochasticity; DDPO samples with eta > 0 to have log probabilities
    batch_size: int = Field(8, ge=1)  # images per forward pass
    seed: int = Field(0, ge=0)
    negative: str = ""  # default negative prompt
    # fp32, bf16, or auto: bf16 where the hardware computes it natively (generator/sampling.py); sample, generate,
    # synthesize and contact sheets draw in it; eval, the loop and training validation always draw in fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    lora: list[str] = []  # LoRA adapters applied on load (sample, eval, generate): .safetensors files, a run's final/ or best/, a run folder (its best/), or a run's steered/ (synthmed runs steer: its offset table steers the sampler)


class LoraConfig(Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    include_mid_block: bool = True  # also the mid block's attention projections
    include_out: bool = False  # also the output projections (transformer proj_out, conv_out)
    name: str = "default"  # adapter name; several can coexist (e.g. one per modality)
    text_encoder_rank: int = Field(0, ge=0)  # > 0: LoRA on the text encoder's query/key/value, trained by `train unet`
    text_encoder_alpha: float = Field(8.0, gt=0)


def normalise_modality_text(text: str) -> str:
    """Case, spaces, hyphens and underscores do not distinguish modality names."""
    return " ".join(text.lower().replace("-", " ").replace("_", " ").split())
