"""erc_gym.entropy against float64 log_softmax references, on adversarial logits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from erc_gym.entropy import (
    entropy_from_logits,
    kl_from_logits,
    linear_kl_divergence,
    logprob_and_entropy,
)


def reference(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    z = logits.double() / temperature
    lp = torch.log_softmax(z, dim=-1)
    return lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(lp.exp() * lp).sum(-1)


def adversarial(v: int, offset: float, dominance: float, rows: int = 24, seed: int = 0):
    """Random logits plus a common offset and one dominant logit of varying strength.

    ``dominance`` near 0 gives high entropy; 10-25 gives H between ~1e-1 and ~1e-8.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, v, generator=g) + offset
    boost = torch.linspace(0.0, dominance, rows)
    z[:, 7 % v] += boost
    labels = torch.randint(0, v, (rows,), generator=g)
    labels[::3] = 7 % v
    return z, labels


CASES = [
    (v, off, dom)
    for v in (2, 1000, 32768, 151936)
    for off in (0.0, 100.0, -100.0)
    for dom in (0.0, 15.0, 30.0)
]


@pytest.mark.parametrize(("v", "offset", "dominance"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_relative_error(v, offset, dominance, dtype):
    z, labels = adversarial(v, offset, dominance)
    z = z.to(dtype)
    lp, h = logprob_and_entropy(z, labels)
    lp_ref, h_ref = reference(z, labels)
    assert h.dtype == torch.float32 and lp.dtype == torch.float32
    assessed = h_ref >= 1e-6
    assert assessed.any()
    rel = (h.double() - h_ref).abs() / h_ref
    assert rel[assessed].max().item() <= 1e-5, rel[assessed].max().item()
    # below 1e-6 nats the answer must still be tiny and non-negative, never NaN
    assert torch.all(h >= 0) and torch.isfinite(h).all()
    if dtype == torch.float32:
        # fp32 outputs resolve 1e-5 only below |log p| = 128 (the spacing there is 7.6e-6)
        small = lp_ref.abs() < 128
        assert (lp.double() - lp_ref).abs()[small].max().item() <= 1e-5


def test_low_entropy_beats_naive_formula():
    """The case the spec warns about: the naive form loses accuracy, ours does not."""
    z = torch.randn(64, 32768) + 100.0
    z[:, 0] += torch.linspace(8.0, 22.0, 64)
    labels = torch.zeros(64, dtype=torch.long)
    _, h = logprob_and_entropy(z, labels)
    _, h_ref = reference(z, labels)
    p = torch.softmax(z, -1)
    naive = torch.logsumexp(z, -1) - (p * z).sum(-1)
    ok = h_ref >= 1e-6
    naive_rel = ((naive.double() - h_ref).abs() / h_ref)[ok].max().item()
    ours_rel = ((h.double() - h_ref).abs() / h_ref)[ok].max().item()
    assert ours_rel <= 1e-5 < naive_rel


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_temperature(temperature):
    z, labels = adversarial(5000, 50.0, 12.0)
    lp, h = logprob_and_entropy(z, labels, temperature=temperature)
    lp_ref, h_ref = reference(z, labels, temperature)
    ok = h_ref >= 1e-6
    assert ((h.double() - h_ref).abs() / h_ref)[ok].max().item() <= 1e-5
    assert (lp.double() - lp_ref).abs().max().item() <= 1e-5


def test_chunking_does_not_change_results():
    z, labels = adversarial(3001, 10.0, 20.0, rows=37)
    base_lp, base_h = logprob_and_entropy(z, labels)
    for chunk in (1, 5, 37, 1000):
        for vchunk in (None, 7, 512, 3000, 5000):
            lp, h = logprob_and_entropy(z, labels, chunk_size=chunk, vocab_chunk_size=vchunk)
            torch.testing.assert_close(h, base_h, rtol=2e-6, atol=1e-12)
            torch.testing.assert_close(lp, base_lp, rtol=1e-6, atol=2e-6)


def test_vocab_streaming_with_ties_across_chunks():
    # the maximum appears once in each vocabulary chunk: every tie must count
    z = torch.full((2, 8), -50.0)
    z[:, 1] = 3.0
    z[:, 5] = 3.0
    labels = torch.tensor([1, 0])
    lp, h = logprob_and_entropy(z, labels, vocab_chunk_size=4)
    lp_ref, h_ref = reference(z, labels)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-6, atol=1e-6)
    assert h[0].item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_autograd(temperature, dtype):
    z, labels = adversarial(300, 3.0, 6.0, rows=10)
    z = z.to(dtype)
    w_lp, w_h = torch.randn(10), torch.randn(10)
    x = z.clone().requires_grad_(True)
    lp, h = logprob_and_entropy(x, labels, temperature=temperature, chunk_size=3, entropy_grad=True)
    ((lp * w_lp).sum() + (h * w_h).sum()).backward()
    y = z.double().requires_grad_(True)
    lp_r, h_r = reference(y, labels, temperature)
    ((lp_r * w_lp.double()).sum() + (h_r * w_h.double()).sum()).backward()
    assert x.grad is not None and x.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x.grad.double(), y.grad, atol=tol, rtol=tol)


