"""trl 0.23.1's ``DDPOTrainer`` on synthmed's model: the reference side of ``synthmed bench improve``.

Run inside the trl environment that :mod:`pipelines.trl_bench` creates (trl 0.23.1 on top of this
project's own packages), as ``python trl_ddpo_runner.py SPEC.json``; it writes ``result.json``, the
trained adapter and ``epochs.jsonl`` into the spec's ``out`` folder. Every import of trl happens
here and only here, so the main environment never needs trl.

What is trl's and what is ours. trl's own code does the work: ``DDPOTrainer.train`` (sampling loop,
reward call, advantages with its ``PerPromptStatTracker``, PPO-clip loss, AdamW, accelerate's
gradient accumulation), trl's ``pipeline_step`` (the sampling loop over the diffusers
``StableDiffusionPipeline``) and trl's ``scheduler_step`` (DDIM with log probabilities). Ours, because
trl's interfaces cannot carry them:

1. The model. trl's ``DefaultDDPOStableDiffusionPipeline`` loads a hub id; :class:`SynthmedDDPOPipeline`
   implements trl's abstract ``DDPOStableDiffusionPipeline`` over a ``StableDiffusionPipeline`` assembled
   from our VAE, UNet and DDIM scheduler config, as ``synthmed bench generate`` assembles it.
2. The conditioning. trl encodes a prompt as ``text_encoder(tokenizer(prompt).input_ids)[0]`` and hands
   that one tensor to the UNet as ``encoder_hidden_states``; our UNet also needs the token mask and the
   modality x text class vector, and the modality is not in the text. So the "tokenizer"
   (:class:`PromptBook`) gives each prompt the id of its request, the "text encoder"
   (:class:`ConditioningEncoder`) runs our conditioner and *packs* tokens, mask and class vector into
   one tensor (:class:`PackLayout`), and a forward pre-hook on the UNet unpacks it on every call, in
   sampling and in trl's loss alike. Nothing in trl's loop sees the difference.
3. The negative prompt. trl encodes one negative prompt for every sample (``config.negative_prompts``);
   our unconditional branch depends on each request's negative text and modality. trl's negative is
   therefore a placeholder, replaced in the hook by the negative conditioning of the request in the
   paired (second) half of the guided batch.
4. The LoRA adapter is added by :func:`generator.lora.add_lora` (peft ``add_adapter`` on exactly our
   target modules and rank, float32), where trl's default adds rank 4 on bare suffixes.
5. Prompts and reward are ours: ``prompt_fn`` returns the requests our loop draws, each K times in a
   row (trl asks for one prompt per sample), and ``reward_fn`` is :func:`rlhf.reward.build_reward`.
6. Timing: ``DDPOTrainer.step`` and its ``_generate_samples`` / ``compute_rewards`` /
   ``_train_batched_samples`` are wrapped on the instance by timers; their code runs unchanged. Before
   each epoch the runner waits for the bench's "go" (:class:`Channel`), so the two sides take turns.
7. Compatibility with the newer accelerate this project runs: its logger refuses to log before any
   accelerate state exists, and ``DDPOTrainer.__init__`` logs before it builds its ``Accelerator``, so
   the runner creates ``accelerate.PartialState()`` first. Nothing else needed changing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from generator.errors import UserError

try:  # only inside the trl environment; the pure parts below import without it (tests)
    from trl import DDPOStableDiffusionPipeline
except ImportError:  # pragma: no cover - exercised by the main environment's tests
    DDPOStableDiffusionPipeline = object

TRL_VERSION = "0.23.1"
COND, PLACEHOLDER = 1.0, 2.0  # row kinds in the packed conditioning


# ---------------------------------------------------------------------------------------------
# Packing our conditioning into the one tensor trl passes around


@dataclass(frozen=True)
class PackLayout:
    """(B, tokens + meta_rows, width): the token embeddings, then rows holding, flattened,
    ``[mask (tokens), request id, kind, class vector (class_dim)]``, zero-padded."""

    tokens: int  # text tokens + the modality token, padded to a fixed length
    width: int  # cross-attention width D
    class_dim: int  # the UNet's time-embedding width T

    @property
    def meta_length(self) -> int:
        return self.tokens + 2 + self.class_dim

    @property
    def meta_rows(self) -> int:
        return math.ceil(self.meta_length / self.width)

    @property
    def length(self) -> int:
        return self.tokens + self.meta_rows

    def pack(self, tokens: torch.Tensor, mask: torch.Tensor, class_emb: torch.Tensor, ids: torch.Tensor, kind: float) -> torch.Tensor:
        b, n, d = tokens.shape  # (B, n, D), n <= self.tokens
        if d != self.width or n > self.tokens or class_emb.shape != (b, self.class_dim):
            raise ValueError(f"conditioning {tuple(tokens.shape)} / class {tuple(class_emb.shape)} does not fit {self}")
        padded = torch.zeros(b, self.tokens, d, dtype=tokens.dtype, device=tokens.device)
        padded[:, :n] = tokens
        meta = torch.zeros(b, self.meta_rows * d, dtype=tokens.dtype, device=tokens.device)
        meta[:, :n] = mask.to(tokens.dtype)
        meta[:, self.tokens] = ids.to(tokens.dtype)
        meta[:, self.tokens + 1] = kind
        meta[:, self.tokens + 2:self.meta_length] = class_emb.to(tokens.dtype)
        return torch.cat([padded, meta.view(b, self.meta_rows, d)], dim=1)  # (B, length, D)

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (B, L, D), mask (B, L) long, class vector (B, T), ids (B,) long, kinds (B,)."""
        if packed.ndim != 3 or packed.shape[1:] != (self.length, self.width):
            raise ValueError(f"encoder_hidden_states {tuple(packed.shape)} is not packed synthmed conditioning "
                             f"(B, {self.length}, {self.width})")
        meta = packed[:, self.tokens:].reshape(packed.shape[0], -1)
        mask = meta[:, :self.tokens].round().long()
        ids = meta[:, self.tokens].round().long()
        kinds = meta[:, self.tokens + 1].round()
        return packed[:, :self.tokens], mask, meta[:, self.tokens + 2:self.meta_length], ids, kinds


