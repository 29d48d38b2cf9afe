"""erc_gym.entropy.linear_logprob_and_entropy (fused LM head) against float64 references.

The inputs are quantised (multiples of 1/16, few columns) so that every logit ``hidden @ W.T`` is
exact in fp32: the comparison then measures the head's reduction and gradients, not the rounding
of a GEMM, which would be the same for any head (materialised or fused).
"""

from __future__ import annotations

import pytest
import torch

from erc_gym.entropy import linear_logprob_and_entropy, logprob_and_entropy

HID = 8


def _q(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 16) / 16


def head_case(v: int, offset: float, rows: int = 16, dominance: float = 40.0, seed: int = 0):
    """hidden (rows, HID), weight (V, HID), labels: logits = offset + noise (+ boost on id 7).

    Column 0 carries the common offset through the GEMM, column 1 a dominant logit for id 7
    growing from 0 to ``dominance`` across rows (entropies from ~log V down to below 1e-6).
    The hidden-state gradient along column 0 is exactly 0 (a softmax is shift-invariant) but is
    the fp32 GEMM's rounding of ``sum_v g_v * offset`` (~1e-5 of the gradient's norm at offset
    100, the same with materialised logits), so gradient tests carry the offset in the bias.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = _q(torch.randn(rows, HID, generator=g) * 0.7)
    weight = _q(torch.randn(v, HID, generator=g) * 0.7)
    hidden[:, 0] = 1.0
    weight[:, 0] = offset
    hidden[:, 1] = _q(torch.linspace(0.0, dominance, rows))
    weight[:, 1] = 0.0
    weight[7 % v, 1] = 1.0
    labels = torch.randint(0, v, (rows,), generator=g)
    labels[::3] = 7 % v
    return hidden, weight, labels


def reference(hidden, weight, labels, bias=None, temperature=1.0, logit_scale=1.0, softcap=None):
    """fp64 log-probs and entropies with the logits materialised (differentiable)."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z / temperature, dim=-1)
    h = -(lp.exp() * lp.clamp(min=torch.finfo(lp.dtype).min)).sum(-1)
    return lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), h


