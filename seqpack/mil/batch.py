"""The MIL batch: packed feature bags on one flat axis (:class:`MILBatch`), its per-pack view for
transformer MILs (:class:`PackedView`), and :func:`assemble`, which builds a batch from runs of
slide features (:class:`BagPart`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from seqpack.batch import accelerator_available


@dataclass
class PackedView:
    """A ``MILBatch`` as ``P`` packs of ``L = capacity`` feature slots (``MILBatch.packed_view``).

    Attributes:
        features: ``[P, L, D]``, pack ``p`` holds its bags back to back, then zeros.
        bag_ids: int64 ``[P, L]``, bag index in the batch of each slot (-1 on padding).
        key_padding_mask: bool ``[P, L]``, True on padding (``nn.MultiheadAttention`` convention).
        attn_mask: bool ``[P, L, L]``, True where query ``i`` may attend to key ``j``: same bag, both
            real (block diagonal). This is ``F.scaled_dot_product_attention``'s convention (add a head
            axis: ``attn_mask[:, None]``); ``nn.MultiheadAttention`` wants the opposite (pass
            ``~attn_mask``, repeated per head). Padding queries attend to themselves only.
    """

    features: torch.Tensor
    bag_ids: torch.Tensor
    key_padding_mask: torch.Tensor
    attn_mask: torch.Tensor


@dataclass
class MILBatch:
    """Packed feature bags on one flat axis of ``T`` features (the MIL variant of ``VarlenBatch``).

    Attributes:
        features: float ``[T, D]``, the bags back to back, then zero padding to ``T``.
        bag_ids: int32 ``[T]``, bag index of each feature (``n_bags`` on padding: its own segment).
            Same as ``seq_idx`` of ``VarlenBatch``.
        cu_seqlens: int32 ``[n_bags + 1]`` or ``[n_bags + 2]`` with a padding segment; contiguous,
            ``cu_seqlens[-1] == T``, never an empty segment.
        max_seqlen: longest segment (Python int, padding included).
        mask: bool ``[T]``, True on real features.
        labels: per bag, int64 ``[n_bags]`` class indices, or float32 ``[n_bags, C]`` (multi-hot for
            multi-label data; composed soft/multi-hot labels for hyperslides), or int64 ``[n_bags, 2]``
            ``(time bin, censorship)`` for survival data (hyperslides too, see
            ``compose_survival_label``); None without labels.
        slide_ids: int64 ``[n_parts]``, source index of the slide of each *part* (a run of features
            from one slide). In the main branch parts are bags; a hyperslide has several parts.
        part_bag: int64 ``[n_parts]``, bag of each part.
        part_len: int64 ``[n_parts]``, features of each part.
        instance_idx: int64 ``[T]``, row of each feature inside its slide's bag (-1 on padding).
        n_bags: bags (segments that are not padding).
        loss_scale: 1.0, or 0.0 for a filler batch that keeps ranks in step (multiply the loss).
        residual: the hyperslide batch built from the same slides (main branch only), or None.
        pack_offsets: int32 ``[P + 1]``, pack ``p`` holds features ``pack_offsets[p]:pack_offsets[p+1]``
            of the flat axis (whole bags only; ``pack_offsets[-1] == num_features``). In the residual
            batch each pack is one hyperslide.
        capacity: feature slots per pack (``PackMIL.capacity * downsample``: the model's sequence of
            ``capacity`` tokens after downsampling); see ``packed_view``.
    """

    features: torch.Tensor
    bag_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    mask: torch.Tensor
    labels: torch.Tensor | None
    slide_ids: torch.Tensor
    part_bag: torch.Tensor
    part_len: torch.Tensor
    instance_idx: torch.Tensor
    n_bags: int
    loss_scale: float = 1.0
    residual: MILBatch | None = None
    pack_offsets: torch.Tensor | None = None
    capacity: int = 0

    @property
    def pack_len(self) -> int:
        """Deprecated name of :attr:`capacity`."""
        warnings.warn("MILBatch.pack_len is deprecated; use MILBatch.capacity", DeprecationWarning, 2)
        return self.capacity

    def packed_view(self) -> PackedView:
        """The batch as ``[P, capacity]`` packs for transformer MILs (one row per pack, bags back to back
        inside it, zero padding at the end of each row).

        Bags attend only within themselves through ``attn_mask``; see ``PackedView``. Needs
        ``pack_offsets`` (set by ``PackMIL``). ``view.features[~view.key_padding_mask]`` gives back the
        real features in flat order (``features[:num_features]``), so per-token outputs of the view map
        to ``bag_ids``/``instance_idx`` of the flat batch.
        """
        if self.pack_offsets is None or self.capacity <= 0:
            raise ValueError(
                "packed_view needs pack_offsets and capacity (batches built by PackMIL have them)"
            )
        off = self.pack_offsets.to(torch.int64)
        lens = off[1:] - off[:-1]
        L = self.capacity
        if len(lens) and int(lens.max()) > L:
            raise ValueError(f"a pack holds {int(lens.max())} features, more than capacity={L}")
        dev = self.features.device
        pos = torch.arange(L, device=dev)
        valid = pos.unsqueeze(0) < lens.unsqueeze(1)  # [P, L]
        src = (off[:-1].unsqueeze(1) + pos.unsqueeze(0)).clamp(max=max(self.features.shape[0] - 1, 0))
        feats = self.features[src] * valid.unsqueeze(-1).to(self.features.dtype)
        bag = torch.where(valid, self.bag_ids[src].to(torch.int64), torch.full_like(src, -1))
        attn = (bag.unsqueeze(2) == bag.unsqueeze(1)) & valid.unsqueeze(1)
        # a padding query attends to itself only: no all-masked row (softmax NaN), no effect on real rows
        attn |= torch.eye(L, dtype=torch.bool, device=dev).unsqueeze(0) & ~valid.unsqueeze(2)
        return PackedView(feats, bag, ~valid, attn)

    @property
    def seq_idx(self) -> torch.Tensor:
        return self.bag_ids

    @property
    def n_real_segments(self) -> int:
        return self.n_bags

    @property
    def num_features(self) -> int:
        """Real features (excluding padding)."""
        return int(self.part_len.sum())

    @property
    def bag_cu_seqlens(self) -> torch.Tensor:
        """``cu_seqlens`` of the real bags only (``[n_bags + 1]``), e.g. for ``AttentionDownsampler``."""
        return self.cu_seqlens[: self.n_bags + 1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MILBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> MILBatch:
        """Page-locked copy; ``self`` unchanged without an accelerator (as ``VarlenBatch.pin_memory``)."""
        if not accelerator_available():
            return self
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> MILBatch:
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        if self.residual is not None:
            changes["residual"] = self.residual._map(fn)
        return replace(self, **changes)

    def validate(self) -> None:
        """Raise ``ValueError`` unless the batch keeps the contract (boundaries, ids, mask, labels)."""
        T = self.features.shape[0]
        cu = self.cu_seqlens.to(torch.int64)
        if self.cu_seqlens.dtype != torch.int32 or not self.cu_seqlens.is_contiguous():
            raise ValueError("cu_seqlens must be contiguous int32")
        if cu[0] != 0 or cu[-1] != T:
            raise ValueError(f"cu_seqlens must run from 0 to T={T}, got {cu.tolist()}")
        if len(cu) > 1 and not bool((cu[1:] > cu[:-1]).all()):
            raise ValueError("cu_seqlens must be strictly increasing (no empty segment)")
        n_seg = len(cu) - 1
        if n_seg not in (self.n_bags, self.n_bags + 1):
            raise ValueError(f"{n_seg} segments for {self.n_bags} bags")
        expect = torch.repeat_interleave(torch.arange(n_seg, device=cu.device), cu[1:] - cu[:-1])
        if not torch.equal(self.bag_ids.to(torch.int64), expect):
            raise ValueError("bag_ids disagree with cu_seqlens")
        if not torch.equal(self.mask, expect < self.n_bags):
            raise ValueError("mask must be True exactly on the bags' features")
        if self.labels is not None and self.labels.shape[0] != self.n_bags:
            raise ValueError(f"{self.labels.shape[0]} labels for {self.n_bags} bags")
        if int(self.part_len.sum()) != int(self.mask.sum()):
            raise ValueError("parts do not cover the real features")
        if self.pack_offsets is not None:
            off = self.pack_offsets.to(torch.int64)
            if off[0] != 0 or off[-1] != self.num_features or bool((off[1:] < off[:-1]).any()):
                raise ValueError(f"pack_offsets must rise from 0 to {self.num_features}, got {off.tolist()}")
            if not set(off.tolist()) <= set(cu[: self.n_bags + 1].tolist()):
                raise ValueError("pack_offsets must fall on bag boundaries (a bag never spans two packs)")
            if len(off) > 1 and int((off[1:] - off[:-1]).max()) > self.capacity:
                raise ValueError(f"a pack holds more than capacity={self.capacity} features")


@dataclass
class BagPart:
    """A run of features of one slide in a batch: ``source[take]`` are rows ``rows`` of the slide."""

    bag: int  # bag of the batch the part belongs to
    slide: int  # index of the slide in its FeatureBagSource
    source: np.ndarray  # the whole bag, or only the rows read for this epoch
    take: np.ndarray | slice  # index into ``source``
    rows: np.ndarray  # row numbers inside the slide's bag (int64)
    pack: int = 0  # pack (0 .. n_packs - 1) of the batch the part is in


def assemble(
    parts: Sequence[BagPart],
    n_bags: int,
    labels: torch.Tensor | None,
    dim: int,
    *,
    n_packs: int,
    capacity: int,
    pad_to: int | None = None,
    dtype: torch.dtype | None = None,
) -> MILBatch:
    """Build a batch of ``n_bags`` bags in ``n_packs`` packs of ``capacity`` feature slots from parts
    sorted by bag (and so by pack), padded with zeros to ``pad_to`` features when given."""
    part_len = np.array([len(p.rows) for p in parts], np.int64)
    n_real = int(part_len.sum())
    T = max(pad_to or 0, n_real)
    stored = np.result_type(*[p.source.dtype for p in parts]) if parts else np.dtype(np.float32)
    x = np.empty((T, dim), stored)
    x[n_real:] = 0
    at = 0
    for p, n in zip(parts, part_len.tolist()):
        # gather in the stored dtype (a plain copy); the cast below is one vectorized torch pass,
        # several times faster than numpy's float16 -> float32 conversion
        if isinstance(p.take, slice):
            x[at : at + n] = p.source[p.take]
        else:
            np.take(p.source, p.take, axis=0, out=x[at : at + n])
        at += n
    features = torch.from_numpy(x)
    if dtype is not None:
        features = features.to(dtype)
    part_bag = np.array([p.bag for p in parts], np.int64)
    bag_len = np.bincount(part_bag, weights=part_len, minlength=n_bags).astype(np.int64)
    seg_len = np.r_[bag_len, [T - n_real]] if T > n_real else bag_len
    cu = np.zeros(len(seg_len) + 1, np.int64)
    np.cumsum(seg_len, out=cu[1:])
    bag_ids = np.repeat(np.arange(len(seg_len), dtype=np.int32), seg_len)
    rows = np.full(T, -1, np.int64)
    if parts:
        rows[:n_real] = np.concatenate([p.rows for p in parts])
    part_pack = np.array([p.pack for p in parts], np.int64)
    pack_feats = np.bincount(part_pack, weights=part_len, minlength=n_packs).astype(np.int64)
    return MILBatch(
        features=features,
        bag_ids=torch.from_numpy(bag_ids),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(seg_len.max()) if len(seg_len) else 0,
        mask=torch.from_numpy(bag_ids < n_bags),
        labels=labels,
        slide_ids=torch.from_numpy(np.array([p.slide for p in parts], np.int64)),
        part_bag=torch.from_numpy(part_bag),
        part_len=torch.from_numpy(part_len),
        instance_idx=torch.from_numpy(rows),
        n_bags=n_bags,
        pack_offsets=torch.from_numpy(np.r_[0, np.cumsum(pack_feats)].astype(np.int32)),
        capacity=capacity,
    )
