"""MIL compute over packed feature bags: segment softmax, attention pooling, ABMIL and ADS.

A packed sequence holds several bags back to back on one feature axis ``[T, D]``; ``bag_ids``
(int64 ``[T]``) gives each feature's bag, and any id outside ``[0, n_bags)`` (the padding segment of a
``MILBatch``) is ignored. Every op here keeps each bag to itself, so the packed result equals running
each bag alone: softmax normalizes within a bag (``segment_softmax``), pooling sums within a bag, and
the attention-driven downsampler (ADS, PackMIL) pads, shuffles and groups features inside a bag only.
Each packed op has a per-bag reference (``forward_bag``) used by the tests.
"""

from __future__ import annotations

import torch
from torch import nn


def seq_idx_from_cu(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Segment index of each position (int64 ``[T]``) from boundaries ``cu_seqlens`` ``[n+1]``."""
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    idx = torch.repeat_interleave(torch.arange(len(lens), device=cu.device), lens)
    if total is not None and total != len(idx):
        raise ValueError(f"cu_seqlens covers {len(idx)} positions, expected {total}")
    return idx


def _bucket(bag_ids: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Map ids outside ``[0, n_bags)`` to the spare bucket ``n_bags`` (dropped by callers)."""
    bag_ids = bag_ids.to(torch.int64)
    return torch.where((bag_ids >= 0) & (bag_ids < n_bags), bag_ids, torch.full_like(bag_ids, n_bags))


def segment_softmax(scores: torch.Tensor, bag_ids: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Softmax of ``scores`` (``[T]`` or ``[T, H]`` for H heads) over the positions of each bag.

    Positions whose bag id is outside ``[0, n_bags)`` get weight 0.
    """
    seg = _bucket(bag_ids, n_bags)
    idx = seg.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores)
    shape = (n_bags + 1, *scores.shape[1:])
    # per-bag max for a stable exp; detached because softmax is invariant to the shift
    peak = torch.full(shape, float("-inf"), dtype=scores.dtype, device=scores.device)
    peak = peak.scatter_reduce(0, idx, scores.detach(), reduce="amax", include_self=True)
    e = torch.exp(scores - peak.gather(0, idx))
    denom = torch.zeros(shape, dtype=scores.dtype, device=scores.device).index_add(0, seg, e)
    w = e / denom.gather(0, idx)
    valid = (seg < n_bags).to(w.dtype).view(-1, *([1] * (scores.dim() - 1)))
    return w * valid


def segment_sum(values: torch.Tensor, bag_ids: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Sum of ``values`` ``[T, ...]`` per bag -> ``[n_bags, ...]`` (ids outside the range dropped)."""
    seg = _bucket(bag_ids, n_bags)
    out = values.new_zeros((n_bags + 1, *values.shape[1:])).index_add(0, seg, values)
    return out[:n_bags]


DENSE_POOL_MAX_BAGS = 16  # more bags than this per batch: pool by index_add (one GEMM is slower there)


def attention_pool(
    features: torch.Tensor, scores: torch.Tensor, bag_ids: torch.Tensor, n_bags: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bag embeddings ``[n_bags, D]`` = per-bag softmax(``scores`` ``[T]``)-weighted sums of ``features``
    ``[T, D]``. Returns ``(embeddings, weights [T])``."""
    w = segment_softmax(scores, bag_ids, n_bags)
    if 0 < n_bags <= DENSE_POOL_MAX_BAGS:
        # one GEMM with the block-structured weights [n_bags, T]: with few bags this costs less than
        # the elementwise product + index_add (and its index_select backward) over [T, D]
        seg = _bucket(bag_ids, n_bags)
        weights = w.new_zeros(n_bags + 1, features.shape[0]).scatter(0, seg.unsqueeze(0), w.unsqueeze(0))
        return weights[:n_bags] @ features, w
    return segment_sum(features * w.unsqueeze(-1), bag_ids, n_bags), w


class GatedAttention(nn.Module):
    """Attention scores of Ilse et al. (2018): ``w^T (tanh(V h) * sigmoid(U h))`` (or ungated ``tanh``)."""

    def __init__(self, dim: int, attn_dim: int = 64, gated: bool = True):
        super().__init__()
        self.V = nn.Linear(dim, attn_dim)
        self.U = nn.Linear(dim, attn_dim) if gated else None
        self.w = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        return self.w(a).squeeze(-1)


class ABMIL(nn.Module):
    """Attention-based MIL over packed bags: instance MLP, gated attention pooling per bag, classifier.

    ``forward(features [T, D], bag_ids [T], n_bags) -> logits [n_bags, C]`` gives one embedding and
    one prediction per bag; ``forward_bag(x [N, D]) -> [C]`` runs one bag alone (the reference).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 128,
        attn_dim: int = 64,
        gated: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attn_dim, gated)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, features: torch.Tensor, bag_ids: torch.Tensor, n_bags: int) -> torch.Tensor:
        h = self.embed(features)
        z, _ = attention_pool(h, self.attention(h), bag_ids, n_bags)
        return self.classifier(z)

    def forward_bag(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        w = torch.softmax(self.attention(h), dim=0)
        return self.classifier((w.unsqueeze(-1) * h).sum(0))


class AttentionDownsampler(nn.Module):
    """Attention-driven downsampler (ADS, PackMIL): reduce each bag of ``N`` features to ``ceil(N/r)``.

    Per bag: attention ``a = softmax(Linear(D,attn)->tanh->Linear(attn,1))`` over the bag's features,
    ``x += x * a``; pad the bag with zero rows to a multiple of ``r``; shuffle inside the bag; embed
    with ``Linear(D,D)+GELU``; merge each block of ``r`` rows by ``max`` (``mode="max"``) or by keeping
    ``D`` random columns of the flattened ``D*r`` block (``mode="random"``); ``Linear(D,D)``. Nothing
    crosses bags: blocks never straddle a bag boundary and shuffles stay inside a bag.
    """

    def __init__(self, dim: int, r: int, attn_dim: int = 128, mode: str = "max"):
        super().__init__()
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        if mode not in ("max", "random"):
            raise ValueError(f"mode must be 'max' or 'random', got {mode!r}")
        self.dim, self.r, self.mode = dim, int(r), mode
        self.attention = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))
        self.embed = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Linear(dim, dim)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Features per bag after downsampling: ``ceil(N / r)``."""
        return -(-lengths // self.r)

    def sample_shuffle(
        self, cu_seqlens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Random ``(perm, keep)`` for ``forward``: ``perm`` permutes the padded positions (int64
        ``[sum ceil(N/r)*r]``) within each bag; ``keep`` (``mode="random"``) picks ``D`` of the ``D*r``
        columns."""
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64).cpu()
        padded = self.out_lengths(lens) * self.r
        seg = torch.repeat_interleave(torch.arange(len(padded)), padded).to(torch.float64)
        # sorting bag index + U[0,1) keys shuffles inside each bag and keeps bags in order
        perm = torch.argsort(seg + torch.rand(len(seg), generator=generator, dtype=torch.float64))
        keep = None
        if self.mode == "random":
            keep = torch.randperm(self.dim * self.r, generator=generator)[: self.dim].sort().values
        return perm.to(cu_seqlens.device), None if keep is None else keep.to(cu_seqlens.device)

    def forward(
        self,
        features: torch.Tensor,
        cu_seqlens: torch.Tensor,
        *,
        perm: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        downsample: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Downsample packed bags.

        Args:
            features: float ``[T, D]``, the bags of ``cu_seqlens`` back to back (real bags only;
                slice off a batch's padding segment first).
            cu_seqlens: int ``[n_bags + 1]`` bag boundaries, ``cu_seqlens[-1] == T``.
            perm, keep: shuffle from ``sample_shuffle``; drawn with ``generator`` when omitted.
                ``perm`` of ``torch.arange`` (no shuffle) with ``mode="max"`` is deterministic.
            downsample: False (inference) keeps every feature: attention, embed and output
                projection only.

        Returns:
            ``(out [sum ceil(N/r), D], out_cu_seqlens int32 [n_bags + 1])``.
        """
        cu = cu_seqlens.to(torch.int64)
        n_bags = len(cu) - 1
        seg = seq_idx_from_cu(cu, features.shape[0])
        a = segment_softmax(self.attention(features).squeeze(-1), seg, n_bags)
        x = features + features * a.unsqueeze(-1)
        if not downsample or self.r == 1:
            return self.out(self.embed(x)), cu_seqlens.to(torch.int32)
        lens = cu[1:] - cu[:-1]
        m = self.out_lengths(lens)
        padded = m * self.r
        pad_start = torch.cumsum(padded, 0) - padded
        bag_of_slot = torch.repeat_interleave(torch.arange(n_bags, device=cu.device), padded)
        j = torch.arange(int(padded.sum()), device=cu.device) - pad_start[bag_of_slot]
        # slots past a bag's end read the appended zero row (index T)
        src = torch.where(
            j < lens[bag_of_slot], cu[:-1][bag_of_slot] + j, torch.full_like(j, features.shape[0])
        )
        if perm is None:
            perm, keep_drawn = self.sample_shuffle(cu, generator)
            keep = keep if keep is not None else keep_drawn
        src = src[perm]
        xp = torch.cat([x, x.new_zeros(1, x.shape[1])])[src]
        h = self.embed(xp).view(-1, self.r, self.dim)
        h = self._merge(h, keep)
        out_cu = torch.zeros(n_bags + 1, dtype=torch.int32, device=cu.device)
        out_cu[1:] = torch.cumsum(m, 0)
        return self.out(h), out_cu

    def _merge(self, h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "max":
            return h.amax(1)
        if keep is None:
            raise ValueError("mode='random' needs keep (from sample_shuffle)")
        # [blocks, r, D] -> [blocks, D, r] -> [blocks, D*r], keep D columns
        return h.transpose(1, 2).reshape(h.shape[0], -1)[:, keep]

    def forward_bag(
        self,
        x: torch.Tensor,
        perm: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        downsample: bool = True,
    ) -> torch.Tensor:
        """One bag alone ``[N, D] -> [ceil(N/r), D]`` (reference for ``forward``); ``perm`` permutes the
        bag's ``ceil(N/r)*r`` padded positions (identity when omitted)."""
        a = torch.softmax(self.attention(x).squeeze(-1), dim=0)
        x = x + x * a.unsqueeze(-1)
        if not downsample or self.r == 1:
            return self.out(self.embed(x))
        n = x.shape[0]
        padded = -(-n // self.r) * self.r
        xp = torch.cat([x, x.new_zeros(padded - n, x.shape[1])])
        if perm is not None:
            xp = xp[perm]
        h = self.embed(xp).view(-1, self.r, self.dim)
        return self.out(self._merge(h, keep))


def ads_bag_perms(perm: torch.Tensor, out_cu_seqlens: torch.Tensor, r: int) -> list[torch.Tensor]:
    """Split a packed ``perm`` from ``sample_shuffle`` into per-bag local permutations (for references)."""
    starts = (out_cu_seqlens.to(torch.int64) * r).tolist()
    return [perm[s:e] - s for s, e in zip(starts[:-1], starts[1:])]


def bag_logits_reference(
    model: ABMIL, features: torch.Tensor, cu_seqlens: torch.Tensor, n_bags: int
) -> torch.Tensor:
    """Run ``model.forward_bag`` on each of the first ``n_bags`` segments (reference for tests)."""
    cu = cu_seqlens.tolist()
    return torch.stack([model.forward_bag(features[cu[i] : cu[i + 1]]) for i in range(n_bags)])


__all__ = [
    "ABMIL",
    "AttentionDownsampler",
    "GatedAttention",
    "ads_bag_perms",
    "attention_pool",
    "bag_logits_reference",
    "segment_softmax",
    "segment_sum",
    "seq_idx_from_cu",
]
