"""The graph's generator part: draws candidates with the latent diffusion model and writes them as PNGs.

The graph's state holds paths, never tensors, so every checkpoint stays small and readable and a
trace points at the very files the verifier judged.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from generator.errors import UserError
from generator.fileio import atomic_write
from generator.sampling import SampleOutput, sample


class ImageGenerator:
    """``draw(prompt, modality, seeds, ...) -> (paths, images)`` with one seed per candidate."""

    def __init__(self, model, channels: Mapping[str, int], sampler: str = "ddim", eta: float = 0.0, batch_size: int = 8,
                 guidance_schedule: str = "constant", source: str = "", precision: str = "fp32"):
        self.model = model  # generator.models.LatentDiffusion
        self.channels = dict(channels)  # modality -> 1 (grey) or 3 (colour)
        self.sampler, self.eta, self.batch_size, self.guidance_schedule = sampler, eta, batch_size, guidance_schedule
        self.precision = precision  # fp32, bf16 or auto (generator.sampling)
        self.source = source  # where the weights came from, for the trace

    @property
    def modalities(self) -> list[str]:
        return list(self.model.modalities)

    def unread_tail(self, prompt: str) -> tuple[int, int, str] | None:
        """``(tokens, limit, tail)`` when ``prompt`` runs past the model's token limit (``model.text_max_length``):
        the conditioning never sees ``tail``. None when the whole prompt is read."""
        encoder = self.model.conditioner.text_encoder
        ids = encoder.tokenizer(prompt, truncation=False)["input_ids"]
        if len(ids) <= encoder.max_length:
            return None
        # kept: [CLS], max_length - 2 tokens, [SEP]; the rest of the text (before the final [SEP]) is cut
        return len(ids), encoder.max_length, encoder.tokenizer.decode(ids[encoder.max_length - 1:-1])

    def draw(self, prompt: str, modality: str, seeds: Sequence[int], out: str | Path, negative: str = "",
             guidance: float = 4.0, steps: int = 25, prefix: str = "",
             findings: Sequence[Mapping] | None = None, reward_guide=None,
             expected: Mapping[str, bool] | None = None) -> tuple[list[str], torch.Tensor, float]:
        """Candidates for one prompt, one per seed (each image reproducible from its seed alone). ``findings``: the
        structured findings the prompt was composed from, for a generator with finding tokens (others read text only).
        ``reward_guide`` (:class:`rlhf.guidance.RewardGuide`) with ``expected`` (label -> present / absent): each image is
        drawn with reward guidance instead (DDIM, eta 0, full precision: :func:`rlhf.guidance.reward_guided_draw`), from
        the same starting noise of its seed, its jittered views drawn from its seed too.

        Returns the PNG paths, the images as (B, 3, H, W) in [-1, 1] (as written, i.e. quantised to
        8 bits, so the verifier judges the files) and the seconds taken."""
        if modality not in self.model.modalities:
            raise UserError(f"the generator was not trained on modality {modality!r}; it knows {', '.join(self.model.modalities)}")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        paths: list[str] = []
        arrays: list[np.ndarray] = []
        for run in consecutive_runs([int(s) for s in seeds], self.batch_size):
            # image i of a batch starts from the noise of seed run[0] + i (generator.sampling.initial_noise), so each
            # image depends on its own seed only and matches `synthmed sample --seed` for the same text
            if reward_guide is not None:
                output = self._guided(reward_guide, expected or {}, prompt, modality, run, negative, guidance, steps, findings)
            else:
                with torch.inference_mode():
                    output = sample(self.model, [prompt] * len(run), [modality] * len(run), negative=negative or None,
                                    guidance=guidance, steps=steps, seed=run[0], sampler=self.sampler, eta=self.eta,
                                    guidance_schedule=self.guidance_schedule, precision=self.precision,
                                    findings=[findings] * len(run) if findings is not None else None)
            for seed, image in zip(run, output.to_uint8([modality] * len(run), self.channels)):
                path = out / f"{prefix}{modality}_seed{seed:06d}.png"
                atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp))  # noqa: B023  (called at once)
                paths.append(str(path))
                arrays.append(image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2))
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return paths, images, time.perf_counter() - started

    def _guided(self, guide, expected: Mapping[str, bool], prompt: str, modality: str, run: Sequence[int], negative: str,
                guidance: float, steps: int, findings: Sequence[Mapping] | None) -> SampleOutput:
        from rlhf.guidance import reward_guided_draw, views_of_seeds

        n = len(run)
        stated = guide.stated(expected, modality)
        draw = reward_guided_draw(
            self.model, guide, [prompt] * n, [modality] * n, [stated] * n, list(run), views_of_seeds(run), steps, guidance,
            negatives=[negative] * n, findings=[findings] * n if findings is not None else None, batch_size=self.batch_size)
        return SampleOutput(draw.images)


def consecutive_runs(seeds: Sequence[int], limit: int) -> list[list[int]]:
    """Seeds cut into runs of consecutive values, each at most ``limit`` long (one batch each)."""
    runs: list[list[int]] = []
    for seed in seeds:
        if runs and seed == runs[-1][-1] + 1 and len(runs[-1]) < limit:
            runs[-1].append(seed)
        else:
            runs.append([seed])
    return runs


def read_images(paths: Sequence[str]) -> torch.Tensor:
    """PNGs back as (B, 3, H, W) in [-1, 1]."""
    arrays = []
    for path in paths:
        a = np.asarray(Image.open(path))
        arrays.append(np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3])
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


__all__ = ["ImageGenerator", "consecutive_runs", "read_images"]
