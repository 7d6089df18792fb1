"""PackMIL (Fang et al., 2025): pack sampled whole-slide feature bags into fixed-length sequences,
and compose the features that sampling left out into "hyperslides" with tailored labels.

Per slide and epoch, :mod:`seqpack.mil.sampling` splits the bag between the main and the residual
branch (small bags go whole to both; each branch is capped at ``max_instances``).

Main branch: sampled bags are planned with :func:`seqpack.pack` (``greedy`` = next fit in epoch
order, as in the paper, or ``bfd``/``ffd``) into sequences of ``capacity`` features (after the
model's downsampling by ``downsample``: a bag of ``n`` features takes ``ceil(n / downsample)``),
never splitting a bag. Each bag is one segment of the batch: one embedding and one loss per slide.
Residual branch: the residual parts of the slides of one main batch are packed the same way; each
pack is ONE bag (a hyperslide) whose label is composed from its slides' labels, weighted by the
features each contributed (:func:`seqpack.mil.labels.compose_labels`).

Reading: the first time a process meets a slide it loads the whole bag and checks it for NaN/inf
(``nan`` policy); afterwards it reads only the rows drawn for the epoch (``FeatureBagSource.load_rows``),
so a 200K-feature bag costs O(drawn) per epoch, not O(N).

Planning needs only bag lengths (read from file headers), so a whole epoch is planned up front, the
same on every rank; ranks take every ``world_size``-th batch, and the batch count is padded to a
multiple of ``world_size`` with repeated batches of ``loss_scale = 0`` (counted) so DDP never hangs.
Everything is a function of ``(seed, epoch, batch index)``: the state is two integers, and resume
is exact, also after a change of ``world_size``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from seqpack.checks import check_choice, check_float, check_int, check_pad_to, rename_kwargs
from seqpack.mil.bags import FeatureBagError, FeatureBagSource
from seqpack.mil.batch import BagPart, MILBatch, assemble
from seqpack.mil.config import RENAMED, pad_to_from_pad, read_mil_config
from seqpack.mil.labels import LABEL_MODES, SURVIVAL, LabelTable
from seqpack.mil.sampling import branch_sizes, draw_rows
from seqpack.plan import pack

POLICIES = ("error", "skip")
STATS = (
    "slides", "bags", "packs", "hyperslides", "input_features", "main_features", "residual_features",
    "discarded_features", "shared_features", "padding_features", "padding_batches", "skipped_empty",
    "skipped_missing_label", "skipped_nan", "skipped_nan_features",
)  # fmt: skip


@dataclass
class _EpochPlan:
    batches: list[np.ndarray]  # slide indices per main batch, in pack order
    bag_counts: list[int]  # packs per batch
    packs: list[np.ndarray]  # pack (0 .. packs in the batch - 1) of each slide of a batch
    n_real: int  # batches before padding to a multiple of world_size


class PackMIL(torch.utils.data.IterableDataset):
    """Stateful iterator of ``MILBatch`` (main branch, with ``.residual`` hyperslides attached).

    Args:
        source: feature bags (:mod:`seqpack.mil.bags`, :mod:`seqpack.mil.formats`).
        labels: slide labels; slides without a row follow ``missing_label``. None for unlabelled data.
        capacity: features per packed sequence, after ``downsample`` (``pack_len=`` is its deprecated name).
        packs_per_batch: packs concatenated into one batch (``T = packs_per_batch * capacity * downsample``).
        max_instances: cap per branch and bag (default ``capacity * downsample``; at most that).
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
        pad_to: features of every batch's flat axis: ``"max"`` (``packs_per_batch * capacity *
            downsample``, fixed shapes; the default), an int >= that, or None (no padding). The
            deprecated ``pad=True/False`` means ``"max"``/None.
        dtype: cast features to this dtype (None keeps the stored float16/float32).
        empty, missing_label, nan: ``error`` (raise, naming the slide) or ``skip`` (counted in
            ``stats``) for bags with ``N = 0``, slides without a label row, and non-finite features.
    """

    def __init__(
        self,
        source: FeatureBagSource,
        labels: LabelTable | None = None,
        *,
        capacity: int | None = None,
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
        pad_to: int | str | None = "max",
        dtype: torch.dtype | None = torch.float32,
        empty: str = "error",
        missing_label: str = "error",
        nan: str = "error",
        **deprecated: Any,
    ):
        kw = rename_kwargs(deprecated, RENAMED, "PackMIL", capacity=capacity)
        pad_to_from_pad(kw, deprecated, "PackMIL")
        capacity = check_int(kw["capacity"], "capacity", minimum=1)
        packs_per_batch = check_int(packs_per_batch, "packs_per_batch", minimum=1)
        downsample = check_int(downsample, "downsample", minimum=1)
        cap = capacity * downsample
        max_instances = check_int(cap if max_instances is None else max_instances, "max_instances", 1, cap)
        main_fraction = check_float(main_fraction, "main_fraction", maximum=1.0)
        if main_fraction <= 0.0:
            raise ValueError(f"main_fraction: must be in (0, 1], got {main_fraction}")
        check_choice(algorithm, "algorithm", ("greedy", "bfd", "ffd"))
        for name, val in (("empty", empty), ("missing_label", missing_label), ("nan", nan)):
            check_choice(val, name, POLICIES)
        if rank is None or world_size is None:
            dist = torch.distributed
            live = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if live else 0) if rank is None else rank
            world_size = (dist.get_world_size() if live else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        multi = labels is not None and labels.multi_label
        surv = labels is not None and labels.survival
        residual_label = residual_label or (SURVIVAL if surv else "multi_hot" if multi else "soft")
        if surv != (residual_label == SURVIVAL):
            raise ValueError(
                f"residual_label {residual_label!r} does not fit {'survival' if surv else 'class'} labels"
            )
        check_choice(residual_label, "residual_label", (*LABEL_MODES, SURVIVAL))
        self.source, self.labels = source, labels
        self.capacity, self.packs_per_batch = capacity, packs_per_batch
        self.max_instances, self.main_fraction = max_instances, main_fraction
        self.small_below = int(min_seq_len) * downsample
        self.downsample, self.residual, self.residual_label = downsample, bool(residual), residual_label
        self.algorithm, self.shuffle, self.seed = algorithm, bool(shuffle), int(seed)
        self.rank, self.world_size, self.num_epochs = int(rank), int(world_size), num_epochs
        self.pad_to = check_pad_to(kw.get("pad_to", pad_to), "pad_to", packs_per_batch * cap)
        self.dtype, self.nan = dtype, nan
        self.epoch, self.position = 0, 0  # position: global batches consumed by all ranks together
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        self._eligible = self._screen(empty, missing_label)
        self._plans: dict[int, _EpochPlan] = {}
        # branch sizes depend on N only: one table for the whole run
        self._size_table = branch_sizes(
            self.source.lengths,
            main_fraction=self.main_fraction,
            max_instances=self.max_instances,
            small_below=self.small_below,
            residual=self.residual,
        )
        self._finite: set[int] = set()  # slides already checked for NaN/inf (checked once per process)

    @property
    def pack_len(self) -> int:
        """Deprecated name of :attr:`capacity`."""
        warnings.warn("PackMIL.pack_len is deprecated; use PackMIL.capacity", DeprecationWarning, 2)
        return self.capacity

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

    def _units(self, n) -> np.ndarray:
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
        plan = pack(units, self.capacity, algorithm=self.algorithm, overflow="error", seed=self.seed + epoch)
        batches, counts, packs = [], [], []
        for b0 in range(0, plan.n_bins, self.packs_per_batch):
            b1 = min(b0 + self.packs_per_batch, plan.n_bins)
            lo, hi = plan.bin_offsets[b0], plan.bin_offsets[b1]
            batches.append(order[plan.seg_doc[lo:hi]])
            counts.append(b1 - b0)
            packs.append(np.repeat(np.arange(b1 - b0), np.diff(plan.bin_offsets[b0 : b1 + 1])))
        self._plans = {epoch: _EpochPlan(batches, counts, packs, len(batches))}  # keep one epoch's plan
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
        st, sizes = self.stats, self._size_table
        main_parts: list[BagPart] = []
        res_parts: list[BagPart] = []
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
            main_parts.append(BagPart(len(main_parts), s, x, take_main, rows_main, pk))
            if len(rows_res):
                res_parts.append(BagPart(-1, s, x, take_res, rows_res))
            if not filler:
                st["slides"] += 1
                st["input_features"] += n
                for k in ("main", "residual", "discarded", "shared"):
                    st[f"{k}_features"] += int(sizes[k][s])
        labels = None
        if self.labels is not None:
            labels = self.labels.batch_labels([self._label_rows[p.slide] for p in main_parts])
        n_packs = plan.bag_counts[index] if plan.n_real else 0
        batch = self._assemble(main_parts, len(main_parts), labels, n_packs)
        batch.residual = self._hyperslides(res_parts) if self.residual else None
        if filler:
            batch.loss_scale = 0.0
            st["padding_batches"] += 1
            if batch.residual is not None:
                batch.residual.loss_scale = 0.0
        else:
            st["bags"] += batch.n_bags
            st["packs"] += n_packs
            st["padding_features"] += batch.features.shape[0] - batch.num_features
            if batch.residual is not None:
                st["hyperslides"] += batch.residual.n_bags
        return batch

    def _assemble(self, parts: list[BagPart], n_bags: int, labels, n_packs: int) -> MILBatch:
        return assemble(
            parts,
            n_bags,
            labels,
            self.source.dim,
            n_packs=n_packs,
            capacity=self.capacity * self.downsample,
            pad_to=self.pad_to,
            dtype=self.dtype,
        )

    def _hyperslides(self, res_parts: list[BagPart]) -> MILBatch:
        """The residual parts packed into hyperslides: one bag (and one pack) per bin."""
        units = self._units([len(p.rows) for p in res_parts])
        plan = pack(units, self.capacity, algorithm=self.algorithm, overflow="error", seed=None)
        parts, groups = [], []
        for h in range(plan.n_bins):
            members = [res_parts[j] for j in plan.bin(h)[0].tolist()]
            parts += [replace(m, bag=h, pack=h) for m in members]
            if self.labels is not None:
                lab = np.stack([self._label_rows[m.slide] for m in members])
                groups.append((lab, np.array([len(m.rows) for m in members])))
        labels = None if self.labels is None else self.labels.hyperslide_labels(groups, self.residual_label)
        return self._assemble(parts, plan.n_bins, labels, plan.n_bins)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Where to resume: epoch and global batch position (with the settings that define the plan)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "capacity": self.capacity,
            "packs_per_batch": self.packs_per_batch,
            "n_slides": len(self.source),
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume; ``world_size`` may differ from the run that saved ``state`` (the plan is global).
        States saved before the rename (``pack_len`` for ``capacity``) load too."""
        saved = {**state, "capacity": state.get("capacity", state.get("pack_len"))}
        for k in ("seed", "capacity", "packs_per_batch", "n_slides"):
            mine = len(self.source) if k == "n_slides" else getattr(self, k)
            if saved[k] != mine:
                raise ValueError(f"state was saved with {k}={saved[k]}, this stage has {k}={mine}")
        # position counts global batches, so it is valid for any world size
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.stats.update(state.get("stats", {}))

    @classmethod
    def from_config(cls, config: dict, **kwargs) -> PackMIL:
        """Same as :func:`mil_stage_from_config` (``rank``, ``world_size`` pass through)."""
        return mil_stage_from_config(config, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0


def mil_stage_from_config(config: dict, *, rank: int | None = None, world_size: int | None = None) -> PackMIL:
    """Build a ``PackMIL`` stage from a loader config (dict, as parsed from YAML/TOML; the keys are
    described in :mod:`seqpack.mil.config`). Unknown ``stage`` keys raise ConfigError naming them."""
    source, labels, kw = read_mil_config(config)
    return PackMIL(source, labels, rank=rank, world_size=world_size, **kw)
