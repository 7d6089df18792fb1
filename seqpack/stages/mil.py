"""PackMIL (Fang et al., 2025): pack sampled whole-slide feature bags into fixed-length sequences,
and compose the features that sampling left out into "hyperslides" with tailored labels.

Per slide and epoch (design.md section 4):

- a bag of ``N < min_seq_len * downsample`` features is *small*: both branches get the whole bag;
- otherwise the bag is shuffled with a generator seeded by ``(seed, epoch, slide index)``; the main
  branch gets the first ``floor(N * main_fraction)`` features and the residual branch the rest;
- each branch is capped at ``max_instances`` (a uniform random subsample: the order is already
  random); features above the cap are *discarded* and counted.

Main branch: sampled bags are planned with :func:`seqpack.pack` (``greedy`` = next fit in epoch
order, as in the paper, or ``bfd``/``ffd``) into sequences of ``pack_len`` features (after the model's
downsampling by ``downsample``: a bag of ``n`` features takes ``ceil(n / downsample)``), never
splitting a bag. Each bag is one segment of the batch: one embedding and one loss per slide.
Residual branch: the residual parts of the slides of one main batch are packed the same way; each
pack is ONE bag (a hyperslide) whose label is composed from its slides' labels, weighted by the
features each contributed (``compose_labels``).

Reading: the first time a process meets a slide it loads the whole bag and checks it for NaN/inf
(``nan`` policy); afterwards it reads only the rows drawn for the epoch (``FeatureBagSource.load_rows``:
memory-mapped ``.npy``/safetensors/tar members, h5 point selection), so a 200K-feature bag costs
O(drawn) per epoch, not O(N).

Planning needs only bag lengths (read from file headers), so a whole epoch is planned up front, the
same on every rank; ranks take every ``world_size``-th batch, and the batch count is padded to a
multiple of ``world_size`` with repeated batches of ``loss_scale = 0`` (counted) so DDP never hangs.
Everything is a function of ``(seed, epoch, batch index)``: the state is two integers, and resume
is exact, also after a change of ``world_size``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from seqpack.plan import pack
from seqpack.sources.features import FeatureBagError, FeatureBagSource, LabelTable

POLICIES = ("error", "skip")
LABEL_MODES = ("soft", "max", "multi_hot")
SURVIVAL = "survival"


# ---------------------------------------------------------------------------------------- batch
@dataclass
class PackedView:
    """A ``MILBatch`` as ``P`` packs of ``L = pack_len`` feature slots (``MILBatch.packed_view``).

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
        pack_len: feature slots per pack (``PackMIL.pack_len * downsample``); see ``packed_view``.
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
    pack_len: int = 0

    def packed_view(self) -> PackedView:
        """The batch as ``[P, pack_len]`` packs for transformer MILs (one row per pack, bags back to back
        inside it, zero padding at the end of each row).

        Bags attend only within themselves through ``attn_mask``; see ``PackedView``. Needs
        ``pack_offsets`` (set by ``PackMIL``). ``view.features[~view.key_padding_mask]`` gives back the
        real features in flat order (``features[:num_features]``), so per-token outputs of the view map
        to ``bag_ids``/``instance_idx`` of the flat batch.
        """
        if self.pack_offsets is None or self.pack_len <= 0:
            raise ValueError(
                "packed_view needs pack_offsets and pack_len (batches built by PackMIL have them)"
            )
        off = self.pack_offsets.to(torch.int64)
        lens = off[1:] - off[:-1]
        L = self.pack_len
        if len(lens) and int(lens.max()) > L:
            raise ValueError(f"a pack holds {int(lens.max())} features, more than pack_len={L}")
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
            if len(off) > 1 and int((off[1:] - off[:-1]).max()) > self.pack_len:
                raise ValueError(f"a pack holds more than pack_len={self.pack_len} features")


@dataclass
class _Part:
    """A run of features of one slide in a batch: ``source[take]`` are rows ``rows`` of the slide."""

    bag: int
    slide: int
    source: np.ndarray  # the whole bag, or only the rows read for this epoch
    take: np.ndarray | slice  # index into ``source``
    rows: np.ndarray  # row numbers inside the slide's bag (int64)


