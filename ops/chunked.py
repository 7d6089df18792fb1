"""Causal attention of one chunk over the carried K/V of earlier chunks (ChunkFlow reference).

A ChunkFlow chunk holds ``T`` tokens in ``n`` segments (``cu_seqlens`` int32 ``[n+1]``). Segment 0
may continue a document whose earlier tokens were in earlier chunks: their per-layer keys/values
(the *prefix*, ``P`` tokens, kept by the state store as a list of blocks, one per earlier chunk)
are visible to segment 0 only. Query ``i`` of segment 0 sees all ``P`` prefix keys and its own
segment's keys ``0..i`` (causal, aligned bottom-right: the last query sees every key). Every other
segment is plain causal attention inside itself (document mask).

Backends, all computing the same function:

- ``blockwise``: a ``torch.autograd.Function`` with an online softmax over key blocks (the prefix
  blocks as given, then the segment's own keys). It saves only ``q``, ``out`` and the log-sum-exp
  and recomputes scores block by block in backward, so memory is ``O(T x block)`` however long the
  prefix is; the prefix blocks are referenced, never concatenated. CPU default (and on ``meta``).
- ``reference``: explicit boolean mask over ``cat(prefix, own)`` and ``scaled_dot_product_attention``
  per segment; materializes ``[H, T_seg, P + T_seg]``. The ground truth the tests compare to.
- ``flash``: ``flash_attn_varlen_func`` (CUDA, fp16/bf16) with ``cu_seqlens_k`` counting the prefix
  in segment 0 and ``causal=True`` (flash-attn >= 2.1 aligns causal masks bottom-right).

Shapes: ``q`` ``[T, H, D]``; ``k``/``v`` ``[T, H_kv, D]``, ``H % H_kv == 0`` (GQA); each prefix block
``[P_b, H_kv, D]``; output ``[T, H, D]``.

``TinyChunkedLM`` is a small RoPE decoder built on this attention, the consumer the ChunkFlow
executor, tests, example and benchmark run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import flash_attn_available

BACKENDS = ("auto", "blockwise", "reference", "flash")

# Prefix per layer, as the state store holds it: (key blocks, value blocks), one block per earlier
# chunk, optionally followed by (key gradient blocks, value gradient blocks) accumulators.
PrefixKV = tuple[Sequence[torch.Tensor], ...]


def _expand_heads(x: torch.Tensor, rep: int) -> torch.Tensor:
    """``[T, H_kv, D]`` -> head-major ``[H_kv * rep, T, D]`` (GQA)."""
    x = x.transpose(0, 1)
    return x.repeat_interleave(rep, 0) if rep > 1 else x


def _reduce_heads(g: torch.Tensor, rep: int) -> torch.Tensor:
    """Head-major ``[H, T, D]`` gradient -> ``[T, H_kv, D]`` summed over each GQA group."""
    if rep > 1:
        g = g.reshape(g.shape[0] // rep, rep, g.shape[1], g.shape[2]).sum(1)
    return g.transpose(0, 1)


class _BlockwiseCausalAttention(torch.autograd.Function):
    """One segment: queries over prefix blocks (all visible) and its own keys (causal)."""

    @staticmethod
    def forward(ctx, scale: float, n_prefix: int, sinks, q, k, v, *prefix):
        rep = q.shape[1] // k.shape[1]
        qh = q.transpose(0, 1)  # [H, T, D]
        T = q.shape[0]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril_()
        blocks = [(prefix[i], prefix[n_prefix + i], None) for i in range(n_prefix)] + [(k, v, causal)]
        m = torch.full((qh.shape[0], T, 1), -math.inf, dtype=q.dtype, device=q.device)
        denom = torch.zeros_like(m)
        acc = torch.zeros_like(qh)
        for kb, vb, mask in blocks:
            s = torch.matmul(qh, _expand_heads(kb, rep).transpose(1, 2)) * scale
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = torch.exp(s - m_new)
            corr = torch.exp(m - m_new)
            denom = denom * corr + p.sum(-1, keepdim=True)
            acc = acc * corr + torch.matmul(p, _expand_heads(vb, rep))
            m = m_new
            del s, p
        out_h = acc / denom
        lse = m + torch.log(denom)
        ctx.scale, ctx.n_prefix, ctx.rep, ctx.sinks = scale, n_prefix, rep, sinks
        ctx.save_for_backward(q, k, v, out_h, lse, *prefix)
        return out_h.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out_h, lse, *prefix = ctx.saved_tensors
        scale, n_prefix, rep, sinks = ctx.scale, ctx.n_prefix, ctx.rep, ctx.sinks
        qh = q.transpose(0, 1)
        do = grad_out.transpose(0, 1)
        delta = (do * out_h).sum(-1, keepdim=True)
        T = q.shape[0]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril_()
        blocks = [(prefix[i], prefix[n_prefix + i], None) for i in range(n_prefix)] + [(k, v, causal)]
        dq = torch.zeros_like(qh)
        grads_k, grads_v = [], []
        for kb, vb, mask in blocks:
            kh, vh = _expand_heads(kb, rep), _expand_heads(vb, rep)
            s = torch.matmul(qh, kh.transpose(1, 2)) * scale
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf)
            p = torch.exp(s - lse)
            del s
            dv = _reduce_heads(torch.matmul(p.transpose(1, 2), do), rep)
            ds = p * (torch.matmul(do, vh.transpose(1, 2)) - delta)
            del p
            dq = dq + torch.matmul(ds, kh) * scale
            dk = _reduce_heads(torch.matmul(ds.transpose(1, 2), qh) * scale, rep)
            del ds
            b = len(grads_k)
            if sinks is not None and b < n_prefix:
                # state-store accumulators: add now so prefix gradients never all exist at once
                sinks[0][b].add_(dk)
                sinks[1][b].add_(dv)
                dk = dv = None
            grads_k.append(dk)
            grads_v.append(dv)
        dk_own, dv_own = grads_k.pop(), grads_v.pop()
        return (None, None, None, dq.transpose(0, 1), dk_own, dv_own, *grads_k, *grads_v)


def blockwise_segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: Sequence[torch.Tensor] = (),
    prefix_v: Sequence[torch.Tensor] = (),
    scale: float | None = None,
    sinks: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Memory-efficient causal attention of one segment ``[T, H, D]`` over ``prefix + own`` keys.

    ``sinks``: optional (dK, dV) accumulator blocks shaped like the prefix; backward adds the
    prefix gradients into them in place (instead of returning them through autograd).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _BlockwiseCausalAttention.apply(scale, len(prefix_k), sinks, q, k, v, *prefix_k, *prefix_v)


def reference_segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: Sequence[torch.Tensor] = (),
    prefix_v: Sequence[torch.Tensor] = (),
    scale: float | None = None,
    sinks: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Ground truth: explicit bottom-right causal mask over ``cat(prefix, own)`` with SDPA."""
    rep = q.shape[1] // k.shape[1]
    keys, values = _keys_after_prefix(k, v, prefix_k, prefix_v, sinks)
    T, P = q.shape[0], keys.shape[0] - k.shape[0]
    # query i sees key j iff j <= P + i
    mask = torch.arange(P + T, device=q.device)[None, :] <= (P + torch.arange(T, device=q.device))[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), _expand_heads(keys, rep), _expand_heads(values, rep), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


