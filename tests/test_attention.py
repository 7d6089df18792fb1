"""All varlen attention backends agree with the per-segment SDPA reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from seqpack.ops.attention import (
    flash_attn_available,
    flex_attention_available,
    resolve_backend,
    varlen_attention,
)

from seqpack import VarlenBatch


def qkv(T, hq=4, hk=2, d=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, h, d, generator=g, dtype=dtype).to(device) for h in (hq, hk, hk)]


def dense_reference(q, k, v, cu, causal):
    """Independent check: one masked softmax over the whole packed axis."""
    T = q.shape[0]
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= torch.ones(T, T, dtype=torch.bool).tril()
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("thd,shd->hts", q, kk) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), vv)


CU = [[0, 5, 17, 40, 200], [0, 1, 2, 3, 130], [0, 256]]


@pytest.mark.parametrize("cu", CU)
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_reference_matches_dense(cu, causal):
    cu = torch.tensor(cu, dtype=torch.int32)
    q, k, v = qkv(int(cu[-1]))
    out = varlen_attention(q, k, v, cu, int((cu[1:] - cu[:-1]).max()), causal, backend="sdpa")
    assert torch.allclose(out, dense_reference(q, k, v, cu, causal), atol=1e-5)


@pytest.mark.skipif(not flex_attention_available(), reason="FlexAttention not in this torch")
@pytest.mark.parametrize("cu", CU)
@pytest.mark.parametrize("causal", [True, False])
def test_flex_matches_sdpa(cu, causal):
    cu = torch.tensor(cu, dtype=torch.int32)
    q, k, v = qkv(int(cu[-1]), seed=1)
    m = int((cu[1:] - cu[:-1]).max())
    ref = varlen_attention(q, k, v, cu, m, causal, backend="sdpa")
    out = varlen_attention(q, k, v, cu, m, causal, backend="flex")
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.skipif(not flex_attention_available(), reason="FlexAttention not in this torch")
def test_batch_block_mask_drives_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    rng = np.random.default_rng(0)
    b = VarlenBatch.from_segments([rng.integers(0, 9, n) for n in (33, 100, 7)], [0, 1, 2], pad_to=256)
    q, k, v = qkv(b.num_tokens, hq=2, hk=2, seed=2)
    out = flex_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=b.block_mask())[
        0
    ].transpose(0, 1)
    ref = varlen_attention(q, k, v, b.cu_seqlens, b.max_seqlen, backend="sdpa")
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn needs CUDA and the flash_attn package")
def test_flash_matches_sdpa():
    cu = torch.tensor([0, 5, 17, 40, 200], dtype=torch.int32, device="cuda")
    q, k, v = qkv(200, dtype=torch.bfloat16, device="cuda")
    ref = varlen_attention(q.float(), k.float(), v.float(), cu, 160, backend="sdpa")
    out = varlen_attention(q, k, v, cu, 160, backend="flash")
    assert torch.allclose(out.float(), ref, atol=2e-2)


def test_auto_backend_on_cpu_is_reference():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"


def test_bad_arguments():
    q, k, v = qkv(10)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, k, v, torch.tensor([0, 10]), 10)
    with pytest.raises(ValueError, match="T=10"):
        varlen_attention(q, k, v, torch.tensor([0, 9], dtype=torch.int32), 9)
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, v, torch.tensor([0, 10], dtype=torch.int32), 10, backend="xformers")
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q, q[:, :3], q[:, :3], torch.tensor([0, 10], dtype=torch.int32), 10)