def _assemble(
    parts: Sequence[_Part],
    n_bags: int,
    labels: torch.Tensor | None,
    dim: int,
    pad_to: int | None,
    dtype: torch.dtype | None,
) -> MILBatch:
    """Build a batch from parts sorted by bag."""
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
    )


# ---------------------------------------------------------------------------------------- labels
def compose_labels(
    labels: np.ndarray, weights: np.ndarray, num_classes: int, mode: str = "soft"
) -> np.ndarray:
    """Label of a hyperslide from its constituent slides' labels.

    Args:
        labels: int ``[k]`` class indices (single-label) or 0/1 ``[k, C]`` (multi-label).
        weights: ``[k]`` features each slide contributed.
        mode: ``soft``: ``sum_i w_i * y_i / sum_i w_i`` (a distribution for single-label; per-class
            weighted fraction for multi-label); ``max``: ``sum_i w_i * y_i`` divided by its max
            (PackMIL's normalization; take the argmax for single-label losses); ``multi_hot``: 1 for
            every class any constituent has.

    Returns float32 ``[C]``.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"mode must be one of {LABEL_MODES}, got {mode!r}")
    labels = np.asarray(labels)
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or (w <= 0).any():
        raise ValueError("compose_labels needs at least one constituent, with positive weights")
    hot = labels.astype(np.float64) if labels.ndim == 2 else np.eye(num_classes)[labels.astype(np.int64)]
    if mode == "multi_hot":
        return (hot.max(0) > 0).astype(np.float32)
    y = (w[:, None] * hot).sum(0)
    y = y / (w.sum() if mode == "soft" else max(y.max(), 1e-12))
    return y.astype(np.float32)


def compose_survival_label(time_bins: np.ndarray, censored: np.ndarray) -> np.ndarray:
    """Survival label ``(time bin, censorship)`` of a hyperslide from its constituent slides.

    PackMIL's rule: the smallest *uncensored* time bin, as an event (censorship 0): the hyperslide
    stands for its slides together, and its first observed event is the earliest event among them.
    When every constituent is censored there is no event to take; the hyperslide is censored at the
    smallest censoring bin (each slide is known event-free up to its own censoring time, so the group's
    first event is only known to lie after the earliest of them).

    Args:
        time_bins: int ``[k]`` discrete time bins; censored: ``[k]`` 1 = censored, 0 = event.

    Returns int64 ``[2]``.
    """
    t = np.asarray(time_bins, np.int64)
    c = np.asarray(censored, np.int64)
    if len(t) == 0 or len(t) != len(c):
        raise ValueError("compose_survival_label needs at least one constituent, times and censorship alike")
    events = t[c == 0]
    if len(events):
        return np.array([events.min(), 0], np.int64)
    return np.array([t.min(), 1], np.int64)


# ---------------------------------------------------------------------------------------- sampling
def branch_sizes(
    n: np.ndarray, *, main_fraction: float, max_instances: int, small_below: int, residual: bool = True
) -> dict[str, np.ndarray]:
    """Features per branch for bags of ``n`` features (int64 arrays, no randomness needed).

    Returns ``main``, ``residual`` (after caps), ``main_all`` (main share before the cap),
    ``discarded`` (over a cap, or the residual share when ``residual=False``) and ``shared`` (small
    bags, counted in both branches). Identity: ``main + residual + discarded - shared == n``.
    """
    n = np.asarray(n, np.int64)
    small = n < small_below
    main_all = np.where(small, n, np.maximum(np.floor(n * main_fraction).astype(np.int64), np.minimum(n, 1)))
    res_all = np.where(small, n, n - main_all)
    main = np.minimum(main_all, max_instances)
    res = np.minimum(res_all, max_instances) if residual else np.zeros_like(n)
    shared = np.where(small & residual, np.minimum(n, max_instances), 0)
    discarded = n - main - res + shared
    return {"main": main, "residual": res, "main_all": main_all, "discarded": discarded, "shared": shared}


def sample_rows(
    n: int,
    slide: int,
    epoch: int,
    seed: int,
    *,
    main_fraction: float,
    max_instances: int,
    small_below: int,
    residual: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a bag of ``n`` features given to ``(main, residual)`` in epoch ``epoch``: seeded by
    ``(seed, epoch, slide)`` only, so independent of order, rank and worker. Rows come sorted (reads
    stay sequential on disk)."""
    sz = branch_sizes(
        np.array([n]),
        main_fraction=main_fraction,
        max_instances=max_instances,
        small_below=small_below,
        residual=residual,
    )
    return draw_rows(n, int(sz["main"][0]), int(sz["residual"][0]), n < small_below, slide, epoch, seed)