def _sink_leaves(blocks: Sequence[torch.Tensor], sinks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh leaves over ``blocks`` whose gradients are added into ``sinks`` (autograd backends)."""
    out = []
    for blk, sink in zip(blocks, sinks):
        leaf = blk.detach().requires_grad_()
        leaf.register_hook(lambda g, sink=sink: sink.add_(g))
        out.append(leaf)
    return out


def _keys_after_prefix(
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: Sequence[torch.Tensor],
    prefix_v: Sequence[torch.Tensor],
    sinks: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat(prefix, own)`` keys and values ``[P + T, H_kv, D]`` for the concatenating backends;
    with ``sinks`` the prefix enters as leaves whose gradients go into the sinks."""
    if sinks is not None:
        prefix_k, prefix_v = _sink_leaves(prefix_k, sinks[0]), _sink_leaves(prefix_v, sinks[1])
    if not len(prefix_k):
        return k, v
    return torch.cat([*prefix_k, k]), torch.cat([*prefix_v, v])


def flash_chunk_attention(
    q, k, v, cu_seqlens, max_seqlen: int, prefix_k=(), prefix_v=(), scale=None, sinks=None
):
    """flash-attn varlen kernel: the prefix is prepended to segment 0's keys (CUDA, fp16/bf16)."""
    from flash_attn import flash_attn_varlen_func

    keys, values = _keys_after_prefix(k, v, prefix_k, prefix_v, sinks)
    P = keys.shape[0] - k.shape[0]
    cu_k = cu_seqlens + P
    cu_k[0] = 0
    first = int(cu_seqlens[1])  # length of segment 0, whose keys grow by the prefix
    return flash_attn_varlen_func(
        q,
        keys,
        values,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_k.contiguous(),
        max_seqlen_q=int(max_seqlen),
        max_seqlen_k=max(int(max_seqlen), first + P),
        softmax_scale=scale,
        causal=True,
    )


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """``auto`` -> ``flash`` on CUDA with flash-attn and a half dtype, else ``blockwise``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if q.dtype in (torch.float16, torch.bfloat16) and q.device.type == "cuda" and flash_attn_available():
        return "flash"
    return "blockwise"


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    prefix_k: Sequence[torch.Tensor] = (),
    prefix_v: Sequence[torch.Tensor] = (),
    *,
    prefix_grad_k: Sequence[torch.Tensor] | None = None,
    prefix_grad_v: Sequence[torch.Tensor] | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of a chunk's queries over carried prefix K/V (segment 0 only) plus its own keys.

    Args:
        q: ``[T, H, D]`` queries of the chunk.
        k, v: ``[T, H_kv, D]`` the chunk's own keys/values.
        cu_seqlens: int32 ``[n+1]`` segment boundaries, ``cu_seqlens[-1] == T``.
        max_seqlen: longest segment (Python int).
        prefix_k, prefix_v: blocks ``[P_b, H_kv, D]`` of the document segment 0 continues, in
            document order (empty for a standalone chunk or a chain's first chunk).
        prefix_grad_k, prefix_grad_v: optional accumulators shaped like the prefix blocks (the
            ChunkFlow state store's dK/dV): backward adds the prefix gradients into them in place
            rather than returning them through autograd, so the blockwise backward never holds
            the whole prefix's gradients at once. Without them, gradients flow to the prefix
            tensors as usual.
        scale: softmax scale, ``D ** -0.5`` when None.
        backend: one of ``BACKENDS``.

    Returns:
        ``[T, H, D]``.
    """
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or q.shape[::2] != k.shape[::2]:
        raise ValueError(
            f"q [T,H,D], k/v [T,H_kv,D] expected; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of key/value heads {k.shape[1]}")
    if len(prefix_k) != len(prefix_v):
        raise ValueError(f"{len(prefix_k)} prefix key blocks but {len(prefix_v)} value blocks")
    for i, (pk, pv) in enumerate(zip(prefix_k, prefix_v)):
        if pk.shape != pv.shape or pk.shape[1:] != k.shape[1:]:
            raise ValueError(
                f"prefix block {i} has shape {tuple(pk.shape)}/{tuple(pv.shape)}, "
                f"want [P, {k.shape[1]}, {k.shape[2]}]"
            )
    if cu_seqlens.dtype != torch.int32 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0]:
        raise ValueError(f"cu_seqlens must be int32 from 0 to T={q.shape[0]}")
    sinks = None
    if prefix_grad_k is not None or prefix_grad_v is not None:
        if prefix_grad_k is None or prefix_grad_v is None or len(prefix_grad_k) != len(prefix_k):
            raise ValueError("prefix_grad_k and prefix_grad_v must both be given, one per prefix block")
        for i, (pk, gk, gv) in enumerate(zip(prefix_k, prefix_grad_k, prefix_grad_v)):
            if gk.shape != pk.shape or gv.shape != pk.shape:
                raise ValueError(
                    f"prefix gradient block {i} has shape {tuple(gk.shape)}, want {tuple(pk.shape)}"
                )
        sinks = (list(prefix_grad_k), list(prefix_grad_v))
    chosen = resolve_backend(backend, q)
    if chosen == "flash":
        return flash_chunk_attention(q, k, v, cu_seqlens, max_seqlen, prefix_k, prefix_v, scale, sinks)
    segment = blockwise_segment_attention if chosen == "blockwise" else reference_segment_attention
    bounds = cu_seqlens.tolist()
    outs = []
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        pk, pv, sk = (prefix_k, prefix_v, sinks) if s == 0 else ((), (), None)
        outs.append(segment(q[lo:hi], k[lo:hi], v[lo:hi], pk, pv, scale, sk))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


