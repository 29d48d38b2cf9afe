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


# --- fused LM head on CUDA: the Triton path and the PyTorch path --------------------


@pytest.fixture(params=["triton", "torch"])
def head_path(request, monkeypatch):
    """Run a test once through the Triton fused head and once through the PyTorch one."""
    import erc_gym.entropy as entropy_module

    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setattr(entropy_module, "USE_TRITON", request.param == "triton")
    return request.param


@pytest.mark.parametrize("v", [32768, 151936])
@pytest.mark.parametrize("offset", [0.0, 100.0, -100.0])
def test_fused_head_cuda_matches_fp64(head_path, v, offset):
    """fp32 on CUDA: values (H >= 1e-6) and gradients of hidden, weight, bias within 1e-5
    relative of the fp64 reference, with entropy gradients, on the exact-logit inputs of
    test_fused_head (so the comparison measures the head, not a GEMM's rounding)."""
    from test_fused_head import _leaf, _q, _rel, head_case, reference

    import erc_gym.entropy as entropy_module

    hidden, weight, labels = head_case(v, 0.0, rows=40)
    bias = _q(torch.randn(v, generator=torch.Generator().manual_seed(1))) + offset
    grad_lp = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    grad_h = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3))
    leaves = [
        _leaf(x, torch.float32).cuda().detach().requires_grad_(True) for x in (hidden, weight, bias)
    ]
    assert entropy_module._head_triton_ok(leaves[0], 1.0, None) == (head_path == "triton")
    lp, ent = entropy_module.linear_logprob_and_entropy(
        leaves[0], leaves[1], labels.cuda(), bias=leaves[2], chunk_tokens=7, entropy_grad=True
    )
    ((lp * grad_lp.cuda()).sum() + (ent * grad_h.cuda()).sum()).backward()
    refs = [_leaf(x, torch.float64) for x in (hidden, weight, bias)]
    lp_ref, ent_ref = reference(*refs[:2], labels, refs[2])
    ((lp_ref * grad_lp.double()).sum() + (ent_ref * grad_h.double()).sum()).backward()
    assessed = ent_ref >= 1e-6
    assert ent_ref[assessed].min() < 1e-4  # the low-entropy rows are covered
    assert ((ent.cpu().double() - ent_ref).abs() / ent_ref)[assessed].max() <= 1e-5
    assert ((lp.cpu().double() - lp_ref).abs() / lp_ref.abs().clamp(min=1e-3)).max() <= 1e-5
    for name, got, want in zip(("hidden", "weight", "bias"), leaves, refs, strict=True):
        assert _rel(got.grad.cpu(), want.grad) <= 1e-5, (name, _rel(got.grad.cpu(), want.grad))


def test_fused_head_cuda_bf16_within_its_rounding(head_path):
    """bf16 on CUDA: values within 1e-5 of the fp64 reduction of the GEMM's bf16 logits,
    gradients within 2 bf16 ulps (norm-wise 7.8e-3) of the fp64 gradients."""
    from test_fused_head import _leaf, _rel, head_case, reference

    from erc_gym.entropy import linear_logprob_and_entropy

    hidden, weight, labels = head_case(151936, 0.0, rows=24, dominance=30.0)
    hl = _leaf(hidden, torch.bfloat16).cuda().detach().requires_grad_(True)
    wl = _leaf(weight, torch.bfloat16).cuda().detach().requires_grad_(True)
    lp, ent = linear_logprob_and_entropy(hl, wl, labels.cuda(), chunk_tokens=5)
    lp.sum().backward()
    with torch.no_grad():  # the logits as this device's bf16 GEMM rounds them
        rounded = (hl @ wl.T).cpu().double()
    lp64 = torch.log_softmax(rounded, -1)
    ent64 = -(lp64.exp() * lp64).sum(-1)
    assessed = ent64 >= 1e-6
    assert ((ent.cpu().double() - ent64).abs() / ent64)[assessed].max() <= 1e-5
    lp_ref = lp64.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert ((lp.cpu().double() - lp_ref).abs() / lp_ref.abs().clamp(min=1e-3)).max() <= 1e-5
    h64, w64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64)
    reference(h64, w64, labels)[0].sum().backward()
    eps = torch.finfo(torch.bfloat16).eps
    assert _rel(hl.grad.cpu(), h64.grad) <= 2 * eps
    assert _rel(wl.grad.cpu(), w64.grad) <= 2 * eps


def test_fused_head_cuda_memory_two_chunks_plus_outputs(head_path):
    """Forward + backward at N = 8192, H = 1024, V = 151,936 in bf16, default chunking: peak
    extra CUDA memory (max_memory_allocated over the inputs) <= 2 chunks of fp32 logits + the
    gradients + one fp32 accumulator (+ 64 MiB slack); the Triton path >= 5x below the
    materialised-logits path."""
    import erc_gym.entropy as entropy_module

    n, h, v = 8192, 1024, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=g).bfloat16().requires_grad_(True)
    weight = (torch.randn(v, h, device="cuda", generator=g) / 32).bfloat16().requires_grad_(True)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)

    def peak(fn) -> int:
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()[0].sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused = peak(lambda: entropy_module.linear_logprob_and_entropy(hidden, weight, labels))
    materialised = peak(lambda: logprob_and_entropy(hidden @ weight.T, labels))
    if head_path == "triton":
        chunk = entropy_module._HEAD_TILE_ELEMENTS
    else:
        chunk = entropy_module.DEFAULT_HEAD_CHUNK_ELEMENTS_GPU // v * v
    grads, acc = (n * h + v * h) * 2, max(n * h * 4, v * h * 4)
    assert fused <= 2 * chunk * 4 + grads + acc + (64 << 20), fused / 2**20
    if head_path == "triton":  # the PyTorch path keeps an fp32 (V, H) accumulator: ~5.0x
        assert materialised >= 5 * fused, (materialised / 2**20, fused / 2**20)