# ---------------------------------------------------------------------------------------------
# trl's "tokenizer": prompt strings <-> request ids


class PromptBook:
    """Each request trl is given gets a string key (what trl's stat tracker groups by) and an id
    (what travels in ``input_ids``). Id 0 is trl's negative prompt, a placeholder."""

    model_max_length = 1  # one "token" per prompt: its id

    def __init__(self):
        self.items: list[Any] = [None]
        self._ids: dict[str, int] = {"": 0}
        self._keys: list[str] = [""]

    @staticmethod
    def key(item: Any, group: str | None = None) -> str:
        """The request's words; with ``group``, prefixed by it, so trl's tracker keeps each group apart."""
        words = f"{item.modality} | {item.prompt} | negative: {item.negative}"
        return f"{group} | {words}" if group else words

    def register(self, item: Any, group: str | None = None) -> str:
        key = self.key(item, group)
        if key not in self._ids:
            self._ids[key] = len(self.items)
            self.items.append(item)
            self._keys.append(key)
        return key

    def __call__(self, text: str | Sequence[str], return_tensors: str = "pt", **_: Any) -> SimpleNamespace:
        texts = [text] if isinstance(text, str) else list(text)
        unknown = [t for t in texts if t not in self._ids]
        if unknown:
            raise KeyError(f"prompt(s) never given by the prompt function: {unknown[:3]}")
        return SimpleNamespace(input_ids=torch.tensor([[self._ids[t]] for t in texts], dtype=torch.long))

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
        return [self._keys[int(row[0])] for row in np.asarray(ids).reshape(len(ids), -1)]


class ConditioningEncoder(torch.nn.Module):
    """trl's "text encoder": ``(input_ids,) -> (packed conditioning,)``, with our conditioner inside.
    Also encodes each request's negative once, for the hook to put in place of trl's placeholder."""

    def __init__(self, conditioner: torch.nn.Module, book: PromptBook, layout: PackLayout):
        super().__init__()
        self.conditioner = conditioner
        self.book = book
        self.layout = layout
        self.negatives: dict[int, torch.Tensor] = {}  # request id -> packed (length, D)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        ids = input_ids[:, 0].long()
        dtype = self.conditioner.token_proj.weight.dtype
        if bool((ids == 0).all()):
            b = ids.shape[0]
            placeholder = self.layout.pack(torch.zeros(b, 1, self.layout.width, dtype=dtype, device=ids.device),
                                           torch.zeros(b, 1, device=ids.device),
                                           torch.zeros(b, self.layout.class_dim, dtype=dtype, device=ids.device), ids, PLACEHOLDER)
            return (placeholder,)
        if bool((ids == 0).any()):
            raise ValueError("a batch mixes trl's negative prompt with requests")
        items = [self.book.items[int(i)] for i in ids]
        modalities = [it.modality for it in items]
        cond = self.conditioner([it.prompt for it in items], modalities, [it.generator_findings for it in items])
        new = sorted({int(i) for i in ids} - set(self.negatives))
        if new:
            negs = [self.book.items[i] for i in new]
            neg = self.conditioner([it.negative or "" for it in negs], [it.modality for it in negs])
            packed = self.layout.pack(neg.tokens, neg.mask, neg.class_emb, torch.tensor(new), COND)
            self.negatives.update({i: row for i, row in zip(new, packed)})
        return (self.layout.pack(cond.tokens, cond.mask, cond.class_emb, ids, COND),)


