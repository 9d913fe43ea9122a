"""DDPO's pure functions: the PPO-clip loss by hand, advantages, the stat tracker, the KL term, the guard."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf.config import GuardConfig
from rlhf.ddpo import (PerPromptStatTracker, batch_advantages, clip_advantages, gaussian_kl, group_advantages,
                       ppo_clip_loss)


def test_ppo_loss_on_a_fixed_batch_equals_a_hand_computation():
    new = torch.tensor([0.10, -0.20, 0.00, 0.30])
    old = torch.tensor([0.00, -0.20, 0.05, 0.00])
    adv = torch.tensor([1.0, -2.0, 0.5, -1.0])
    c = 0.2
    terms = ppo_clip_loss(new, old, adv, c)
    # by hand: ratios e^0.1, 1, e^-0.05, e^0.3
    r = [math.exp(0.1), 1.0, math.exp(-0.05), math.exp(0.3)]
    per = []
    for ri, ai in zip(r, adv.tolist()):
        clipped = min(max(ri, 1 - c), 1 + c)
        per.append(max(-ai * ri, -ai * clipped))
    assert terms.loss.item() == pytest.approx(sum(per) / 4, rel=1e-6)
    # sample 4: ratio e^0.3 = 1.35 > 1.2 with A < 0: the unclipped (more pessimistic) term wins
    assert per[3] == pytest.approx(1.0 * r[3])
    assert terms.approx_kl.item() == pytest.approx(0.5 * np.mean([0.01, 0.0, 0.0025, 0.09]), rel=1e-6)
    assert terms.clipfrac.item() == pytest.approx(0.25)  # only e^0.3 leaves [0.8, 1.2]
    assert ppo_clip_loss(new, old, adv, c, reduce="sum").loss.item() == pytest.approx(sum(per), rel=1e-6)


def test_ppo_gradient_is_zero_where_the_clip_binds():
    new = torch.tensor([0.5], requires_grad=True)  # ratio e^0.5 far above 1 + c
    ppo_clip_loss(new, torch.zeros(1), torch.tensor([1.0]), 0.2).loss.backward()
    assert new.grad.item() == 0.0
    new = torch.tensor([0.0], requires_grad=True)  # on-policy: gradient -A
    ppo_clip_loss(new, torch.zeros(1), torch.tensor([2.0]), 0.2).loss.backward()
    assert new.grad.item() == pytest.approx(-2.0)


def test_ppo_loss_rejects_bad_shapes_and_clip():
    with pytest.raises(ValueError, match="equal"):
        ppo_clip_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), 0.2)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0)


def test_advantages_are_normalised_within_each_prompt_group():
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 5.0, 7.0])
    groups = ["a", "a", "a", "b", "b", "b", "c", "c"]
    adv = group_advantages(rewards, groups)
    for g in "abc":
        idx = [i for i, x in enumerate(groups) if x == g]
        values = adv[idx]
        if g == "b":
            assert np.all(values == 0.0)  # no spread, no signal
        else:
            assert values.mean() == pytest.approx(0.0, abs=1e-9)
            assert values.std() == pytest.approx(1.0, abs=1e-4)
    # a group's advantages do not depend on the other groups' rewards
    other = group_advantages(np.array([1.0, 2.0, 3.0, -5.0, 0.0, 99.0, 5.0, 7.0]), groups)
    assert np.allclose(other[:3], adv[:3]) and np.allclose(other[6:], adv[6:])
    assert np.allclose(clip_advantages(np.array([-9.0, 0.5, 9.0]), 5.0), [-5.0, 0.5, 5.0])
    assert batch_advantages(rewards).mean() == pytest.approx(0.0, abs=1e-9)


def test_stat_tracker_uses_the_batch_until_min_count_and_round_trips():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tracker.update(["p", "p", "q"], [1.0, 3.0, 2.0])
    batch = np.array([1.0, 3.0, 2.0])
    assert np.allclose(first, (batch - batch.mean()) / (batch.std() + 1e-6))
    second = tracker.update(["p", "p"], [5.0, 7.0])  # p's buffer [1, 3, 5, 7]: its own statistics now
    buf = np.array([1.0, 3.0, 5.0, 7.0])
    assert np.allclose(second, (np.array([5.0, 7.0]) - buf.mean()) / (buf.std() + 1e-6))
    clone = PerPromptStatTracker(4, 3)
    clone.load_state_dict(tracker.state_dict())
    assert np.allclose(clone.update(["p"], [2.0]), tracker.update(["p"], [2.0]))
    with pytest.raises(ValueError, match="buffer"):
        PerPromptStatTracker(8, 3).load_state_dict(tracker.state_dict())


def test_gaussian_kl_by_hand_and_zero_for_equal_means():
    mean = torch.zeros(2, 1, 2, 2)
    ref = torch.ones(2, 1, 2, 2)
    std = torch.full((2, 1, 1, 1), 0.5)
    assert torch.allclose(gaussian_kl(mean, ref, std), torch.full((2,), 1 / (2 * 0.25)))
    assert torch.allclose(gaussian_kl(mean, ref, std, reduce="sum"), torch.full((2,), 4 / (2 * 0.25)))
    assert torch.equal(gaussian_kl(ref, ref, std), torch.zeros(2))


def test_guard_stops_a_run_whose_reward_rises_while_the_evaluator_falls():
    from pipelines.improve import RewardHackingGuard

    guard = RewardHackingGuard(GuardConfig(patience=2))
    assert guard.observe(0, None, 0.10, 100.0) is None  # the base
    assert guard.observe(5, 1.00, 0.20, 101.0) is None  # reward and evaluator rise together: fine
    assert guard.observe(10, 1.10, 0.15, 102.0) is None  # first strike
    message = guard.observe(15, 1.20, 0.12, 103.0)  # second in a row
    assert message and "reward hacking suspected" in message and "0.150 -> 0.120" in message
    calm = RewardHackingGuard(GuardConfig(patience=2))
    for epoch, (r, s) in enumerate([(None, 0.1), (1.0, 0.2), (1.1, 0.15), (1.2, 0.18), (1.3, 0.14)]):
        assert calm.observe(epoch, r, s, 100.0) is None  # strikes not in a row
    fd = RewardHackingGuard(GuardConfig(patience=1, fd_tolerance=0.1))
    fd.observe(0, None, 0.1, 100.0)
    assert "FD 120.00 is more than 10% worse" in fd.observe(1, 1.0, 0.3, 120.0)
    # one modality drifting away while the mean improves, shaped like the real profile's run 2 (its chest CT 186 -> 447 while the mean fell)
    run2 = {"base": {"cxr": 585.0, "chest_ct": 186.0, "brain_mri": 833.0}, "later": {"cxr": 300.0, "chest_ct": 447.0, "brain_mri": 480.0}}
    mean_only = RewardHackingGuard(GuardConfig(patience=1))
    mean_only.observe(0, None, 0.3, 535.0, run2["base"])
    assert mean_only.observe(5, 1.0, 0.3, 409.0, run2["later"]) is None  # the mean alone hides it
    each = RewardHackingGuard(GuardConfig(patience=1, modality_fd_tolerance=0.5))
    each.observe(0, None, 0.3, 535.0, run2["base"])
    assert "chest_ct FD 447.00 is more than 50% worse than the base model's 186.00" in each.observe(5, 1.0, 0.3, 409.0, run2["later"])
    resumed = RewardHackingGuard(GuardConfig(patience=1, modality_fd_tolerance=0.5))
    resumed.load_state_dict({"history": [{"epoch": 0, "reward": None, "share": 0.3, "fd": 535.0}], "strikes": 0})  # an older run's state
    assert resumed.observe(5, 1.0, 0.3, 409.0, run2["later"]) is None  # no base per modality: nothing to compare
    off = RewardHackingGuard(GuardConfig(enabled=False, patience=1))
    off.observe(0, None, 0.5, 1.0)
    assert off.observe(1, 9.0, 0.0, 99.0) is None


def test_epoch_lr_by_hand():
    from rlhf.ddpo import epoch_lr

    assert [epoch_lr(2e-3, e) for e in (1, 5, 99)] == [2e-3] * 3  # constant
    # cosine over 5 epochs to 0.1: lr * (0.1 + 0.9 * (1 + cos(pi * (e - 1) / 4)) / 2)
    got = [epoch_lr(2e-3, e, "cosine", horizon=5, min_ratio=0.1) for e in range(1, 8)]
    want = [2e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * min(1.0, (e - 1) / 4))) / 2) for e in range(1, 8)]
    assert got == pytest.approx(want) and got[0] == pytest.approx(2e-3) and got[2] == pytest.approx(1.1e-3)
    assert got[4] == got[5] == got[6] == pytest.approx(2e-4)  # the floor from the horizon on
    assert epoch_lr(1.0, 1, "cosine", horizon=1, min_ratio=0.5) == 1.0  # a one-epoch horizon starts at the peak
    with pytest.raises(ValueError, match="epochs count from 1"):
        epoch_lr(1.0, 0, "cosine", horizon=3)


def test_scale_calibration_with_a_margin_keeps_clear_of_the_fd_cliff():
    from pipelines.improve import RewardHackingGuard, calibrate_guidance

    # held-out figures shaped like the 32-epoch table run's best/ (docs/improve/long_runs.md): x1.5 the best share within
    # 10% of the base's FD, x2 four times worse
    figures = {1.0: (0.163, 476.6), 1.25: (0.200, 450.7), 1.5: (0.288, 543.2), 2.0: (0.288, 2200.0)}

    def lines():
        return [{"scale": s, "overall": {"all_requested_shown": share, "finding_accuracy": 0.5, "fd": fd, "ms_ssim": 0.78}}
                for s, (share, fd) in figures.items()]

    def guard():
        g = RewardHackingGuard(GuardConfig(fd_tolerance=0.1, best_ms_ssim_rise=0.05))
        g.observe(0, None, 0.100, 550.6, None, 0.81)  # the base
        return g

    plain = lines()
    assert calibrate_guidance(plain, guard())["scale"] == 1.5  # at the edge
    assert plain[3]["not_calibrated_because"].startswith("FD 2200.00 more than 10% worse")
    careful = lines()
    chosen = calibrate_guidance(careful, guard(), margin=True)
    assert chosen["scale"] == 1.25 and chosen["calibrated"] and [r["calibrated"] for r in careful] == [False, True, False, False]
    by_scale = {r["scale"]: r.get("not_calibrated_because") for r in careful}
    assert by_scale[1.0] is None and by_scale[1.25] is None  # x1 eligible, beaten on the share
    assert by_scale[1.5].startswith("no margin: the next scale up, x2, is refused (FD 2200.00")
    assert by_scale[2.0].startswith("FD 2200.00")
    lone = [{"scale": 1.0, "overall": {"all_requested_shown": 0.2, "fd": 500.0, "ms_ssim": 0.78}}]
    assert calibrate_guidance(lone, guard(), margin=True) is None
    assert lone[0]["not_calibrated_because"].startswith("no margin: the largest scale tried")
    assert calibrate_guidance(lone, guard())["scale"] == 1.0  # without the margin it is kept


def test_log_findings_reward_by_hand_and_ranks_what_the_probability_form_cannot():
    from rlhf.reward import log_agreement

    details = {"prob/effusion": np.array([1e-4, 1e-3, 0.9, np.nan]), "prob/nodule": np.array([0.2, 0.5, 1e-9, 0.3])}
    expected = [{"effusion": True, "nodule": False}, {"effusion": True, "nodule": False}, {"effusion": True, "unknown": True}, {"effusion": True}]
    got = log_agreement(details, expected, floor=1e-6)
    assert got[0] == pytest.approx((math.log(1e-4) + math.log(0.8)) / 2)
    assert got[1] == pytest.approx((math.log(1e-3) + math.log(0.5)) / 2)
    assert got[2] == pytest.approx(math.log(0.9))  # a finding the classifier does not know does not count
    assert got[3] == 0.0  # nothing known: neutral
    # clipped at the floor: p = 0 does not give -inf
    assert log_agreement({"prob/a": np.array([0.0])}, [{"a": True}], floor=1e-6)[0] == pytest.approx(math.log(1e-6))
    # 1e-4 against 1e-3 for a requested finding: 0.0009 apart as probabilities, log(10) apart here
    one = log_agreement({"prob/a": np.array([1e-4, 1e-3])}, [{"a": True}, {"a": True}])
    assert one[1] - one[0] == pytest.approx(math.log(10))


def test_stage_two_verifier_pass_reads_each_label_at_its_own_operating_point():
    from rlhf.reward import verifier_pass

    details = {"prob/nodule": np.array([0.3, 0.3, 0.1, 0.3]), "prob/effusion": np.array([0.9, 0.9, 0.9, np.nan])}
    expected = [{"nodule": True}, {"nodule": True, "effusion": False}, {"nodule": True}, {"nodule": True, "effusion": True}]
    modalities = ["cxr", "cxr", "cxr", "fundus"]
    # a flat 0.5 fails a nodule seen at 0.3; at the nodule's own point (0.25) it passes
    assert verifier_pass(details, expected, modalities).tolist() == [0, 0, 0, 0]
    points = {"cxr": {"nodule": 0.25, "effusion": 0.6}, "fundus": {}}
    assert verifier_pass(details, expected, modalities, points).tolist() == [1, 0, 0, 0]
    # a modality without points keeps 0.5; a finding the classifier does not know (NaN) does not count
    assert verifier_pass(details, expected, modalities, {"cxr": {"nodule": 0.25}})[3] == 0.0
    assert verifier_pass(details, [{"effusion": True}] * 4, ["fundus"] * 4, {"fundus": {"effusion": 0.95}}).tolist() == [0, 0, 0, 1]


def test_reward_rejects_an_unknown_findings_form():
    from rlhf.reward import Reward

    with pytest.raises(ValueError, match="findings_form must be 'prob' or 'log'"):
        Reward({"quality": 1.0}, {"quality": object()}, findings_form="logit")


def test_stage_two_verifier_pass_reads_the_verifiers_own_classifiers():
    """The reward's findings component comes from the reward role; the verifier pass (what stage 2 keeps) from the verifier's
    classifiers, whose agreement is logged beside it; the evaluator can be neither."""
    from generator.phantoms import get_spec
    from rlhf.classifiers import FindingClassifier, FindingScorer, build_network
    from rlhf.reward import Reward, verifier_pass

    def scorer(role: str, seed: int) -> FindingScorer:
        torch.manual_seed(seed)
        names = list(get_spec("cxr").findings)
        arch = {"arch": "convnet", "widths": [4, 8], "blocks": 1, "patch": 4}
        return FindingScorer({"cxr": FindingClassifier(build_network(n_labels=len(names), **arch), names, 32, 1.5, role, "cxr",
                                                       arch, thresholds=[0.3 + 0.02 * i for i in range(len(names))])}, role)

    reward_side, verifier = scorer("reward", 0), scorer("verifier", 1)
    items = [SimpleNamespace(prompt="p", modality="cxr", expected=e) for e in
             ({"pleural_effusion": True}, {"nodule": True, "pneumothorax": False}, {"mass": False}, {})]
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    result = Reward({"findings": 1.0}, {"findings": reward_side}, verifier=verifier)(images, items)
    _, own = verifier.score(images, ["p"] * 4, ["cxr"] * 4, expected=[it.expected for it in items])
    _, rewards = reward_side.score(images, ["p"] * 4, ["cxr"] * 4, expected=[it.expected for it in items])
    np.testing.assert_allclose(result.components["findings"], rewards["agreement"])
    np.testing.assert_allclose(result.components["findings/verifier_agreement"], own["agreement"])
    expected = [it.expected for it in items]
    np.testing.assert_array_equal(result.components["findings/verifier_pass"],
                                  verifier_pass(own, expected, ["cxr"] * 4, {"cxr": verifier.operating_points("cxr")}))
    assert not np.allclose(own["agreement"], rewards["agreement"])  # another network's reading
    # without a verifier the pass reads the findings scorer itself, as before
    alone = Reward({"findings": 1.0}, {"findings": reward_side})(images, items)
    np.testing.assert_array_equal(alone.components["findings/verifier_pass"],
                                  verifier_pass(rewards, expected, ["cxr"] * 4, {"cxr": reward_side.operating_points("cxr")}))
    assert "findings/verifier_agreement" not in alone.components
    with pytest.raises(ValueError, match="held-out evaluator never decides what stage 2 keeps"):
        Reward({"findings": 1.0}, {"findings": reward_side}, verifier=scorer("evaluator", 2))


def test_jittered_views_shift_and_zoom_by_the_drawn_amounts_and_pass_the_gradient():
    from rlhf.ddpo import jittered_views

    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert jittered_views(images, 1, torch.Generator()) is images
    still = jittered_views(images, 3, torch.Generator().manual_seed(0), max_shift=0.0, max_zoom=0.0)
    assert still.shape == (6, 3, 32, 32) and torch.allclose(still, images.repeat(3, 1, 1, 1), atol=1e-5)
    a = jittered_views(images, 3, torch.Generator().manual_seed(1))
    b = jittered_views(images, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a[:2], images, atol=1e-3)  # seeded, and each view moved
    # a bright square moves by at most max_shift of the side plus the zoom's share: its centre stays within 0.06 * 32 + 0.08 * 16 px
    square = torch.zeros(1, 1, 32, 32)
    square[..., 12:20, 12:20] = 1.0
    views = jittered_views(square, 16, torch.Generator().manual_seed(2))
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    mass = views.sum(dim=(1, 2, 3))
    cy, cx = (views[:, 0] * ys).sum(dim=(1, 2)) / mass, (views[:, 0] * xs).sum(dim=(1, 2)) / mass
    moved = torch.maximum((cy - 15.5).abs(), (cx - 15.5).abs())
    assert moved.max() <= 0.06 * 32 + 0.08 * 16 and moved.max() > 0.5
    a.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_best_is_chosen_among_evaluations_within_the_gains_terms():
    """An evaluation whose FD is past the guard's tolerance, or whose MS-SSIM within a prompt rose by more than
    best_ms_ssim_rise, is no candidate for best/ (the seed-1 finding-table run of docs/improve/long_runs.md: its best
    share came with FD 16% worse); the base always is; an older run's guard state without MS-SSIM gates on FD alone."""
    from pipelines.improve import RewardHackingGuard

    guard = RewardHackingGuard(GuardConfig(patience=5))
    assert guard.acceptable(462.0, 0.79) is None  # the base
    guard.observe(0, None, 0.087, 462.0, ms_ssim=0.79)
    assert guard.acceptable(501.0, 0.71) is None  # +8%: within 10%
    assert "FD 535.00 more than 10% worse than the base's 462.00" in guard.acceptable(535.0, 0.74)
    assert "MS-SSIM 0.850 more than 0.05 above the base's 0.790" in guard.acceptable(470.0, 0.85)
    assert guard.acceptable(470.0, 0.84) is None
    loose = RewardHackingGuard(GuardConfig(best_within_tolerance=False))
    loose.observe(0, None, 0.087, 462.0, ms_ssim=0.79)
    assert loose.acceptable(2000.0, 0.99) is None
    no_rise = RewardHackingGuard(GuardConfig(best_ms_ssim_rise=None))
    no_rise.observe(0, None, 0.087, 462.0, ms_ssim=0.79)
    assert no_rise.acceptable(470.0, 0.99) is None
    older = RewardHackingGuard(GuardConfig())
    older.load_state_dict({"history": [{"epoch": 0, "reward": None, "share": 0.3, "fd": 535.0}], "strikes": 0})
    assert older.acceptable(540.0, 0.99) is None and older.acceptable(600.0, 0.5) is not None