def draw_rows(
    n: int, n_main: int, n_res: int, small: bool, slide: int, epoch: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The seeded draw behind ``sample_rows`` given the branch sizes (``branch_sizes``) of the bag."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch, slide]))  # = default_rng(...), less overhead
    if small:
        rows = np.sort(rng.choice(n, n_main, replace=False))
        return rows, rows[:n_res].copy()
    # a uniform draw of n_main + n_res distinct rows, split in order, has the same law as shuffling
    # the bag, splitting at floor(n * p) and capping each side; it costs O(drawn) for huge bags
    take = rng.choice(n, n_main + n_res, replace=False)
    return np.sort(take[:n_main]), np.sort(take[n_main:])


# ---------------------------------------------------------------------------------------- stage
@dataclass
class _EpochPlan:
    batches: list[np.ndarray]  # slide indices per main batch, in pack order
    bag_counts: list[int]  # packs per batch
    packs: list[np.ndarray]  # pack (0 .. packs in the batch - 1) of each slide of a batch
    n_real: int  # batches before padding to a multiple of world_size


class PackMIL(torch.utils.data.IterableDataset):
    """Stateful iterator of ``MILBatch`` (main branch, with ``.residual`` hyperslides attached).

    Args:
        source: feature bags (``seqpack.sources.features``).
        labels: slide labels; slides without a row follow ``missing_label``. None for unlabelled data.
        pack_len: features per packed sequence (after ``downsample``).
        packs_per_batch: packs concatenated into one batch (``T = packs_per_batch * pack_len``).
        max_instances: cap per branch and bag (default ``pack_len * downsample``; at most that).
        main_fraction: share of a bag given to the main branch (PackMIL ``p``; 0.5, PANDA 0.4).
        min_seq_len: bags under ``min_seq_len * downsample`` features go whole to both branches.
        downsample: the model's ADS factor ``r``: a bag of ``n`` features fills ``ceil(n/r)`` slots.
        residual: build hyperslides; False counts the residual share as discarded.
        residual_label: ``soft`` / ``max`` / ``multi_hot`` (see ``compose_labels``); default ``soft``
            for single-label and ``multi_hot`` for multi-label data. Survival labels use (and need)
            ``survival``: ``compose_survival_label``.
        algorithm: ``greedy`` (next fit in epoch order, the paper) or ``bfd``/``ffd``.
        shuffle: shuffle slide order each epoch (seeded by ``seed, epoch``).
        rank, world_size: data-parallel shard (default: from ``torch.distributed`` when initialized,
            else 0 of 1); every rank gets the same number of batches. Inside a ``DataLoader`` the
            workers of a rank split its batches further, each worker yielding the same count.
        num_epochs: epochs to iterate (None: forever).
        pad: pad every batch to ``packs_per_batch * pack_len`` features (fixed shapes).
        dtype: cast features to this dtype (None keeps the stored float16/float32).
        empty, missing_label, nan: ``error`` (raise, naming the slide) or ``skip`` (counted in
            ``stats``) for bags with ``N = 0``, slides without a label row, and non-finite features.
    """

    def __init__(
        self,
        source: FeatureBagSource,
        labels: LabelTable | None = None,
        *,
        pack_len: int,
        packs_per_batch: int = 1,
        max_instances: int | None = None,
        main_fraction: float = 0.5,
        min_seq_len: int = 0,
        downsample: int = 1,
        residual: bool = True,
        residual_label: str | None = None,
        algorithm: str = "greedy",
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_epochs: int | None = 1,
        pad: bool = True,
        dtype: torch.dtype | None = torch.float32,
        empty: str = "error",
        missing_label: str = "error",
        nan: str = "error",
    ):
        if pack_len <= 0 or packs_per_batch <= 0 or downsample <= 0:
            raise ValueError("pack_len, packs_per_batch and downsample must be positive")
        cap = pack_len * downsample
        max_instances = cap if max_instances is None else int(max_instances)
        if not 0 < max_instances <= cap:
            raise ValueError(
                f"max_instances must be in [1, pack_len * downsample = {cap}], got {max_instances}"
            )
        if not 0.0 < main_fraction <= 1.0:
            raise ValueError(f"main_fraction must be in (0, 1], got {main_fraction}")
        if algorithm not in ("greedy", "bfd", "ffd"):
            raise ValueError(f"algorithm must be 'greedy', 'bfd' or 'ffd', got {algorithm!r}")
        if rank is None or world_size is None:
            dist = torch.distributed
            live = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if live else 0) if rank is None else rank
            world_size = (dist.get_world_size() if live else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        for name, val in (("empty", empty), ("missing_label", missing_label), ("nan", nan)):
            if val not in POLICIES:
                raise ValueError(f"{name} must be one of {POLICIES}, got {val!r}")
        multi = labels is not None and labels.multi_label
        surv = labels is not None and labels.survival
        residual_label = residual_label or (SURVIVAL if surv else "multi_hot" if multi else "soft")
        if surv != (residual_label == SURVIVAL):
            raise ValueError(
                f"residual_label {residual_label!r} does not fit {'survival' if surv else 'class'} labels"
            )
        if residual_label not in (*LABEL_MODES, SURVIVAL):
            raise ValueError(f"residual_label must be one of {LABEL_MODES}, got {residual_label!r}")
        self.source, self.labels = source, labels
        self.pack_len, self.packs_per_batch = int(pack_len), int(packs_per_batch)
        self.max_instances, self.main_fraction = max_instances, float(main_fraction)
        self.small_below = int(min_seq_len) * int(downsample)
        self.downsample, self.residual, self.residual_label = int(downsample), bool(residual), residual_label
        self.algorithm, self.shuffle, self.seed = algorithm, bool(shuffle), int(seed)
        self.rank, self.world_size, self.num_epochs = int(rank), int(world_size), num_epochs
        self.pad, self.dtype, self.nan = pad, dtype, nan
        self.epoch, self.position = 0, 0  # position: global batches consumed by all ranks together
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "slides",
                "bags",
                "packs",
                "hyperslides",
                "input_features",
                "main_features",
                "residual_features",
                "discarded_features",
                "shared_features",
                "padding_features",
                "padding_batches",
                "skipped_empty",
                "skipped_missing_label",
                "skipped_nan",
                "skipped_nan_features",
            ),
            0,
        )
        self._eligible = self._screen(empty, missing_label)
        self._plans: dict[int, _EpochPlan] = {}
        # branch sizes depend on N only: one table for the whole run
        self._size_table = self._sizes(self.source.lengths)
        self._finite: set[int] = set()  # slides already checked for NaN/inf (checked once per process)

    # ----------------------------------------------------------------- setup
    def _screen(self, empty: str, missing_label: str) -> np.ndarray:
        keep = []
        for i, sid in enumerate(self.source.slide_ids):
            if self.source.lengths[i] == 0:
                if empty == "error":
                    raise FeatureBagError(
                        f"slide {sid!r} ({self.source.location(i)}) has no features (N = 0); "
                        "pass empty='skip' to skip such bags"
                    )
                self.stats["skipped_empty"] += 1
                continue
            if self.labels is not None and sid not in self.labels:
                if missing_label == "error":
                    raise FeatureBagError(
                        f"slide {sid!r} ({self.source.location(i)}) has no row in label file "
                        f"{self.labels.path}; pass missing_label='skip' to skip it"
                    )
                self.stats["skipped_missing_label"] += 1
                continue
            keep.append(i)
        if self.labels is not None and keep:
            ids = self.source.slide_ids
            self._label_rows = {i: self.labels.get(ids[i]) for i in keep}
        return np.array(keep, np.int64)

    def _sizes(self, n: np.ndarray) -> dict[str, np.ndarray]:
        return branch_sizes(
            n,
            main_fraction=self.main_fraction,
            max_instances=self.max_instances,
            small_below=self.small_below,
            residual=self.residual,
        )

    def _units(self, n: np.ndarray) -> np.ndarray:
        return -(-np.asarray(n, np.int64) // self.downsample)

    # ----------------------------------------------------------------- planning
    def plan_epoch(self, epoch: int) -> _EpochPlan:
        """Main-branch batches of ``epoch`` (slide indices per batch), identical on every rank."""
        if epoch in self._plans:
            return self._plans[epoch]
        order = self._eligible
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        units = self._units(self._size_table["main"][order])
        plan = pack(units, self.pack_len, algorithm=self.algorithm, overflow="error", seed=self.seed + epoch)
        batches, counts, packs = [], [], []
        for b0 in range(0, plan.n_bins, self.packs_per_batch):
            b1 = min(b0 + self.packs_per_batch, plan.n_bins)
            lo, hi = plan.bin_offsets[b0], plan.bin_offsets[b1]
            batches.append(order[plan.seg_doc[lo:hi]])
            counts.append(b1 - b0)
            packs.append(np.repeat(np.arange(b1 - b0), np.diff(plan.bin_offsets[b0 : b1 + 1])))
        n_real = len(batches)
        self._plans = {epoch: _EpochPlan(batches, counts, packs, n_real)}  # keep one epoch's plan
        return self._plans[epoch]

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches each rank yields in a full epoch (known before loading any feature)."""
        n = self.plan_epoch(self.epoch if epoch is None else epoch).n_real
        return -(-n // self.world_size)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    # ----------------------------------------------------------------- iteration
    def _rank_slots(self) -> tuple[int, int]:
        """(offset, stride) of this iterator among all consumers: ranks, then DataLoader workers."""
        offset, stride = self.rank, self.world_size
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            offset, stride = self.rank * info.num_workers + info.id, self.world_size * info.num_workers
        return offset, stride

    def __iter__(self) -> Iterator[MILBatch]:
        offset, stride = self._rank_slots()
        while self.num_epochs is None or self.epoch < self.num_epochs:
            plan = self.plan_epoch(self.epoch)
            # every consumer takes one batch per round until the epoch is covered; the last round's
            # missing batches are fillers (loss_scale 0), so all ranks yield the same count
            while self.position < plan.n_real:
                g = self.position + offset
                batch = self.build_batch(
                    self.epoch, g % plan.n_real if plan.n_real else 0, filler=g >= plan.n_real
                )
                self.position += stride
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def build_batch(self, epoch: int, index: int, *, filler: bool = False) -> MILBatch:
        """Load and assemble main batch ``index`` of ``epoch`` with its hyperslides."""
        plan = self.plan_epoch(epoch)
        slides = plan.batches[index] if plan.n_real else np.zeros(0, np.int64)
        slide_pack = plan.packs[index] if plan.n_real else np.zeros(0, np.int64)
        st = self.stats
        main_parts, res_parts, bag_labels, bag_pack = [], [], [], []
        sizes = self._size_table
        for s, pk in zip(slides.tolist(), slide_pack.tolist()):
            n = int(self.source.lengths[s])
            rows_main, rows_res = draw_rows(
                n, int(sizes["main"][s]), int(sizes["residual"][s]), n < self.small_below, s, epoch, self.seed
            )
            n_main = len(rows_main)
            if s in self._finite and not self.source.holds_arrays:  # checked: read only the drawn rows
                x = self.source.load_rows(s, np.concatenate([rows_main, rows_res]))
                take_main, take_res = slice(0, n_main), slice(n_main, None)
            else:
                x = self.source.load(s)
                take_main, take_res = rows_main, rows_res
            if s not in self._finite and not np.isfinite(x).all():
                if self.nan == "error":
                    bad = int(np.flatnonzero(~np.isfinite(x).all(1))[0])
                    raise FeatureBagError(
                        f"slide {self.source.slide_ids[s]!r} ({self.source.location(s)}): non-finite feature "
                        f"in row {bad}; pass nan='skip' to skip such bags"
                    )
                if not filler:
                    st["skipped_nan"] += 1
                    st["skipped_nan_features"] += n
                continue
            self._finite.add(s)
            bag = len(main_parts)
            main_parts.append(_Part(bag, s, x, take_main, rows_main))
            bag_pack.append(pk)
            if len(rows_res):
                res_parts.append(_Part(-1, s, x, take_res, rows_res))
            if self.labels is not None:
                bag_labels.append(self._label_rows[s])
            if not filler:
                st["slides"] += 1
                st["input_features"] += n
                for k in ("main", "residual", "discarded", "shared"):
                    st[f"{k}_features"] += int(sizes[k][s])
        pad_to = self.packs_per_batch * self.pack_len * self.downsample if self.pad else None
        labels = self._label_tensor(bag_labels) if self.labels is not None else None
        batch = _assemble(main_parts, len(main_parts), labels, self.source.dim, pad_to, self.dtype)
        n_packs = plan.bag_counts[index] if plan.n_real else 0
        pack_feats = np.bincount(
            np.array(bag_pack, np.int64), weights=batch.part_len.numpy(), minlength=n_packs
        ).astype(np.int64)
        batch.pack_offsets = torch.from_numpy(np.r_[0, np.cumsum(pack_feats)].astype(np.int32))
        batch.pack_len = self.pack_len * self.downsample
        batch.residual = self._hyperslides(res_parts, pad_to) if self.residual else None
        if filler:
            batch.loss_scale = 0.0
            st["padding_batches"] += 1
            if batch.residual is not None:
                batch.residual.loss_scale = 0.0
        else:
            st["bags"] += batch.n_bags
            st["packs"] += plan.bag_counts[index] if plan.n_real else 0
            st["padding_features"] += batch.features.shape[0] - batch.num_features
            if batch.residual is not None:
                st["hyperslides"] += batch.residual.n_bags
        return batch

    def _label_tensor(self, rows: list[np.ndarray]) -> torch.Tensor:
        if self.labels.survival:
            return torch.from_numpy(np.array(rows, np.int64).reshape(-1, 2))
        if self.labels.multi_label:
            arr = (
                np.stack(rows).astype(np.float32)
                if rows
                else np.zeros((0, self.labels.num_classes), np.float32)
            )
            return torch.from_numpy(arr)
        return torch.from_numpy(np.array(rows, np.int64).reshape(-1))

    def _hyperslides(self, res_parts: list[_Part], pad_to: int | None) -> MILBatch:
        units = self._units([len(p.rows) for p in res_parts])
        plan = pack(units, self.pack_len, algorithm=self.algorithm, overflow="error", seed=None)
        parts, labels = [], []
        for h in range(plan.n_bins):
            members = [res_parts[j] for j in plan.bin(h)[0].tolist()]
            parts += [replace(m, bag=h) for m in members]
            if self.labels is not None:
                lab = np.stack([self._label_rows[m.slide] for m in members])
                if self.labels.survival:
                    labels.append(compose_survival_label(lab[:, 0], lab[:, 1]))
                    continue
                w = np.array([len(m.rows) for m in members])
                labels.append(compose_labels(lab, w, self.labels.num_classes, self.residual_label))
        lab_t = None
        if self.labels is not None:
            empty = (
                np.zeros((0, 2), np.int64)
                if self.labels.survival
                else np.zeros((0, self.labels.num_classes), np.float32)
            )
            lab_t = torch.from_numpy(np.stack(labels) if labels else empty)
        batch = _assemble(parts, plan.n_bins, lab_t, self.source.dim, pad_to, self.dtype)
        batch.pack_offsets = batch.cu_seqlens[: plan.n_bins + 1].clone()  # one hyperslide per pack
        batch.pack_len = self.pack_len * self.downsample
        return batch

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Where to resume: epoch and global batch position (with the settings that define the plan)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "pack_len": self.pack_len,
            "packs_per_batch": self.packs_per_batch,
            "n_slides": len(self.source),
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume; ``world_size`` may differ from the run that saved ``state`` (the plan is global)."""
        for k in ("seed", "pack_len", "packs_per_batch", "n_slides"):
            mine = len(self.source) if k == "n_slides" else getattr(self, k)
            if state[k] != mine:
                raise ValueError(f"state was saved with {k}={state[k]}, this stage has {k}={mine}")
        # position counts global batches, so it is valid for any world size
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.stats.update(state.get("stats", {}))

    @classmethod
    def from_config(cls, config: dict, **kwargs) -> PackMIL:
        """Same as :func:`mil_stage_from_config` (``rank``, ``world_size`` pass through)."""
        return mil_stage_from_config(config, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0


# ---------------------------------------------------------------------------------------- config
STAGE_KEYS = (
    "pack_len", "packs_per_batch", "max_instances", "main_fraction", "min_seq_len", "downsample", "residual",
    "residual_label", "algorithm", "shuffle", "seed", "num_epochs", "pad", "empty", "missing_label", "nan",
)  # fmt: skip


def mil_stage_from_config(config: dict, *, rank: int | None = None, world_size: int | None = None) -> PackMIL:
    """Build a ``PackMIL`` stage from a loader config (dict, as parsed from YAML/TOML)::

        sources: [{path: feats/, key: features}]     # dir, .tar shard(s), .safetensors, or files
        labels: {path: labels.csv, id_column: slide_id, label_columns: [...], classes: [...]}
        stage: {type: mil, pack_len: 600, packs_per_batch: 8, main_fraction: 0.4, ...}
        shuffle: {seed: 0}
        dtype: float32                               # or float16 / null (keep stored)

    Unknown ``stage`` keys raise ``ValueError`` naming them. Several sources are read as one list of
    slides (their paths concatenated); the MIL stage has no weighted mixing.
    """
    from seqpack.sources.features import read_feature_bags, read_labels

    stage = dict(config.get("stage") or {})
    if stage.pop("type", "mil") != "mil":
        raise ValueError("mil_stage_from_config needs stage.type == 'mil'")
    unknown = sorted(set(stage) - set(STAGE_KEYS))
    if unknown:
        raise ValueError(f"unknown keys in stage config: {unknown} (allowed: {list(STAGE_KEYS)})")
    if "pack_len" not in stage:
        raise ValueError("stage config needs pack_len")
    sources = config.get("sources")
    if not sources:
        raise ValueError("config needs sources: [{path: ...}]")
    sources = [s if isinstance(s, dict) else {"path": s} for s in sources]
    keys = {s.get("key", "features") for s in sources}
    if len(keys) > 1:
        raise ValueError(f"all feature sources must use one key, got {sorted(keys)}")
    paths: list = []
    for s in sources:
        if "path" not in s:
            raise ValueError(f"source {s} has no path")
        paths.append(s["path"])
    source = read_feature_bags(
        paths[0] if len(paths) == 1 else paths,
        key=keys.pop(),
        recursive=bool(sources[0].get("recursive", False)),
    )
    labels = None
    if config.get("labels"):
        lab = config["labels"]
        lab = {"path": lab} if isinstance(lab, str) else dict(lab)
        labels = read_labels(lab.pop("path"), **lab)
    if "seed" not in stage and isinstance(config.get("shuffle"), dict) and "seed" in config["shuffle"]:
        stage["seed"] = config["shuffle"]["seed"]
    dtype = config.get("dtype", "float32")
    return PackMIL(
        source, labels, rank=rank, world_size=world_size,
        dtype=None if dtype is None else getattr(torch, dtype), **stage,
    )  # fmt: skip
