"""ddim_step_with_logprob: DDIM maths by hand, equivalence with diffusers' step, the density's shape,
per-sample timesteps, half precision, clipping / thresholding, and a seeded sampling loop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import DDIMScheduler

from generator.ddim_logprob import DDIMStepOutput, ddim_step_with_logprob

SHAPE = (3, 4, 8, 8)  # (B, C, h, w)


def make_scheduler(steps: int = 10, **config) -> DDIMScheduler:
    scheduler = DDIMScheduler(**{"clip_sample": False, "set_alpha_to_one": False, **config})
    scheduler.set_timesteps(steps)
    return scheduler


def random_inputs(seed: int = 0, shape=SHAPE, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g), torch.randn(shape, generator=g)  # model_output, x_t


def diffusers_step(scheduler, model_output, t, sample, eta, noise_seed):
    """diffusers' own step, fed the noise our step draws from torch.Generator().manual_seed(noise_seed)."""
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(noise_seed)) if eta > 0 else None
    return scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise)


# 1. by hand --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_hand_computation_epsilon_float64(reduce):
    scheduler = make_scheduler()
    t, eta = int(scheduler.timesteps[3]), 0.7  # t = 600 -> t_prev = 500
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64)
    x_t = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64)
    x_prev = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64)

    a_t = scheduler.alphas_cumprod[t].double()
    a_prev = scheduler.alphas_cumprod[t - 100].double()
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    density = -((x_prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)  # (2, 1, 2, 2)
    expected = density.mean(dim=(1, 2, 3)) if reduce == "mean" else density.sum(dim=(1, 2, 3))

    out = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=eta, prev_sample=x_prev, reduce=reduce)
    assert isinstance(out, DDIMStepOutput)
    assert out.log_prob.shape == (2,) and out.std.shape == (2, 1, 1, 1) and out.mean.shape == (2, 1, 2, 2)
    torch.testing.assert_close(out.pred_original_sample, x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.std, std.expand(2, 1, 1, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-12, atol=1e-12)
    assert out.prev_sample is x_prev


# 2. equivalence with diffusers -----------------------------------------------------------------

CONFIGS = {
    "leading+offset": {"steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "set_alpha_to_one": {"set_alpha_to_one": True},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
}


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_prev_sample_matches_diffusers(config, prediction_type, eta):
    scheduler = make_scheduler(prediction_type=prediction_type, **CONFIGS[config])
    model_output, x_t = random_inputs()
    for i, t in enumerate(scheduler.timesteps):
        ours = ddim_step_with_logprob(
            scheduler, model_output, t, x_t, eta=eta, generator=torch.Generator().manual_seed(i)
        )
        theirs = diffusers_step(scheduler, model_output, t, x_t, eta, noise_seed=i)
        torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.pred_original_sample, theirs.pred_original_sample, rtol=0, atol=1e-5)
        if eta == 0:
            assert ours.log_prob is None and torch.equal(ours.prev_sample, ours.mean)
        elif ours.log_prob is None:  # only on a zero-variance final step
            assert i == len(scheduler.timesteps) - 1 and torch.count_nonzero(ours.std) == 0
        else:
            assert torch.isfinite(ours.log_prob).all()


def test_eta_zero_draws_the_mean_and_refuses_to_score():
    scheduler = make_scheduler()
    model_output, x_t = random_inputs()
    t = scheduler.timesteps[2]
    drawn = ddim_step_with_logprob(scheduler, model_output, t, x_t, eta=0.0)
    assert drawn.log_prob is None and torch.count_nonzero(drawn.std) == 0
    with pytest.raises(ValueError, match="deterministic .* eta == 0"):
        ddim_step_with_logprob(scheduler, model_output, t, x_t, eta=0.0, prev_sample=drawn.prev_sample)


@pytest.mark.parametrize(
    "config",
    [{"set_alpha_to_one": True, "steps_offset": 1}, {"set_alpha_to_one": False, "steps_offset": 0}],
    ids=["to_alpha_one", "from_t0_to_alphas_cumprod0"],
)
def test_zero_variance_final_step_is_deterministic(config):
    scheduler = make_scheduler(**config)
    model_output, x_t = random_inputs()
    t = scheduler.timesteps[-1]  # previous timestep < 0 -> final_alpha_cumprod (1, or alphas_cumprod[0] = a_t at t = 0)
    drawn = ddim_step_with_logprob(scheduler, model_output, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert drawn.log_prob is None and torch.count_nonzero(drawn.std) == 0
    with pytest.raises(ValueError, match="zero variance"):
        ddim_step_with_logprob(scheduler, model_output, t, x_t, eta=1.0, prev_sample=drawn.prev_sample)
    mixed = torch.tensor([int(scheduler.timesteps[0]), int(t), int(t)])
    with pytest.raises(ValueError, match="mixed batch"):
        ddim_step_with_logprob(scheduler, model_output, mixed, x_t, eta=1.0)


# 3. the density ---------------------------------------------------------------------------------


def test_rescoring_and_density_peak():
    scheduler = make_scheduler()
    model_output, x_t = random_inputs()
    t = scheduler.timesteps[4]
    drawn = ddim_step_with_logprob(scheduler, model_output, t, x_t, generator=torch.Generator().manual_seed(3))
    rescored = ddim_step_with_logprob(scheduler, model_output, t, x_t, prev_sample=drawn.prev_sample)
    assert torch.equal(rescored.log_prob, drawn.log_prob)

    def score(x):
        return ddim_step_with_logprob(scheduler, model_output, t, x_t, prev_sample=x).log_prob

    peak = score(drawn.mean)
    torch.testing.assert_close(peak, -torch.log(drawn.std.flatten()) - 0.5 * math.log(2 * math.pi))
    direction = (drawn.prev_sample - drawn.mean) / drawn.std
    scores = [score(drawn.mean + k * drawn.std * direction) for k in (0.0, 1.0, 2.0, 4.0)]
    for nearer, farther in itertools.pairwise(scores):
        assert (nearer > farther).all()
    g = torch.Generator().manual_seed(4)
    for _ in range(5):  # any perturbation of the mean scores lower
        assert (score(drawn.mean + 0.01 * torch.randn(SHAPE, generator=g)) < peak).all()


def test_gradient_reaches_model_output_not_prev_sample():
    scheduler = make_scheduler()
    model_output, x_t = random_inputs()
    model_output.requires_grad_(True)
    x_prev = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    out = ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[5], x_t, prev_sample=x_prev)
    out.log_prob.sum().backward()
    assert torch.isfinite(model_output.grad).all() and model_output.grad.abs().sum() > 0
    assert x_prev.grad is None


# 4. per-sample timesteps, generators, half precision ---------------------------------------------


@pytest.mark.parametrize("config", [{}, {"thresholding": True, "sample_max_value": 1.5}, {"set_alpha_to_one": True}])
@pytest.mark.parametrize("drawn", [False, True])
def test_per_sample_timesteps_equal_scalar_calls(config, drawn):
    scheduler = make_scheduler(prediction_type="v_prediction", **config)
    model_output, x_t = random_inputs(shape=(4, 2, 4, 4), scale=3.0)
    x_prev = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(6))
    timesteps = scheduler.timesteps[[0, 7, 3, 8]]  # (B,) shuffled, as in DDPO training
    seeds = [10, 11, 12, 13]
    batched = ddim_step_with_logprob(
        scheduler,
        model_output,
        timesteps,
        x_t,
        prev_sample=None if drawn else x_prev,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )
    for i, t in enumerate(timesteps.tolist()):
        single = ddim_step_with_logprob(
            scheduler,
            model_output[i : i + 1],
            t,
            x_t[i : i + 1],
            prev_sample=None if drawn else x_prev[i : i + 1],
            generator=torch.Generator().manual_seed(seeds[i]),
        )
        for name in ("prev_sample", "pred_original_sample", "mean", "std", "log_prob"):
            torch.testing.assert_close(getattr(batched, name)[i : i + 1], getattr(single, name), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    scheduler = make_scheduler()
    model_output, x_t = random_inputs()
    t = scheduler.timesteps[3]
    drawn = ddim_step_with_logprob(
        scheduler, model_output.to(dtype), t, x_t.to(dtype), generator=torch.Generator().manual_seed(7)
    )
    assert drawn.prev_sample.dtype == dtype and drawn.pred_original_sample.dtype == dtype
    assert drawn.log_prob.dtype == torch.float32 and torch.isfinite(drawn.log_prob).all()
    rescored = ddim_step_with_logprob(
        scheduler, model_output.to(dtype), t, x_t.to(dtype), prev_sample=drawn.prev_sample
    )
    assert torch.equal(rescored.log_prob, drawn.log_prob)

    # the same transition scored in float32 (inputs and sample rounded to `dtype` first)
    full = ddim_step_with_logprob(
        scheduler, model_output.to(dtype).float(), t, x_t.to(dtype).float(), prev_sample=drawn.prev_sample.float()
    )
    torch.testing.assert_close(drawn.log_prob, full.log_prob, rtol=0, atol=1e-5)
    # and against the unrounded float32 step: within the rounding of a half-precision sample
    exact = ddim_step_with_logprob(scheduler, model_output, t, x_t, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(drawn.log_prob, exact.log_prob, rtol=0, atol=0.05)


# 5. clipping and thresholding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"clip_sample": True},
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.6, "sample_max_value": 10.0},  # s between 1 and max
        {"thresholding": True, "clip_sample": True, "sample_max_value": 2.0},
    ],
)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_clipping_and_thresholding_match_diffusers(config, prediction_type):
    scheduler = make_scheduler(prediction_type=prediction_type, **config)
    plain = make_scheduler(prediction_type=prediction_type)
    model_output, x_t = random_inputs(scale=3.0)
    for i, t in enumerate(scheduler.timesteps):
        ours = ddim_step_with_logprob(scheduler, model_output, t, x_t, generator=torch.Generator().manual_seed(i))
        theirs = diffusers_step(scheduler, model_output, t, x_t, 1.0, noise_seed=i)
        torch.testing.assert_close(ours.pred_original_sample, theirs.pred_original_sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, rtol=0, atol=1e-5)
    unclipped = ddim_step_with_logprob(plain, model_output, scheduler.timesteps[0], x_t, eta=0.0)
    assert not torch.allclose(ours.pred_original_sample, unclipped.pred_original_sample)  # it did clip