# ---------------------------------------------------------------------------- reference decoder
def _rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (half-split layout) of ``x`` ``[T, H, D]`` at integer positions ``[T]``."""
    half = x.shape[-1] // 2
    inv = theta ** (-torch.arange(half, device=x.device, dtype=x.dtype) / half)
    ang = position_ids.to(x.dtype)[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class ChunkedAttentionLayer(nn.Module):
    """Pre-norm decoder block (RMSNorm, RoPE GQA attention via ``chunk_attention``, SiLU MLP)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, d_ff: int, rope_theta: float = 10_000.0):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.rope_theta = rope_theta
        self.norm1 = nn.RMSNorm(d_model)
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.norm2 = nn.RMSNorm(d_model)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x, position_ids, cu_seqlens, max_seqlen, prefix: PrefixKV | None, backend: str):
        T = x.shape[0]
        h = self.norm1(x)
        q = _rope(self.wq(h).view(T, self.n_heads, self.head_dim), position_ids, self.rope_theta)
        k = _rope(self.wk(h).view(T, self.n_kv_heads, self.head_dim), position_ids, self.rope_theta)
        v = self.wv(h).view(T, self.n_kv_heads, self.head_dim)
        pk, pv, *grads = prefix if prefix is not None else ((), ())
        gk, gv = grads if grads else (None, None)
        a = chunk_attention(
            q, k, v, cu_seqlens, max_seqlen, pk, pv, prefix_grad_k=gk, prefix_grad_v=gv, backend=backend
        )
        x = x + self.wo(a.reshape(T, -1))
        x = x + self.down(F.silu(self.up(self.norm2(x))))
        return x, (k, v)


