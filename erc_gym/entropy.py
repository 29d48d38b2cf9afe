"""Log-probabilities and entropies from logits: the one place in erc_gym that computes them.

ERC compares ``H_new / H_old`` against a band as narrow as +-5%, and acts mostly on low-entropy
(near-deterministic) states, so the entropy has to be accurate *in relative terms* even when it
is tiny. The textbook form ``logsumexp(z) - sum(softmax(z) * z)`` subtracts two large, nearly
equal numbers and loses most of its digits there (ERC_SPEC 5.4). This module uses the
cancellation-free form instead. With ``m = max(z)``, ``d = (m - z) / T >= 0`` and
``e = exp(-d)``::

    s' = sum_{v != argmax} e_v            (the max element contributes exactly 1)
    H  = log1p(s') + sum_v e_v d_v / (1 + s')     (both terms >= 0)
    log p(y) = -d_y - log1p(s')

Every quantity is accumulated in fp32 whatever the input dtype, and the logits are processed in
chunks of rows (tokens) -- and optionally of vocabulary columns, merged with running
``(m, s', u)`` accumulators -- so the full ``(N, V)`` fp32 tensor is never materialised. The
backward pass recomputes the softmax chunk by chunk instead of saving it. On CUDA, when Triton is
installed, the forward is one fused kernel with the same accumulators and merge rule (it reads the
logits once); set ``erc_gym.entropy.USE_TRITON = False`` to force the PyTorch path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_ELEMENTS_GPU",
    "entropy_from_logits",
    "logprob_and_entropy",
    "small_action_logprob_and_entropy",
]

#: Elements (rows x vocabulary) processed per chunk when ``chunk_size`` is None, on the CPU.
#: Each chunk allocates about three fp32 temporaries of this size (12 MiB in all), independent
#: of N, and small enough to stay in cache.
DEFAULT_CHUNK_ELEMENTS = 1 << 20
#: The same on a GPU, where each chunk costs ~10 kernel launches: 32M elements (about 400 MiB of
#: fp32 temporaries) keep launches rare while staying far below a large batch's logits.
DEFAULT_CHUNK_ELEMENTS_GPU = 1 << 25


_FP32_MAX = torch.finfo(torch.float32).max


def _rows_per_chunk(n_rows: int, vocab: int, chunk_size: int | None, device: torch.device) -> int:
    if chunk_size is None:
        budget = DEFAULT_CHUNK_ELEMENTS if device.type == "cpu" else DEFAULT_CHUNK_ELEMENTS_GPU
        return max(1, min(n_rows, budget // max(vocab, 1)))
    return max(1, min(n_rows, chunk_size))


def _partial_stats(z: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Statistics of one block of logits ``z`` (rows x columns, any float dtype).

    Returns ``(m, s_excl, u, nd, argmax)``: the raw row max, the sum of ``exp(-d)`` over all
    columns but one argmax, ``u = sum(exp(-d) * d)``, the fp32 negated scaled gaps
    ``nd = -d = (z - m) / T <= 0`` (callers gather label log-probs from it) and the argmax column.
    """
    zf = z.float()
    m, idx = zf.max(dim=-1, keepdim=True)
    # Scale the gap, not the logits: (z - m) is exact or nearly so, whereas z / T would round a
    # large common offset before the subtraction.
    nd = zf - m
    if temperature != 1.0:
        nd.div_(temperature)
    e = torch.exp(nd)
    e.scatter_(-1, idx, 0.0)
    s_excl = e.sum(dim=-1)
    u = -torch.linalg.vecdot(e, nd)
    bad = torch.isnan(u)
    if bool(bad.any()):
        # -inf logits (masked actions) make e * nd = 0 * -inf = NaN, and a block that is all
        # -inf has nd = NaN; a finite stand-in gives them weight exp(nd) = 0. Rare, so only
        # the affected rows pay for it.
        rows = bad.nonzero().squeeze(-1)
        fixed = nd[rows].nan_to_num_(nan=-_FP32_MAX, neginf=-_FP32_MAX)
        nd[rows] = fixed
        u[rows] = -torch.linalg.vecdot(e[rows], fixed)
    return m.squeeze(-1), s_excl, u, nd, idx.squeeze(-1)


