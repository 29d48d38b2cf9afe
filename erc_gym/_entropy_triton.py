"""Triton kernels of :mod:`erc_gym.entropy` (imported by it on first use, never at import).

They stream a row's columns in blocks with the accumulators of the PyTorch path: ``m`` (raw row
max), ``s'`` (sum of ``exp(-d)`` over all columns but the argmax, whose weight is exactly 1) and
``u = sum(exp(-d) * d)``, ``d = (m - z) / T``, merged across blocks as ``entropy._merge`` does.
They live in their own module because Triton resolves the helpers a kernel calls among the
module's globals.
"""

import triton
import triton.language as tl


@triton.jit
def stream(base, cols, m, s, u, inv_t, big, BLOCK: tl.constexpr):
    """Fold columns ``[0, cols)`` of the row at ``base`` into the state ``(m, s', u)``."""
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < cols
        z = tl.load(base + offs, mask=valid, other=-float("inf")).to(tl.float32)
        mb = tl.max(z, axis=0)
        ib = tl.argmax(z, axis=0)
        d = tl.minimum((mb - z) * inv_t, big)
        d = tl.where(d == d, d, big)  # NaN (all -inf block) -> big
        e = tl.where(valid & (offs != start + ib), tl.exp(-d), 0.0)
        sb = tl.sum(e, axis=0)
        ub = tl.sum(e * d, axis=0)
        run_wins = m >= mb
        delta = tl.minimum(tl.abs(m - mb) * inv_t, big)
        delta = tl.where(delta == delta, delta, big)
        sc = tl.exp(-delta)
        s_w = tl.where(run_wins, s, sb)
        u_w = tl.where(run_wins, u, ub)
        s_l = tl.where(run_wins, sb, s)
        u_l = tl.where(run_wins, ub, u)
        total_l = 1.0 + s_l
        add_u = tl.where(sc > 0.0, sc * (u_l + delta * total_l), 0.0)
        # an empty running state (m = -inf) has nothing to merge with
        first = m == -float("inf")
        s = tl.where(first, sb, s_w + sc * total_l)
        u = tl.where(first, ub, u_w + add_u)
        m = tl.maximum(m, mb)
    return m, s, u


@triton.jit
def log1p(s):
    # log1p(s) to full fp32 accuracy (Goldberg's trick; log1p is not in triton.language)
    w = 1.0 + s
    return tl.where(w == 1.0, s, tl.log(w) * (s / (w - 1.0)))


@triton.jit
def rows(
    z_ptr,
    row_stride,
    labels_ptr,
    lp_ptr,
    h_ptr,
    vocab,
    inv_t,
    big,
    HAS_LABELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Whole rows of logits: entropy and (optionally) the label's log-prob."""
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * row_stride
    # the running state must start as tensors: Triton rejects loop-carried constexprs
    zero = tl.full([], 0.0, tl.float32)
    m, s, u = stream(base, vocab, zero - float("inf"), zero, zero, inv_t, big, BLOCK)
    log_s = log1p(s)
    tl.store(h_ptr + row, log_s + u / (1.0 + s))
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        zy = tl.load(base + y).to(tl.float32)
        tl.store(lp_ptr + row, -tl.minimum((m - zy) * inv_t, big) - log_s)


@triton.jit
def tile(
    z_ptr,
    row_stride,
    cols,
    col0,
    labels_ptr,
    m_ptr,
    s_ptr,
    u_ptr,
    zy_ptr,
    inv_t,
    big,
    BLOCK: tl.constexpr,
):
    """One tile (columns ``col0 + [0, cols)``) of the fused head's logits: fold it into the
    per-row state in memory and keep the label's raw logit if it lies in the tile."""
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * row_stride
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    u = tl.load(u_ptr + row)
    m, s, u = stream(base, cols, m, s, u, inv_t, big, BLOCK)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(u_ptr + row, u)
    y = tl.load(labels_ptr + row) - col0
    if (y >= 0) & (y < cols):
        tl.store(zy_ptr + row, tl.load(base + y).to(tl.float32))


@triton.jit
def grad(
    z_ptr,
    row_stride,
    cols,
    col0,
    labels_ptr,
    m_ptr,
    ls_ptr,
    h_ptr,
    glp_ptr,
    gh_ptr,
    inv_t,
    big,
    HAS_LP: tl.constexpr,
    HAS_H: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Overwrite a tile of logits with their gradient, in their dtype.

    ``log p = (z - m) / T - log1p(s')`` from the forward's row statistics, then
    ``g = g_lp (onehot - p) - g_h p (log p + H)``, divided by ``T``; the label's ``1 - p_y``
    is ``-expm1(log p_y)`` (exact when ``p_y`` is within 1e-7 of 1), as in
    :func:`_logits_grad`, whose formula this is.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < cols
    ptrs = z_ptr + row * row_stride + offs
    z = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
    # -inf logits (masked actions): log p clamps to -big, so p = 0 and p * (log p + H) = 0
    d = tl.minimum((tl.load(m_ptr + row) - z) * inv_t, big)
    d = tl.where(d == d, d, big)
    logp = tl.maximum(-d - tl.load(ls_ptr + row), -big)
    p = tl.exp(logp)
    g = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_LP:
        g_lp = tl.load(glp_ptr + row)
        # expm1(log p) to full accuracy (Kahan's trick; expm1 is not in triton.language)
        em1 = tl.where(p == 1.0, logp, (p - 1.0) * logp / tl.log(p))
        em1 = tl.where(p == 0.0, -1.0, em1)
        g = tl.where(offs + col0 == tl.load(labels_ptr + row), -em1 * g_lp, -p * g_lp)
    if HAS_H:
        g = g - tl.load(gh_ptr + row) * p * (logp + tl.load(h_ptr + row))
    tl.store(ptrs, (g * inv_t).to(z_ptr.dtype.element_ty), mask=valid)
