"""LoRA on a tiny seeded UNet: freezing, identity at init, disabled == base, save/load, merge, several adapters."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from generator.lora import (
    LORA_TARGETS,
    LoraSpec,
    active_adapters,
    adapter_names,
    adapters_disabled,
    add_lora,
    load_lora,
    lora_parameters,
    merge_lora,
    read_lora_metadata,
    save_lora,
    set_active_adapters,
    target_modules,
    unmerge_lora,
)

TINY = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "norm_num_groups": 4,
}
# transformer blocks of TINY: down_blocks.0 (1), up_blocks.1 (2), mid_block (1); attn1 + attn2 each
N_OUTER_ATTN_PROJ = 3 * 2 * len(LORA_TARGETS)
N_MID_ATTN_PROJ = 1 * 2 * len(LORA_TARGETS)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tensors here are tiny: extra intra-op threads only spin-wait, and on a busy machine that costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY, **overrides}).eval()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)  # (B, C, h, w)
    timesteps = torch.tensor([10, 500])
    text = torch.randn(2, 5, 16, generator=g)  # (B, tokens, cross_attention_dim)
    return latents, timesteps, text


def forward(unet, inputs, dtype=torch.float32):
    latents, timesteps, text = inputs
    return unet(latents.to(dtype), timesteps, text.to(dtype)).sample


def train_steps(unet, inputs, name="default", steps=3, lr=1e-2):
    opt = torch.optim.Adam(lora_parameters(unet, name), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        forward(unet, inputs).pow(2).mean().backward()
        opt.step()


def perturb(unet, name, seed):
    """Random non-zero LoRA weights: a stand-in for a trained adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet, name):
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def base_params(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" not in n}


# 1. freezing, parameter count, optimiser touches LoRA only ------------------------------------------


def test_only_lora_trains_and_counts_match_rank_times_in_plus_out(inputs):
    unet = tiny_unet()
    spec = LoraSpec(rank=2)
    targets = target_modules(unet, spec)
    add_lora(unet, spec)

    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(unet)}
    linears = {n: m for n, m in unet.named_modules() if n in targets}
    expected = sum(spec.rank * (m.in_features + m.out_features) for m in linears.values())
    assert sum(p.numel() for p in trainable) == expected
    adapted = [n for n, m in unet.named_modules() if hasattr(m, "lora_A")]
    assert adapted == targets

    before_base = base_params(unet)
    before_lora = [p.detach().clone() for p in lora_parameters(unet)]
    train_steps(unet, inputs, steps=1)
    after_base = base_params(unet)
    assert before_base.keys() == after_base.keys()
    assert all(torch.equal(before_base[n], after_base[n]) for n in before_base)
    assert any(not torch.equal(a, p) for a, p in zip(before_lora, lora_parameters(unet)))


def test_spec_rejects_inits_that_rewrite_the_base():
    with pytest.raises(ValueError, match="init"):
        LoraSpec(init="pissa")
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0)


# 2. identity at init, training changes outputs, disabled == base ------------------------------------


@pytest.mark.parametrize("init", ["gaussian", "default"])
def test_fresh_adapter_is_identity_then_training_moves_and_disabled_is_base(inputs, init):
    unet = tiny_unet()
    with torch.no_grad():
        base = forward(unet, inputs)
    add_lora(unet, LoraSpec(rank=2, init=init, dropout=0.1))
    with torch.no_grad():
        assert torch.equal(forward(unet, inputs), base)

    unet.train()  # dropout on: the eval forward below must not depend on it
    train_steps(unet, inputs)
    unet.eval()
    with torch.no_grad():
        trained = forward(unet, inputs)
    assert not torch.allclose(trained, base, atol=1e-4)

    grads_before = [p.requires_grad for p in lora_parameters(unet)]
    with torch.no_grad(), adapters_disabled(unet):
        assert torch.equal(forward(unet, inputs), base)
    with torch.no_grad():
        assert torch.equal(forward(unet, inputs), trained)
    assert active_adapters(unet) == ["default"]
    assert [p.requires_grad for p in lora_parameters(unet)] == grads_before


def test_adapters_disabled_restores_state_after_an_error(inputs):
    unet = tiny_unet()
    add_lora(unet, LoraSpec(rank=2), "a")
    add_lora(unet, LoraSpec(rank=2), "b")
    perturb(unet, "a", 0)
    perturb(unet, "b", 1)
    set_active_adapters(unet, ["a", "b"], [0.5, 2.0])
    with torch.no_grad():
        mixed = forward(unet, inputs)
    with pytest.raises(KeyError), adapters_disabled(unet):
        raise KeyError("inside")
    assert active_adapters(unet) == ["a", "b"]
    with torch.no_grad():
        assert torch.equal(forward(unet, inputs), mixed)


# 3. save -> load round trip -------------------------------------------------------------------------


