"""Typed configuration of the judges and the evaluation (section ``judges`` of the config tree).

Each judge owns one sub-section. Every field states its unit and scope.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassifierConfig(Section):
    """Multi-label finding classifiers, one per modality and role (``reward`` / ``evaluator``)."""

    out: str = "rlhf/weights/classifiers"  # shipped classifiers: <out>/<role>/<modality>/
    image_size: int = Field(64, ge=16)  # pixels; images are resized to this before classification
    data: list[str] = []  # manifests to train on; empty: the classifiers' own phantom set (phantoms_per_finding, phantoms_seed), drawn at image_size into <phantoms.out>_<image_size>px_seed<phantoms_seed>_<phantoms_per_finding>pf if absent
    phantoms_per_finding: int = Field(300, ge=1)  # studies per (modality, finding) of that set, the normal study counting as a finding (300: 2,100-2,700 images per modality, 12,300 in all); why 300: docs/judges/settings.md
    # studies per pair of findings that can be drawn together (generator.phantoms.compatible_pairs), so the classifiers learn
    # findings side by side: trained on one finding per image they missed one of two in most two-finding phantoms (the
    # loop's held-out requests are mostly pairs); 0: single findings only (docs/judges/settings.md)
    phantoms_per_pair: int = Field(40, ge=0)
    phantoms_seed: int = Field(4242, ge=0)  # seed of that set; must differ from judges.eval.seed (the evaluation's reference phantoms) and benchmark_seed, and differs from phantoms.seed so no generator training image is a classifier training image
    epochs: int = Field(12, ge=1)  # passes over the training split (measured choice: docs/judges/settings.md)
    batch_size: int = Field(64, ge=1)  # images per step
    lr: float = Field(2e-3, gt=0)  # peak learning rate (AdamW, cosine decay)
    weight_decay: float = Field(1e-4, ge=0)
    val_fraction: float = Field(0.15, gt=0, lt=1)  # share held back, half for calibration, half for AUROC
    # each label's operating point (where a finding counts as shown: the evaluation's "requested shown", the verifier) is fit
    # on the calibration half: the best sensitivity - false-positive rate among thresholds passing at most this share of the
    # images without the finding; null: 0.5 for every label (rlhf.classifiers.fit_operating_points)
    operating_max_fpr: float | None = Field(0.1, gt=0, lt=1)
    # the roles differ in seed, split and architecture so that the evaluator is independent of the reward and the verifier;
    # the verifier (agents.verifier.role) differs from the reward in seed, split and widths, so that an image drawn or
    # trained towards the reward's classifier is judged by another network
    reward_arch: Literal["convnet", "resnet"] = "convnet"
    reward_seed: int = Field(0, ge=0)
    verifier_arch: Literal["convnet", "resnet"] = "convnet"
    verifier_seed: int = Field(2, ge=0)
    verifier_widths: list[int] = [24, 48, 80, 96]  # channels of the verifier's network (its arch's widths below are the other roles')
    evaluator_arch: Literal["convnet", "resnet"] = "resnet"
    evaluator_seed: int = Field(1, ge=0)
    stem_patch: int = Field(2, ge=1)  # pixels per side of the patchify stem (a conv of that kernel and stride), both architectures; 4 is ~3x cheaper but loses small lesions
    convnet_widths: list[int] = [16, 32, 64, 64]  # channels: the stem, then one conv + 2x2 max pool per further width
    resnet_widths: list[int] = [20, 40, 80]  # channels per stage of the residual net; each stage after the first halves the resolution
    resnet_blocks: int = Field(1, ge=1)  # residual blocks per stage
    resnet_pool: Literal["avg", "avgmax"] = "avgmax"  # global pooling of the residual net's features: average, or average and max side by side (the convnet always pools both); avgmax keeps small lesions (docs/judges/settings.md)
    labels: Literal["auto", "phantom", "manifest"] = "auto"  # label space: the phantom catalogue, or names seen present in the rows; auto: phantom when every row is a phantom
    min_positives: int = Field(0, ge=0)  # labels=manifest: a name stated present in fewer rows is no label (too few to learn or to measure); the metadata lists the dropped ones
    augment: bool = True  # small shift, rotation, zoom, brightness and contrast jitter while training; never a flip (laterality)
    benchmark_per_finding: int = Field(40, ge=0)  # fresh phantoms per (modality, finding) drawn at benchmark_seed for an extra test (40 positives per finding: an AUROC's standard error near 0.03 instead of 0.06-0.08 at 10); 0: none
    # and per pair of findings drawn together: metadata's benchmark_pairs says in what share of them the classifier shows both
    benchmark_per_pair: int = Field(10, ge=0)
    benchmark_seed: int = Field(777, ge=0)  # distinct from the seed of the training phantoms
    num_threads: int = Field(1, ge=1)  # CPU threads torch may use while training; on a busy shared CPU two threads wait on each other's time slices (docs/judges/settings.md)
    device: str = "auto"  # "auto", "cpu", "cuda"


class AlignmentConfig(Section):
    """Image-text alignment model (CLIP) trained contrastively on image-report pairs."""

    out: str = "rlhf/weights/clip"  # the shipped alignment model
    model: str | None = None  # any open_clip model name instead of training one (e.g. "hf-hub:microsoft/BiomedCLIP-...")
    pretrained: str | None = None  # open_clip pretrained tag or checkpoint path for `model`
    image_size: int = Field(64, ge=16)  # pixels
    embed_dim: int = Field(128, ge=8)  # joint embedding width
    data: list[str] = []  # manifests of image-report pairs; empty: phantoms at image_size
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=2)  # pairs per step; contrastive loss sees batch_size - 1 negatives per pair
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)  # held-back pairs for retrieval recall@k
    seed: int = Field(0, ge=0)
    device: str = "auto"
    # the custom model (ignored when `model` names an open_clip model)
    vision_layers: int | list[int] = [1, 1, 1, 1]  # a list: ResNet blocks per stage (open_clip ModifiedResNet); an int: ViT layers
    vision_width: int = Field(16, ge=4)  # channels of the first ResNet stage (x32 at the attention pool), or the ViT token width
    vision_patch: int = Field(8, ge=2)  # pixels per ViT patch side (ViT only)
    text_width: int = Field(64, ge=8)  # channels of the text transformer; its token table (49,408 x width) is most of the weights
    text_layers: int = Field(2, ge=1)  # text transformer blocks
    text_heads: int = Field(4, ge=1)  # attention heads per text block
    context_length: int = Field(96, ge=8)  # tokens per report; longer ones are truncated (phantom reports: median 50, 97% fit 96)
    warmup_steps: int = Field(50, ge=0)  # optimiser steps of linear warm-up before the cosine decay
    augment_prompts: bool = True  # reorder sentences after the first, sometimes lowercase (generator.training.augment_prompt)
    max_shift: int = Field(3, ge=0)  # pixels; random translation of training images (never a flip: the side of a finding matters)
    time_budget_s: float | None = Field(None, gt=0)  # wall-clock seconds of training steps; the cosine decay follows elapsed time and training stops at the budget; None: all epochs (reproducible)


class SelectorConfig(Section):
    """Quality selector: alignment-model features -> head -> quality in [0, 1], with a learned threshold."""

    out: str = "rlhf/weights/selector"
    source: Literal["bootstrap", "ratings", "pairs"] = "bootstrap"  # bootstrap: real vs degraded/generated, no people
    ratings: str | None = None  # ratings CSV (image_path,rating,modality,expert_level,prompt) for source=ratings
    pairs: str | None = None  # preferences CSV (preferred_path,other_path,modality,prompt) for source=pairs
    expert_weights: dict[str, float] = {"junior": 0.5, "senior": 1.0, "expert": 1.5}  # rating weight per expert level
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = Field(0, ge=0)
    device: str = "auto"
    data: list[str] = []  # manifests of real images for source=bootstrap; empty: phantoms at the alignment model's image size
    hidden: int = Field(128, ge=1)  # units of the head's hidden layer
    dropout: float = Field(0.1, ge=0, lt=1)  # dropout before the head's output layer, training only
    weight_decay: float = Field(1e-4, ge=0)  # AdamW, head only (the alignment model stays frozen)
    degradations: list[str] = ["blur", "noise", "contrast", "blocking", "clipping", "occlusion", "ringing"]  # bootstrap negatives (rlhf.degrade)
    severities: list[int] = [1, 2, 3]  # 1 mild, 2 moderate, 3 severe; training copies draw one, validation uses all
    copies_per_image: int = Field(7, ge=1)  # degraded copies per training image, kinds in turn, severity drawn
    pair_weight: float = Field(1.0, ge=0)  # weight of the Bradley-Terry term (image above its own degraded copy) next to the absolute term
    rating_scale: tuple[float, float] | None = None  # (worst, best) rating; None: the smallest of 0-1, 1-5, 1-10, 0-100 holding every rating
    good_rating: float = Field(0.5, ge=0, le=1)  # normalised rating from which an image counts as good (threshold, AUROC)
    alignment: str | None = None  # alignment model folder the selector is trained on; None: judges.alignment.out


class EvalConfig(Section):
    """`synthmed eval`: generated against real images, per modality."""

    n_per_prompt: int = Field(4, ge=1)  # generated images per prompt (MS-SSIM diversity needs 2 or more)
    prompts_per_modality: int = Field(16, ge=1)  # prompts drawn from the held-back real (or phantom) reports
    steps: int = Field(25, ge=1)  # denoising steps of the generator under evaluation
    sampler: Literal["ddim", "dpmpp"] = "ddim"  # DDIM, or DPM-Solver++ (2M): to judge whether fewer steps draw as well
    guidance: float = Field(4.0, ge=0)
    seed: int = Field(1234, ge=0)  # evaluation seed, distinct from the training seeds
    inception_weights: str | None = None  # a local torchvision inception_v3 state dict; None: FID/KID (Inception) reported unavailable
    memorisation_threshold: float = Field(0.95, gt=0, le=1)  # cosine similarity to the nearest training image above which a sample counts as memorised
    memorisation_pixel_threshold: float = Field(0.95, gt=0, le=1)  # SSIM to the nearest training image (pixel-space second opinion) above which a sample counts as memorised; distinct real CXRs reach 0.91 at 32 px
    memorisation_pixel_size: int = Field(32, ge=8)  # pixels; side both images are downsampled to for the pixel-space check
    kid_subsets: int = Field(100, ge=1)  # random subsets averaged for KID
    kid_subset_size: int = Field(1000, ge=2)  # feature vectors per KID subset and set; clamped to the smaller set
    inception_batch_size: int = Field(32, ge=1)  # images per Inception forward pass
    # quality checks (rlhf.metrics.quality_checks) on luminance in [0, 1], calibrated on meddata at 64 px: the only real
    # images below the blank std are 2 practically black fundus photographs of 1256; clipped black covers up to 30% of a
    # real CXR, clipped white at most 6% of any image; corners above 0.4 occur in 0.2% of brain MRI and in no fundus photograph
    quality_blank_std: float = Field(0.01, ge=0)  # luminance std below which an image is blank (~2.5 grey levels)
    quality_saturated_share: float = Field(0.35, gt=0, le=1)  # share of pixels at an extreme above which an image is saturated
    quality_corner_brightness: float = Field(0.4, gt=0, le=1)  # mean luminance of a corner patch above which a dark-cornered modality is out of field
    dark_corner_modalities: list[str] = ["fundus", "brain_mri"]  # modalities whose image corners lie outside the field of view (dark)
    dark_end_saturation_modalities: list[str] = ["cxr"]  # modalities where clipped black also counts as saturation (elsewhere black is background)


class JudgesConfig(Section):
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig)
    selector: SelectorConfig = Field(default_factory=SelectorConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


__all__ = ["AlignmentConfig", "ClassifierConfig", "EvalConfig", "JudgesConfig", "SelectorConfig"]


# ---------------------------------------------------------------------------------------------
# The self-improvement loop (`synthmed improve`, section ``improve``)

REWARD_COMPONENTS = ("findings", "alignment", "selector", "quality")  # what a reward may weigh
FORBIDDEN_IN_REWARD = ("evaluator", "finding_evaluator")  # the held-out judge: asking for it is an error


class PromptsConfig(Section):
    """The knowledge-driven prompt sampler (agents/requests.py)."""

    modalities: list[str] = ["cxr", "chest_ct", "brain_mri", "fundus", "oct"]  # drawn in turn, equally often
    findings: dict[str, list[str]] = {}  # per modality, the findings requests may ask for; absent modality: every finding the reward classifier knows
    max_findings: int = Field(2, ge=0, le=2)  # present findings per request: 0 (normal), 1 or 2
    p_normal: float = Field(0.15, ge=0, le=1)  # share of training requests for a normal study
    p_two: float = Field(0.3, ge=0, le=1)  # share of abnormal training requests with two findings
    severities: dict[str, float] = {"mild": 0.2, "moderate": 0.4, "severe": 0.4}  # relative frequency of each grade asked for
    negatives: int = Field(1, ge=0, le=3)  # pertinent negatives ("no pneumothorax") stated per request
    heldout_fraction: float = Field(0.3, gt=0, lt=1)  # share of each modality's finding combinations (singles and pairs) kept for the held-out set
    heldout: dict[str, list[str]] = {}  # per modality, the held-out combinations named ("glioma", "a+b"); absent modality: drawn with heldout_fraction
    heldout_per_modality: int = Field(8, ge=1)  # held-out prompts per modality (fixed per run)
    # untouched test prompts per modality: the same held-out combinations, worded and drawn apart, with their own image
    # seeds (improve.eval.test_seed); evaluated on the base at epoch 0 and on best/ and final/ at the end, and read by
    # nothing that decides (not best/, not the guard), so their figures are not tuned on. 0: none
    test_per_modality: int = Field(8, ge=0)
    seed: int = Field(0, ge=0)  # which combinations are held out, and the held-out prompts' wording


class RewardConfig(Section):
    """The reward: a weighted sum of components, each kept per sample. Components: ``findings`` (the
    reward-role classifier's agreement with the structured expectation: present findings shown,
    absent ones not), ``alignment`` (CLIP cosine of image and prompt), ``selector`` (learned quality
    in [0, 1]), ``quality`` (1 when no quality check fails: blank, saturated, out of field, NaN)."""

    weights: dict[str, float] = {"findings": 1.0, "alignment": 0.2, "selector": 0.1, "quality": 0.5}
    # How a finding's probability enters the findings component: "prob" averages p (present) or 1 - p (absent);
    # "log" averages log p or log(1 - p), p clipped to [findings_floor, 1 - findings_floor]. When the base model
    # rarely draws a finding, p sits near 0 for all K images of a prompt and "prob" leaves the group nothing to
    # rank (1e-4 and 1e-3 differ by 0.001); in "log" they differ by 2.3, so the policy can climb from there.
    findings_form: Literal["prob", "log"] = "prob"
    findings_floor: float = Field(1e-6, gt=0, lt=0.5)


class DDPOConfig(Section):
    """Stage 1: DDPO with per-prompt group advantages and a PPO-clip loss on the LoRA policy."""

    epochs: int = Field(2, ge=1)  # sample -> reward -> update rounds
    prompts_per_epoch: int = Field(16, ge=1)  # distinct prompts per epoch, per process
    images_per_prompt: int = Field(4, ge=2)  # K: the group an advantage is normalised in
    steps: int = Field(10, ge=2)  # DDIM steps of a rollout
    eta: float = Field(1.0, gt=0, le=1)  # DDIM stochasticity of rollouts (a policy needs eta > 0)
    guidance: float = Field(4.0, ge=1)  # classifier-free guidance scale of rollouts and updates
    sample_batch_size: int = Field(20, ge=1)  # images per sampling forward pass
    train_batch_size: int = Field(8, ge=1)  # samples per update micro-batch
    grad_accum_steps: int = Field(1, ge=1)  # micro-batches per optimiser step (times the trained timesteps of each)
    inner_epochs: int = Field(1, ge=1)  # passes over an epoch's rollouts
    timestep_fraction: float = Field(0.5, gt=0, le=1)  # share of each trajectory's steps trained on, drawn afresh per sample
    # PPO ratio clip on the log density averaged over latent elements. ddpo-pytorch's 1e-4 over SD's 4x64x64 = 16,384 elements
    # is a trust region of ~1.6 in summed log density; over this model's 4x16x16 = 1,024 elements the same region is ~1.6e-3
    # (1e-4 here clipped 30% of ratios from the second optimiser step on and barely moved the policy in 5 epochs)
    clip_range: float = Field(1e-3, gt=0)
    logprob_reduce: Literal["mean", "sum"] = "mean"  # per-element log density averaged (ddpo-pytorch) or summed over the latent
    adv_clip_max: float = Field(5.0, gt=0)  # advantages clipped to [-adv_clip_max, adv_clip_max]
    advantages: Literal["group", "tracker", "batch"] = "group"  # normalise within each prompt's K images (GRPO), per prompt text over recent epochs (ddpo-pytorch's stat tracker), or over the batch
    tracker_buffer: int = Field(32, ge=2)  # tracker: rewards kept per prompt
    tracker_min_count: int = Field(8, ge=2)  # tracker: below this many a prompt uses the batch's statistics
    # The update: "ppo" is DDPO's PPO-clip on the rollouts' log probabilities and the scalar reward; "draft" backpropagates
    # the reward-role classifier's log likelihood of the expected findings (the differentiable "log" findings reward)
    # through the VAE decoder and the last ``draft_steps`` denoising steps of each stored rollout (DRaFT-K, Clark et al.
    # 2024), with each step's noise held at the rollout's, so the image it differentiates is the one the reward scored.
    # "draft" uses only the findings component for its gradient; the other components are still measured and logged.
    # "none": no stage-1 update; the rollouts are still drawn and judged (the reward logs, the guard, stage 2's
    # candidates), so stage 2 alone trains the policy (e.g. selection.target=table, whose regression a PPO step between
    # its epochs pushes back: docs/improve/long_runs.md).
    objective: Literal["ppo", "draft", "none"] = "ppo"
    draft_steps: int = Field(2, ge=1)  # K of DRaFT-K: the last K of the ``steps`` denoising steps carry the gradient
    kl_weight: float = Field(0.0, ge=0)  # beta of the KL penalty to the base model (adapter disabled); 0: no penalty (and no extra forward pass)
    # draft: the classifier's likelihood is averaged over this many views of each decoded image, each shifted and zoomed a
    # little (rlhf.ddpo.jittered_views; the classifiers trained with such jitter), so the gradient cannot rest on one pixel
    # pattern only the reward classifier reads; 1: the image as decoded
    draft_views: int = Field(1, ge=1)
    draft_view_shift: float = Field(0.06, ge=0, lt=0.5)  # largest shift of a view, share of the side
    draft_view_zoom: float = Field(0.08, ge=0, lt=0.5)  # largest zoom in or out of a view
    # What the updates train: the UNet's LoRA (the policy), the finding table of a base model with finding tokens
    # (model.finding_tokens: a vector per finding and one per state, side, severity and location; not the pooled path's
    # shared projection), or both. "findings" is prompt tuning: the UNet stays the base's and only what each finding
    # asks of it moves; the table is saved beside the adapter (findings.safetensors) and loaded with it by --lora. The
    # KL penalty's reference is then the base model's own table (kept frozen), with the adapter disabled.
    trainable: Literal["lora", "findings", "lora+findings"] = "lora"
    lr: float = Field(5e-4, gt=0)  # AdamW learning rate of the trained weights
    # The learning rate over the run's epochs (stage 1 and stage 2 share the optimiser): "constant", or "cosine" from ``lr``
    # at epoch 1 down to ``lr * lr_min_ratio`` at epoch ``lr_schedule_epochs`` (default: ``epochs``), held there after.
    # A pure function of the epoch (:func:`rlhf.ddpo.epoch_lr`), so a resumed run sets the same rates. A constant rate
    # left the table stage's held-out share moving by a few images between evaluations and falling past epoch 32, where
    # the guard stopped it at 44 (docs/improve/long_runs.md).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_min_ratio: float = Field(0.1, ge=0, le=1)
    lr_schedule_epochs: int | None = Field(None, ge=1)
    weight_decay: float = Field(1e-4, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)  # gradient clipping, L2 over the trained parameters
    seed: int = Field(0, ge=0)  # rollout noise and timestep draws (each process offsets it by its rank)


class SelectionConfig(Section):
    """Stage 2, active selection (MINIM): samples above the selector's threshold that the verifier
    passes feed a reward-weighted denoising update."""

    enabled: bool = True
    threshold: float | None = Field(None, ge=0, le=1)  # selector quality from which a sample is kept; None: the selector's learned threshold
    require_verifier_pass: bool = True  # also every expected finding must agree with the reward classifier (present from the label's operating point, absent below it)
    max_per_epoch: int = Field(16, ge=0)  # selected samples used per epoch, highest reward first
    loss_weight: float = Field(1.0, ge=0)  # scale of the reward-weighted denoising loss
    batch_size: int = Field(8, ge=1)  # selected samples per optimiser step
    # noise levels (target=trajectory / table: steps of the draft) drawn per selected sample per pass. With target=table,
    # many requests a step at one step each (batch_size 32, noise_draws 1, passes 36: the `table` profile) fitted the
    # table where 8 requests at all 9 of their steps (noise_draws 9, passes 4: the same terms) or 2 at 9 did not
    # (docs/improve/long_runs.md, eleventh session)
    noise_draws: int = Field(2, ge=1)
    passes: int = Field(1, ge=1)  # passes over the epoch's selected samples (optimiser steps: passes x ceil(selected / batch_size))
    # What the denoising loss fits: the conditional branch (MINIM's fine-tuning), or the classifier-free-guided prediction
    # the policy samples with (improve.ddpo.guidance). Fitting the conditional branch alone, whatever the LoRA learns for a
    # prompt is multiplied by the guidance scale when the policy samples (4 by default): textures a selected image has
    # come back amplified.
    fit: Literal["conditional", "guided"] = "conditional"
    # What it is fitted to: the selected samples' final latents, noised at random timesteps (the denoising loss), or, with
    # source=guided, the guided drafts' own steps: at a state x_t the guided sampler passed through, the output it took
    # there (guidance distillation; the guided prediction is fitted whatever ``fit`` says).
    # "table" (with source=guided): guidance distilled through its per-request average. The guided drafts are the base's
    # (adapter disabled); at each of their states, the shift guidance gave x0_hat over the base's own is kept, and the
    # shifts of every epoch so far are fitted by an offset table (rlhf.amortised: per step, a ridge regression on the
    # request's stated findings, sides and modality). The policy is then fitted, at the states of the base's
    # table-steered draw of each selected request (its rollout's starting noise, x0_hat moved by table_gamma x the
    # table's offset), to that draw's: a fixed target per request, where "trajectory" fits each draft's own, per-image
    # gradient (docs/improve/long_runs.md: the table's gain carries to untouched requests; the per-image steps did not).
    # The fit is the probe's regression: x0_hat against the steered draw's, each step's error divided by its mean squared
    # offset (1.0: the adapter gives nothing of the table; the selection's step loss), only the steps the table moves,
    # every selected request alike; ``noise_draws`` of at least the steps' count visits each of them once a pass.
    # "drafts" (with source=guided): the base's guided drafts themselves, fitted by the table's regression: at each state
    # a draft passed, the policy's guided x0_hat against the draft's (the base's plus guidance's shift), each step's error
    # divided by that step's mean squared shift over the selected drafts, every draft alike. The per-image target
    # "trajectory" fits in the output's units (where the late steps' errors swamp the early ones and its loss did not
    # fall); "table" fits the shifts' per-request average, a function of the request and step only, where a draft's
    # shift also depends on the state it was taken at. Measured over 16 epochs of the `table` profile: behind the table at
    # every evaluation from epoch 8 (0.125 against 0.163 held out at best; docs/improve/long_runs.md, thirteenth session).
    target: Literal["final", "trajectory", "table", "drafts"] = "final"
    # target=table: the table's offsets are multiplied by this in the steered draws. 1.75 is the seventh session's probe's
    # choice; the 32-epoch table run's own table (2,048 drafts) steering the base is past the held-out FD edge there
    # (+12%) and within it at 1.25 (0.300 held out; 0.279 on 240 untouched images, FD -10%: docs/improve/long_runs.md,
    # thirteenth session), the gamma a table-stage run of the adapter has not yet been measured at
    table_gamma: float = Field(1.75, gt=0)
    table_ridge: float = Field(1.0, ge=0)  # target=table: the table's ridge penalty (per step, on the feature weights)
    # target=table: the selection waits until the table holds this many drafts; the epochs before only add their drafts
    # (a table of a few dozen drafts memorises its requests, so fitting the policy to it early chases a moving, noisy
    # target; measured, 512 drafts of warm-up left the held-out curve where it was: docs/improve/long_runs.md). 0: fit
    # from the first epoch.
    table_warmup: int = Field(0, ge=0)
    # target=table: each epoch's selection also revisits the selected requests of this many earlier epochs (their
    # table-steered draws kept, in half precision, in the trainer's checkpoint): each request is fitted in (1 + this)
    # epochs, as the probe fitted its draws over several passes (measured with 3 and passes=1: no change against 4 passes
    # in one epoch, docs/improve/long_runs.md). 0: every epoch's requests are fitted in that epoch only.
    table_replay: int = Field(0, ge=0)
    # Where the candidates come from. "rollouts": the epoch's stage-1 rollouts (MINIM's selection). "guided": one
    # reward-guided draw per rollout (same request, same starting noise, DDIM with eta 0 and the rollouts' steps and
    # guidance), each step's x0_hat moved along the gradient of the reward-role classifier's log likelihood of the
    # request's findings (through the VAE decoder, averaged over ``guidance_views`` jittered views; rlhf.ddpo.guidance_shift).
    # The selection then distils what guidance drew into the policy: expert iteration, with the reward's classifier as
    # the expert's compass. The held-out evaluation still samples the policy without guidance, and the evaluator never
    # guides (it is not the reward's classifier).
    source: Literal["rollouts", "guided"] = "rollouts"
    guidance_scale: float = Field(0.1, gt=0)  # guided: x0_hat moves by this x sqrt(alpha_t) in RMS units per step
    guidance_views: int = Field(4, ge=1)  # guided: jittered views the classifier's likelihood is averaged over

    @property
    def draws_guided(self) -> bool:
        """Whether the loop draws guided drafts: stage 2 on, with guided candidates and room for any."""
        return self.enabled and self.source == "guided" and self.max_per_epoch > 0


class HeldoutConfig(Section):
    """Held-out evaluation: fixed prompts, deterministic sampler, fixed seeds, the evaluator classifier."""

    every: int = Field(5, ge=1)  # epochs between evaluations (epoch 0, the base model, and the last epoch always)
    images_per_prompt: int = Field(2, ge=1)  # images per held-out prompt (MS-SSIM within a prompt needs 2)
    steps: int = Field(10, ge=1)  # DDIM steps (eta 0)
    seed: int = Field(1234, ge=0)  # image i of prompt p uses seed + 1000 p + i, every evaluation alike
    test_seed: int = Field(98765, ge=0)  # the same for the untouched test prompts (improve.prompts.test_per_modality)
    reference_per_finding: int = Field(6, ge=2)  # fresh phantoms per (modality, finding) as the real side of the FD, at judges.eval.seed (a profile of real images: 8x this validation images per modality)
    # Images that truly show each held-out request, judged like the generated ones once per run (the "reference" line of
    # metrics.jsonl): phantoms drawn to the request, or the real reference images with its labels. They say how far the
    # evaluator's share can rise: on the default profile's held-out set, phantoms of the requests show every requested
    # finding in 0.481 of images with the classifiers that learnt findings side by side (0.172 with those that saw one at a
    # time; docs/improve/long_runs.md). 0: not measured.
    reference_per_request: int = Field(8, ge=0)
    reference_seed: int = Field(4343, ge=0)  # seed of the phantoms drawn to the requests (distinct from the classifiers' 4242)
    # Reward guidance calibrated on the held-out set, once, at epoch 0: the base drawn on the held-out requests by the
    # reward-guided sampler (the reward's classifiers steer; rlhf.guidance) at each of these scales (and at stage 2's
    # improve.selection.guidance_scale when it draws guided drafts), a "guided" line each, judged by the evaluator like
    # every evaluation. The calibrated scale is the one with the highest share among those whose images stay within the
    # gain's terms (FD and MS-SSIM against the base's, as best/ is chosen: improve.guard); it is judged once on the
    # untouched test prompts and written to the run's guidance.json, the --reward-guidance that `synthmed generate` and
    # `synthmed synthesize` take. A sampler setting chosen by the held-out evaluator, not a trained policy. []: none.
    guidance_scales: list[float] = Field(default_factory=list)
    # A table-stage run (improve.selection.target=table) ends by making its offset table part of its policy: the base
    # drawn on the held-out requests with every step's x0_hat moved by each of these gammas x the table, the gamma kept
    # as `synthmed runs steer` keeps it (the best share within the gain's terms whose next gamma up is within them too),
    # written to the run's steered/ (what --lora loads) and steer.json, and judged once on the untouched test prompts.
    # Only the held-out evaluator chooses; it never enters the table. []: none (`synthmed runs steer RUN` does it later).
    steer_gammas: list[float] = Field(default_factory=list)
    # with steer_gammas: also a gamma per modality, each chosen on its own held-out images and kept where they together
    # beat the one gamma (`synthmed runs steer --per-modality`)
    steer_per_modality: bool = False

    @field_validator("guidance_scales", "steer_gammas")
    @classmethod
    def _positive_distinct(cls, scales: list[float], info) -> list[float]:
        what = "reward-guidance scale" if info.field_name == "guidance_scales" else "steering gamma"
        if any(not (s > 0) for s in scales):
            raise ValueError(f"every {what} must be above 0, got {scales}")
        if len(set(scales)) != len(scales):
            raise ValueError(f"{what}s must be distinct, got {scales}")
        return scales


class GuardConfig(Section):
    """Reward-hacking guard."""

    enabled: bool = True
    patience: int = Field(2, ge=1)  # evaluations in a row that must show the pattern before the loop stops
    fd_tolerance: float = Field(0.10, ge=0)  # relative FD worsening against the base model that counts as a warning sign
    # the same for any one modality's FD against its base (None: only the mean is watched); the mean can fall while one
    # modality's images drift away from the real ones (docs/improve/real_loop.md, run 2: chest CT 186 -> 447)
    modality_fd_tolerance: float | None = Field(None, ge=0)
    min_drop: float = Field(0.0, ge=0)  # a fall of the evaluator's metric larger than this counts
    metric: Literal["all_requested_shown", "requested_shown", "finding_accuracy"] = "all_requested_shown"  # the held-out evaluator's figure watched
    # best/ is the best held-out result among evaluations whose images stayed acceptable: FD no more than fd_tolerance
    # worse than the base's and MS-SSIM within a prompt no more than this above the base's (the gain terms); an
    # evaluation past either is not a candidate (the base model, epoch 0, always is). None: every evaluation is a candidate
    best_ms_ssim_rise: float | None = Field(0.05, ge=0)
    best_within_tolerance: bool = True  # False: best/ by the held-out share alone, whatever the FD and MS-SSIM


class ImproveConfig(Section):
    base_model: str | None = None  # the generator to improve; None: train.out (the shipped model)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ddpo: DDPOConfig = Field(default_factory=DDPOConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    eval: HeldoutConfig = Field(default_factory=HeldoutConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    report_to: Literal["auto", "none", "tensorboard", "trackio", "wandb"] = "auto"  # trackers beside metrics.jsonl; auto: TensorBoard when installed
    keep_checkpoints: int = Field(2, ge=1)  # newest epoch checkpoints kept
    grid_images: int = Field(20, ge=1)  # rollouts shown in each epoch's grid
    num_threads: int = Field(0, ge=0)  # torch CPU threads; 0: leave torch's default

    @model_validator(mode="after")
    def _steer_needs_a_table(self) -> "ImproveConfig":
        if self.eval.steer_gammas and self.selection.target != "table":
            raise ValueError(f"improve.eval.steer_gammas steer by the offset table a run with improve.selection.target=table "
                             f"fits (this one's target is {self.selection.target}); set improve.eval.steer_gammas=[] or "
                             "use the table (synthmed improve --config table)")
        if self.eval.steer_per_modality and not self.eval.steer_gammas:
            raise ValueError("improve.eval.steer_per_modality chooses each modality's gamma among improve.eval.steer_gammas, "
                             "which is empty; give the gammas (e.g. [1, 1.25, 1.5, 1.75, 2]) or set it to false")
        return self


__all__ += ["DDPOConfig", "FORBIDDEN_IN_REWARD", "GuardConfig", "HeldoutConfig", "ImproveConfig", "PromptsConfig",
            "REWARD_COMPONENTS", "RewardConfig", "SelectionConfig"]
