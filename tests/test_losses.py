"""policy_loss against an independent re-implementation of docs/method.md section 2.

The reference below is written from the formulas, in the *objective* (maximise) form with
``torch.min``, Python loops for the aggregation and multiply-by-mask for the stop-gradient, so it
shares no helper and no expression shape with ``erc_gym.losses``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from erc_gym.losses import ERCConfig, LossConfig, aggregate, policy_loss

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
CLIPS = {"ppo": ("ppo", 0.2, 0.2), "dapo": ("ppo", 0.2, 0.28), "gppo": ("gppo", 0.2, 0.2)}


def reference_loss(lp, old_lp, adv, h, h_old, mask, clip, eps_lo, eps_hi, c, band, agg):
    """Scalar loss straight from the spec formulas (fp64)."""
    r = torch.exp(torch.clamp(lp - old_lp, min=-20.0, max=20.0))
    if clip == "ppo":
        surr_clip = adv * torch.clamp(r, 1 - eps_lo, 1 + eps_hi)
    else:
        sg = r.detach()
        surr_clip = adv * torch.clamp(r, (1 - eps_lo) * r / sg, (1 + eps_hi) * r / sg)
    objective = torch.min(adv * r, surr_clip)
    if c is not None:
        objective = torch.where(adv < 0, torch.max(objective, c * adv), objective)
    per_token = -objective
    m = mask.double()
    if band is not None:
        rho = (h + 1e-8) / (h_old + 1e-8)
        inside = ((rho > band[0]) & (rho < band[1])).double() * m
        per_token = per_token * inside + per_token.detach() * (1.0 - inside)
    b, t = per_token.shape
    if agg == "token-mean":
        total = sum(per_token[i, j] * m[i, j] for i in range(b) for j in range(t))
        return total / max(float(m.sum()), 1.0)
    if agg == "seq-mean-token-sum-norm":
        return sum(per_token[i, j] * m[i, j] for i in range(b) for j in range(t)) / t
    seqs = []
    for i in range(b):
        n_i = float(m[i].sum())
        if n_i == 0:
            continue
        s_i = sum(per_token[i, j] * m[i, j] for j in range(t))
        seqs.append(s_i / n_i if agg == "seq-mean-token-mean" else s_i)
    return sum(seqs) / len(seqs) if seqs else per_token.sum() * 0.0


def random_batch(seed: int, b: int, t: int):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = lp + 0.7 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64)
    h_old = torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    h = h_old * (1 + 0.08 * torch.randn(b, t, generator=g, dtype=torch.float64))
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    if b > 2:
        mask[1] = False  # a sequence with no valid token
    return lp, old, adv, h.abs(), h_old, mask


@pytest.mark.parametrize(
    ("clip_name", "erc_on", "dual", "agg"),
    list(itertools.product(CLIPS, [False, True], [False, True], AGGS)),
)
def test_matches_reference(clip_name, erc_on, dual, agg):
    clip, eps_lo, eps_hi = CLIPS[clip_name]
    c = 2.0 if dual else None
    band = (0.95, 1.05) if erc_on else None
    seen = {"erc": 0.0, "dual": 0.0}
    for seed, (b, t) in enumerate([(5, 7), (3, 11), (8, 1)]):
        lp, old, adv, h, h_old, mask = random_batch(seed, b, t)
        cfg = LossConfig(
            clip=clip,
            eps_low=eps_lo,
            eps_high=eps_hi,
            dual_clip_c=c,
            erc=ERCConfig(*band) if band else None,
            aggregation=agg,
        )
        x = lp.clone().requires_grad_(True)
        out = policy_loss(x, old, adv, entropy=h, old_entropy=h_old, mask=mask, config=cfg)
        (g_lib,) = torch.autograd.grad(out.loss, x)
        y = lp.clone().requires_grad_(True)
        ref = reference_loss(y, old, adv, h, h_old, mask, clip, eps_lo, eps_hi, c, band, agg)
        (g_ref,) = torch.autograd.grad(ref, y, allow_unused=True)
        g_ref = torch.zeros_like(y) if g_ref is None else g_ref
        assert out.loss.dtype == torch.float64
        assert abs(out.loss.item() - ref.item()) <= 1e-6
        torch.testing.assert_close(g_lib, g_ref, atol=1e-6, rtol=0)
        seen["erc"] += out.metrics["erc_clip_fraction"] if erc_on else 0.0
        seen["dual"] += out.metrics["dual_clip_fraction"]
    # the data must exercise what the case claims to test
    assert (seen["erc"] > 0) == erc_on
    assert (seen["dual"] > 0) == dual


def test_advantage_shapes_are_equivalent():
    lp, old, adv, _, _, mask = random_batch(0, 4, 6)
    cfg = LossConfig.dapo()
    a = policy_loss(lp, old, adv, mask=mask, config=cfg).loss
    b = policy_loss(lp, old, adv.squeeze(-1), mask=mask, config=cfg).loss
    c = policy_loss(lp, old, adv.expand(4, 6), mask=mask, config=cfg).loss
    assert a.item() == b.item() == c.item()


def test_one_dimensional_inputs_are_one_state_per_sample():
    lp, old, adv, h, h_old, _ = random_batch(1, 9, 1)
    cfg = LossConfig.ppo(erc=ERCConfig())
    one_d = policy_loss(
        lp[:, 0], old[:, 0], adv[:, 0], entropy=h[:, 0], old_entropy=h_old[:, 0], config=cfg
    )
    two_d = policy_loss(lp, old, adv, entropy=h, old_entropy=h_old, config=cfg)
    assert one_d.loss.item() == pytest.approx(two_d.loss.item(), abs=1e-12)
    assert one_d.metrics == pytest.approx(two_d.metrics, nan_ok=True)


# ---------------------------------------------------------------- property-based tests

shapes = st.tuples(st.integers(1, 6), st.integers(1, 9))
seeds = st.integers(0, 2**31 - 1)
configs = st.sampled_from(
    [LossConfig.ppo(), LossConfig.dapo(), LossConfig.gppo()]
    + [LossConfig(clip="gppo", aggregation=a) for a in AGGS]
)


def _loss_and_grad(cfg, lp, old, adv, h, h_old, mask):
    x = lp.clone().requires_grad_(True)
    out = policy_loss(x, old, adv, entropy=h, old_entropy=h_old, mask=mask, config=cfg)
    (g,) = torch.autograd.grad(out.loss, x)
    return out, g


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds, base=configs)
def test_infinite_band_equals_erc_off(shape, seed, base):
    lp, old, adv, h, h_old, mask = random_batch(seed, *shape)
    off = LossConfig(**{**base.__dict__, "erc": None})
    wide = LossConfig(**{**base.__dict__, "erc": ERCConfig(0.0, math.inf)})
    out_off, g_off = _loss_and_grad(off, lp, old, adv, h, h_old, mask)
    out_on, g_on = _loss_and_grad(wide, lp, old, adv, h, h_old, mask)
    assert out_on.loss.item() == out_off.loss.item()
    assert torch.equal(g_on, g_off)
    assert out_on.metrics["erc_clip_fraction"] == 0.0


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds, base=configs)
def test_out_of_band_tokens_have_zero_gradient_and_keep_value(shape, seed, base):
    lp, old, adv, h, h_old, mask = random_batch(seed, *shape)
    erc = LossConfig(**{**base.__dict__, "erc": ERCConfig(0.95, 1.05)})
    off = LossConfig(**{**base.__dict__, "erc": None})
    out_on, g_on = _loss_and_grad(erc, lp, old, adv, h, h_old, mask)
    out_off, g_off = _loss_and_grad(off, lp, old, adv, h, h_old, mask)
    rho = (h + 1e-8) / (h_old + 1e-8)
    outside = ((rho <= 0.95) | (rho >= 1.05)) & mask
    assert torch.all(g_on[outside] == 0)
    assert torch.all(g_on[~mask] == 0)
    # in-band tokens keep the ERC-off gradient: the denominator does not change
    inside = ~outside & mask
    torch.testing.assert_close(g_on[inside], g_off[inside], atol=1e-12, rtol=0)
    assert out_on.loss.item() == pytest.approx(out_off.loss.item(), abs=1e-12)
    assert torch.equal(out_on.token_loss, out_off.token_loss)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds, eps=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)]))
def test_gppo_forward_equals_ppo_and_gradient_factors(shape, seed, eps):
    lp, old, adv, _, _, _ = random_batch(seed, *shape)
    adv = adv.expand_as(lp).contiguous()
    ppo = LossConfig(clip="ppo", eps_low=eps[0], eps_high=eps[1])
    gppo = LossConfig(clip="gppo", eps_low=eps[0], eps_high=eps[1])
    out_p, g_p = _loss_and_grad(ppo, lp, old, adv, None, None, None)
    out_g, g_g = _loss_and_grad(gppo, lp, old, adv, None, None, None)
    assert out_g.loss.item() == pytest.approx(out_p.loss.item(), abs=1e-12)
    r = torch.exp(lp - old)
    factor = r.clone()
    high = (adv > 0) & (r > 1 + eps[1])
    low = (adv < 0) & (r < 1 - eps[0])
    factor[high] = 1 + eps[1]
    factor[low] = 1 - eps[0]
    n = lp.numel()
    torch.testing.assert_close(g_g, -factor * adv / n, atol=1e-12, rtol=1e-9)
    ppo_factor = torch.where(high | low, torch.zeros_like(r), r)
    torch.testing.assert_close(g_p, -ppo_factor * adv / n, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("cfg_fn", [LossConfig.ppo, LossConfig.dapo, LossConfig.gppo])
def test_all_masked_batch_is_finite_with_zero_gradient(agg, cfg_fn):
    lp, old, adv, h, h_old, mask = random_batch(3, 4, 5)
    cfg = LossConfig(**{**cfg_fn(erc=ERCConfig()).__dict__, "aggregation": agg})
    out, g = _loss_and_grad(cfg, lp, old, adv, h, h_old, torch.zeros_like(mask))
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    assert torch.all(g == 0)
    assert out.metrics["clip_fraction"] == 0.0


def test_zero_entropies_give_no_nan():
    lp, old, adv, _, _, mask = random_batch(4, 3, 4)
    zeros = torch.zeros_like(lp)
    out, g = _loss_and_grad(LossConfig.dapo(erc=ERCConfig()), lp, old, adv, zeros, zeros, mask)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(g).all()
    assert out.metrics["entropy_ratio_mean"] == 1.0
    assert out.metrics["erc_clip_fraction"] == 0.0
    # one side zero: finite ratio (1e8 or 1e-8), token clipped, still no NaN
    out2, g2 = _loss_and_grad(
        LossConfig.dapo(erc=ERCConfig()), lp, old, adv, zeros, torch.ones_like(lp), mask
    )
    assert torch.isfinite(out2.loss) and torch.isfinite(g2).all()
    assert out2.metrics["erc_clip_fraction"] == 1.0


_POISON = st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30])


@settings(max_examples=80, deadline=None)
@given(
    shape=shapes,
    seed=seeds,
    base=configs,
    agg=st.sampled_from(AGGS),
    erc_on=st.booleans(),
    poison=_POISON,
)
def test_masked_positions_do_not_leak_into_loss_gradients_or_metrics(
    shape, seed, base, agg, erc_on, poison
):
    # NaN / inf at masked-out positions (a padded token whose logits were all
    # -inf, a stale old log-prob, the NaN advantage of an empty sequence, a NaN entropy) must
    # change neither the valid tokens' loss nor their gradients nor the metrics.
    lp, old, adv, h, h_old, mask = random_batch(seed, *shape)
    adv = adv.expand_as(lp).contiguous()
    cfg = LossConfig(
        **{**base.__dict__, "aggregation": agg, "erc": ERCConfig(0.95, 1.05) if erc_on else None}
    )
    clean, g_clean = _loss_and_grad(cfg, lp, old, adv, h, h_old, mask)
    dirty = [x.masked_fill(~mask, poison) for x in (lp, old, adv, h, h_old)]
    out, g = _loss_and_grad(cfg, *dirty, mask)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == clean.loss.item()
    assert torch.isfinite(g).all()
    assert torch.equal(g[mask], g_clean[mask])
    assert torch.all(g[~mask] == 0)
    assert out.metrics == pytest.approx(clean.metrics, nan_ok=True)


def test_aggregate_selects_masked_positions_out():
    loss = torch.tensor([[1.0, math.nan], [math.inf, 2.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, True]])
    for agg in AGGS:
        out = aggregate(loss, mask, agg)  # type: ignore[arg-type]
        assert torch.isfinite(out), agg
        (g,) = torch.autograd.grad(out, loss)
        assert torch.all(g[~mask] == 0) and torch.all(g[mask] > 0), agg


def test_nan_entropy_on_a_valid_token_counts_as_erc_clipped():
    # a NaN entropy fails both strict band comparisons, so ERC stops its
    # gradient; the metrics must count it as clipped, as the applied keep-mask does.
    lp, old, adv, h, h_old, _ = random_batch(8, 2, 4)
    h = h_old.clone()  # every ratio is 1: in band
    h[0, 1] = math.nan
    h_old[1, 2] = math.nan
    out, g = _loss_and_grad(LossConfig.dapo(erc=ERCConfig()), lp, old, adv, h, h_old, None)
    assert out.erc_keep is not None
    assert int((~out.erc_keep).sum()) == 2
    assert g[0, 1] == 0 and g[1, 2] == 0
    m = out.metrics
    assert m["erc_clip_fraction"] == pytest.approx(2 / 8)
    assert m["erc_clip_fraction"] == pytest.approx(1 - out.erc_keep.double().mean().item())
    # a NaN ratio lies on neither side of the band
    assert m["erc_clip_fraction_low"] == 0.0 and m["erc_clip_fraction_high"] == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    lp, old, adv, h, h_old, mask = random_batch(5, 6, 8)
    cfg = LossConfig.gppo(erc=ERCConfig(0.9, 1.1))
    x = lp.to(dtype).requires_grad_(True)
    out = policy_loss(
        x,
        old.to(dtype),
        adv.to(dtype),
        entropy=h.to(dtype),
        old_entropy=h_old.to(dtype),
        mask=mask,
        config=cfg,
    )
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    ref = policy_loss(
        lp.to(dtype).double(),
        old.to(dtype).double(),
        adv.to(dtype).double(),
        entropy=h.to(dtype).double(),
        old_entropy=h_old.to(dtype).double(),
        mask=mask,
        config=cfg,
    )
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-4, abs=1e-5)


def test_metrics_hand_computed():
    # 4 tokens, one sequence: clip-high, clip-low, in band, dual-clip
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 4.0]], dtype=torch.float64))
    old = torch.zeros_like(lp)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    h_old = torch.tensor([[1.0, 0.1, 2.0, 0.5]], dtype=torch.float64)
    h = torch.tensor([[1.0, 0.2, 1.8, 0.5]], dtype=torch.float64)  # rho: 1, 2, .9, 1
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, erc=ERCConfig(0.95, 1.05))
    out = policy_loss(lp, old, adv, entropy=h, old_entropy=h_old, config=cfg)
    m = out.metrics
    assert m["clip_fraction_high"] == 0.25 and m["clip_fraction_low"] == 0.25
    assert m["clip_fraction"] == 0.5 and m["dual_clip_fraction"] == 0.25
    assert m["erc_clip_fraction_high"] == 0.25 and m["erc_clip_fraction_low"] == 0.25
    assert m["erc_clip_fraction"] == 0.5
    assert m["erc_clipped_entropy_old_mean"] == pytest.approx((0.1 + 2.0) / 2)
    assert m["erc_kept_entropy_old_mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["entropy_ratio_min"] == pytest.approx(0.9) and m["entropy_ratio_max"] == pytest.approx(
        2.0
    )
    r = torch.tensor([1.5, 0.5, 1.0, 4.0], dtype=torch.float64)
    assert m["approx_kl"] == pytest.approx(((r - 1) - r.log()).mean().item())
    assert m["ppo_kl"] == pytest.approx((-r.log()).mean().item())
    # loss values: -A*clip: -1.28, +0.8 (max(0.5, 0.8)), -1, min(4, 3) = 3
    assert out.loss.item() == pytest.approx((-1.28 + 0.8 - 1.0 + 3.0) / 4)


def test_metrics_sync_once(monkeypatch):
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    lp, old, adv, h, h_old, mask = random_batch(6, 3, 4)
    policy_loss(lp, old, adv, entropy=h, old_entropy=h_old, mask=mask, config=LossConfig.dapo())
    assert len(calls) == 1


def test_aggregate_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / 3)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"low": 1.0, "high": 1.05}, "low=1.0"),
        ({"low": 1.2, "high": 1.5}, "low=1.2"),
        ({"low": 0.9, "high": 1.0}, "high=1.0"),
        ({"low": 0.9, "high": 0.5}, "high=0.5"),
        ({"low": -0.1, "high": 1.1}, "low=-0.1"),
    ],
)
def test_erc_config_rejects_bad_band(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ERCConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"eps_low": -0.1}, "eps_low=-0.1"),
        ({"eps_high": -0.2}, "eps_high=-0.2"),
        ({"dual_clip_c": 1.0}, "dual_clip_c=1.0"),
        ({"dual_clip_c": 0.5}, "dual_clip_c=0.5"),
        ({"clip": "trpo"}, "'trpo'"),
        ({"aggregation": "sum"}, "'sum'"),
    ],
)
def test_loss_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        LossConfig(**kwargs)


def test_mismatched_shapes_are_rejected():
    lp = torch.zeros(3, 4)
    cfg = LossConfig.ppo()
    with pytest.raises(ValueError, match=r"old_log_prob .*\(3, 5\)"):
        policy_loss(lp, torch.zeros(3, 5), torch.zeros(3), config=cfg)
    with pytest.raises(ValueError, match=r"advantages .*\(2,\)"):
        policy_loss(lp, lp, torch.zeros(2), config=cfg)
    with pytest.raises(ValueError, match=r"mask .*\(3, 3\)"):
        policy_loss(lp, lp, torch.zeros(3), mask=torch.ones(3, 3), config=cfg)
    with pytest.raises(ValueError, match=r"entropy .*\(4,\)"):
        policy_loss(lp, lp, torch.zeros(3), entropy=torch.ones(4), old_entropy=lp, config=cfg)


def test_non_tensor_inputs_are_a_type_error_naming_the_argument():
    """A list was an AttributeError ("'list' object has no attribute 'shape'") (h14)."""
    lp = torch.zeros(3)
    cfg = LossConfig.ppo()
    with pytest.raises(TypeError, match=r"log_prob must be a torch\.Tensor, got list"):
        policy_loss([0.0, 0.0, 0.0], lp, lp, config=cfg)
    with pytest.raises(TypeError, match=r"advantages must be a torch\.Tensor, got ndarray"):
        policy_loss(lp, lp, lp.numpy(), config=cfg)
    with pytest.raises(TypeError, match=r"mask must be a torch\.Tensor, got list"):
        policy_loss(lp, lp, lp, mask=[True] * 3, config=cfg)


def test_erc_without_entropies_is_rejected():
    lp = torch.zeros(3, 4)
    cfg = LossConfig.dapo(erc=ERCConfig())
    with pytest.raises(ValueError, match="entropy and old_entropy are None"):
        policy_loss(lp, lp, torch.zeros(3), config=cfg)
    with pytest.raises(ValueError, match="old_entropy is None"):
        policy_loss(lp, lp, torch.zeros(3), entropy=lp, config=cfg)


def test_presets():
    assert LossConfig.ppo() == LossConfig(clip="ppo", eps_low=0.2, eps_high=0.2)
    d = LossConfig.dapo(erc=ERCConfig())
    assert (d.clip, d.eps_low, d.eps_high, d.dual_clip_c, d.aggregation) == (
        "ppo",
        0.2,
        0.28,
        10.0,
        "token-mean",
    )
    assert d.erc == ERCConfig(0.95, 1.05)
    g = LossConfig.gppo()
    assert (g.clip, g.eps_low, g.eps_high, g.dual_clip_c) == ("gppo", 0.2, 0.2, 10.0)


@pytest.mark.parametrize("numel", [1000, (1 << 12) + 1, 70_000])
def test_stop_gradient_forms_agree(numel):
    """Both stop-gradient forms (torch.where below the size cut, autograd node above) agree."""
    from erc_gym.losses import _stop_gradient_outside, _StopGradientOutside

    g = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(numel, generator=g) > 0.4
    weights = torch.randn(numel, generator=g, dtype=torch.float64)
    outs = []
    for form in (
        _stop_gradient_outside,
        _StopGradientOutside.apply,
        lambda v, k: torch.where(k, v, v.detach()),
    ):
        y = form(x * 3.0, keep)
        (grad,) = torch.autograd.grad((y * weights).sum(), x)
        outs.append((y.detach(), grad))
    for y, grad in outs[1:]:
        assert torch.equal(y, outs[0][0])
        assert torch.equal(grad, outs[0][1])
    assert torch.equal(outs[0][1], torch.where(keep, 3.0 * weights, torch.zeros_like(weights)))


def test_negative_entropies_are_refused_when_metrics_are_reduced():
    """Negative entropies (an entropy loss -H passed by mistake) were accepted silently."""
    from erc_gym.losses import loss_metrics

    config = LossConfig(erc=ERCConfig(0.95, 1.05))
    lp = torch.randn(4, 3, requires_grad=True)
    h = torch.rand(4, 3) + 0.1
    with pytest.raises(ValueError, match=r"must be entropies \(>= 0\), got -0\.5 at a valid"):
        policy_loss(lp, lp.detach(), torch.randn(4), entropy=-h.clamp(max=0.5), old_entropy=h,
                    config=config)  # fmt: skip
    out = policy_loss(lp, lp.detach(), torch.randn(4), entropy=h, old_entropy=-h,
                      config=config, metrics=False)  # fmt: skip
    with pytest.raises(ValueError, match="not an entropy loss"):  # the deferred reduction too
        loss_metrics([out.stats])
    # a masked-out token may hold anything; rounding just below 0 is an entropy still
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0, 0] = False
    odd = h.clone()
    odd[0, 0], odd[1, 1] = -5.0, -1e-6
    out = policy_loss(lp, lp.detach(), torch.randn(4), entropy=odd, old_entropy=h, mask=mask,
                      config=config)  # fmt: skip
    assert math.isfinite(out.metrics["entropy_mean"])


def test_a_zero_old_entropy_is_clipped_unless_the_entropy_stays_zero():
    """Documented behaviour: rho = (H + 1e-8) / 1e-8 where the old policy was deterministic."""
    config = LossConfig(erc=ERCConfig(0.95, 1.05))
    lp = torch.randn(1, 3, requires_grad=True)
    old = torch.zeros(1, 3)
    h = torch.tensor([[0.0, 1e-10, 1e-3]])
    out = policy_loss(lp, lp.detach(), torch.ones(1), entropy=h, old_entropy=old, config=config)
    assert out.erc_keep.tolist() == [[True, True, False]]
    assert out.metrics["erc_clip_fraction_high"] == pytest.approx(1 / 3)


def test_policy_loss_on_meta_tensors_gives_the_loss_and_nan_metrics():
    """Shape inference on ``meta`` tensors failed inside the metrics (no data to copy out)."""
    config = LossConfig.dapo(erc=ERCConfig(0.95, 1.05))
    lp = torch.empty(2, 5, device="meta", requires_grad=True)
    h = torch.empty(2, 5, device="meta")
    out = policy_loss(lp, lp.detach(), torch.empty(2, device="meta"), entropy=h, old_entropy=h,
                      config=config)  # fmt: skip
    assert out.loss.is_meta and out.loss.shape == ()
    assert out.metrics and all(math.isnan(v) for v in out.metrics.values())
    out.loss.backward()
    assert lp.grad is not None and lp.grad.shape == lp.shape