#: Up to this many actions, rows are computed in float64 with the textbook formula instead: as
#: accurate (log-softmax in fp64 has ~1e-16 relative error) and about half the operations, which
#: matters for small-action RL (SB3) where the per-call overhead dominates.
SMALL_VOCAB = 1024


_FP64_LOWEST = torch.finfo(torch.float64).min


def _small_logp_entropy(z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Float64 log-softmax of ``z / T`` and the textbook entropy (differentiable).

    ``log p`` is clamped at float64's lowest value inside the product, so masked (-inf) actions
    contribute 0 to the entropy and 0 to its gradient (no ``0 * inf``).
    """
    if temperature != 1.0:
        logp = torch.log_softmax(z.double() / temperature, dim=-1)
    else:
        logp = torch.log_softmax(z, dim=-1, dtype=torch.float64)  # casts first: one op
    entropy = -(logp.exp() * logp.clamp(min=_FP64_LOWEST)).sum(-1)
    return logp, entropy


def _small_vocab_stats(
    z: Tensor, labels: Tensor | None, temperature: float
) -> tuple[Tensor | None, Tensor]:
    logp, entropy64 = _small_logp_entropy(z, temperature)
    entropy = entropy64.float()
    if labels is None:
        return None, entropy
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float(), entropy


def small_action_logprob_and_entropy(
    logits: Tensor, actions: Tensor, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Differentiable log-prob of ``actions`` and entropy, for few actions (``V <= 1024``).

    The same float64 textbook formula as this module's small-action path (so the entropy equals
    :func:`entropy_from_logits` bit for bit), with plain autograd instead of the chunked kernel:
    for RL policies with a handful of actions (SB3), where a custom autograd node's fixed cost
    would dominate. Both outputs are float64; cast them as needed.

    Args:
        logits: ``(..., V)`` with ``V <= SMALL_VOCAB``.
        actions: integer tensor of shape ``logits.shape[:-1]``.
        temperature: sampling temperature (> 0).

    Returns:
        ``(log_prob, entropy)``, each of shape ``logits.shape[:-1]``, float64, differentiable.
    """
    _check_inputs(logits, temperature, None)
    if logits.shape[-1] > SMALL_VOCAB:
        raise ValueError(
            f"small_action_logprob_and_entropy is for V <= {SMALL_VOCAB} actions, got "
            f"V = {logits.shape[-1]}; use logprob_and_entropy"
        )
    if tuple(actions.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"actions must have shape {tuple(logits.shape[:-1])}, got {tuple(actions.shape)}"
        )
    logp, entropy = _small_logp_entropy(logits, float(temperature))
    log_prob = logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    return log_prob, entropy


def _merge(
    a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor], temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge two partial ``(m, s', u)`` states over disjoint column sets (online softmax)."""
    m_a, s_a, u_a = a
    m_b, s_b, u_b = b
    a_wins = m_a >= m_b
    m_w = torch.where(a_wins, m_a, m_b)
    s_w, u_w = torch.where(a_wins, s_a, s_b), torch.where(a_wins, u_a, u_b)
    s_l, u_l = torch.where(a_wins, s_b, s_a), torch.where(a_wins, u_b, u_a)
    delta = ((m_w - torch.where(a_wins, m_b, m_a)) / temperature).clamp(max=_FP32_MAX)
    scale = torch.exp(-delta)
    # The losing block's own max element (weight 1 in its frame) now counts in s'.
    total_l = 1.0 + s_l
    return m_w, s_w + scale * total_l, u_w + scale * (u_l + delta * total_l)


def _row_block_stats(
    z: Tensor, labels: Tensor | None, temperature: float, vocab_chunk: int | None
) -> tuple[Tensor | None, Tensor]:
    """Log-prob of ``labels`` (or None) and entropy for one block of rows, fp32."""
    vocab = z.shape[-1]
    if vocab <= SMALL_VOCAB and vocab_chunk is None:
        return _small_vocab_stats(z, labels, temperature)
    if vocab_chunk is None or vocab_chunk >= vocab:
        _, s, u, nd, _ = _partial_stats(z, temperature)
        log_s = torch.log1p(s)
        entropy = log_s + u / (1.0 + s)
        if labels is None:
            return None, entropy
        return nd.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_s, entropy

    state: tuple[Tensor, Tensor, Tensor] | None = None
    z_label = None
    if labels is not None:
        z_label = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
    for start in range(0, vocab, vocab_chunk):
        m, s, u, _, _ = _partial_stats(z[:, start : start + vocab_chunk], temperature)
        state = (m, s, u) if state is None else _merge(state, (m, s, u), temperature)
    assert state is not None
    m, s, u = state
    log_s = torch.log1p(s)
    entropy = log_s + u / (1.0 + s)
    if z_label is None:
        return None, entropy
    return -(m - z_label) / temperature - log_s, entropy


# ---------------------------------------------------------------------------------------------
# Optional fused forward for CUDA tensors (Triton): one program per row streams the vocabulary in
# blocks with the same (m, s', u) accumulators and merge rule as the PyTorch path, so the logits
# are read once. The backward pass is the chunked PyTorch code either way.
# ---------------------------------------------------------------------------------------------

#: Use the Triton forward on CUDA when Triton is installed (set False to force the PyTorch path).
USE_TRITON = True

_triton_kernel: Any = None


def _get_triton_kernel() -> Any:
    global _triton_kernel
    if _triton_kernel is not None:
        return _triton_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
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
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * row_stride
        m = -float("inf")
        s = 0.0
        u = 0.0
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < vocab
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
            # the very first block has no running state to merge with
            first = m == -float("inf")
            s = tl.where(first, sb, s_w + sc * total_l)
            u = tl.where(first, ub, u_w + add_u)
            m = tl.maximum(m, mb)
        # log1p(s) to full fp32 accuracy (Goldberg's trick; log1p is not in triton.language)
        w = 1.0 + s
        log_s = tl.where(w == 1.0, s, tl.log(w) * (s / (w - 1.0)))
        tl.store(h_ptr + row, log_s + u / (1.0 + s))
        if HAS_LABELS:
            y = tl.load(labels_ptr + row)
            zy = tl.load(base + y).to(tl.float32)
            tl.store(lp_ptr + row, -tl.minimum((m - zy) * inv_t, big) - log_s)

    _triton_kernel = kernel
    return kernel


def _triton_available(x: Tensor) -> bool:
    if not (USE_TRITON and x.is_cuda and x.shape[-1] > 0 and x.stride(-1) == 1):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_forward(
    view: Tensor, labels: Tensor | None, temperature: float, lp_out: Tensor | None, h_out: Tensor
) -> None:
    rows, vocab = view.shape
    if rows == 0:
        return
    kernel = _get_triton_kernel()
    has_labels = labels is not None and lp_out is not None
    kernel[(rows,)](
        view,
        view.stride(0),
        labels if has_labels else h_out,
        lp_out if has_labels else h_out,
        h_out,
        vocab,
        1.0 / temperature,
        _FP32_MAX,
        HAS_LABELS=has_labels,
        BLOCK=4096,
    )


def _row_views(x: Tensor) -> list[tuple[int, Tensor]]:
    """``(flat_row_offset, (rows, V) view)`` pairs covering ``x``'s rows in order, never copying.

    A contiguous tensor is one view; a strided one (e.g. the response slice ``logits[:, p:-1]`` of
    a model's output) is split along its leading dimensions until each part can be viewed as 2-D.
    """
    vocab = x.shape[-1]
    try:
        return [(0, x.view(-1, vocab))]
    except RuntimeError:
        rows_per_item = math.prod(x.shape[1:-1])
        return [
            (i * rows_per_item + offset, view)
            for i in range(x.shape[0])
            for offset, view in _row_views(x[i])
        ]


def _forward_stats(
    logits: Tensor,
    labels: Tensor | None,
    temperature: float,
    chunk_rows: int,
    vocab_chunk: int | None,
) -> tuple[Tensor | None, Tensor]:
    """Flat ``(N,)`` log-probs (of flat ``labels``) and entropies of ``(..., V)`` logits."""
    views = _row_views(logits)
    n = math.prod(logits.shape[:-1])
    if vocab_chunk is None and all(_triton_available(v) for _, v in views):
        entropy = torch.empty(n, dtype=torch.float32, device=logits.device)
        log_prob = None if labels is None else torch.empty_like(entropy)
        for offset, view in views:
            out = slice(offset, offset + view.shape[0])
            _triton_forward(
                view,
                None if labels is None else labels[out].contiguous(),
                temperature,
                None if log_prob is None else log_prob[out],
                entropy[out],
            )
        return log_prob, entropy
    if len(views) == 1 and n <= chunk_rows:  # one chunk: no output buffers to fill
        return _row_block_stats(views[0][1], labels, temperature, vocab_chunk)
    entropy = torch.empty(n, dtype=torch.float32, device=logits.device)
    log_prob = None
    if labels is not None:
        log_prob = torch.empty(n, dtype=torch.float32, device=logits.device)
    for offset, view in views:
        for start in range(0, view.shape[0], chunk_rows):
            stop = min(start + chunk_rows, view.shape[0])
            out = slice(offset + start, offset + stop)
            lp, h = _row_block_stats(
                view[start:stop], None if labels is None else labels[out], temperature, vocab_chunk
            )
            entropy[out] = h
            if log_prob is not None and lp is not None:
                log_prob[out] = lp
    return log_prob, entropy


class _LogProbEntropy(torch.autograd.Function):
    """Chunked forward; backward recomputes the softmax chunk by chunk.

    Takes ``(..., V)`` logits (any strides) and flat ``(N,)`` labels; returns flat outputs.
    Gradients with respect to the logits ``z`` (divided by T at the end):
    ``dlogp_y/dz = onehot(y) - p`` and ``dH/dz = -p * (log p + H)``.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        labels: Tensor,
        temperature: float,
        chunk_rows: int,
        vocab_chunk: int | None,
        entropy_grad: bool,
    ) -> tuple[Tensor, Tensor]:
        log_prob, entropy = _forward_stats(logits, labels, temperature, chunk_rows, vocab_chunk)
        assert log_prob is not None
        ctx.save_for_backward(logits, labels, entropy)
        ctx.temperature = temperature  # type: ignore[attr-defined]
        ctx.chunk_rows = chunk_rows  # type: ignore[attr-defined]
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return log_prob, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_lp: Tensor | None, grad_h: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        logits, labels, entropy = ctx.saved_tensors  # type: ignore[attr-defined]
        temperature: float = ctx.temperature  # type: ignore[attr-defined]
        rows: int = ctx.chunk_rows  # type: ignore[attr-defined]
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_rows = grad.view(-1, logits.shape[-1])
        for offset, view in _row_views(logits):
            for start in range(0, view.shape[0], rows):
                stop = min(start + rows, view.shape[0])
                sl = slice(offset + start, offset + stop)
                logp = torch.log_softmax(view[start:stop].float() / temperature, dim=-1)
                p = logp.exp()
                g = torch.zeros_like(p)
                if grad_lp is not None:
                    g_lp = grad_lp[sl].float().unsqueeze(-1)
                    g.sub_(p * g_lp)
                    g.scatter_add_(-1, labels[sl].unsqueeze(-1), g_lp)
                if grad_h is not None:
                    g_h = grad_h[sl].float().unsqueeze(-1)
                    finite_logp = logp.clamp(min=-_FP32_MAX)  # p = 0 where logp = -inf
                    g.sub_(p * (finite_logp + entropy[sl].unsqueeze(-1)) * g_h)
                if temperature != 1.0:
                    g.div_(temperature)
                grad_rows[sl] = g.to(grad.dtype)
        return grad, None, None, None, None, None


def _check_inputs(logits: Tensor, temperature: float, chunk_size: int | None) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating-point tensor, got "
            f"{type(logits).__name__} {getattr(logits, 'dtype', '')}"
        )
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")


def logprob_and_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Log-probability of ``labels`` and full-distribution entropy, in one streaming pass.

    Both are computed for the distribution ``softmax(logits / temperature)`` with the
    cancellation-free formula of the module docstring, in fp32, chunk by chunk.

    Args:
        logits: ``(..., V)`` tensor, fp32, bf16 or fp16 (fp64 is accepted and computed in fp32).
        labels: ``(...)`` integer tensor of action / token ids in ``[0, V)``.
        temperature: sampling temperature; the logits are divided by it (must be > 0).
        chunk_size: tokens (rows) per chunk. ``None`` picks ``DEFAULT_CHUNK_ELEMENTS // V`` rows
            on the CPU (``DEFAULT_CHUNK_ELEMENTS_GPU // V`` on a GPU), which bounds the extra
            memory independently of the number of tokens.
        vocab_chunk_size: if set, each row is also streamed over vocabulary slices of this width,
            merged with running ``(max, sum, weighted-gap)`` accumulators. Only useful when one row
            chunk of the full vocabulary does not fit the memory you have.
        entropy_grad: let gradient flow into the entropy (needed only for an entropy bonus).

    Returns:
        ``(log_prob, entropy)``, both fp32 of shape ``(...)``. ``log_prob`` is differentiable with
        respect to ``logits``; ``entropy`` is detached unless ``entropy_grad=True``.

    Raises:
        ValueError: on non-float logits, a label shape that does not match, labels out of range,
            ``temperature <= 0`` or ``chunk_size < 1``.

    Example:
        >>> logits = torch.randn(4, 7, 32000)
        >>> labels = torch.randint(0, 32000, (4, 7))
        >>> log_prob, entropy = logprob_and_entropy(logits, labels)
        >>> log_prob.shape, entropy.shape
        (torch.Size([4, 7]), torch.Size([4, 7]))
    """
    _check_inputs(logits, temperature, chunk_size)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    vocab = logits.shape[-1]
    if labels.numel() and bool(((labels < 0) | (labels >= vocab)).any()):
        raise ValueError(
            f"labels must lie in [0, {vocab}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    lead = logits.shape[:-1]
    flat_labels = labels.reshape(-1).long()
    rows = _rows_per_chunk(flat_labels.numel(), vocab, chunk_size, logits.device)
    log_prob, entropy = _LogProbEntropy.apply(
        logits, flat_labels, float(temperature), rows, vocab_chunk_size, entropy_grad
    )
    return log_prob.reshape(lead), entropy.reshape(lead)


def entropy_from_logits(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last axis, without gradient.

    Same numerics and chunking as :func:`logprob_and_entropy`; use that function when you also
    need log-probabilities (one pass instead of two) or an entropy gradient.

    Args:
        logits: ``(..., V)`` floating-point tensor.
        temperature: sampling temperature (> 0).
        chunk_size: tokens (rows) per chunk; ``None`` bounds memory as in
            :func:`logprob_and_entropy`.
        vocab_chunk_size: optional vocabulary slice width for very large ``V``.

    Returns:
        fp32 tensor of shape ``logits.shape[:-1]``, in nats.
    """
    _check_inputs(logits, temperature, chunk_size)
    vocab = logits.shape[-1]
    n = math.prod(logits.shape[:-1])
    rows = _rows_per_chunk(n, vocab, chunk_size, logits.device)
    if vocab <= SMALL_VOCAB and vocab_chunk_size is None and rows == n and not logits.is_cuda:
        # Few actions, one chunk (small-action RL): the fp64 rows directly, without the
        # view / chunk bookkeeping, whose fixed cost would dominate at this size.
        with torch.no_grad():
            return _small_vocab_stats(logits.detach(), None, float(temperature))[1]
    with torch.no_grad():
        _, entropy = _forward_stats(
            logits.detach(), None, float(temperature), rows, vocab_chunk_size
        )
    return entropy.reshape(logits.shape[:-1])