def _leaf(x, dtype):
    return x.detach().to(dtype).requires_grad_(True)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error (element-wise blows up on gradients that cancel to ~0)."""
    return float((a.double() - ref).norm() / ref.norm().clamp(min=1e-300))


@pytest.mark.parametrize("v", [1000, 32768, 151936])
@pytest.mark.parametrize("offset", [0.0, 100.0, -100.0])
def test_values_and_gradients_match_fp64(v, offset):
    """Offset in the bias; relative 1e-5 on values (H >= 1e-6) and norm-wise on gradients."""
    hidden, weight, labels = head_case(v, 0.0, rows=12 if v > 100000 else 16)
    bias = _q(torch.randn(v, generator=torch.Generator().manual_seed(1))) + offset
    grad_lp = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    grad_h = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3))

    h32, w32, b32 = (
        _leaf(hidden, torch.float32),
        _leaf(weight, torch.float32),
        _leaf(bias, torch.float32),
    )
    lp, ent = linear_logprob_and_entropy(
        h32, w32, labels, bias=b32, chunk_tokens=5, entropy_grad=True
    )
    ((lp * grad_lp).sum() + (ent * grad_h).sum()).backward()

    h64, w64, b64 = (
        _leaf(hidden, torch.float64),
        _leaf(weight, torch.float64),
        _leaf(bias, torch.float64),
    )
    lp_ref, ent_ref = reference(h64, w64, labels, b64)
    ((lp_ref * grad_lp.double()).sum() + (ent_ref * grad_h.double()).sum()).backward()

    assert lp.dtype == ent.dtype == torch.float32
    assessed = ent_ref >= 1e-6
    assert assessed.all() or ent_ref[assessed].min() < 1e-4  # low entropies are covered
    rel_h = ((ent.double() - ent_ref).abs() / ent_ref)[assessed].max().item()
    assert rel_h <= 1e-5, rel_h
    rel_lp = ((lp.double() - lp_ref).abs() / lp_ref.abs().clamp(min=1e-3)).max().item()
    assert rel_lp <= 1e-5, rel_lp
    for name, got, want in (("hidden", h32, h64), ("weight", w32, w64), ("bias", b32, b64)):
        assert _rel(got.grad, want.grad) <= 1e-5, (name, _rel(got.grad, want.grad))


@pytest.mark.parametrize("v", [1000, 151936])
@pytest.mark.parametrize("offset", [100.0, -100.0])
def test_values_with_offset_through_the_weight(v, offset):
    hidden, weight, labels = head_case(v, offset, rows=12)
    lp, ent = linear_logprob_and_entropy(hidden, weight, labels, chunk_tokens=5)
    lp_ref, ent_ref = reference(hidden.double(), weight.double(), labels)
    assessed = ent_ref >= 1e-6
    assert ent_ref[assessed].min() < 1e-4
    assert ((ent.double() - ent_ref).abs() / ent_ref)[assessed].max() <= 1e-5
    assert ((lp.double() - lp_ref).abs() / lp_ref.abs().clamp(min=1e-3)).max() <= 1e-5


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_log_prob_only_gradient_and_leading_shape(entropy_grad):
    hidden, weight, labels = head_case(3000, 0.0, rows=24)
    hidden, labels = hidden.reshape(2, 3, 4, HID), labels.reshape(2, 3, 4)
    h32, w32 = _leaf(hidden, torch.float32), _leaf(weight, torch.float32)
    lp, ent = linear_logprob_and_entropy(
        h32, w32, labels, chunk_tokens=7, entropy_grad=entropy_grad
    )
    assert lp.shape == ent.shape == (2, 3, 4)
    assert ent.requires_grad is entropy_grad
    lp.sum().backward()
    h64, w64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64)
    lp_ref, _ = reference(h64, w64, labels)
    lp_ref.sum().backward()
    assert _rel(h32.grad, h64.grad) <= 1e-5
    assert _rel(w32.grad, w64.grad) <= 1e-5


@pytest.mark.parametrize(
    ("temperature", "logit_scale", "softcap"),
    [(0.7, 1.0, None), (1.3, 0.0625, None), (1.0, 1.0, 30.0), (0.6, 0.5, 20.0)],
)
def test_temperature_scale_and_softcap(temperature, logit_scale, softcap):
    """Temperature, Cohere-style ``logit_scale`` and Gemma-2-style final soft-capping."""
    hidden, weight, labels = head_case(5000, 0.0, rows=16, dominance=30.0)
    h32, w32 = _leaf(hidden, torch.float32), _leaf(weight, torch.float32)
    kw = {"temperature": temperature, "logit_scale": logit_scale, "softcap": softcap}
    lp, ent = linear_logprob_and_entropy(h32, w32, labels, chunk_tokens=6, entropy_grad=True, **kw)
    (lp.sum() + 0.5 * ent.sum()).backward()
    h64, w64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64)
    lp_ref, ent_ref = reference(h64, w64, labels, **kw)
    (lp_ref.sum() + 0.5 * ent_ref.sum()).backward()
    assessed = ent_ref >= 1e-6
    assert ((ent.double() - ent_ref).abs() / ent_ref)[assessed].max() <= 2e-5
    assert ((lp.double() - lp_ref).abs() / lp_ref.abs().clamp(min=1e-3)).max() <= 2e-5
    assert _rel(h32.grad, h64.grad) <= 2e-5
    assert _rel(w32.grad, w64.grad) <= 2e-5


def test_equals_materialised_logits_path():
    """Same numbers as logits = hidden @ W.T followed by logprob_and_entropy (fp32, random)."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 9, 32, generator=g)
    weight = torch.randn(4000, 32, generator=g) * 0.3
    labels = torch.randint(0, 4000, (3, 9), generator=g)
    lp, ent = linear_logprob_and_entropy(hidden, weight, labels, chunk_tokens=4)
    lp_m, ent_m = logprob_and_entropy(hidden @ weight.T, labels)
    torch.testing.assert_close(lp, lp_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_its_rounding(dtype):
    """bf16/fp16: the logits are rounded to the input dtype, as the model's own head rounds them.

    Values then equal the fp64 reduction of those rounded logits within 1e-5 (the reduction adds
    no error of its own); gradients, returned in the input dtype, are within 2 ulps of that dtype
    (norm-wise relative 2 * eps: 7.8e-3 for bf16, 9.8e-4 for fp16) of the fp64 gradients.
    """
    hidden, weight, labels = head_case(32768, 0.0, rows=16, dominance=30.0)
    hl, wl = _leaf(hidden, dtype), _leaf(weight, dtype)
    lp, ent = linear_logprob_and_entropy(hl, wl, labels, chunk_tokens=5)
    lp.sum().backward()
    assert hl.grad.dtype == wl.grad.dtype == dtype
    rounded = (hidden.double() @ weight.double().T).to(dtype).double()
    lp64 = torch.log_softmax(rounded, -1)
    ent64 = -(lp64.exp() * lp64).sum(-1)
    lp_ref = lp64.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assessed = ent64 >= 1e-6
    assert ((ent.double() - ent64).abs() / ent64)[assessed].max() <= 1e-5
    assert ((lp.double() - lp_ref).abs() / lp_ref.abs().clamp(min=1e-3)).max() <= 1e-5
    h64, w64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64)
    lp_r, _ = reference(h64, w64, labels)
    lp_r.sum().backward()
    eps = torch.finfo(dtype).eps
    assert _rel(hl.grad, h64.grad) <= 2 * eps, _rel(hl.grad, h64.grad)
    assert _rel(wl.grad, w64.grad) <= 2 * eps, _rel(wl.grad, w64.grad)


