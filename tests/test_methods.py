"""The rival methods, baselines and controls in policy_loss, against independent fp64 formulas.

The reference below is written token by token from the papers' and engines' definitions
(docs/rivals.md): Python loops over tokens, each token's loss a scalar function of its own
log-prob, the token selections computed with plain Python (sorted lists, numpy's quantile), and
the aggregation by loops. It shares no helper with ``erc_gym.losses``. Values *and* per-token
gradients are compared. Random draws are checked by their count, support and uniformity, and the
loss is then checked against the reference given the drawn set.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from erc_gym.adaptive_coef import AdaptiveEntropyCoef, AdaptiveKLCoef
from erc_gym.losses import (
    METHODS,
    ClipCov,
    ERCConfig,
    HighEntropy,
    KLCov,
    LossConfig,
    RandomMask,
    loss_metrics,
    method_settings,
    policy_loss,
)
from erc_gym.methods import MethodSettings, early_stop

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def batch(seed: int = 0, b: int = 6, t: int = 9, spread: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    old = -torch.rand(b, t, generator=g, dtype=d) * 3
    lp = old + spread * torch.randn(b, t, generator=g, dtype=d)
    adv = torch.randn(b, 1, generator=g, dtype=d).expand(b, t).clone()
    adv += 0.3 * torch.randn(b, t, generator=g, dtype=d)
    mask = torch.rand(b, t, generator=g) > 0.2
    mask[0, 0] = True
    mask[-1] = False  # a sequence without valid tokens
    h_old = torch.rand(b, t, generator=g, dtype=d) * 2 + 0.05
    h = (h_old * (1 + 0.08 * torch.randn(b, t, generator=g, dtype=d))).abs()
    kl = torch.rand(b, t, generator=g, dtype=d) * 0.1
    return {"lp": lp, "old": old, "adv": adv, "mask": mask, "h": h, "h_old": h_old, "kl": kl}


def aggregate_ref(per_token, mask, agg):
    b, t = mask.shape
    m = [[bool(mask[i, j]) for j in range(t)] for i in range(b)]
    if agg == "token-mean":
        n = sum(map(sum, m))
        return sum(per_token[i][j] for i in range(b) for j in range(t) if m[i][j]) / max(n, 1)
    if agg == "seq-mean-token-sum-norm":
        return sum(per_token[i][j] for i in range(b) for j in range(t) if m[i][j]) / t
    seqs = []
    for i in range(b):
        n_i = sum(m[i])
        if n_i:
            s_i = sum(per_token[i][j] for j in range(t) if m[i][j])
            seqs.append(s_i / n_i if agg == "seq-mean-token-mean" else s_i)
    return sum(seqs) / len(seqs)


def token_mean_ref(values, mask):
    b, t = mask.shape
    picked = [values[i][j] for i in range(b) for j in range(t) if mask[i, j]]
    return sum(picked) / max(len(picked), 1)


def ppo_token(lp, old, a, clip, eps_lo, eps_hi, c):
    """One token's loss as a scalar function of its log-prob (objective form, then negated)."""
    r = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    if clip == "none":
        objective = a * r
    elif clip == "ppo":
        objective = torch.min(a * r, a * torch.clamp(r, 1 - eps_lo, 1 + eps_hi))
    else:  # gppo
        sg = r.detach()
        objective = torch.min(
            a * r, a * torch.clamp(r, (1 - eps_lo) * r / sg, (1 + eps_hi) * r / sg)
        )
    if c is not None and a < 0:
        objective = torch.clamp(objective, min=c * a)
    return -objective


def dppo_token(lp, old, a, kind, eps_lo, eps_hi, cap):
    lp_value = lp.detach().item()
    p, q = math.exp(lp_value), math.exp(float(old))
    if kind == "tv":
        inside = (p - q <= eps_hi) if a > 0 else (p - q >= -eps_lo)
    else:
        d = q * (float(old) - lp_value) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
        inside = (d <= eps_hi or p <= q) if a > 0 else (d <= eps_lo or p >= q)
    w = math.exp(max(-20.0, min(20.0, lp_value - float(old))))
    if cap is not None:
        w = min(w, cap)
    return -a * w * lp * (1.0 if inside else 0.0), inside


