"""Log-probabilities and entropies from logits: the one place in erc_gym that computes them.

ERC compares ``H_new / H_old`` against a band as narrow as +-5%, and acts mostly on low-entropy
(near-deterministic) states, so the entropy has to be accurate *in relative terms* even when it
is tiny. The textbook form ``logsumexp(z) - sum(softmax(z) * z)`` subtracts two large, nearly
equal numbers and loses most of its digits there (``docs/method.md`` section 5.4). This module
uses the cancellation-free form instead. With ``m = max(z)``, ``d = (m - z) / T >= 0`` and
``e = exp(-d)``::

    s' = sum_{v != argmax} e_v            (the max element contributes exactly 1)
    H  = log1p(s') + sum_v e_v d_v / (1 + s')     (both terms >= 0)
    log p(y) = -d_y - log1p(s')

Every quantity is accumulated in fp32 whatever the input dtype, and the logits are processed in
chunks of rows (tokens) -- and optionally of vocabulary columns, merged with running
``(m, s', u)`` accumulators -- so the full ``(N, V)`` fp32 tensor is never materialised. The
backward pass recomputes the softmax chunk by chunk instead of saving it. On CUDA, when Triton is
installed, the forward is one fused kernel with the same accumulators and merge rule (it reads the
logits once), and the fused LM head (:func:`linear_logprob_and_entropy`) runs its forward and
backward through Triton kernels (``erc_gym._entropy_triton``) on tiles of tokens x vocabulary
columns; set ``erc_gym.entropy.USE_TRITON = False`` (or ``ERC_GYM_USE_TRITON=0``) to force the
PyTorch path.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_ELEMENTS_GPU",
    "DEFAULT_HEAD_CHUNK_ELEMENTS",
    "DEFAULT_HEAD_CHUNK_ELEMENTS_GPU",
    "entropy_from_logits",
    "kl_from_logits",
    "linear_kl_divergence",
    "linear_logprob_and_entropy",
    "logprob_and_entropy",
    "small_action_logprob_and_entropy",
]

#: Elements (rows x vocabulary) processed at once when ``chunk_size`` is None, on the CPU,
#: shared between the chunk workers (each takes 1/threads of it). Each chunk allocates about three
#: fp32 temporaries of its size (12 MiB in all), independent of N.
DEFAULT_CHUNK_ELEMENTS = 1 << 20
#: The same on a GPU, where each chunk costs ~10 kernel launches: 32M elements (about 400 MiB of
#: fp32 temporaries) keep launches rare while staying far below a large batch's logits.
DEFAULT_CHUNK_ELEMENTS_GPU = 1 << 25


_FP32_MAX = torch.finfo(torch.float32).max


def _rows_per_chunk(n_rows: int, vocab: int, chunk_size: int | None, device: torch.device) -> int:
    if chunk_size is None:
        if device.type == "cpu":
            # CPU chunk workers hold one chunk each at a time: split the budget between them
            budget = DEFAULT_CHUNK_ELEMENTS // (torch.get_num_threads() if CPU_CHUNK_WORKERS else 1)
        else:
            budget = DEFAULT_CHUNK_ELEMENTS_GPU
        return max(1, min(n_rows, budget // max(vocab, 1)))
    return max(1, min(n_rows, chunk_size))


def _partial_stats(
    z: Tensor, temperature: float, overwrite: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Statistics of one block of logits ``z`` (rows x columns, any float dtype).

    With ``overwrite=True`` an fp32 ``z`` is reused as the buffer of ``nd`` (one chunk less).

    Returns ``(m, s_excl, u, nd, argmax)``: the raw row max, the sum of ``exp(-d)`` over all
    columns but one argmax, ``u = sum(exp(-d) * d)``, the fp32 negated scaled gaps
    ``nd = -d = (z - m) / T <= 0`` (callers gather label log-probs from it) and the argmax column.
    """
    zf = z.float()
    m, idx = zf.max(dim=-1, keepdim=True)
    # Scale the gap, not the logits: (z - m) is exact or nearly so, whereas z / T would round a
    # large common offset before the subtraction.
    nd = zf.sub_(m) if overwrite and zf.dtype == torch.float32 else zf - m
    if temperature != 1.0:
        nd.div_(temperature)
    e = torch.exp(nd)
    e.scatter_(-1, idx, 0.0)
    s_excl = e.sum(dim=-1)
    # u = -sum(e * nd), with the product written over e (vecdot would allocate it: one chunk)
    u = e.mul_(nd).sum(dim=-1).neg_()
    bad = torch.isnan(u)
    if bool(bad.any()):
        # -inf logits (masked actions) make e * nd = 0 * -inf = NaN, and a block that is all
        # -inf has nd = NaN; a finite stand-in gives them weight exp(nd) = 0. Rare, so only
        # the affected rows pay for it.
        rows = bad.nonzero().squeeze(-1)
        e_rows = torch.exp(nd[rows]).scatter_(-1, idx[rows], 0.0)
        fixed = nd[rows].nan_to_num_(nan=-_FP32_MAX, neginf=-_FP32_MAX)
        nd[rows] = fixed
        u[rows] = -torch.linalg.vecdot(e_rows, fixed)
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