# 6. a sampling loop -----------------------------------------------------------------------------


def linear_model(channels: int):
    """A fixed random "UNet": a 1x1 convolution of x_t plus a timestep-dependent offset."""
    g = torch.Generator().manual_seed(8)
    weight = 0.5 * torch.randn(channels, channels, generator=g)  # (C, C)
    bias = 0.1 * torch.randn(channels, generator=g)  # (C,)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", weight, x) + bias[:, None, None] * torch.cos(t.float() / 100)

    return model


def sample_loop(scheduler, model, seed: int, step_fn):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    trajectory, log_probs = [x], []
    for t in scheduler.timesteps:
        x, log_prob = step_fn(model(x, t), t, x, g)
        trajectory.append(x)
        log_probs.append(log_prob)
    return torch.stack(trajectory, dim=1), log_probs  # (B, T + 1, C, h, w), T x (B,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampling_loop_is_reproducible_and_rescorable(prediction_type):
    scheduler = make_scheduler(prediction_type=prediction_type, steps_offset=1)
    model = linear_model(SHAPE[1])

    def ours(output, t, x, g):
        step = ddim_step_with_logprob(scheduler, output, t, x, eta=1.0, generator=g)
        return step.prev_sample, step.log_prob

    def theirs(output, t, x, g):
        return scheduler.step(output, t, x, eta=1.0, generator=g).prev_sample, None

    trajectory, log_probs = sample_loop(scheduler, model, 9, ours)
    assert len(log_probs) == 10 and all(lp.shape == (SHAPE[0],) and torch.isfinite(lp).all() for lp in log_probs)
    again, log_probs_again = sample_loop(scheduler, model, 9, ours)
    assert torch.equal(trajectory, again)
    assert all(torch.equal(a, b) for a, b in zip(log_probs, log_probs_again))
    reference, _ = sample_loop(scheduler, model, 9, theirs)  # same generator stream through diffusers' step
    torch.testing.assert_close(trajectory, reference, rtol=0, atol=1e-5)

    # DDPO training: re-score the stored transitions with per-sample timesteps in a shuffled order
    log_probs = torch.stack(log_probs, dim=1)  # (B, T)
    batch, steps = log_probs.shape
    order = torch.stack(
        [torch.randperm(steps, generator=torch.Generator().manual_seed(b)) for b in range(batch)]
    )  # (B, T)
    rows = torch.arange(batch)
    for j in range(steps):
        k = order[:, j]  # (B,) step index per sample
        t = scheduler.timesteps[k]  # (B,)
        x_t, x_prev = trajectory[rows, k], trajectory[rows, k + 1]  # (B, C, h, w)
        step = ddim_step_with_logprob(scheduler, model(x_t, t[:, None, None, None]), t, x_t, prev_sample=x_prev)
        torch.testing.assert_close(step.log_prob, log_probs[rows, k], rtol=0, atol=1e-5)


# errors -----------------------------------------------------------------------------------------


def test_bad_requests_fail_with_a_message():
    model_output, x_t = random_inputs()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(DDIMScheduler(), model_output, 500, x_t)
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="reduce"):
        ddim_step_with_logprob(scheduler, model_output, 500, x_t, reduce="max")
    with pytest.raises(ValueError, match="scalar or shaped"):
        ddim_step_with_logprob(scheduler, model_output, torch.tensor([500, 400]), x_t)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        ddim_step_with_logprob(scheduler, model_output, 1000, x_t)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, model_output, 500, x_t, eta=-0.1)
    with pytest.raises(ValueError, match="too large"):
        ddim_step_with_logprob(scheduler, model_output, 500, x_t, eta=5.0)
    with pytest.raises(ValueError, match="differ in shape"):
        ddim_step_with_logprob(scheduler, model_output, 500, x_t, prev_sample=x_t[:1])