def run(x, config, **kwargs):
    lp = x["lp"].clone().requires_grad_(True)
    h = kwargs.pop("h", x["h"])
    out = policy_loss(
        lp,
        x["old"],
        x["adv"],
        entropy=h,
        old_entropy=x["h_old"],
        mask=x["mask"],
        config=config,
        **kwargs,
    )
    (grad,) = torch.autograd.grad(out.loss, lp, retain_graph=h.requires_grad)
    return out, grad


def reference(x, per_token_fn, agg, extra=None):
    """Scalar reference loss and its gradient w.r.t. every token's log-prob."""
    lp = x["lp"].clone().requires_grad_(True)
    b, t = lp.shape
    per_token = [[per_token_fn(i, j, lp[i, j]) for j in range(t)] for i in range(b)]
    loss = aggregate_ref(per_token, x["mask"], agg)
    if extra is not None:
        loss = loss + extra(lp)
    (grad,) = torch.autograd.grad(loss, lp, allow_unused=True)
    return loss.detach(), torch.zeros_like(lp) if grad is None else grad


def close(out, grad, ref_loss, ref_grad):
    torch.testing.assert_close(out.loss.detach(), ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------------------------------------- clip


@pytest.mark.parametrize(("agg", "dual"), list(itertools.product(AGGS, [None, 3.0])))
def test_unclipped_variant_matches_reference(agg, dual):
    x = batch(1, spread=1.0)
    cfg = LossConfig(clip="none", dual_clip_c=dual, aggregation=agg)
    out, grad = run(x, cfg)

    def tok(i, j, lp):
        return ppo_token(lp, x["old"][i, j], float(x["adv"][i, j]), "none", 0, 0, dual)

    close(out, grad, *reference(x, tok, agg))
    assert out.metrics["clip_fraction"] == 0.0


@pytest.mark.parametrize(
    ("kind", "agg", "cap"), list(itertools.product(["tv", "kl"], AGGS, [None, 1.3]))
)
def test_dppo_matches_reference(kind, agg, cap):
    x = batch(2, spread=0.9)
    x["old"] = x["old"] / 3  # probabilities up to 1: the trust region bites on both sides
    x["lp"] = x["old"] + 0.9 * torch.randn(
        x["old"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    x["lp"] = x["lp"].clamp(max=-1e-3)
    cfg = LossConfig(
        clip=f"dppo-{kind}", eps_low=0.1, eps_high=0.15, ratio_cap=cap, aggregation=agg
    )
    out, grad = run(x, cfg)
    inside = {}

    def tok(i, j, lp):
        loss, inside[i, j] = dppo_token(
            lp, x["old"][i, j], float(x["adv"][i, j]), kind, 0.1, 0.15, cap
        )
        return loss

    close(out, grad, *reference(x, tok, agg))
    valid = [(i, j) for (i, j) in inside if x["mask"][i, j]]
    outside = [ij for ij in valid if not inside[ij]]
    assert 0 < len(outside) < len(valid)  # the region is active but not everywhere
    assert out.metrics["clip_fraction"] == pytest.approx(len(outside) / len(valid))
    pos = sum(1 for ij in outside if x["adv"][ij] > 0)
    assert out.metrics["clip_fraction_high"] == pytest.approx(pos / len(valid))
    if cap is not None:
        r = torch.exp(x["lp"] - x["old"])
        capped = [ij for ij in valid if inside[ij] and r[ij] > cap]
        assert out.metrics["dual_clip_fraction"] == pytest.approx(len(capped) / len(valid))


def test_dppo_rejects_dual_clip_and_cap_needs_dppo():
    with pytest.raises(ValueError, match="ratio_cap instead"):
        LossConfig(clip="dppo-tv", dual_clip_c=3.0)
    with pytest.raises(ValueError, match="DPPO's weight truncation"):
        LossConfig(clip="ppo", ratio_cap=3.0)
    with pytest.raises(ValueError, match="does not define"):
        LossConfig(clip="dppo-kl", gate=ClipCov(0.1))


# ------------------------------------------------------------------------------------------- gates


def covariances(x):
    """Centred covariance per valid token, from plain Python sums."""
    b, t = x["mask"].shape
    idx = [(i, j) for i in range(b) for j in range(t) if x["mask"][i, j]]
    a_bar = sum(float(x["adv"][ij]) for ij in idx) / len(idx)
    l_bar = sum(float(x["lp"][ij]) for ij in idx) / len(idx)
    return {ij: (float(x["adv"][ij]) - a_bar) * (float(x["lp"][ij]) - l_bar) for ij in idx}


@pytest.mark.parametrize(("clip", "agg"), list(itertools.product(["ppo", "gppo", "none"], AGGS)))
def test_clip_cov_matches_reference(clip, agg):
    x = batch(3, b=8, t=12, spread=1.0)
    x["adv"] = x["adv"] * 3  # covariances reach the (lb, ub) window
    gate = ClipCov(ratio=0.1, lb=0.2, ub=3.0)
    cfg = LossConfig(clip=clip, eps_low=0.2, eps_high=0.28, gate=gate, aggregation=agg)
    out, grad = run(x, cfg, generator=torch.Generator().manual_seed(7))
    drawn = {tuple(ij) for ij in torch.nonzero(out.gate_mask).tolist()}
    cov = covariances(x)
    r = torch.exp(x["lp"] - x["old"])
    clipped = {
        ij
        for ij in cov
        if clip != "none"
        and ((x["adv"][ij] > 0 and r[ij] > 1.28) or (x["adv"][ij] < 0 and r[ij] < 0.8))
    }
    candidates = {ij for ij, c in cov.items() if 0.2 < c < 3.0 and ij not in clipped}
    n_draw = min(max(int(0.1 * len(cov)), 1), len(candidates))
    assert len(candidates) > n_draw > 1  # a real draw, not the whole set
    assert drawn <= candidates and len(drawn) == n_draw

    def tok(i, j, lp):
        base = ppo_token(lp, x["old"][i, j], float(x["adv"][i, j]), clip, 0.2, 0.28, None)
        return base * 0.0 if (i, j) in drawn else base

    close(out, grad, *reference(x, tok, agg))
    assert out.metrics["clip_cov_fraction"] == pytest.approx(n_draw / len(cov))
    assert out.metrics["gate_fraction"] == out.metrics["clip_cov_fraction"]


def test_clip_cov_draw_is_seeded_and_uses_the_global_rng_without_generator():
    x = batch(3, b=8, t=12, spread=1.0)
    x["adv"] = x["adv"] * 3
    cfg = LossConfig(gate=ClipCov(ratio=0.05, lb=0.2, ub=3.0))  # 3 of 13 candidates

    def drawn(**kw):
        return run(x, cfg, **kw)[0].gate_mask

    same = [drawn(generator=torch.Generator().manual_seed(11)) for _ in range(2)]
    assert torch.equal(*same)
    draws = []
    for seed in (4, 4, 5, 6, 7):
        torch.manual_seed(seed)
        draws.append(drawn())
    assert torch.equal(draws[0], draws[1])
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 2


@pytest.mark.parametrize(("clip", "agg"), list(itertools.product(["none", "ppo"], AGGS)))
def test_kl_cov_matches_reference(clip, agg):
    x = batch(4, b=7, t=10, spread=0.8)
    cfg = LossConfig(clip=clip, gate=KLCov(ratio=0.15, coef=0.7), aggregation=agg)
    out, grad = run(x, cfg)
    cov = covariances(x)
    k = max(1, int(len(cov) * 0.15))
    chosen = set(sorted(cov, key=lambda ij: -cov[ij])[:k])
    assert {tuple(ij) for ij in torch.nonzero(out.gate_mask).tolist()} == chosen

    def tok(i, j, lp):
        base = ppo_token(lp, x["old"][i, j], float(x["adv"][i, j]), clip, 0.2, 0.2, None)
        if (i, j) in chosen:
            base = base + 0.7 * torch.abs(lp - x["old"][i, j])
        return base

    close(out, grad, *reference(x, tok, agg))
    assert out.metrics["kl_cov_fraction"] == pytest.approx(k / len(cov))


@pytest.mark.parametrize(("quantile", "agg"), list(itertools.product([0.2, 0.5, 1.0], AGGS)))
def test_high_entropy_gate_matches_reference(quantile, agg):
    x = batch(5, b=7, t=11)
    x["h"] = x["h"].float().double()  # TRL ranks fp32 entropies
    cfg = LossConfig(eps_high=0.28, dual_clip_c=10.0, gate=HighEntropy(quantile), aggregation=agg)
    out, grad = run(x, cfg)
    valid_h = x["h"][x["mask"]].numpy()
    threshold = np.quantile(valid_h, 1 - quantile)  # linear interpolation, fp64
    keep = (x["h"].numpy() >= threshold) & x["mask"].numpy()
    assert torch.equal(~out.gate_mask & x["mask"], torch.from_numpy(keep))

    def tok(i, j, lp):
        base = ppo_token(lp, x["old"][i, j], float(x["adv"][i, j]), "ppo", 0.2, 0.28, 10.0)
        return base if keep[i, j] else base * 0.0

    close(out, grad, *reference(x, tok, agg))
    assert out.metrics["entropy_gate_fraction"] == pytest.approx(
        1 - keep.sum() / x["mask"].sum().item()
    )


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("mode", ["share", "matched"])
def test_random_mask_matches_reference_given_the_draw(mode, agg):
    x = batch(6, b=8, t=10, spread=0.4)
    band = ERCConfig(0.95, 1.05)
    gate = RandomMask(share=0.3) if mode == "share" else RandomMask(match=band)
    cfg = LossConfig(clip="gppo", dual_clip_c=10.0, gate=gate, aggregation=agg)
    out, grad = run(x, cfg, generator=torch.Generator().manual_seed(0))
    drawn = out.gate_mask
    n_valid = int(x["mask"].sum())
    rho = (x["h"] + 1e-8) / (x["h_old"] + 1e-8)
    erc_count = int((((rho <= 0.95) | (rho >= 1.05)) & x["mask"]).sum())
    expected = math.floor(0.3 * n_valid + 0.5) if mode == "share" else erc_count
    assert int(drawn.sum()) == expected > 0
    assert not bool((drawn & ~x["mask"]).any())

    def tok(i, j, lp):
        base = ppo_token(lp, x["old"][i, j], float(x["adv"][i, j]), "gppo", 0.2, 0.2, 10.0)
        return base.detach() if drawn[i, j] else base

    close(out, grad, *reference(x, tok, agg))
    assert out.metrics["random_mask_fraction"] == pytest.approx(expected / n_valid)


shapes = st.tuples(st.integers(1, 9), st.integers(1, 40))


@settings(max_examples=80, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    band=st.sampled_from([(0.95, 1.05), (0.99, 1.01), (0.8, 1.2), (0.5, 1.5)]),
    spread=st.floats(0.0, 0.5),
)
def test_matched_random_mask_masks_exactly_ercs_count(shape, seed, band, spread):
    g = torch.Generator().manual_seed(seed)
    h_old = torch.rand(shape, generator=g, dtype=torch.float64) + 0.01
    h = h_old * (1 + spread * torch.randn(shape, generator=g, dtype=torch.float64)).abs()
    mask = torch.rand(shape, generator=g) > 0.3
    lp = -torch.rand(shape, generator=g, dtype=torch.float64)
    adv = torch.randn(shape[0], generator=g, dtype=torch.float64)
    erc = ERCConfig(*band)
    with_erc = policy_loss(
        lp, lp, adv, entropy=h, old_entropy=h_old, mask=mask, config=LossConfig(erc=erc)
    )
    control = policy_loss(
        lp,
        lp,
        adv,
        entropy=h,
        old_entropy=h_old,
        mask=mask,
        config=LossConfig(gate=RandomMask(match=erc)),
        generator=torch.Generator().manual_seed(seed),
    )
    erc_count = int((mask & ~with_erc.erc_keep).sum())
    assert int(control.gate_mask.sum()) == erc_count
    assert not bool((control.gate_mask & ~mask).any())
    assert control.metrics["random_mask_fraction"] == with_erc.metrics["erc_clip_fraction"]


def test_random_mask_is_uniform_over_valid_tokens():
    """Every valid token is drawn equally often (chi-square test over 4,000 seeded draws)."""
    shape = (4, 6)
    mask = torch.ones(shape, dtype=torch.bool)
    mask[0, :3] = False
    lp = torch.zeros(shape)
    cfg = LossConfig(gate=RandomMask(share=0.25))
    gen = torch.Generator().manual_seed(123)
    counts = torch.zeros(shape)
    draws = 4000
    for _ in range(draws):
        counts += policy_loss(
            lp, lp, torch.ones(4), mask=mask, config=cfg, generator=gen, metrics=False
        ).gate_mask
    observed = counts[mask].numpy()
    assert observed.sum() == draws * math.floor(0.25 * 21 + 0.5)
    assert stats.chisquare(observed).pvalue > 1e-3
    assert counts[~mask].sum() == 0


def test_random_mask_needs_one_setting_and_matched_replaces_erc():
    with pytest.raises(ValueError, match="exactly one"):
        RandomMask()
    with pytest.raises(ValueError, match="exactly one"):
        RandomMask(share=0.1, match=ERCConfig())
    with pytest.raises(ValueError, match="share must be in"):
        RandomMask(share=1.5)
    with pytest.raises(ValueError, match="replaces it"):
        LossConfig(erc=ERCConfig(), gate=RandomMask(match=ERCConfig()))
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="matched random control"):
        policy_loss(lp, lp, torch.ones(2), config=LossConfig(gate=RandomMask(match=ERCConfig())))


@pytest.mark.parametrize(
    "gate", [RandomMask(share=0.3), HighEntropy(0.3), KLCov(0.2), ClipCov(0.3, 0.0, 9.0)]
)
def test_gates_compose_with_erc(gate):
    """ERC's stop-gradient applies on top of the gate: a token stopped by either has none."""
    x = batch(8, b=6, t=8)
    erc = ERCConfig(0.97, 1.03)
    cfg = LossConfig(eps_high=0.28, dual_clip_c=10.0, erc=erc, gate=gate)
    out, grad = run(x, cfg, generator=torch.Generator().manual_seed(1))
    assert out.erc_keep is not None and out.gate_mask is not None
    stopped = x["mask"] & ~out.erc_keep
    assert bool(stopped.any())
    assert torch.all(grad[stopped] == 0)
    if not isinstance(gate, KLCov):  # the others stop (or zero) the gate's tokens too
        assert torch.all(grad[out.gate_mask] == 0)
    assert "gate_fraction" in out.metrics and "erc_clip_fraction" in out.metrics


# ------------------------------------------------------------------------------------ regularisers


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("gate", [None, HighEntropy(0.4)])
def test_entropy_bonus_matches_reference(agg, gate):
    x = batch(9, b=5, t=8)
    h = x["h"].clone().requires_grad_(True)
    cfg = LossConfig(eps_high=0.28, gate=gate, entropy_coef=0.05, aggregation=agg)
    lp = x["lp"].clone().requires_grad_(True)
    out = policy_loss(
        lp, x["old"], x["adv"], entropy=h, old_entropy=x["h_old"], mask=x["mask"], config=cfg
    )
    g_lp, g_h = torch.autograd.grad(out.loss, (lp, h))
    tokens = x["mask"].clone()
    if gate is not None:
        tokens &= ~out.gate_mask
    ref_h = h.detach().clone().requires_grad_(True)
    bonus = -0.05 * token_mean_ref(ref_h, tokens)
    (ref_g_h,) = torch.autograd.grad(bonus, ref_h)
    torch.testing.assert_close(g_h, ref_g_h, rtol=1e-12, atol=1e-15)
    no_bonus = policy_loss(
        lp,
        x["old"],
        x["adv"],
        entropy=h.detach(),
        old_entropy=x["h_old"],
        mask=x["mask"],
        config=LossConfig(eps_high=0.28, gate=gate, aggregation=agg),
    )
    torch.testing.assert_close(out.loss.detach(), no_bonus.loss + bonus.detach())
    (g_lp_plain,) = torch.autograd.grad(no_bonus.loss, lp)
    torch.testing.assert_close(g_lp, g_lp_plain)  # the bonus acts through the entropy only
    assert out.metrics["entropy_coef"] == 0.05
    assert out.metrics["pg_loss"] == pytest.approx(no_bonus.loss.item())
    torch.testing.assert_close(out.bonus_entropy, token_mean_ref(h.detach(), tokens))


def test_entropy_bonus_needs_a_differentiable_entropy():
    x = batch(9)
    lp = x["lp"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="entropy_grad=True"):
        policy_loss(
            lp,
            x["old"],
            x["adv"],
            entropy=x["h"],
            old_entropy=x["h_old"],
            config=LossConfig(entropy_coef=0.1),
        )
    with pytest.raises(ValueError, match="needs the current entropy"):
        policy_loss(lp, x["old"], x["adv"], config=LossConfig(entropy_coef=0.1))


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("estimator", ["exact", "k3"])
def test_kl_penalty_matches_reference(agg, estimator):
    x = batch(10, b=5, t=8, spread=0.5)
    kl = x["kl"].clone().requires_grad_(True)
    cfg = LossConfig(kl_coef=0.3, kl_estimator=estimator, aggregation=agg)
    lp = x["lp"].clone().requires_grad_(True)
    out = policy_loss(
        lp, x["old"], x["adv"], mask=x["mask"], config=cfg, kl=kl if estimator == "exact" else None
    )
    g_lp = torch.autograd.grad(out.loss, lp, retain_graph=True)[0]

    def tok(i, j, lp_ij):
        return ppo_token(lp_ij, x["old"][i, j], float(x["adv"][i, j]), "ppo", 0.2, 0.2, None)

    if estimator == "exact":
        ref_loss, ref_grad = reference(x, tok, agg)
        ref_kl = kl.detach().clone().requires_grad_(True)
        penalty = 0.3 * token_mean_ref(ref_kl, x["mask"])
        (g_kl,) = torch.autograd.grad(out.loss, kl)
        torch.testing.assert_close(g_kl, torch.autograd.grad(penalty, ref_kl)[0])
        ref_loss = ref_loss + penalty.detach()
    else:

        def k3(lp_all):
            vals = [[math.nan] * lp_all.shape[1] for _ in range(lp_all.shape[0])]
            for i, j in itertools.product(range(lp_all.shape[0]), range(lp_all.shape[1])):
                d = lp_all[i, j] - x["old"][i, j]
                vals[i][j] = torch.exp(d) - 1 - d
            return 0.3 * token_mean_ref(vals, x["mask"])

        ref_loss, ref_grad = reference(x, tok, agg, extra=k3)
    torch.testing.assert_close(out.loss.detach(), ref_loss, rtol=1e-10, atol=1e-12)
    if estimator == "k3":
        torch.testing.assert_close(g_lp, ref_grad, rtol=1e-9, atol=1e-12)
    assert out.metrics["kl_coef"] == 0.3 and out.metrics["kl_mean"] >= 0


def test_exact_kl_penalty_needs_kl():
    x = batch(10)
    with pytest.raises(ValueError, match="kl_estimator='k3'"):
        policy_loss(x["lp"], x["old"], x["adv"], config=LossConfig(kl_coef=0.1))


def test_runtime_coefficients_override_the_config_and_report_zero():
    """An adaptive controller's coefficient (even 0) is the one applied and logged."""
    x = batch(11)
    h = x["h"].clone().requires_grad_(True)
    cfg = LossConfig(entropy_coef=0.5)
    tensors = (x["lp"], x["old"], x["adv"])
    entropies = {"entropy": h, "old_entropy": x["h_old"], "mask": x["mask"]}
    a = policy_loss(*tensors, **entropies, config=cfg, entropy_coef=0.0)
    plain = policy_loss(*tensors, **entropies, config=LossConfig())
    assert a.loss.item() == plain.loss.item()
    assert a.metrics["entropy_coef"] == 0.0 and a.bonus_entropy is not None
    with pytest.raises(ValueError, match="entropy_coef must be"):
        policy_loss(*tensors, **entropies, config=cfg, entropy_coef=-1.0)


# -------------------------------------------------------------------------------------- equal step


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), spread=st.floats(0.0, 0.3))
def test_equal_step_scale_is_ercs_kept_share_and_leaves_the_loss_alone(shape, seed, spread):
    g = torch.Generator().manual_seed(seed)
    h_old = torch.rand(shape, generator=g, dtype=torch.float64) + 0.01
    h = h_old * (1 + spread * torch.randn(shape, generator=g, dtype=torch.float64)).abs()
    mask = torch.rand(shape, generator=g) > 0.3
    old = -torch.rand(shape, generator=g, dtype=torch.float64)
    lp = (old + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(shape[0], generator=g, dtype=torch.float64)
    band = ERCConfig(0.95, 1.05)
    control = policy_loss(
        lp, old, adv, entropy=h, old_entropy=h_old, mask=mask, config=LossConfig(equal_step=band)
    )
    plain = policy_loss(lp, old, adv, entropy=h, old_entropy=h_old, mask=mask, config=LossConfig())
    erc = policy_loss(
        lp, old, adv, entropy=h, old_entropy=h_old, mask=mask, config=LossConfig(erc=band)
    )
    assert control.loss.item() == plain.loss.item()
    ga, gb = (torch.autograd.grad(o.loss, lp)[0] for o in (control, plain))
    assert torch.equal(ga, gb)
    n = int(mask.sum())
    expected = 1.0 if n == 0 else int(erc.erc_keep.sum()) / n
    assert float(control.step_scale) == pytest.approx(expected, abs=1e-12)
    assert control.metrics["equal_step_scale"] == pytest.approx(expected, abs=1e-12)


def test_equal_step_runs_with_erc_off():
    with pytest.raises(ValueError, match="with ERC off"):
        LossConfig(erc=ERCConfig(), equal_step=ERCConfig())


# ------------------------------------------------------------------------------------------ shared


def test_method_metrics_reduce_over_calls():
    x = batch(12, b=8, t=10)
    cfg = LossConfig(gate=RandomMask(share=0.4), kl_coef=0.2, kl_estimator="k3")
    gen = torch.Generator().manual_seed(0)
    outs = [
        policy_loss(
            x["lp"][i : i + 4],
            x["old"][i : i + 4],
            x["adv"][i : i + 4],
            mask=x["mask"][i : i + 4],
            config=cfg,
            generator=gen,
            kl_coef=c,
            metrics=False,
        )
        for i, c in ((0, 0.2), (4, 0.6))
    ]
    m = loss_metrics([o.stats for o in outs])
    drawn = sum(int(o.gate_mask.sum()) for o in outs)
    assert m["gate_fraction"] == pytest.approx(drawn / int(x["mask"].sum()))
    assert m["kl_coef"] == pytest.approx(0.4)


def test_erc_only_metrics_unchanged_by_the_methods():
    """ERC-only configs keep exactly the keys they had (the rival methods add keys only when on)."""
    x = batch(13)
    out = run(x, LossConfig.dapo(erc=ERCConfig()))[0]
    assert not {"gate_fraction", "kl_mean", "entropy_coef", "kl_coef", "equal_step_scale"} & set(
        out.metrics
    )


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("recipe", ["ppo", "dapo", "gppo"])
def test_every_registered_method_is_a_loss_config(name, recipe):
    settings_ = method_settings(name)
    erc = (settings_.get("erc_low"), settings_.get("erc_high"))
    methods = MethodSettings(**{k: v for k, v in settings_.items() if not k.startswith("erc_")})
    cfg = methods.apply_to(LossConfig.named(recipe, *erc))
    x = batch(14)
    adaptive = {"entropy_coef": 0.01} if methods.entropy_target is not None else {}
    out, _ = run(
        x,
        cfg,
        h=x["h"].clone().requires_grad_(True),
        kl=x["kl"],
        generator=torch.Generator().manual_seed(0),
        **adaptive,
    )
    assert math.isfinite(out.loss.item())


def test_method_settings_names_unknown_methods_and_bad_combinations():
    with pytest.raises(ValueError, match="known methods: base, erc"):
        method_settings("erc-ish")
    with pytest.raises(ValueError, match="at most one token gate"):
        MethodSettings(clip_cov_ratio=0.1, top_entropy_quantile=0.2).check_methods(False)
    with pytest.raises(ValueError, match="runs with ERC off"):
        MethodSettings(control_low=0.95, control_high=1.05, equal_step=True).check_methods(True)
    with pytest.raises(ValueError, match="set control_low"):
        MethodSettings(random_mask_matched=True).check_methods(False)
    with pytest.raises(ValueError, match="kl_coef, which needs a start value"):
        MethodSettings(kl_target=0.01).check_methods(False)
    with pytest.raises(ValueError, match="clip_variant must be one of"):
        MethodSettings(clip_variant="trpo").check_methods(False)
    with pytest.raises(ValueError, match="target_kl must be"):
        MethodSettings(target_kl=0.0).check_methods(False)
    with pytest.raises(ValueError, match="random_mask_matched must be true or false"):
        MethodSettings(random_mask_matched="yes").check_methods(False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clip_cov_lb must be below clip_cov_ub"):
        MethodSettings(clip_cov_ratio=0.1, clip_cov_lb=5.0, clip_cov_ub=1.0).check_methods(False)
    with pytest.raises(ValueError, match="random_mask_share must be a finite number"):
        MethodSettings(random_mask_share="0.2").check_methods(False)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- controllers


def test_adaptive_entropy_coefficient_rule_by_hand():
    ctrl = AdaptiveEntropyCoef(target=0.2, coef=0.0, delta=0.1, coef_max=0.25)
    applied = []
    for h in [0.5, 0.1, 0.1, 0.1, 0.3, 0.05]:
        applied.append(ctrl.applied_coef)
        ctrl.update(h)
    # applied only after a step at or below the target; clipped at coef_max, floored at 0
    assert applied == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.25, 0.0])
    assert ctrl.coef == pytest.approx(0.25)
    state = ctrl.state_dict()
    other = AdaptiveEntropyCoef(target=0.2, delta=0.1, coef_max=0.25)
    other.load_state_dict(state)
    assert other.applied_coef == ctrl.applied_coef and other.coef == ctrl.coef


def test_adaptive_entropy_skips_a_step_without_tokens_unlike_trl():
    """On purpose: TRL's controller reads 0 / max(0, 1) = 0 nats for a window without tokens and
    raises the coefficient; ours has no measurement then and leaves the state alone."""
    ctrl = AdaptiveEntropyCoef(target=0.2, coef=0.3, delta=0.1)
    ctrl.update(0.5)
    before = ctrl.state_dict()
    assert ctrl.update(math.nan) == pytest.approx(0.2)
    assert ctrl.state_dict() == before


def test_adaptive_kl_coefficient_rule_by_hand():
    ctrl = AdaptiveKLCoef(target=0.01, coef=1.0)
    assert [ctrl.update(k) for k in [0.02, 0.012, 0.001, None, math.nan]] == [
        2.0,
        2.0,
        1.0,
        1.0,
        1.0,
    ]
    with pytest.raises(ValueError, match="factor must be > 1"):
        AdaptiveKLCoef(target=0.01, factor=1.0)


@pytest.mark.parametrize(
    ("kl", "target", "stop"), [(0.031, 0.02, True), (0.03, 0.02, False), (1.0, None, False)]
)
def test_early_stop_is_sb3s_rule(kl, target, stop):
    assert early_stop(kl, target) is stop