def _full_vocab_stats(
    z: Tensor, labels: Tensor | None, temperature: float, overwrite: bool = False
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """``(log_prob or None, entropy, m, log1p(s'))`` of one block of rows over all columns.

    ``m`` (row max) and ``log1p(s')`` (the log-normaliser relative to it) let a backward pass
    rebuild ``log p = (z - m) / T - log1p(s')`` without another reduction, to full accuracy.
    """
    m, s, u, nd, _ = _partial_stats(z, temperature, overwrite)
    log_s = torch.log1p(s)
    entropy = log_s + u / (1.0 + s)
    if labels is None:
        return None, entropy, m, log_s
    return nd.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_s, entropy, m, log_s


def _row_block_stats(
    z: Tensor,
    labels: Tensor | None,
    temperature: float,
    vocab_chunk: int | None,
    overwrite: bool = False,
) -> tuple[Tensor | None, Tensor]:
    """Log-prob of ``labels`` (or None) and entropy for one block of rows, fp32.

    ``overwrite=True`` lets the full-vocabulary path use an fp32 ``z`` as scratch space.
    """
    vocab = z.shape[-1]
    if vocab <= SMALL_VOCAB and vocab_chunk is None:
        return _small_vocab_stats(z, labels, temperature)
    if vocab_chunk is None or vocab_chunk >= vocab:
        lp, entropy, _, _ = _full_vocab_stats(z, labels, temperature, overwrite)
        return lp, entropy

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
# Optional Triton kernels for CUDA tensors: one program per row streams the vocabulary in blocks
# with the same (m, s', u) accumulators and merge rule as the PyTorch path, so the logits are read
# once. From logits, the backward pass is the chunked PyTorch code either way; the fused head
# (further below) also has a Triton backward.
# ---------------------------------------------------------------------------------------------

#: Use the Triton kernels on CUDA when Triton is installed (set False, or the environment variable
#: ``ERC_GYM_USE_TRITON=0`` before import, to force the PyTorch path).
USE_TRITON = os.environ.get("ERC_GYM_USE_TRITON", "1") != "0"

_kernels: Any = None


def _get_kernels() -> Any:
    """The Triton kernels (``erc_gym._entropy_triton``), imported on first use."""
    global _kernels
    if _kernels is None:
        from erc_gym import _entropy_triton

        _kernels = _entropy_triton
    return _kernels


def _triton_device(x: Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under its interpreter (tests only)."""
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_available(x: Tensor) -> bool:
    if not (USE_TRITON and _triton_device(x) and x.shape[-1] > 0 and x.stride(-1) == 1):
        return False
    return _triton_importable()


#: Columns per block of the Triton kernels' inner loops / gradient programs.
_ROW_BLOCK = 4096
_GRAD_BLOCK = 2048


def _triton_forward(
    view: Tensor, labels: Tensor | None, temperature: float, lp_out: Tensor | None, h_out: Tensor
) -> None:
    rows, vocab = view.shape
    if rows == 0:
        return
    has_labels = labels is not None and lp_out is not None
    _get_kernels().rows[(rows,)](
        view,
        view.stride(0),
        labels if has_labels else h_out,
        lp_out if has_labels else h_out,
        h_out,
        vocab,
        1.0 / temperature,
        _FP32_MAX,
        HAS_LABELS=has_labels,
        BLOCK=_ROW_BLOCK,
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

    def one_chunk(task: tuple[Tensor, slice]) -> None:
        block, out = task
        lp, h = _row_block_stats(
            block, None if labels is None else labels[out], temperature, vocab_chunk
        )
        entropy[out] = h
        if log_prob is not None and lp is not None:
            log_prob[out] = lp

    _run_chunks(one_chunk, _row_chunks(views, chunk_rows), logits.device)
    return log_prob, entropy


def _row_chunks(views: list[tuple[int, Tensor]], chunk_rows: int) -> list[tuple[Tensor, slice]]:
    """``(rows x V block, flat output slice)`` for every chunk of ``chunk_rows`` rows."""
    return [
        (view[start:stop], slice(offset + start, offset + stop))
        for offset, view in views
        for start in range(0, view.shape[0], chunk_rows)
        for stop in (min(start + chunk_rows, view.shape[0]),)
    ]


# ---------------------------------------------------------------------------------------------
# CPU chunk scheduling. Each chunk is ~10 element-wise ops; run with torch's
# intra-op (OpenMP) threads, every op splits its work statically over all threads and waits at a
# barrier, so when one core is busy with another process every op waits for the thread sharing
# that core: 2.4-6x slower than the naive formula's few large ops. Instead, whole chunks go to
# worker threads whose torch ops are single-threaded, taken from a shared queue, so a thread on
# a free core simply takes more chunks and nothing waits per op.
# ---------------------------------------------------------------------------------------------

#: Spread CPU chunks over single-threaded workers (set False for torch's own intra-op threads).
CPU_CHUNK_WORKERS = True

_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (threads, pid, pool)
_pool_lock = threading.Lock()
_in_worker = threading.local()


#: Serialises the workers' first torch calls. After a fork, torch rebuilds its internal thread
#: pool on the first ``set_num_threads`` call, and two threads doing that at once can see no pool
#: ("Invalid thread pool!") or hang; the lock (and the main thread going first, see
#: :func:`_cpu_pool`) keeps that rebuild single-threaded.
_init_lock = threading.Lock()


def _worker_init() -> None:
    with _init_lock:
        torch.ones(1 << 16).add_(1)  # trigger torch's lazy per-thread setup before changing it
        torch.set_num_threads(1)  # this thread's OpenMP setting (the caller restores the global)
    _in_worker.active = True


def _cpu_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` workers whose torch ops run on one thread each (created once)."""
    global _pool
    with _pool_lock:
        if _pool is not None and _pool[:2] == (threads, os.getpid()):
            return _pool[2]
        if _pool is not None and _pool[1] == os.getpid():
            _pool[2].shutdown(wait=False)
        # (after a fork the parent's workers do not exist in the child: start new ones; the
        # main thread resets torch's thread pool first, before any worker touches it)
        torch.set_num_threads(threads)
        pool = ThreadPoolExecutor(threads, "erc_gym-chunks", initializer=_worker_init)
        barrier = threading.Barrier(threads)
        try:
            list(pool.map(lambda _: barrier.wait(), range(threads)))  # start every worker now
        finally:
            torch.set_num_threads(threads)  # the workers' set_num_threads(1) touched globals
        _pool = (threads, os.getpid(), pool)
        return pool


def _run_chunks(fn: Callable[[Any], None], tasks: Iterable[Any], device: torch.device) -> None:
    """Run ``fn`` on every task: on CPU worker threads when that can help, else in order."""
    tasks = list(tasks)
    threads = torch.get_num_threads()
    if (
        not CPU_CHUNK_WORKERS
        or device.type != "cpu"
        or threads < 2
        or len(tasks) < 2
        or getattr(_in_worker, "active", False)
    ):
        for task in tasks:
            fn(task)
        return
    grad_mode = torch.is_grad_enabled()

    def run(task: Any) -> None:
        with torch.set_grad_enabled(grad_mode):
            fn(task)

    # list() re-raises the first worker exception here
    list(_cpu_pool(threads).map(run, tasks))


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
        # an unused output's gradient arrives as None instead of a tensor of zeros (the entropy
        # is usually logged, not differentiated: no wasted chunk of work in the backward pass)
        ctx.set_materialize_grads(False)
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

        def one_chunk(task: tuple[Tensor, slice]) -> None:
            block, sl = task
            g = _logits_grad(block, labels[sl], entropy[sl], grad_lp, grad_h, sl, temperature)
            grad_rows[sl] = g.to(grad.dtype)

        _run_chunks(one_chunk, _row_chunks(_row_views(logits), rows), logits.device)
        return grad, None, None, None, None, None


def _logits_grad(
    z: Tensor,
    labels: Tensor,
    entropy: Tensor,
    grad_lp: Tensor | None,
    grad_h: Tensor | None,
    rows: slice,
    temperature: float,
    overwrite: bool = False,
    norm: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """fp32 gradient with respect to one block of logits ``z`` (rows ``rows`` of the outputs).

    ``dlogp_y/dz = (onehot(y) - p) / T`` and ``dH/dz = -p * (log p + H) / T``, weighted by the
    upstream gradients ``grad_lp`` and ``grad_h`` (either may be None). Works in place on one
    fp32 buffer (a copy of ``z``, or ``z`` itself when ``overwrite=True`` and it is fp32), plus
    one more for ``p`` when the entropy has a gradient.

    ``norm = (m, log1p(s'))`` from the forward pass (:func:`_full_vocab_stats`) replaces the
    log-sum-exp reduction and makes the label's ``1 - p_y = -expm1(log p_y)`` exact even when
    ``p_y`` is within 1e-7 of 1 (``g_lp - p_y * g_lp`` would lose all its digits there).
    """
    if z.dtype != torch.float32:
        w = z.float()
    elif overwrite:
        w = z
    else:
        w = z.clone()
    # log-softmax in place, as torch.log_softmax computes it: (z - max) first, then log-sum-exp
    if norm is None:
        w.sub_(w.amax(dim=-1, keepdim=True).clamp(min=-_FP32_MAX))
    else:
        w.sub_(norm[0].unsqueeze(-1))
    if temperature != 1.0:
        w.div_(temperature)
    if norm is None:
        w.sub_(torch.logsumexp(w, dim=-1, keepdim=True))
    else:
        w.sub_(norm[1].unsqueeze(-1))
    g_lp = None if grad_lp is None else grad_lp[rows].float().unsqueeze(-1)
    lp_y = None if norm is None else w.gather(-1, labels.unsqueeze(-1))
    if grad_h is None:
        g = w.exp_()  # p
        if g_lp is None:
            return g.zero_()
        g.mul_(-g_lp)
    else:
        p = w.exp()
        g_h = grad_h[rows].float().unsqueeze(-1)
        # -p * (log p + H) * g_h; clamping log p keeps p = 0 where log p = -inf
        g = w.clamp_(min=-_FP32_MAX).add_(entropy.unsqueeze(-1)).mul_(p).mul_(-g_h)
        if g_lp is not None:
            g.addcmul_(p, g_lp, value=-1.0)
        del p
    if lp_y is not None and g_lp is not None:
        g_y = g_lp * -torch.expm1(lp_y)
        if grad_h is not None:
            safe = lp_y.clamp(min=-_FP32_MAX)
            g_y.sub_(
                lp_y.exp() * (safe + entropy.unsqueeze(-1)) * grad_h[rows].float().unsqueeze(-1)
            )
        g.scatter_(-1, labels.unsqueeze(-1), g_y)
    elif g_lp is not None:
        g.scatter_add_(-1, labels.unsqueeze(-1), g_lp)
    if temperature != 1.0:
        g.div_(temperature)
    return g


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


# ---------------------------------------------------------------------------------------------
# Fused LM head: log-probs and entropies straight from hidden states, one chunk of tokens at a
# time, so the (N, V) logits are never held.
# ---------------------------------------------------------------------------------------------

#: Logit elements (tokens x vocabulary) per chunk of :func:`linear_logprob_and_entropy` when
#: ``chunk_tokens`` is None, on the CPU: 16M fp32 elements (64 MiB; 512 tokens at V = 32,768,
#: 110 at V = 151,936) keep the GEMMs efficient (8M were measured 1.07x slower, 32M 1.07x faster:
#: noisy, 3 calls each) and the extra memory at about two such buffers, independent of N.
DEFAULT_HEAD_CHUNK_ELEMENTS = 1 << 24
#: The same on a GPU (256 MiB of fp32 logits per chunk).
DEFAULT_HEAD_CHUNK_ELEMENTS_GPU = 1 << 26


def _head_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    logit_scale: float,
    softcap: float | None,
    want_deriv: bool,
) -> tuple[Tensor, Tensor | None]:
    """fp32 logits of one chunk of tokens, and ``d(capped)/d(scaled)`` when soft-capping.

    The GEMM runs in the inputs' dtype (fp32 accumulation inside, as the model's own
    ``nn.Linear`` head), so bf16/fp16 logits are rounded exactly as the model would round them.
    """
    z = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    z = z.float()
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    deriv = None
    if softcap is not None:
        z.div_(softcap).tanh_()
        if want_deriv:
            deriv = 1.0 - z * z  # d(cap * tanh(x / cap)) / dx
        z.mul_(softcap)
    return z, deriv


#: Vocabulary block of the hidden-state gradient ``g @ W``: one fp32 GEMM over a 152k-long
#: vocabulary accumulates ~2e-5 relative rounding (measured: the materialised-logits path has
#: it too); summing 8192-wide blocks' products in fp64 brings it to ~1e-7 for a few extra GEMMs.
_GRAD_VOCAB_BLOCK = 8192


def _vocab_blocked_mm(g: Tensor, weight: Tensor) -> Tensor:
    """``g @ weight`` (``g`` fp32 ``(n, V)``) in ``weight``'s dtype, summed over vocab blocks."""
    vocab = weight.shape[0]
    acc = torch.zeros(g.shape[0], weight.shape[1], dtype=torch.float64, device=g.device)
    for start in range(0, vocab, _GRAD_VOCAB_BLOCK):
        block = slice(start, start + _GRAD_VOCAB_BLOCK)
        acc.add_(g[:, block].to(weight.dtype) @ weight[block])
    return acc.to(weight.dtype)


def _split_rows(n: int, device: torch.device) -> list[slice]:
    """Row slices of one fused-head chunk for the CPU chunk workers (one slice elsewhere)."""
    parts = 4 * torch.get_num_threads() if device.type == "cpu" and CPU_CHUNK_WORKERS else 1
    step = max(1, -(-n // parts))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in fp32 without first rounding the product to bf16/fp16 (CUDA: one GEMM)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch < 2.8: no out_dtype
            pass
    return a.float() @ b.float()


def _addmm_f32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` into the fp32 ``acc`` (see :func:`_mm_f32`)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):
            pass
    acc.addmm_(a.float(), b.float())


def _head_triton_ok(hidden: Tensor, logit_scale: float, softcap: float | None) -> bool:
    """The Triton fused head: CUDA (or Triton's interpreter), plain logits (no scale or cap)."""
    return (
        USE_TRITON
        and _triton_device(hidden)
        and logit_scale == 1.0
        and softcap is None
        and _triton_importable()
    )


#: Logits elements per tile of the Triton fused head (``rows x columns`` of the inputs' dtype;
#: 128 MiB in bf16). The tile spans as many tokens as fit next to at least
#: ``_MIN_TILE_COLS`` vocabulary columns, so the three GEMMs per tile stay large and the weight
#: gradient of a column block is summed over all tokens in one GEMM (no fp32 (V, H) accumulator
#: read and written once per token chunk).
_HEAD_TILE_ELEMENTS = 1 << 26
_MIN_TILE_COLS = 4096


def _head_tile_plan(
    n: int, vocab: int, chunk_tokens: int | None, dtype: torch.dtype
) -> tuple[int, int]:
    """``(rows, cols)`` of the Triton fused head's tiles."""
    rows = max(1, min(n, chunk_tokens or n))
    cols = min(vocab, max(_MIN_TILE_COLS, _HEAD_TILE_ELEMENTS // rows))
    if dtype == torch.float32:
        # fp32: the hidden-state gradient is summed over column blocks in fp64 (see
        # _vocab_blocked_mm), so a tile is at most one such block wide
        cols = min(cols, _GRAD_VOCAB_BLOCK)
    return max(1, min(rows, _HEAD_TILE_ELEMENTS // cols)), cols


def _tiles(n: int, vocab: int, plan: tuple[int, int]) -> list[tuple[slice, slice]]:
    """``(row slice, column slice)`` of every tile, column blocks outermost."""
    rows, cols = plan
    return [
        (slice(r, min(r + rows, n)), slice(c, min(c + cols, vocab)))
        for c in range(0, vocab, cols)
        for r in range(0, n, rows)
    ]


def _tile_gemm(
    buf: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, rs: slice, cs: slice
) -> Tensor:
    """The logits of one tile, ``hidden[rs] @ weight[cs].T (+ bias[cs])``, into ``buf``."""
    out = buf[: (rs.stop - rs.start) * (cs.stop - cs.start)].view(rs.stop - rs.start, -1)
    if bias is None:
        torch.mm(hidden[rs], weight[cs].T, out=out)
    else:
        torch.addmm(bias[cs], hidden[rs], weight[cs].T, out=out)
    return out


def _triton_head_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    temperature: float,
    plan: tuple[int, int],
    outs: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    """Forward of the Triton fused head: per tile, one GEMM into one buffer of the inputs' dtype,
    folded into per-row ``(m, s', u)`` by one kernel that reads it once; fills ``(log_prob,
    entropy, m, log1p s')``."""
    log_prob, entropy, row_max, log_s = outs
    n, vocab = hidden.shape[0], weight.shape[0]
    row_max.fill_(-float("inf"))
    s = torch.zeros_like(row_max)
    u = torch.zeros_like(row_max)
    z_label = torch.empty_like(row_max)
    buf = hidden.new_empty(plan[0] * plan[1])
    kernels = _get_kernels()
    for rs, cs in _tiles(n, vocab, plan):
        tile = _tile_gemm(buf, hidden, weight, bias, rs, cs)
        kernels.tile[(tile.shape[0],)](
            tile,
            tile.stride(0),
            tile.shape[1],
            cs.start,
            labels[rs],
            row_max[rs],
            s[rs],
            u[rs],
            z_label[rs],
            1.0 / temperature,
            _FP32_MAX,
            BLOCK=_ROW_BLOCK,
        )
    torch.log1p(s, out=log_s)
    torch.add(log_s, u / (1.0 + s), out=entropy)
    gap = ((row_max - z_label) / temperature).clamp_(max=_FP32_MAX).nan_to_num_(nan=_FP32_MAX)
    torch.sub(gap.neg_(), log_s, out=log_prob)


class _LinearLogProbEntropy(torch.autograd.Function):
    """Fused head: forward and backward both compute each chunk's logits from ``hidden @ W.T``.

    Takes flat ``(N, H)`` hidden states and ``(N,)`` labels; returns flat fp32 outputs.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        temperature: float,
        logit_scale: float,
        softcap: float | None,
        chunk_rows: int,
        entropy_grad: bool,
        plan: tuple[int, int] | None,
    ) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # see _LogProbEntropy.forward
        n = hidden.shape[0]
        log_prob, entropy, row_max, log_s = (
            torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(4)
        )
        if plan is not None:  # the Triton path (see _head_tile_plan)
            _triton_head_forward(
                hidden, weight, bias, labels, temperature, plan, (log_prob, entropy, row_max, log_s)
            )
        for start in range(0, 0 if plan is not None else n, chunk_rows):
            sl = slice(start, min(start + chunk_rows, n))
            z, _ = _head_logits(hidden[sl], weight, bias, logit_scale, softcap, False)

            def reduce(rs: slice, z: Tensor = z, first: int = start) -> None:
                out = slice(first + rs.start, first + rs.stop)
                lp, h, m, ls = _full_vocab_stats(z[rs], labels[out], temperature, overwrite=True)
                assert lp is not None
                log_prob[out], entropy[out], row_max[out], log_s[out] = lp, h, m, ls

            _run_chunks(reduce, _split_rows(z.shape[0], z.device), z.device)
            del z, reduce  # the closure holds the chunk too: free it before the next GEMM
        ctx.save_for_backward(hidden, weight, bias, labels, entropy, row_max, log_s)  # type: ignore[arg-type]
        ctx.options = (temperature, logit_scale, softcap, chunk_rows, plan)  # type: ignore[attr-defined]
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return log_prob, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_lp: Tensor | None, grad_h: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        hidden, weight, bias, labels, entropy, row_max, log_s = saved
        temperature, logit_scale, softcap, rows, plan = ctx.options  # type: ignore[attr-defined]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        if plan is not None:
            grads = _triton_head_backward(
                hidden,
                weight,
                bias,
                labels,
                entropy,
                (row_max, log_s),
                grad_lp,
                grad_h,
                temperature,
                plan,
                (need_h, need_w, need_b),
            )
            return (*grads, None, None, None, None, None, None, None)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        # fp32 accumulators across chunks (a bf16 sum over many chunks would lose digits)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = None
        if need_b:
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        n = hidden.shape[0]
        for start in range(0, n, rows):
            sl = slice(start, min(start + rows, n))
            h_c = hidden[sl]
            z, deriv = _head_logits(h_c, weight, bias, logit_scale, softcap, True)

            def to_grad(
                rs: slice, z: Tensor = z, deriv: Tensor | None = deriv, first: int = start
            ) -> None:
                out = slice(first + rs.start, first + rs.stop)
                block = z[rs]
                g_rs = _logits_grad(
                    block,
                    labels[out],
                    entropy[out],
                    grad_lp,
                    grad_h,
                    out,
                    temperature,
                    overwrite=True,
                    norm=(row_max[out], log_s[out]),
                )
                if g_rs.data_ptr() != block.data_ptr():
                    block.copy_(g_rs)
                if deriv is not None:
                    block.mul_(deriv[rs])
                if logit_scale != 1.0:
                    block.mul_(logit_scale)

            _run_chunks(to_grad, _split_rows(z.shape[0], z.device), z.device)
            g, deriv = z, None  # z now holds the logits' gradient
            if grad_hidden is not None:
                grad_hidden[sl] = _vocab_blocked_mm(g, weight)
            if need_w:
                grad_w.addmm_(g.T, h_c.float())
            if grad_b is not None:
                grad_b.add_(g.sum(dim=0))
            del g, z, to_grad  # free this chunk before the next GEMM
        return (
            grad_hidden,
            grad_w.to(weight.dtype) if need_w else None,
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _triton_head_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    entropy: Tensor,
    norm: tuple[Tensor, Tensor],
    grad_lp: Tensor | None,
    grad_h: Tensor | None,
    temperature: float,
    plan: tuple[int, int],
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of the Triton fused head: per tile, recompute the logits into one buffer of the
    inputs' dtype, overwrite them with their gradient (one kernel), then the GEMMs with fp32
    output. Column blocks are outermost, so each block's weight gradient is complete after its
    tiles and is written once in the weight's dtype; the hidden-state gradient is accumulated
    over blocks in fp32 (fp64 for fp32 inputs, as the PyTorch path does)."""
    need_h, need_w, need_b = needs
    n, vocab = hidden.shape[0], weight.shape[0]
    if grad_lp is None and grad_h is None:
        return None, None, None
    g_lp = None if grad_lp is None else grad_lp.float().contiguous()
    g_h = None if grad_h is None else grad_h.float().contiguous()
    wide = torch.float64 if hidden.dtype == torch.float32 else torch.float32
    acc_h = torch.zeros(hidden.shape, dtype=wide, device=hidden.device) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    acc_w = None
    if need_w and plan[0] < n:  # a column block spans several row tiles: sum them in fp32
        acc_w = torch.zeros(plan[1], weight.shape[1], dtype=torch.float32, device=weight.device)
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
    buf = hidden.new_empty(plan[0] * plan[1])
    kernel = _get_kernels().grad
    for rs, cs in _tiles(n, vocab, plan):
        tile = _tile_gemm(buf, hidden, weight, bias, rs, cs)
        kernel[(tile.shape[0], -(-tile.shape[1] // _GRAD_BLOCK))](
            tile,
            tile.stride(0),
            tile.shape[1],
            cs.start,
            labels[rs],
            norm[0][rs],
            norm[1][rs],
            entropy[rs],
            norm[0][rs] if g_lp is None else g_lp[rs],
            norm[0][rs] if g_h is None else g_h[rs],
            1.0 / temperature,
            _FP32_MAX,
            HAS_LP=g_lp is not None,
            HAS_H=g_h is not None,
            BLOCK=_GRAD_BLOCK,
        )
        if acc_h is not None:
            acc_h[rs] += _mm_f32(tile, weight[cs])
        if grad_w is not None:
            if acc_w is None:
                grad_w[cs] = _mm_f32(tile.T, hidden[rs]).to(weight.dtype)
            else:
                block = acc_w[: cs.stop - cs.start]
                if rs.start == 0:
                    block.zero_()
                _addmm_f32(block, tile.T, hidden[rs])
                if rs.stop == n:
                    grad_w[cs] = block.to(weight.dtype)
        if grad_b is not None:
            grad_b[cs] += tile.sum(dim=0, dtype=torch.float32)
    return (
        None if acc_h is None else acc_h.to(hidden.dtype),
        grad_w,
        None if grad_b is None or bias is None else grad_b.to(bias.dtype),
    )


def _check_head_inputs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    temperature: float,
    chunk_tokens: int | None,
    logit_scale: float,
    softcap: float | None,
) -> None:
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a floating-point tensor, got "
            f"{type(hidden).__name__} {getattr(hidden, 'dtype', '')}"
        )
    if hidden.ndim < 1:
        raise ValueError(f"hidden must have shape (..., H), got {tuple(hidden.shape)}")
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[0] < 1:
        raise ValueError(
            f"weight must be a (V, H) tensor with V >= 1, got "
            f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}"
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"weight must have hidden's dtype and device ({hidden.dtype}, {hidden.device}), "
            f"got ({weight.dtype}, {weight.device})"
        )
    vocab = weight.shape[0]
    if bias is not None and (
        tuple(bias.shape) != (vocab,) or bias.dtype != hidden.dtype or bias.device != hidden.device
    ):
        raise ValueError(
            f"bias must be a ({vocab},) tensor of hidden's dtype and device, got "
            f"{tuple(bias.shape)} {bias.dtype} {bias.device}"
        )
    if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got "
            f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.numel() and bool(((labels < 0) | (labels >= vocab)).any()):
        raise ValueError(
            f"labels must lie in [0, {vocab}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive number of tokens, got {chunk_tokens}")
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be finite and > 0, got {logit_scale}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or finite and > 0, got {softcap}")


def linear_logprob_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    entropy_grad: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-prob of ``labels`` and full-vocabulary entropy from hidden states and an LM head.

    The same values as ``logprob_and_entropy(hidden @ weight.T + bias, labels)`` without ever
    holding the ``(N, V)`` logits: each chunk of ``chunk_tokens`` tokens gets its logits from one
    GEMM, reduced at once with the cancellation-free formula of this module (the same code), and
    the backward pass recomputes them chunk by chunk. Extra memory is about two chunks of fp32
    logits plus the outputs (and an fp32 ``(V, H)`` accumulator for the weight gradient),
    independent of N; the Triton path (CUDA) needs one tile of logits in the inputs' dtype, an
    fp32 ``(N, H)`` accumulator and the outputs. Tied embeddings need nothing special: pass the
    shared matrix.

    The logits are ``softcap * tanh(logit_scale * z / softcap)`` (``z = hidden @ weight.T +
    bias``), then divided by ``temperature``: ``logit_scale`` covers Cohere / Command-R
    (``config.logit_scale``) and Granite (``1 / config.logits_scaling``); ``softcap`` covers
    Gemma-2 / Gemma-3 (``config.final_logit_softcapping``). Soft-capping costs one more chunk
    buffer in the backward pass.

    Args:
        hidden: ``(..., H)`` final hidden states (after the model's final norm), fp32/bf16/fp16.
        weight: ``(V, H)`` LM-head weight (``model.lm_head.weight``), same dtype and device.
        labels: ``(...)`` integer token ids in ``[0, V)``.
        bias: optional ``(V,)`` head bias.
        temperature: sampling temperature (> 0).
        chunk_tokens: tokens per chunk; ``None`` picks ``DEFAULT_HEAD_CHUNK_ELEMENTS // V`` on the
            CPU (``DEFAULT_HEAD_CHUNK_ELEMENTS_GPU // V`` for the PyTorch path on a GPU), at
            least 1. The Triton path (CUDA with Triton installed, no ``logit_scale`` or
            ``softcap``) cuts the logits into tiles of tokens x vocabulary columns instead
            (``_HEAD_TILE_ELEMENTS`` elements, all tokens if they fit); ``chunk_tokens`` then caps
            the tokens per tile.
        entropy_grad: let gradient flow into the entropy (needed only for an entropy bonus).
        logit_scale: multiplies the head's output before soft-capping (> 0).
        softcap: final-logit soft-capping value, or ``None`` for none.

    Returns:
        ``(log_prob, entropy)``, fp32, of shape ``hidden.shape[:-1]``. ``log_prob`` is
        differentiable with respect to ``hidden``, ``weight`` and ``bias``; ``entropy`` only
        when ``entropy_grad=True``.

    Raises:
        ValueError: on non-floating ``hidden``, a ``weight`` / ``bias`` / ``labels`` shape or
            dtype that does not match, labels out of range, or a non-positive setting.

    Example:
        >>> hidden, head = torch.randn(2, 5, 64), torch.randn(1000, 64)
        >>> labels = torch.randint(0, 1000, (2, 5))
        >>> log_prob, entropy = linear_logprob_and_entropy(hidden, head, labels)
        >>> log_prob.shape, entropy.shape
        (torch.Size([2, 5]), torch.Size([2, 5]))
    """
    _check_head_inputs(
        hidden, weight, labels, bias, temperature, chunk_tokens, logit_scale, softcap
    )
    lead = hidden.shape[:-1]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    n, vocab = flat_hidden.shape[0], weight.shape[0]
    if chunk_tokens is None:
        budget = (
            DEFAULT_HEAD_CHUNK_ELEMENTS
            if hidden.device.type == "cpu"
            else DEFAULT_HEAD_CHUNK_ELEMENTS_GPU
        )
        rows = max(1, min(n, budget // vocab))
    else:
        rows = max(1, min(n, chunk_tokens))
    log_prob, entropy = _LinearLogProbEntropy.apply(
        flat_hidden,
        weight,
        bias,
        flat_labels,
        float(temperature),
        float(logit_scale),
        None if softcap is None else float(softcap),
        rows,
        entropy_grad,
        _head_tile_plan(n, vocab, chunk_tokens, hidden.dtype)
        if _head_triton_ok(hidden, float(logit_scale), softcap)
        else None,
    )
    return log_prob.reshape(lead), entropy.reshape(lead)


# ---------------------------------------------------------------------------------------------
# KL(pi_old || pi) per state, for the KL penalty to the old policy (PPO-penalty).
# ---------------------------------------------------------------------------------------------


def _kl_rows(z_old: Tensor, z: Tensor, temperature: float) -> Tensor:
    """``sum_v q_v (log q_v - log p_v)`` per row, ``q = softmax(z_old / T)``, in fp32 or wider.

    ``q_v = 0`` terms contribute 0 (``xlogy``-style), so masked (-inf) actions of the old policy
    are ignored; a -inf of the new policy where ``q_v > 0`` is an infinite KL, as it should be.
    """
    dtype = torch.promote_types(z.dtype, torch.float32)
    log_q = torch.log_softmax(z_old.detach().to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(z.to(dtype) / temperature, dim=-1)
    q = log_q.exp()
    return torch.where(q > 0, q * (log_q - log_p), 0.0).sum(-1)


def kl_from_logits(old_logits: Tensor, logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Per-state ``KL(softmax(old / T) || softmax(new / T))`` over the last axis.

    Differentiable with respect to ``logits`` (gradient ``(p - q) / T`` per logit), with no
    gradient into ``old_logits``. Computed with log-softmax in fp32 (fp64 inputs in fp64), so it
    is exact to rounding and never negative beyond it. For the bandit and SB3 policies, whose
    ``(N, V)`` logits exist anyway; LM trainers use :func:`linear_kl_divergence`.

    Args:
        old_logits: ``(..., V)`` logits of the policy that collected the data.
        logits: ``(..., V)`` logits of the current policy.
        temperature: sampling temperature (> 0).

    Returns:
        ``(...)`` KL per state, fp32 (fp64 for fp64 inputs).
    """
    _check_inputs(logits, temperature, None)
    if old_logits.shape != logits.shape:
        raise ValueError(
            f"old_logits must have the shape of logits {tuple(logits.shape)}, "
            f"got {tuple(old_logits.shape)}"
        )
    return _kl_rows(old_logits, logits, float(temperature))


def _linear_kl_chunk(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    old_hidden: Tensor,
    old_weight: Tensor,
    old_bias: Tensor | None,
    temperature: float,
    logit_scale: float,
    softcap: float | None,
) -> Tensor:
    # out of place (``_head_logits`` transforms in place, for its no-grad kernels): autograd
    # differentiates this chunk when the checkpoint recomputes it
    z = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    z = z.float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    with torch.no_grad():
        z_old, _ = _head_logits(old_hidden, old_weight, old_bias, logit_scale, softcap, False)
    return _kl_rows(z_old, z, temperature)


def linear_kl_divergence(
    hidden: Tensor,
    weight: Tensor,
    old_hidden: Tensor,
    old_weight: Tensor,
    *,
    bias: Tensor | None = None,
    old_bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Per-token ``KL(pi_old || pi)`` from the hidden states and LM heads of both policies.

    The exact KL of the full vocabulary distributions without holding ``(N, V)`` logits: each
    chunk of tokens gets both policies' logits from one GEMM each (the same transform as
    :func:`linear_logprob_and_entropy`), and the backward pass recomputes the chunk
    (activation checkpointing), so the extra memory is a few chunks of fp32 logits. The old
    policy is the hidden states of the scoring pass and a copy of the head taken with them.

    Args:
        hidden: ``(..., H)`` current final hidden states (differentiable).
        weight: ``(V, H)`` current LM-head weight (differentiable).
        old_hidden: ``(..., H)`` the old policy's hidden states at the same tokens.
        old_weight: ``(V, H)`` the old policy's LM-head weight.
        bias: current head bias, or None.
        old_bias: old head bias, or None.
        temperature: sampling temperature (> 0).
        logit_scale: multiplies the head's output before soft-capping (> 0).
        softcap: final-logit soft-capping value, or None.
        chunk_tokens: tokens per chunk (None: as :func:`linear_logprob_and_entropy`).

    Returns:
        ``(...)`` fp32 KL per token.
    """
    from torch.utils.checkpoint import checkpoint

    if old_hidden.shape != hidden.shape or old_weight.shape != weight.shape:
        raise ValueError(
            f"the old policy's hidden states / head must have the current ones' shapes "
            f"{tuple(hidden.shape)} / {tuple(weight.shape)}, got {tuple(old_hidden.shape)} / "
            f"{tuple(old_weight.shape)}"
        )
    if not temperature > 0 or not logit_scale > 0:
        raise ValueError(
            f"temperature and logit_scale must be > 0, got {temperature}, {logit_scale}"
        )
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    old_flat = old_hidden.reshape(-1, hidden.shape[-1]).to(old_weight.dtype)
    n, vocab = flat.shape[0], weight.shape[0]
    budget = (
        DEFAULT_HEAD_CHUNK_ELEMENTS
        if hidden.device.type == "cpu"
        else DEFAULT_HEAD_CHUNK_ELEMENTS_GPU
    )
    rows = max(1, min(n, chunk_tokens if chunk_tokens is not None else budget // (2 * vocab)))
    parts = [
        checkpoint(
            _linear_kl_chunk,
            flat[start : start + rows],
            weight,
            bias,
            old_flat[start : start + rows],
            old_weight,
            old_bias,
            float(temperature),
            float(logit_scale),
            None if softcap is None else float(softcap),
            use_reentrant=False,
        )
        for start in range(0, n, rows)
    ]
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.float().reshape(lead)