def test_tied_weight_gets_both_gradients():
    """A tied embedding matrix used as the head accumulates both uses' gradients."""
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(500, 16, generator=g, requires_grad=True)
    ids = torch.randint(0, 500, (2, 6), generator=g)
    labels = torch.randint(0, 500, (2, 6), generator=g)
    lp, _ = linear_logprob_and_entropy(torch.tanh(emb[ids]), emb, labels, chunk_tokens=5)
    lp.sum().backward()
    fused = emb.grad.clone()
    emb.grad = None
    lp_m, _ = logprob_and_entropy(torch.tanh(emb[ids]) @ emb.T, labels)
    lp_m.sum().backward()
    torch.testing.assert_close(fused, emb.grad, rtol=1e-5, atol=1e-6)


# --- bad input: one clear ValueError naming the argument --------------------------------------


def _ok():
    return torch.randn(2, 3, 8), torch.randn(50, 8), torch.randint(0, 50, (2, 3))


def test_rejects_hidden_weight_shape_mismatch():
    hidden, _, labels = _ok()
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_logprob_and_entropy(hidden, torch.randn(50, 7), labels)


def test_rejects_labels_shape_mismatch():
    hidden, weight, _ = _ok()
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_logprob_and_entropy(hidden, weight, torch.zeros(2, 4, dtype=torch.long))


def test_rejects_labels_out_of_range():
    hidden, weight, labels = _ok()
    labels[0, 0] = 50
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 50\)"):
        linear_logprob_and_entropy(hidden, weight, labels)


def test_rejects_non_floating_hidden():
    _, weight, labels = _ok()
    with pytest.raises(ValueError, match="hidden must be a floating-point tensor"):
        linear_logprob_and_entropy(torch.ones(2, 3, 8, dtype=torch.long), weight, labels)


def test_rejects_bad_bias_and_settings():
    hidden, weight, labels = _ok()
    with pytest.raises(ValueError, match="bias must be"):
        linear_logprob_and_entropy(hidden, weight, labels, bias=torch.zeros(49))
    with pytest.raises(ValueError, match="weight must have hidden's dtype"):
        linear_logprob_and_entropy(hidden, weight.double(), labels)
    for kw, name in (
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"logit_scale": -1.0}, "logit_scale"),
        ({"softcap": 0.0}, "softcap"),
    ):
        with pytest.raises(ValueError, match=name):
            linear_logprob_and_entropy(hidden, weight, labels, **kw)


_MEMORY_CHILD = """
import sys, torch
from erc_gym.entropy import linear_logprob_and_entropy, logprob_and_entropy

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

fused = sys.argv[1] == "fused"
n, h, v, chunk = 2048, 64, 32768, 128
def step(n):
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) / 8).requires_grad_(True)
    labels = torch.randint(0, v, (n,))
    return hidden, weight, labels
def run(hidden, weight, labels):
    if fused:
        lp, _ = linear_logprob_and_entropy(hidden, weight, labels, chunk_tokens=chunk)
    else:
        lp, _ = logprob_and_entropy(hidden @ weight.T, labels)
    lp.sum().backward()
run(*step(2 * chunk))  # warm-up
args = step(n)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmRSS:")
run(*args)
print(status("VmHWM:") - base)
"""


def test_peak_memory_is_two_chunks_plus_outputs():
    """Forward + backward, N=2048, V=32768, 128-token chunks, measured as the rise of peak RSS.

    The child process fixes glibc's mmap threshold, so every large tensor is its own mapping and
    RSS follows the live tensors (no reuse or fragmentation of freed heap memory). Bound: two
    chunks of fp32 logits (2 x 16 MiB) plus the outputs (hidden and weight gradients, 8.5 MiB)
    plus 4 MiB of slack; the materialised-logits path (256 MiB of logits and as much gradient)
    needs >= 5x more.
    """
    import os
    import subprocess
    import sys

    def extra(kind: str) -> int:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, kind],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        return int(out.stdout.strip().splitlines()[-1])

    mib = 1 << 20
    fused, materialised = extra("fused"), extra("materialised")
    chunk_bytes = 128 * 32768 * 4
    outputs = (2048 * 64 + 32768 * 64) * 4
    assert fused <= 2 * chunk_bytes + outputs + 4 * mib, fused / mib
    assert materialised >= 5 * fused, (materialised / mib, fused / mib)