def unpack_for_unet(layout: PackLayout, negatives: dict[int, torch.Tensor], packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """The UNet's keyword arguments from packed conditioning; placeholder rows (trl's negative prompt,
    the first half of a guided batch) become the negative of the request in the paired row."""
    _, _, _, ids, kinds = layout.unpack(packed)
    if bool((kinds == PLACEHOLDER).any()):
        n = packed.shape[0] // 2
        if packed.shape[0] % 2 or not bool((kinds[:n] == PLACEHOLDER).all()) or not bool((kinds[n:] == COND).all()):
            raise ValueError("trl's negative prompt must fill exactly the first half of a guided batch")
        packed = torch.cat([torch.stack([negatives[int(i)] for i in ids[n:]]).to(packed), packed[n:]])
    tokens, mask, class_emb, _, _ = layout.unpack(packed)
    return {"encoder_hidden_states": tokens, "encoder_attention_mask": mask, "class_labels": class_emb}


# ---------------------------------------------------------------------------------------------
# Prompts and rewards in trl's signatures


class PromptSchedule:
    """trl's ``prompt_fn``: the requests of each epoch in order, each ``repeats`` times in a row.

    ``per_group`` keys every request occurrence apart ("<epoch>:<index> | ..."), so that trl's
    per-prompt tracker with buffer and minimum count K normalises within each group of K, as our
    ``advantages: group`` does; otherwise requests with the same words share trl's statistics."""

    def __init__(self, epochs: list[list[Any]], repeats: int, book: PromptBook, per_group: bool = False, first_epoch: int = 1):
        self.queue = [(item, f"{first_epoch + e}:{i}" if per_group else None)
                      for e, epoch in enumerate(epochs) for i, item in enumerate(epoch) for _ in range(repeats)]
        self.book = book
        self.given = 0

    def __call__(self) -> tuple[str, Any]:
        if self.given >= len(self.queue):
            raise RuntimeError(f"trl asked for more than the {len(self.queue)} prompts scheduled")
        item, group = self.queue[self.given]
        self.given += 1
        return self.book.register(item, group), item


def synthmed_reward_fn(reward: Callable) -> Callable:
    """trl's ``reward_fn(images in [0, 1], prompts, metadata) -> (rewards, metadata)`` over our Reward."""

    def reward_fn(images: torch.Tensor, prompts: Sequence[str], items: Sequence[Any]):
        result = reward(images.float() * 2 - 1, list(items))
        return torch.as_tensor(result.total, dtype=torch.float32), {k: v.tolist() for k, v in result.components.items()}

    return reward_fn


def variance_reward_fn(images: torch.Tensor, prompts: Sequence[str], items: Sequence[Any]):
    """Smoke-test reward: minus each image's pixel variance (no judges needed)."""
    return -images.float().flatten(1).var(dim=1), {}


# ---------------------------------------------------------------------------------------------
# trl's pipeline interface over our model


def assemble_stable_diffusion(model):
    """diffusers' ``StableDiffusionPipeline`` from our VAE, UNet and DDIM config, as bench generate builds it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if abs(float(model.vae.config.get("scaling_factor", 1.0)) - model.scaling_factor) > 1e-6:
        raise UserError("the VAE config's scaling_factor differs from the model's; the stock pipeline would decode wrongly")
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=None, tokenizer=None, unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    return pipe


class SynthmedDDPOPipeline(DDPOStableDiffusionPipeline):
    """trl's ``DDPOStableDiffusionPipeline`` over a synthmed ``LatentDiffusion`` (see the module docstring)."""

    def __init__(self, model, lora_spec, adapter_name: str = "default"):
        from generator.models import time_embed_dim

        self.model = model
        self.lora_spec = lora_spec
        self.adapter_name = adapter_name
        self.use_lora = True
        self.sd_pipeline = assemble_stable_diffusion(model)
        self.book = PromptBook()
        # a finding token per finding a request states: at most every finding its modality's table knows
        per_modality = Counter(key.split(":", 1)[0] for key in model.finding_keys or ())
        self.layout = PackLayout(model.cfg.text_max_length + 1 + max(per_modality.values(), default=0),
                                 model.cfg.cross_attention_dim, time_embed_dim(model.unet))
        self.encoder = ConditioningEncoder(model.conditioner, self.book, self.layout)
        model.vae.requires_grad_(False)
        model.conditioner.requires_grad_(False)
        model.unet.requires_grad_(False)
        self._hook = model.unet.register_forward_pre_hook(self._inject, with_kwargs=True)

    def _inject(self, module, args, kwargs):
        args = list(args)
        if "encoder_hidden_states" in kwargs:
            packed = kwargs.pop("encoder_hidden_states")
        else:  # trl's loss calls unet(latents, timesteps, embeds)
            packed = args.pop(2)
        kwargs.update(unpack_for_unet(self.layout, self.encoder.negatives, packed))
        return tuple(args), kwargs

    def close(self) -> None:
        self._hook.remove()

    def __call__(self, *args, **kwargs):
        from trl.models.modeling_sd_base import pipeline_step

        return pipeline_step(self.sd_pipeline, *args, **kwargs)

    def rgb_with_grad(self, *args, **kwargs):
        from trl.models.modeling_sd_base import pipeline_step_with_grad

        return pipeline_step_with_grad(self.sd_pipeline, *args, **kwargs)

    def scheduler_step(self, *args, **kwargs):
        from trl.models.modeling_sd_base import scheduler_step

        return scheduler_step(self.sd_pipeline.scheduler, *args, **kwargs)

    @property
    def unet(self):
        return self.sd_pipeline.unet

    @property
    def vae(self):
        return self.sd_pipeline.vae

    @property
    def tokenizer(self):
        return self.book

    @property
    def scheduler(self):
        return self.sd_pipeline.scheduler

    @property
    def text_encoder(self):
        return self.encoder

    @property
    def autocast(self):
        return contextlib.nullcontext  # trl's choice for LoRA training

    def set_progress_bar_config(self, *args, **kwargs):
        kwargs["disable"] = True  # trl's per-timestep bar; the runner prints one line per epoch
        self.sd_pipeline.set_progress_bar_config(*args, **kwargs)

    def get_trainable_layers(self):
        from generator.lora import add_lora

        add_lora(self.unet, self.lora_spec, self.adapter_name)  # peft add_adapter; only the adapter trains, in float32
        return self.unet

    def save_pretrained(self, output_dir):
        from generator.lora import save_lora

        save_lora(self.unet, Path(output_dir) / "adapter.safetensors", self.adapter_name, metadata={"trainer": f"trl {TRL_VERSION}"})
        self.unet.peft_config[self.adapter_name].save_pretrained(str(output_dir))  # adapter_config.json

    def save_checkpoint(self, models, weights, output_dir):
        if len(models) != 1:
            raise ValueError("one trainable model (the UNet) expected")
        self.save_pretrained(output_dir)

    def load_checkpoint(self, models, input_dir):
        from generator.lora import load_lora

        if len(models) != 1:
            raise ValueError("one trainable model (the UNet) expected")
        load_lora(models[0], Path(input_dir) / "adapter.safetensors", self.adapter_name)


# ---------------------------------------------------------------------------------------------
# Timing trl's epoch without changing it


class StopTraining(Exception):
    """The bench asked for no further epoch."""


class Channel:
    """The line protocol with the bench: messages on the runner's own stdout (everything else that
    writes to fd 1 is sent to stderr), answers on stdin. Without ``interactive`` nothing is awaited."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, message: str) -> None:
        self.out.write(message + "\n")
        self.out.flush()

    def wait(self) -> str:
        if not self.interactive:
            return "go"
        line = sys.stdin.readline()
        if not line:
            raise StopTraining("the bench closed the channel")
        return line.strip()

    def before_epoch(self, epoch: int) -> None:
        """Idle until the bench says go: the two sides take turns epoch by epoch."""
        self.send(f"ready {epoch + 1}")
        answer = self.wait()
        if answer != "go":
            raise StopTraining(answer)


class EpochTimer:
    """Wraps a DDPOTrainer's step and its three phases on the instance; one record per epoch.
    ``before_epoch`` runs first, outside the timed region."""

    PHASES = {"_generate_samples": "sampling", "compute_rewards": "reward", "_train_batched_samples": "update"}

    def __init__(self, trainer, on_epoch: Callable[[dict], None] | None = None, before_epoch: Callable[[int], None] | None = None):
        self.epochs: list[dict] = []
        self._current: dict[str, float] = {}
        self._rewards: list[float] = []
        self.on_epoch = on_epoch
        for name, phase in self.PHASES.items():
            setattr(trainer, name, self._timed(getattr(trainer, name), phase))
        step = trainer.step

        def timed_step(epoch: int, global_step: int):
            if before_epoch:
                before_epoch(epoch)
            self._current = {phase: 0.0 for phase in self.PHASES.values()}
            self._rewards = []
            started, cpu = time.perf_counter(), time.process_time()
            out = step(epoch, global_step)
            record = {"epoch": epoch + 1, "seconds": {**{k: round(v, 3) for k, v in self._current.items()},
                                                      "total": round(time.perf_counter() - started, 3)},
                      "cpu_seconds": round(time.process_time() - cpu, 3),
                      "reward_mean": float(np.mean(self._rewards)) if self._rewards else None}
            self.epochs.append(record)
            if self.on_epoch:
                self.on_epoch(record)
            return out

        trainer.step = timed_step

    def _timed(self, fn: Callable, phase: str) -> Callable:
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            if phase == "reward":  # a lazy zip: materialise it (as the tuples it yields) inside the timed region
                out = tuple(tuple(x) for x in out)
                self._rewards += [float(v) for r in out[0] for v in torch.as_tensor(r).flatten()]
            self._current[phase] = self._current.get(phase, 0.0) + time.perf_counter() - started
            return out

        return wrapper


# ---------------------------------------------------------------------------------------------


def run(spec: dict, channel: Channel | None = None) -> dict:
    """Train with trl as ``spec`` says; returns (and writes) the result. With ``spec["interleave"]``
    every epoch waits for the bench's "go" (see :class:`Channel`)."""
    import trl
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer

    from generator.lora import LoraSpec, save_lora
    from generator.models import LatentDiffusion

    channel = channel or Channel(bool(spec.get("interleave")))
    if trl.__version__ != TRL_VERSION:
        raise RuntimeError(f"trl {trl.__version__} found; this runner drives trl {TRL_VERSION}")
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    started = time.perf_counter()
    model = LatentDiffusion.load(spec["model"], spec.get("modalities"), device="cpu")
    model.requires_grad_(False)
    pipeline = SynthmedDDPOPipeline(model, LoraSpec(**spec["lora"]))
    epochs = [[_item(d) for d in epoch] for epoch in spec["prompts"]]
    prompt_fn = PromptSchedule(epochs, int(spec["images_per_prompt"]), pipeline.book,
                               per_group=spec.get("advantages") == "group", first_epoch=int(spec.get("first_epoch", 1)))
    if spec["reward"] == "variance":
        reward_fn = variance_reward_fn
    else:
        from pipelines.config import load_config
        from rlhf.reward import build_reward

        cfg = load_config(spec["config"])
        modalities = spec.get("reward_modalities") or cfg.improve.prompts.modalities
        reward_fn = synthmed_reward_fn(build_reward(cfg.improve.reward, cfg.judges, modalities, device="cpu"))
    config = DDPOConfig(**spec["trl_config"])
    # accelerate's logger refuses to log before any accelerate state exists, and DDPOTrainer logs
    # (no image hook) before it builds its Accelerator: initialise the state first.
    PartialState()
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    setup_seconds = time.perf_counter() - started
    log = open(out / "epochs.jsonl", "a", encoding="utf-8")

    def on_epoch(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()
        channel.send("epoch " + json.dumps(record))
        print(f"trl epoch {record['epoch']}: {record['seconds']}", file=sys.stderr, flush=True)

    timer = EpochTimer(trainer, on_epoch, channel.before_epoch)
    try:
        trainer.train(epochs=len(epochs))
    except StopTraining:
        pass
    finally:
        log.close()
    done = len(timer.epochs)
    wanted = done * len(prompt_fn.queue) // len(epochs)
    if prompt_fn.given != wanted:
        raise RuntimeError(f"trl used {prompt_fn.given} prompts in {done} epochs; {wanted} were scheduled for them")
    channel.send("trained")
    channel.wait()  # the bench says when: saving must not overlap its own timed epochs
    adapter = save_lora(pipeline.unet, out / "trl_lora.safetensors", pipeline.adapter_name,
                        metadata={"trainer": f"trl {trl.__version__}", "epochs": done})
    pipeline.unet.peft_config[pipeline.adapter_name].save_pretrained(str(out))
    result = {"trl_version": trl.__version__, "epochs": timer.epochs, "adapter": str(adapter), "setup_seconds": round(setup_seconds, 2),
              "epochs_done": done,
              "torch_threads": torch.get_num_threads(), "trl_config": {k: v for k, v in spec["trl_config"].items()},
              "prompts_given": prompt_fn.given}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _item(d: dict):
    from agents.requests import ImagePrompt

    return ImagePrompt.from_dict(d)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: trl_ddpo_runner.py SPEC.json", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