class TinyChunkedLM(nn.Module):
    """A small causal LM whose forward takes one chunk and the carried K/V of earlier chunks.

    ``forward(input_ids [T], position_ids [T], cu_seqlens, max_seqlen, prefix)`` returns
    ``(logits [T, vocab], kv)`` where ``kv[l] = (k, v)``, each ``[T, H_kv, head_dim]``: this chunk's
    post-RoPE keys and values at layer ``l``, which the ChunkFlow state store carries to later
    chunks. ``prefix[l] = (key_blocks, value_blocks[, key_grad_blocks, value_grad_blocks])`` or
    None. With no prefix and whole documents as segments this is ordinary full-sequence
    (document-masked) training.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        d_model: int = 32,
        n_layers: int = 2,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        d_ff: int = 64,
        *,
        attn_backend: str = "auto",
    ):
        super().__init__()
        if attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
        self.attn_backend = attn_backend
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            ChunkedAttentionLayer(d_model, n_heads, n_kv_heads, d_ff) for _ in range(n_layers)
        )
        self.norm = nn.RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        prefix: Sequence[PrefixKV] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        x = self.embed(input_ids)
        kv = []
        for i, layer in enumerate(self.layers):
            layer_prefix = None if prefix is None else prefix[i]
            x, layer_kv = layer(x, position_ids, cu_seqlens, max_seqlen, layer_prefix, self.attn_backend)
            kv.append(layer_kv)
        return self.lm_head(self.norm(x)), kv
