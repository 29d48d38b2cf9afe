"""GPU checks of the entropy kernel and the loss (marked `gpu`; skipped without CUDA)."""

from __future__ import annotations

import itertools

import pytest
import torch

from erc_gym.entropy import logprob_and_entropy
from erc_gym.losses import ERCConfig, LossConfig, policy_loss

pytestmark = pytest.mark.gpu


def _adversarial(v: int, offset: float, rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(v)
    z = torch.randn(rows, v, generator=g) + offset
    z[:, 3] += torch.linspace(0.0, 30.0, rows)
    return z, torch.randint(0, v, (rows,), generator=g)


@pytest.mark.parametrize(("v", "offset"), list(itertools.product([32_000, 151_936], [0.0, 100.0])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_accuracy_on_cuda(v, offset, dtype):
    z, y = _adversarial(v, offset)
    z = z.to(dtype)
    lp, h = logprob_and_entropy(z.cuda(), y.cuda())
    ref = torch.log_softmax(z.double(), -1)
    h_ref = -(ref.exp() * ref).sum(-1)
    lp_ref = ref.gather(-1, y[:, None]).squeeze(-1)
    ok = h_ref >= 1e-6
    rel = ((h.cpu().double() - h_ref).abs() / h_ref)[ok].max().item()
    assert rel <= 1e-5, rel
    if dtype == torch.float32:
        small = lp_ref.abs() < 128
        assert (lp.cpu().double() - lp_ref).abs()[small].max().item() <= 1e-5


def test_entropy_gradients_cuda_match_cpu():
    z, y = _adversarial(5000, 5.0, rows=33)
    w = torch.randn(33)
    grads = []
    for device in ("cpu", "cuda"):
        x = z.clone().to(device).requires_grad_(True)
        lp, h = logprob_and_entropy(x, y.to(device), entropy_grad=True, chunk_size=7)
        ((lp + h) * w.to(device)).sum().backward()
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "make", [LossConfig.ppo, LossConfig.dapo, LossConfig.gppo], ids=["ppo", "dapo", "gppo"]
)
def test_policy_loss_cuda_matches_cpu(make):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(8, 33, generator=g) * 3
    old = lp + 0.5 * torch.randn(8, 33, generator=g)
    adv = torch.randn(8, generator=g)
    h_old = torch.rand(8, 33, generator=g)
    h = h_old * (1 + 0.1 * torch.randn(8, 33, generator=g))
    mask = torch.rand(8, 33, generator=g) > 0.2
    cfg = make(erc=ERCConfig())
    results = []
    for device in ("cpu", "cuda"):
        x = lp.clone().to(device).requires_grad_(True)
        out = policy_loss(
            x,
            old.to(device),
            adv.to(device),
            entropy=h.to(device),
            old_entropy=h_old.to(device),
            mask=mask.to(device),
            config=cfg,
        )
        out.loss.backward()
        results.append((out.loss.item(), x.grad.cpu(), out.metrics))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-5)
    assert results[1][2] == pytest.approx(results[0][2], rel=1e-4, abs=1e-6, nan_ok=True)


def test_bf16_end_to_end_on_cuda():
    z = torch.randn(4, 16, 32_000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 32_000, (4, 16), device="cuda")
    with torch.no_grad():
        old_lp, old_h = logprob_and_entropy(z + 0.05 * torch.randn_like(z), y)
    lp, h = logprob_and_entropy(z, y)
    out = policy_loss(
        lp,
        old_lp,
        torch.randn(4, device="cuda"),
        entropy=h,
        old_entropy=old_h,
        config=LossConfig.dapo(erc=ERCConfig()),
    )
    out.loss.backward()
    assert z.grad is not None and z.grad.dtype == torch.bfloat16
    assert torch.isfinite(z.grad.float()).all()
    assert 0.0 <= out.metrics["erc_clip_fraction"] <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_forward_matches_pytorch_path(dtype, monkeypatch):
    import erc_gym.entropy as entropy_module

    pytest.importorskip("triton")
    z, y = _adversarial(151_936, 50.0, rows=48)
    z = z.to(dtype).cuda()
    y = y.cuda()
    z[5, 100:] = -float("inf")  # masked actions
    assert entropy_module._triton_available(z)
    lp_t, h_t = logprob_and_entropy(z, y)
    strided = torch.cat([z, z], dim=1).reshape(48, 2, -1)[:, 1]  # a non-contiguous view
    lp_s, h_s = logprob_and_entropy(strided, y)
    monkeypatch.setattr(entropy_module, "USE_TRITON", False)
    assert not entropy_module._triton_available(z)
    lp_p, h_p = logprob_and_entropy(z, y)
    torch.testing.assert_close(h_t, h_p, rtol=2e-6, atol=1e-12)
    torch.testing.assert_close(lp_t, lp_p, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(h_s, h_t, rtol=0, atol=0)
    torch.testing.assert_close(lp_s, lp_t, rtol=0, atol=0)