class Wrapper(torch.nn.Module):
    """Stands in for DDP / accelerate, whose state-dict keys gain a "module." prefix."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_save_load_round_trip(tmp_path, inputs):
    unet = tiny_unet()
    spec = LoraSpec(rank=2, alpha=4.0, include_out=True)
    add_lora(unet, spec)
    train_steps(unet, inputs)
    with torch.no_grad():
        trained = forward(unet, inputs)

    path = save_lora(Wrapper(unet), tmp_path / "policy.safetensors", metadata={"step": 3, "modality": "cxr"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.safetensors"]

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        saved = {k: f.get_tensor(k) for k in keys}
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert not any(k.startswith("module.") or ".default." in k for k in keys)
    assert {k.rsplit(".lora_", 1)[0] for k in keys} == set(target_modules(unet, spec))
    assert all(v.dtype == torch.float32 for v in saved.values())
    base_bytes = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if "lora_" not in n)
    assert path.stat().st_size < base_bytes / 4

    meta = read_lora_metadata(path)
    assert LoraSpec(**json.loads(meta["lora_spec"])) == spec
    assert meta["lora_rank"] == "2" and float(meta["lora_alpha"]) == 4.0
    assert json.loads(meta["lora_targets"]) == target_modules(unet, spec)
    assert meta["step"] == "3" and meta["modality"] == "cxr"

    fresh = tiny_unet()
    assert load_lora(fresh, path) == spec
    with torch.no_grad():
        assert torch.equal(forward(fresh, inputs), trained)

    renamed = tiny_unet()  # the adapter name is not part of the file
    load_lora(renamed, path, name="cxr")
    assert adapter_names(renamed) == ["cxr"]
    with torch.no_grad():
        assert torch.equal(forward(renamed, inputs), trained)


def test_load_into_another_architecture_names_the_keys(tmp_path):
    unet = tiny_unet()
    add_lora(unet, LoraSpec(rank=2))
    path = save_lora(unet, tmp_path / "a.safetensors")

    more_attention = tiny_unet(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    with pytest.raises(ValueError, match=r"missing from the file .*down_blocks\.1\.attentions\.0\.transformer_blocks"):
        load_lora(more_attention, path)
    assert adapter_names(more_attention) == []  # the adapter created for the load is removed again

    wider = tiny_unet(block_out_channels=(16, 32), attention_head_dim=8)
    with pytest.raises(
        ValueError, match=r"shape mismatch .*attn1\.to_q\.lora_A\.weight: file \(2, 8\) vs UNet \(2, 16\)"
    ):
        load_lora(wider, path)


def test_save_refuses_reserved_metadata_and_load_refuses_foreign_files(tmp_path):
    from safetensors.torch import save_file

    unet = tiny_unet()
    add_lora(unet, LoraSpec(rank=2))
    with pytest.raises(ValueError, match="reserved"):
        save_lora(unet, tmp_path / "a.safetensors", metadata={"lora_spec": "{}"})
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="not a synthmed LoRA file"):
        load_lora(tiny_unet(), foreign)


# 4. merge / unmerge ---------------------------------------------------------------------------------


def test_merge_then_unmerge(inputs):
    unet = tiny_unet()
    add_lora(unet, LoraSpec(rank=2))
    perturb(unet, "default", 0)
    with torch.no_grad():
        unmerged = forward(unet, inputs)
        merge_lora(unet)
        assert torch.allclose(forward(unet, inputs), unmerged, atol=1e-5)
        with pytest.raises(RuntimeError, match="unmerge_lora"), adapters_disabled(unet):
            pass
        unmerge_lora(unet)
        assert torch.allclose(forward(unet, inputs), unmerged, atol=1e-5)  # W + dW - dW: fp32 rounding only


# 5. two named adapters ------------------------------------------------------------------------------


def test_two_adapters_switch_and_combine(inputs):
    unet = tiny_unet()
    add_lora(unet, LoraSpec(rank=2), "cxr")
    add_lora(unet, LoraSpec(rank=4, alpha=2.0, include_mid_block=False), "ct")
    assert adapter_names(unet) == ["cxr", "ct"] and active_adapters(unet) == ["ct"]
    assert {id(p) for p in lora_parameters(unet, "cxr")}.isdisjoint(id(p) for p in lora_parameters(unet, "ct"))
    perturb(unet, "cxr", 0)
    perturb(unet, "ct", 1)

    with torch.no_grad():
        ct = forward(unet, inputs)
        set_active_adapters(unet, ["cxr"])
        cxr = forward(unet, inputs)
        assert not torch.allclose(cxr, ct, atol=1e-4)
        # the active adapters are the trainable ones
        assert all(p.requires_grad for p in lora_parameters(unet, "cxr"))
        assert not any(p.requires_grad for p in lora_parameters(unet, "ct"))

        set_active_adapters(unet, ["cxr", "ct"], [1.0, 0.0])
        assert torch.allclose(forward(unet, inputs), cxr, atol=1e-6)
        set_active_adapters(unet, ["cxr", "ct"], [0.5, 2.0])
        mixed = forward(unet, inputs)
        assert not torch.allclose(mixed, cxr, atol=1e-4) and not torch.allclose(mixed, ct, atol=1e-4)

        # per layer the mixture is linear: base + 0.5 * delta_cxr + 2 * delta_ct
        name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        layer = unet.get_submodule(name)
        x = torch.randn(3, layer.in_features)
        delta = {n: layer.lora_B[n](layer.lora_A[n](x)) * layer.lora_alpha[n] / layer.r[n] for n in ("cxr", "ct")}
        assert torch.allclose(layer(x), layer.base_layer(x) + 0.5 * delta["cxr"] + 2.0 * delta["ct"], atol=1e-6)

        merge_lora(unet)  # merges the weighted mixture
        assert torch.allclose(forward(unet, inputs), mixed, atol=1e-5)
        with pytest.raises(RuntimeError, match="unmerge_lora"):
            set_active_adapters(unet, ["ct"])
        unmerge_lora(unet)

        set_active_adapters(unet, ["ct"])
        assert torch.allclose(forward(unet, inputs), ct, atol=1e-6)
        with adapters_disabled(unet):
            base = forward(unet, inputs)
        assert torch.allclose(base, forward(tiny_unet(), inputs), atol=1e-6)

    with pytest.raises(KeyError, match="mri"):
        set_active_adapters(unet, ["mri"])
    with pytest.raises(ValueError, match="already"):
        add_lora(unet, LoraSpec(), "cxr")


# 6. which modules are targeted ----------------------------------------------------------------------


def test_target_lists_follow_the_spec():
    unet = tiny_unet()
    default = target_modules(unet, LoraSpec())
    assert len(default) == N_OUTER_ATTN_PROJ + N_MID_ATTN_PROJ
    assert all(n.split(".attn")[1][2:] in LORA_TARGETS for n in default)  # "attn1.to_q" -> "to_q"
    assert sum(n.startswith("mid_block.") for n in default) == N_MID_ATTN_PROJ
    assert not any(".resnets." in n or ".ff." in n for n in default)

    no_mid = target_modules(unet, LoraSpec(include_mid_block=False))
    assert no_mid == [n for n in default if not n.startswith("mid_block.")]
    assert len(no_mid) == N_OUTER_ATTN_PROJ

    with_out = target_modules(unet, LoraSpec(include_out=True))
    extra = sorted(set(with_out) - set(default))
    assert extra == sorted(
        [
            "conv_out",
            "down_blocks.0.attentions.0.proj_out",
            "up_blocks.1.attentions.0.proj_out",
            "up_blocks.1.attentions.1.proj_out",
            "mid_block.attentions.0.proj_out",
        ]
    )
    out_no_mid = target_modules(unet, LoraSpec(include_out=True, include_mid_block=False))
    assert not any(n.startswith("mid_block.") for n in out_no_mid)
    assert set(out_no_mid) == set(with_out) - {n for n in with_out if n.startswith("mid_block.")}

    # the conv outputs adapt too: identity at init, conv-shaped factors
    add_lora(unet, LoraSpec(rank=2, include_out=True))
    assert target_modules(unet, LoraSpec(include_out=True)) == with_out  # unchanged once adapted
    conv_out = unet.conv_out
    assert conv_out.lora_A["default"].weight.shape == (2, 8, 3, 3)
    assert conv_out.lora_B["default"].weight.shape == (4, 2, 1, 1)


# 7. bf16 base, fp32 adapter -------------------------------------------------------------------------


def test_bf16_base_keeps_lora_in_fp32_and_backprops(inputs):
    unet = tiny_unet().to(torch.bfloat16)
    add_lora(unet, LoraSpec(rank=2))
    assert all(p.dtype == torch.float32 for p in lora_parameters(unet))
    assert all(p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if "lora_" not in n)

    out = forward(unet, inputs, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    lora = lora_parameters(unet)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora_" not in n)


def test_merged_for_sampling_draws_the_same_and_restores_the_base_bit_for_bit(inputs):
    from generator.lora import merged_for_sampling

    unet = tiny_unet()
    add_lora(unet, LoraSpec(rank=4, alpha=4))
    train_steps(unet, inputs)  # B != 0: the adapter changes the output
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        adapted = forward(unet, inputs)
        with merged_for_sampling(unet):
            merged = forward(unet, inputs)
            assert any(layer.merged for layer in unet.modules() if hasattr(layer, "merged_adapters"))
        again = forward(unet, inputs)
    assert torch.allclose(merged, adapted, atol=1e-5)
    assert torch.equal(again, adapted)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored, not unmerged: no rounding drift