def test_entropy_is_detached_by_default():
    z = torch.randn(4, 50, requires_grad=True)
    lp, h = logprob_and_entropy(z, torch.zeros(4, dtype=torch.long))
    assert lp.requires_grad and not h.requires_grad
    lp.sum().backward()
    assert z.grad is not None
    torch.testing.assert_close(z.grad.sum(-1), torch.zeros(4), atol=1e-6, rtol=0)


def test_entropy_from_logits_matches_and_has_no_grad():
    z, labels = adversarial(777, -30.0, 18.0, rows=9)
    z = z.requires_grad_(True)
    h = entropy_from_logits(z, chunk_size=2)
    _, h2 = logprob_and_entropy(z, labels)
    assert not h.requires_grad
    torch.testing.assert_close(h, h2, rtol=1e-6, atol=0)


def test_leading_shape_is_kept():
    z = torch.randn(2, 3, 5, 11)
    labels = torch.randint(0, 11, (2, 3, 5))
    lp, h = logprob_and_entropy(z, labels)
    assert lp.shape == h.shape == (2, 3, 5)
    assert entropy_from_logits(z).shape == (2, 3, 5)


@settings(max_examples=80, deadline=None)
@given(
    v=st.integers(1, 400),
    rows=st.integers(1, 6),
    scale=st.floats(0.0, 40.0),
    offset=st.floats(-200.0, 200.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_entropy_bounds_and_normalisation(v, rows, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, v, generator=g) * scale + offset
    labels = torch.randint(0, v, (rows,), generator=g)
    lp, h = logprob_and_entropy(z, labels)
    assert torch.all(h >= 0)
    assert torch.all(h <= math.log(v) * (1 + 1e-6) + 1e-7)
    assert torch.all(lp <= 1e-6)
    # probabilities of all labels sum to one
    all_lp = (
        torch.stack(
            [logprob_and_entropy(z, torch.full((rows,), k, dtype=torch.long))[0] for k in range(v)]
        )
        if v <= 50
        else None
    )
    if all_lp is not None:
        torch.testing.assert_close(
            all_lp.double().exp().sum(0), torch.ones(rows, dtype=torch.float64), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (
            lambda: logprob_and_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long)),
            "labels must have shape",
        ),
        (lambda: logprob_and_entropy(torch.zeros(2, 3), torch.tensor([0, 3])), r"\[0, 3\)"),
        (lambda: logprob_and_entropy(torch.zeros(2, 3), torch.zeros(2)), "integer"),
        (
            lambda: logprob_and_entropy(
                torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long)
            ),
            "floating-point",
        ),
        (lambda: entropy_from_logits(torch.zeros(2, 3), temperature=0.0), "temperature"),
        (lambda: entropy_from_logits(torch.zeros(2, 3), chunk_size=0), "chunk_size"),
    ],
)
def test_bad_input(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_strided_input_is_not_copied_and_matches():
    from erc_gym.entropy import _row_views

    full = torch.randn(3, 9, 50, requires_grad=True)
    response = full[:, 2:-1]  # a model output's response slice: not viewable as 2-D
    assert not response.is_contiguous()
    views = _row_views(response.detach())
    assert len(views) == 3
    for offset, view in views:
        assert view.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
        assert offset % 6 == 0
    labels = torch.randint(0, 50, (3, 6))
    lp, h = logprob_and_entropy(response, labels, chunk_size=4)
    lp_ref, h_ref = reference(response.detach(), labels)
    torch.testing.assert_close(lp.double(), lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(h.double(), h_ref, atol=1e-5, rtol=1e-5)
    lp.sum().backward()
    ref_full = full.detach().clone().requires_grad_(True)
    torch.log_softmax(ref_full[:, 2:-1], -1).gather(-1, labels[..., None]).sum().backward()
    torch.testing.assert_close(full.grad, ref_full.grad, atol=1e-6, rtol=1e-5)
    assert torch.all(full.grad[:, :2] == 0) and torch.all(full.grad[:, -1] == 0)


def test_minus_infinity_logits_are_masked_actions():
    z = torch.randn(4, 10)
    z[:, 7:] = -float("inf")
    labels = torch.tensor([0, 1, 2, 9])
    for vchunk in (None, 3):
        lp, h = logprob_and_entropy(z, labels, vocab_chunk_size=vchunk)
        _, h_ref = reference(z[:, :7], labels.clamp(max=6))
        torch.testing.assert_close(h.double(), h_ref, rtol=1e-6, atol=1e-7)
        assert torch.isfinite(lp[:3]).all() and lp[3] < -1e30
    x = z.clone().requires_grad_(True)
    lp, h = logprob_and_entropy(x, labels.clamp(max=6), entropy_grad=True)
    (lp.sum() + h.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[:, 7:] == 0)


def test_small_action_path_matches_the_kernel_with_gradients():
    from erc_gym.entropy import small_action_logprob_and_entropy

    g = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(64, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    logits.data[:8, 0] += 40.0  # near-deterministic states
    actions = torch.randint(0, 6, (64,), generator=g)
    lp, h = small_action_logprob_and_entropy(logits, actions)
    assert torch.equal(h.float(), entropy_from_logits(logits))
    ref_lp, _ = logprob_and_entropy(logits, actions)
    torch.testing.assert_close(lp.float(), ref_lp, rtol=1e-6, atol=1e-6)
    w = torch.randn(64, generator=g, dtype=torch.float64)
    grad = torch.autograd.grad((w * (lp + h)).sum(), logits)[0]
    # independent reference: float64 autograd through the textbook formula
    p = torch.softmax(logits, -1)
    ref = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).squeeze(-1) - (
        p * torch.log_softmax(logits, -1)
    ).sum(-1)
    ref_grad = torch.autograd.grad((w * ref).sum(), logits)[0]
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_small_action_path_masked_actions_and_errors():
    from erc_gym.entropy import small_action_logprob_and_entropy

    logits = torch.tensor([[0.0, -math.inf, 1.0], [2.0, 0.0, -math.inf]], requires_grad=True)
    lp, h = small_action_logprob_and_entropy(logits, torch.tensor([0, 1]))
    (grad,) = torch.autograd.grad((lp + h).sum(), logits)
    assert torch.isfinite(h).all() and torch.isfinite(grad).all()
    assert torch.all(grad[logits.detach() == -math.inf] == 0)
    with pytest.raises(ValueError, match="V <= 1024"):
        small_action_logprob_and_entropy(torch.zeros(2, 2000), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="actions must have shape"):
        small_action_logprob_and_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_cpu_chunk_workers_match_in_order_path_and_leave_threads_alone(monkeypatch):
    """Chunks on single-threaded worker threads give the in-order results."""
    import erc_gym.entropy as entropy_module

    if torch.get_num_threads() < 2:
        pytest.skip("needs 2 intra-op threads")
    g = torch.Generator().manual_seed(11)
    z = (torch.randn(3, 14, 5000, generator=g) * 3).requires_grad_(True)
    labels = torch.randint(0, 5000, (3, 13), generator=g)
    threads = torch.get_num_threads()
    out = {}
    for workers in (False, True):
        monkeypatch.setattr(entropy_module, "CPU_CHUNK_WORKERS", workers)
        z.grad = None
        # a strided slice (several row views) with a short last chunk in each
        lp, h = logprob_and_entropy(z[:, :-1], labels, chunk_size=4, entropy_grad=True)
        (lp.sum() + h.sum()).backward()
        out[workers] = (lp.detach(), h.detach(), z.grad.clone())
        assert h.grad_fn is not None and lp.grad_fn is not None
    assert torch.get_num_threads() == threads
    for a, b in zip(out[False], out[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cpu_chunk_worker_error_reaches_the_caller(monkeypatch):
    import erc_gym.entropy as entropy_module

    def boom(task):
        raise RuntimeError("chunk failed")

    if torch.get_num_threads() < 2:
        pytest.skip("needs 2 intra-op threads")
    with pytest.raises(RuntimeError, match="chunk failed"):
        entropy_module._run_chunks(boom, range(4), torch.device("cpu"))


def test_cpu_chunk_workers_survive_fork():
    """A forked child (SubprocVecEnv, experiment workers) gets its own workers, not a hang."""
    import multiprocessing

    if torch.get_num_threads() < 2 or "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs 2 intra-op threads and fork")
    z = torch.randn(64, 3000)
    labels = torch.randint(0, 3000, (64,))
    expected = logprob_and_entropy(z, labels, chunk_size=8)[1]  # creates the parent's pool
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_entropy_in_child, (z, labels)).get(timeout=120)
    torch.testing.assert_close(got, expected)


def test_cpu_chunk_workers_start_in_forked_children_with_many_threads():
    """After a fork, several chunk workers calling ``torch.set_num_threads`` at once raced on
    torch's rebuild of its thread pool: "Invalid thread pool!" or a hang (10 of 16 forked
    children failed with 8 threads before the fix; 0 of 813 after)."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    z = torch.randn(64, 3000)
    labels = torch.randint(0, 3000, (64,))
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        expected = logprob_and_entropy(z, labels, chunk_size=8)[1]  # the parent's 8 workers
        ctx = multiprocessing.get_context("fork")
        for _ in range(10):
            with ctx.Pool(1) as pool:
                got = pool.apply_async(_entropy_in_child, (z, labels)).get(timeout=60)
            torch.testing.assert_close(got, expected)
    finally:
        torch.set_num_threads(threads)


def _entropy_in_child(z, labels):
    return logprob_and_entropy(z, labels, chunk_size=8)[1]


# --------------------------------------------------------------------------- KL(old || new)


def _kl_reference(old: torch.Tensor, new: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum_v q_v (log q_v - log p_v) with q, p from an explicit fp64 softmax (no log_softmax)."""
    q = torch.exp(old.double() / temperature)
    q = q / q.sum(-1, keepdim=True)
    p = torch.exp(new.double() / temperature)
    p = p / p.sum(-1, keepdim=True)
    return (q * (torch.log(q) - torch.log(p))).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_from_logits_value_and_gradient_against_fp64(temperature):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(6, 5, 40, generator=g) * 2
    new = (old + 0.3 * torch.randn(6, 5, 40, generator=g)).requires_grad_(True)
    kl = kl_from_logits(old, new, temperature=temperature)
    ref_new = new.detach().double().requires_grad_(True)
    ref = _kl_reference(old, ref_new, temperature)
    torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    weights = torch.rand(6, 5, generator=g)
    (grad,) = torch.autograd.grad((kl * weights).sum(), new)
    (ref_grad,) = torch.autograd.grad((ref * weights.double()).sum(), ref_new)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    assert bool((kl >= 0).all())
    same = kl_from_logits(old, old.clone(), temperature=temperature)
    assert float(same.abs().max()) < 1e-6


def test_kl_from_logits_ignores_masked_old_actions():
    """An action the old policy masked (-inf) contributes 0, not NaN (0 * log 0)."""
    old = torch.tensor([[0.0, 1.0, -math.inf]])
    new = torch.tensor([[0.5, 0.2, 3.0]], dtype=torch.float64)
    q = torch.softmax(old.double()[:, :2], -1)
    log_p = torch.log_softmax(new, -1)[:, :2]
    expected = (q * (q.log() - log_p)).sum(-1)
    torch.testing.assert_close(kl_from_logits(old.double(), new), expected)


@pytest.mark.parametrize(("scale", "softcap", "chunk"), [(1.0, None, 4), (1.5, 20.0, 7)])
def test_linear_kl_divergence_against_materialised_logits(scale, softcap, chunk):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 5, 16, generator=g).requires_grad_(True)
    weight = torch.randn(300, 16, generator=g).requires_grad_(True)
    bias = torch.randn(300, generator=g).requires_grad_(True)
    old_hidden = hidden.detach() + 0.1 * torch.randn(3, 5, 16, generator=g)
    old_weight, old_bias = weight.detach() * 1.01, bias.detach() - 0.05

    def logits(h, w, b):
        z = (h.double() @ w.double().T + b.double()) * scale
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    kl = linear_kl_divergence(
        hidden,
        weight,
        old_hidden,
        old_weight,
        bias=bias,
        old_bias=old_bias,
        temperature=0.9,
        logit_scale=scale,
        softcap=softcap,
        chunk_tokens=chunk,
    )
    ref = _kl_reference(logits(old_hidden, old_weight, old_bias), logits(hidden, weight, bias), 0.9)
    torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-4, atol=1e-6)
    grads = torch.autograd.grad(kl.sum(), (hidden, weight, bias))
    ref_grads = torch.autograd.grad(ref.sum(), (hidden, weight, bias))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-3, atol=1e-5)
