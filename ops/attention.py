"""Variable-length (document-masked) attention over a packed token axis.

Three backends computing the same thing, ``softmax(q k^T * scale + mask) v`` where a query sees only
keys of its own segment (and, when causal, not after itself):

- ``flash``: ``flash_attn_varlen_func`` (CUDA, flash-attn installed); arguments passed by keyword.
- ``flex``: FlexAttention with a causal + document ``BlockMask``.
- ``sdpa``: a loop over segments with ``scaled_dot_product_attention``; the reference.

Shapes: ``q`` ``[T, H_q, D]``, ``k``/``v`` ``[T, H_kv, D]`` with ``H_q % H_kv == 0`` (GQA);
``cu_seqlens`` int32 ``[n+1]`` with ``cu_seqlens[-1] == T``; output ``[T, H_q, D]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "flex", "sdpa")


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception:
        return False
    return True


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(
            f"q, k, v must be [T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of key/value heads {k.shape[1]}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor")
    if int(cu_seqlens[-1]) != q.shape[0] or int(cu_seqlens[0]) != 0:
        raise ValueError(
            f"cu_seqlens must run from 0 to T={q.shape[0]}, got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}"
        )


def sdpa_varlen_attention(
    q, k, v, cu_seqlens, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Reference: attention per segment with SDPA (exactly the per-document computation)."""
    bounds = cu_seqlens.tolist()
    rep = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        qs = q[lo:hi].transpose(0, 1)
        ks = k[lo:hi].transpose(0, 1).repeat_interleave(rep, 0)
        vs = v[lo:hi].transpose(0, 1).repeat_interleave(rep, 0)
        out[lo:hi] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1)
    return out


def flex_varlen_attention(
    q, k, v, cu_seqlens, causal: bool = True, scale: float | None = None, block_mask=None
):
    """FlexAttention with a (causal +) document mask built from ``cu_seqlens``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = q.shape[0]
    if block_mask is None:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        block = 128
        doc = torch.full((-(-T // block) * block,), -1, dtype=torch.int32, device=q.device)
        doc[:T] = torch.arange(len(lens), device=q.device, dtype=torch.int32).repeat_interleave(
            lens.to(q.device)
        )

        def mask_mod(b, h, q_idx, kv_idx):
            same = doc[q_idx] == doc[kv_idx]
            return same & (q_idx >= kv_idx) if causal else same

        block_mask = create_block_mask(mask_mod, None, None, T, T, device=q.device, BLOCK_SIZE=block)
    out = flex_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def flash_varlen_attention(
    q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True, scale: float | None = None
):
    """flash-attn 2 varlen kernel (CUDA, fp16/bf16)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        softmax_scale=scale,
        causal=causal,
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> flash on CUDA with flash-attn, else flex on CUDA, else the SDPA reference.

    Eager FlexAttention on CPU materializes the full score matrix, so ``auto`` does not pick it there.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and flash_attn_available():
        return "flash"
    if device.type == "cuda" and flex_attention_available():
        return "flex"
    return "sdpa"


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Document-masked attention over packed segments; see the module docstring for shapes.

    ``max_seqlen`` must be a Python int (computed by the loader, never ``.item()`` in the model).
    """
    _check(q, k, v, cu_seqlens)
    chosen = resolve_backend(backend, q.device)
    if chosen == "flash":
        return flash_varlen_attention(q, k, v, cu_seqlens, int(max_seqlen), causal, scale)
    if chosen == "flex":
        return flex_varlen_attention(q, k, v, cu_seqlens, causal, scale)
    return sdpa_varlen_attention(q, k, v, cu_seqlens, causal, scale)
