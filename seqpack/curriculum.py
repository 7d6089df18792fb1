"""Length curricula over training progress, and their config (design.md section 4).

Two families, both functions of progress ``t`` (optimizer steps, or tokens seen):

- **Bucket odds** (dataset decomposition, Pouransari et al. Algorithm 1): :class:`BucketCurriculum`
  says how likely each length bucket is to supply the next step; :class:`BucketSampler` draws the
  bucket of every step from a seeded RNG shared by all ranks, over ``n_cycles`` cycles, each owning
  ``1/n_cycles`` of every bucket's batches. Named curricula: ``uniform``, ``grow_linear``,
  ``grow_p2``; or a custom odds list; or a table of odds rows switching at given progress.
- **Max-length schedules** (sequence-length warmup, Li et al.; DeepSpeed ``curriculum_learning``
  with ``curriculum_type: seqlen``): :class:`SeqlenSchedule` maps ``t`` to a maximum length with the
  DeepSpeed keys, and :class:`SeqlenCurriculum` applies it to a document stream by packing to
  capacity ``L`` with document masks (nothing thrown away), truncating, or reshaping.

Config: the ``curriculum:`` section of a YAML/TOML loader config, checked by
:func:`parse_curriculum_config` (errors name the key and the allowed values). The CLI subcommand
``seqpack curriculum plot CONFIG --steps N -o out.png`` draws both schedules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seqpack.batch import VarlenBatch

NAMED_ODDS = ("uniform", "grow_linear", "grow_p2")
WEIGHTINGS = ("odds", "odds_by_mass")
PROGRESS_UNITS = ("steps", "tokens")
SCHEDULE_TYPES = ("fixed_linear", "fixed_root", "fixed_discrete")
LENGTH_MODES = ("pack", "truncate", "reshape")


def _choices(values: Sequence[str]) -> str:
    return ", ".join(repr(v) for v in values)


def named_odds(name: str, n_buckets: int) -> np.ndarray:
    """Odds of a named curriculum over ``n_buckets`` buckets, shortest bucket first.

    Over D8..D13 these are the paper's rows: ``uniform`` 1 1 1 1 1 1, ``grow_linear`` 6 5 4 3 2 1,
    ``grow_p2`` 32 16 8 4 2 1.
    """
    key = name.lower().replace("-", "_")
    if key == "uniform":
        return np.ones(n_buckets)
    if key == "grow_linear":
        return np.arange(n_buckets, 0, -1, dtype=np.float64)
    if key == "grow_p2":
        return 2.0 ** np.arange(n_buckets - 1, -1, -1, dtype=np.float64)
    raise ValueError(
        f"curriculum.buckets.odds: unknown name {name!r}; allowed: {_choices(NAMED_ODDS)} or a list"
    )


def _check_odds(values, n_buckets: int, where: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or len(arr) != n_buckets:
        raise ValueError(
            f"{where}: expected {n_buckets} odds (one per bucket), got {list(np.atleast_1d(arr))}"
        )
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if len(bad):
        raise ValueError(f"{where}[{bad[0]}] = {arr[bad[0]]}: odds must be finite and >= 0")
    if arr.sum() <= 0:
        raise ValueError(f"{where}: odds must sum to a positive number, got {list(arr)}")
    return arr


# ----------------------------------------------------------------------------------------- bucket odds
@dataclass
class BucketCurriculum:
    """How likely each length bucket is to supply the next step.

    Args:
        odds: a named curriculum (``uniform``, ``grow_linear``, ``grow_p2``) or one non-negative
            weight per bucket, shortest bucket first.
        n_cycles: the data of every bucket is split into this many equal shares; cycle ``j`` only
            draws from its share, so short-to-long odds repeat ``n_cycles`` times over an epoch.
        weighting: ``odds`` draws bucket ``i`` with ``o_i / sum(o over non-empty buckets)`` (paper
            Algorithm 1); ``odds_by_mass`` multiplies each ``o_i`` by the tokens the bucket still
            holds in the cycle (the authors' code), so ``uniform`` then means uniform over tokens.
        table: optional ``[(at, odds), ...]`` rows sorted by ``at`` (progress units); the row with
            the largest ``at <= t`` is in effect (the first row before that). Overrides ``odds``.
        progress: ``steps`` or ``tokens``: the unit of ``t`` and of ``table``'s ``at``.
    """

    odds: str | Sequence[float] = "uniform"
    n_cycles: int = 1
    weighting: str = "odds"
    table: list[tuple[float, Sequence[float]]] | None = None
    progress: str = "steps"

    def __post_init__(self) -> None:
        if (
            isinstance(self.n_cycles, bool)
            or not isinstance(self.n_cycles, (int, np.integer))
            or self.n_cycles < 1
        ):
            raise ValueError(f"curriculum.buckets.n_cycles must be an integer >= 1, got {self.n_cycles!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"curriculum.buckets.weighting: {self.weighting!r} not allowed; "
                f"allowed: {_choices(WEIGHTINGS)}"
            )
        if self.progress not in PROGRESS_UNITS:
            raise ValueError(
                f"curriculum.progress: {self.progress!r} not allowed; allowed: {_choices(PROGRESS_UNITS)}"
            )
        if isinstance(self.odds, str):
            named_odds(self.odds, 1)  # validates the name
        if self.table is not None:
            ats = [float(at) for at, _ in self.table]
            if not ats:
                raise ValueError("curriculum.buckets.table: needs at least one row")
            if any(b < a for a, b in zip(ats, ats[1:])):
                raise ValueError(f"curriculum.buckets.table: 'at' must be non-decreasing, got {ats}")

    def odds_for(self, n_buckets: int) -> np.ndarray:
        """Static odds over ``n_buckets`` (ignores ``table``)."""
        if isinstance(self.odds, str):
            return named_odds(self.odds, n_buckets)
        return _check_odds(self.odds, n_buckets, "curriculum.buckets.odds")

    def check(self, n_buckets: int) -> None:
        """Raise if the odds (or any table row) do not fit ``n_buckets`` buckets."""
        self.odds_for(n_buckets)
        for r, (_, row) in enumerate(self.table or []):
            _check_odds(row, n_buckets, f"curriculum.buckets.table[{r}].odds")

    def odds_at(self, t: float, n_buckets: int) -> np.ndarray:
        """Raw (unnormalized) odds in effect at progress ``t``."""
        if not self.table:
            return self.odds_for(n_buckets)
        row = self.table[0][1]
        for at, odds in self.table:
            if at <= t:
                row = odds
        return _check_odds(row, n_buckets, "curriculum.buckets.table odds")


class BucketSampler:
    """Draws the bucket of every step (same sequence on every rank for the same seed).

    Args:
        batches: full batches available per bucket, int ``[n_buckets]`` (shortest bucket first).
            Cycle ``j`` owns ``batches[i] * (j+1) // n_cycles - batches[i] * j // n_cycles`` of them.
        curriculum: the odds.
        seed: seeds the shared RNG (numpy PCG64).

    A drawn bucket is always non-empty in the current cycle: odds are renormalized over the buckets
    that still have batches in it (``stats["renormalized_draws"]`` counts draws where a bucket with
    positive odds was empty). If every non-empty bucket has zero odds, the draw falls back to
    weighting by remaining batches (``stats["zero_odds_fallbacks"]``) so no data is stranded. A cycle
    ends when its share is used up; ``next`` returns ``None`` after the last cycle.
    """

    def __init__(
        self,
        batches: Sequence[int] | np.ndarray,
        curriculum: BucketCurriculum | None = None,
        *,
        seed: int = 0,
    ):
        batches = np.asarray(batches, np.int64)
        if batches.ndim != 1 or (batches < 0).any():
            raise ValueError(f"batches must be a 1-D array of counts >= 0, got {batches}")
        self.curriculum = curriculum or BucketCurriculum()
        self.curriculum.check(len(batches))
        c = self.curriculum.n_cycles
        cuts = np.stack([batches * j // c for j in range(c + 1)])  # [c+1, n_buckets]
        self.remaining = (cuts[1:] - cuts[:-1]).astype(np.int64)  # [n_cycles, n_buckets]
        self.cycle = 0
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.stats = {"draws": 0, "renormalized_draws": 0, "zero_odds_fallbacks": 0}

    @property
    def n_buckets(self) -> int:
        return self.remaining.shape[1]

    @property
    def steps_left(self) -> int:
        return int(self.remaining[self.cycle :].sum())

    def probabilities(self, t: float) -> np.ndarray | None:
        """Draw probabilities over buckets at progress ``t`` in the current cycle (None when done)."""
        while self.cycle < len(self.remaining) and self.remaining[self.cycle].sum() == 0:
            self.cycle += 1
        if self.cycle >= len(self.remaining):
            return None
        left = self.remaining[self.cycle]
        odds = self.curriculum.odds_at(t, self.n_buckets)
        weights = odds * (left > 0)
        if self.curriculum.weighting == "odds_by_mass":
            weights = weights * left  # every batch holds the same tokens, so mass ∝ batches left
        if weights.sum() <= 0:
            return left / left.sum()
        return weights / weights.sum()

    def next(self, t: float = 0.0) -> int | None:
        """Draw the bucket index of the next step at progress ``t``; ``None`` when every cycle is used."""
        p = self.probabilities(t)
        if p is None:
            return None
        left = self.remaining[self.cycle]
        odds = self.curriculum.odds_at(t, self.n_buckets)
        if ((odds > 0) & (left == 0)).any():
            self.stats["renormalized_draws"] += 1
        if (odds * (left > 0)).sum() <= 0:
            self.stats["zero_odds_fallbacks"] += 1
        # inverse CDF on one uniform: the RNG consumes exactly one double per step, whatever p is
        i = int(np.searchsorted(np.cumsum(p), self.rng.random() * p.sum(), side="right"))
        i = min(i, self.n_buckets - 1)
        while p[i] == 0:  # guard against float edge at the top of the CDF
            i -= 1
        self.remaining[self.cycle, i] -= 1
        self.stats["draws"] += 1
        return i

    def state_dict(self) -> dict:
        return {
            "remaining": self.remaining.tolist(),
            "cycle": self.cycle,
            "rng": self.rng.bit_generator.state,
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: Mapping) -> None:
        remaining = np.asarray(state["remaining"], np.int64)
        if remaining.shape != self.remaining.shape:
            raise ValueError(
                f"state has cycles x buckets {remaining.shape}, sampler has {self.remaining.shape}"
            )
        self.remaining = remaining
        self.cycle = int(state["cycle"])
        self.rng.bit_generator.state = state["rng"]
        self.stats = dict(state["stats"])


# ----------------------------------------------------------------------------------- max-length schedules
@dataclass
class SeqlenSchedule:
    """Maximum sequence length as a function of progress ``t`` (DeepSpeed ``seqlen`` curriculum keys).

    ``fixed_root``: ``d = floor((t/T)^(1/root_degree) * (max-min) + min)``, ``d -= d % difficulty_step``,
    ``d = min(d, max)`` with ``T = total_curriculum_step``; ``fixed_linear`` is ``root_degree = 1``;
    ``fixed_discrete``: ``difficulty[i]`` while ``t <= max_step[i]``, then the last difficulty
    (``max_step`` is one shorter than ``difficulty``). ``t`` is in steps or tokens (see ``progress``).
    ``min_difficulty`` must be a multiple of ``difficulty_step`` so rounding never goes below it.
    """

    min_difficulty: int = 0
    max_difficulty: int = 0
    schedule_type: str = "fixed_linear"
    total_curriculum_step: int | None = None
    difficulty_step: int = 1
    root_degree: int = 1
    difficulty: list[int] = field(default_factory=list)
    max_step: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        where = "curriculum.seqlen"
        if self.schedule_type not in SCHEDULE_TYPES:
            raise ValueError(
                f"{where}.schedule_type: {self.schedule_type!r} not allowed; "
                f"allowed: {_choices(SCHEDULE_TYPES)}"
            )
        if self.schedule_type == "fixed_discrete":
            if not self.difficulty or any(int(d) <= 0 for d in self.difficulty):
                raise ValueError(
                    f"{where}.schedule_config.difficulty: a non-empty list of positive lengths, "
                    f"got {self.difficulty}"
                )
            if len(self.max_step) != len(self.difficulty) - 1:
                raise ValueError(
                    f"{where}.schedule_config.max_step: needs len(difficulty)-1 = {len(self.difficulty) - 1} "
                    f"entries, got {len(self.max_step)}"
                )
            if any(b <= a for a, b in zip(self.max_step, self.max_step[1:])):
                raise ValueError(
                    f"{where}.schedule_config.max_step: must be strictly increasing, got {self.max_step}"
                )
            return
        for key in ("min_difficulty", "max_difficulty", "difficulty_step", "root_degree"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                sub = "schedule_config." if key in ("difficulty_step", "root_degree") else ""
                raise ValueError(f"{where}.{sub}{key}: must be a positive integer, got {v!r}")
        if self.max_difficulty < self.min_difficulty:
            raise ValueError(
                f"{where}.max_difficulty ({self.max_difficulty}) must be >= "
                f"min_difficulty ({self.min_difficulty})"
            )
        if self.min_difficulty % self.difficulty_step:
            raise ValueError(
                f"{where}.min_difficulty ({self.min_difficulty}) must be a multiple of "
                f"schedule_config.difficulty_step ({self.difficulty_step})"
            )
        if self.total_curriculum_step is None or self.total_curriculum_step <= 0:
            raise ValueError(
                f"{where}.schedule_config.total_curriculum_step: must be a positive number, "
                f"got {self.total_curriculum_step!r}"
            )
        if self.schedule_type == "fixed_linear" and self.root_degree != 1:
            raise ValueError(
                f"{where}.schedule_config.root_degree: fixed_linear means 1, got {self.root_degree}"
            )

    @property
    def peak(self) -> int:
        """The longest length the schedule ever returns."""
        return max(self.difficulty) if self.schedule_type == "fixed_discrete" else int(self.max_difficulty)

    def __call__(self, t: float) -> int:
        if self.schedule_type == "fixed_discrete":
            for d, until in zip(self.difficulty, self.max_step):
                if t <= until:
                    return int(d)
            return int(self.difficulty[-1])
        frac = (max(float(t), 0.0) / self.total_curriculum_step) ** (1.0 / self.root_degree)
        d = math.floor(frac * (self.max_difficulty - self.min_difficulty) + self.min_difficulty)
        d -= d % self.difficulty_step
        return int(min(d, self.max_difficulty))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SeqlenSchedule:
        """From DeepSpeed-style keys: ``min_difficulty``, ``max_difficulty``, ``schedule_type``,
        ``schedule_config: {total_curriculum_step, difficulty_step, root_degree, difficulty, max_step}``."""
        where = "curriculum.seqlen"
        _only_keys(
            cfg, ("min_difficulty", "max_difficulty", "schedule_type", "schedule_config", "mode"), where
        )
        sc = cfg.get("schedule_config", {}) or {}
        if not isinstance(sc, Mapping):
            raise ValueError(f"{where}.schedule_config: must be a table/mapping, got {type(sc).__name__}")
        _only_keys(
            sc,
            ("total_curriculum_step", "difficulty_step", "root_degree", "difficulty", "max_step"),
            f"{where}.schedule_config",
        )
        stype = cfg.get("schedule_type", "fixed_linear")
        return cls(
            min_difficulty=cfg.get("min_difficulty", 0 if stype == "fixed_discrete" else None),
            max_difficulty=cfg.get("max_difficulty", 0 if stype == "fixed_discrete" else None),
            schedule_type=stype,
            total_curriculum_step=sc.get("total_curriculum_step"),
            difficulty_step=sc.get("difficulty_step", 1),
            root_degree=sc.get("root_degree", 1),
            difficulty=list(sc.get("difficulty", [])),
            max_step=list(sc.get("max_step", [])),
        )


class ResumableDocs:
    """A document source that resumes exactly: a sequence (by index) or an iterable with
    ``state_dict``/``load_state_dict`` (e.g. a loader document node).

    ``next_doc`` counts the documents taken so far (also their ids when the source has none).
    """

    def __init__(self, docs):
        self.docs = docs
        self.random_access = isinstance(docs, Sequence)
        self._iter = None
        self.next_doc = 0

    def pull(self):
        """The next raw item, or None at the end; the caller counts it in ``next_doc``."""
        if self.random_access:
            return self.docs[self.next_doc] if self.next_doc < len(self.docs) else None
        if self._iter is None:
            self._iter = iter(self.docs)
        return next(self._iter, None)

    def save_into(self, state: dict) -> dict:
        """Add ``next_doc`` (and the iterable's own ``source`` state) to ``state``."""
        state["next_doc"] = self.next_doc
        if not self.random_access:
            if not hasattr(self.docs, "state_dict"):
                raise TypeError(
                    "resume needs docs to be a Sequence or to have state_dict()/load_state_dict()"
                )
            state["source"] = self.docs.state_dict()
        return state

    def restore_from(self, state: Mapping) -> None:
        self.next_doc = int(state["next_doc"])
        if not self.random_access:
            self.docs.load_state_dict(state["source"])
            self._iter = None


class SeqlenCurriculum:
    """Apply a max-length schedule to a document stream, one VarlenBatch per optimizer step.

    At step ``s`` the length is ``L = schedule(t)`` (``t`` = steps done, or tokens emitted so far).
    The step holds ``rows = tokens_per_step // L`` rows of at most ``L`` tokens (constant tokens per
    step), or ``batch_size`` rows when given (DeepSpeed style: tokens per step grow with ``L``).

    Modes:
        ``pack``: documents are split into pieces of at most ``L`` and packed best-fit into rows of
            capacity ``L`` with document masks (:class:`~seqpack.plan.OnlinePacker`); no
            token is lost and no token attends across documents.
        ``truncate``: each row is one document cut to ``L``; the cut tokens are counted in
            ``stats["truncated_tokens"]``.
        ``reshape``: the documents are concatenated and regrouped into rows of exactly ``L``
            (concat-and-chunk: a row may span documents and attends across them); the tail carries
            over to the next step.

    ``docs`` is a sequence of 1-D int token arrays (resume by index) or an iterable with
    ``state_dict``/``load_state_dict``. Documents should carry their EOT token. ``pad=True`` pads each
    step to ``rows * L`` tokens (a final padding segment) for fixed shapes.
    """

    def __init__(
        self,
        docs: Sequence[np.ndarray] | Iterable[np.ndarray],
        schedule: SeqlenSchedule,
        *,
        tokens_per_step: int | None = None,
        batch_size: int | None = None,
        mode: str = "pack",
        progress: str = "steps",
        pad: bool = False,
        pad_id: int = 0,
        buffer_docs: int = 256,
    ):
        if mode not in LENGTH_MODES:
            raise ValueError(
                f"curriculum.seqlen.mode: {mode!r} not allowed; allowed: {_choices(LENGTH_MODES)}"
            )
        if progress not in PROGRESS_UNITS:
            raise ValueError(
                f"curriculum.progress: {progress!r} not allowed; allowed: {_choices(PROGRESS_UNITS)}"
            )
        if (tokens_per_step is None) == (batch_size is None):
            raise ValueError("give exactly one of tokens_per_step (constant tokens per step) or batch_size")
        if tokens_per_step is not None and tokens_per_step < schedule.peak:
            raise ValueError(
                f"tokens_per_step={tokens_per_step} is below the schedule's longest length {schedule.peak}"
            )
        self.schedule = schedule
        self.tokens_per_step = tokens_per_step
        self.batch_size = batch_size
        self.mode = mode
        self.progress = progress
        self.pad = pad
        self.pad_id = pad_id
        self.buffer_docs = buffer_docs
        self.source = ResumableDocs(docs)
        self.step = 0
        self.tokens_seen = 0
        # pending items: [doc_id, start, tokens] waiting for a row (pieces not yet emitted)
        self._pending: list[tuple[int, int, np.ndarray]] = []
        self.stats = {"truncated_tokens": 0, "emitted_tokens": 0, "input_tokens": 0}
        # a stream serving every step_stride-th step of a rank (a loader worker) follows the rank's step
        self.step_stride, self.step_offset = 1, 0
        self._last_id = 0

    # ---------------------------------------------------------------- source
    def _pull(self) -> np.ndarray | None:
        doc = self.source.pull()
        if doc is None:
            return None
        self._last_id = self.source.next_doc
        if hasattr(doc, "tokens"):  # a Document (loader stage): keep its global id
            self._last_id = int(doc.doc_id)
            mask = getattr(doc, "loss_mask", None)
            if mask is not None and not np.asarray(mask, bool).all():
                raise ValueError(
                    f"document {doc.doc_id}: has a loss mask, which the seqlen curriculum does not carry "
                    "(rows may be cut or reshaped); use stage type 'pack' or 'bucket' for masked data"
                )
            doc = doc.tokens
        arr = np.asarray(doc)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(
                f"document {self._last_id}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}"
            )
        self.source.next_doc += 1
        self.stats["input_tokens"] += len(arr)
        return arr.astype(np.int64, copy=False)

    def current_length(self) -> int:
        stride = self.step_stride
        t = self.step * stride + self.step_offset if self.progress == "steps" else self.tokens_seen * stride
        return self.schedule(t)

    def _rows(self, L: int) -> int:
        return self.batch_size if self.batch_size is not None else max(1, self.tokens_per_step // L)

    # ---------------------------------------------------------------- steps
    def __iter__(self) -> Iterator[VarlenBatch]:
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    def next_batch(self) -> VarlenBatch | None:
        """The next step's batch, or ``None`` at the end of the stream."""
        L = self.current_length()
        rows = self._rows(L)
        if self.mode == "truncate":
            segs = self._truncate_rows(L, rows)
        elif self.mode == "reshape":
            segs = self._reshape_rows(L, rows)
        else:
            segs = self._packed_rows(L, rows)
        if not segs:
            return None
        n_tok = sum(len(t) for _, _, t in segs)
        batch = VarlenBatch.from_segments(
            [t for _, _, t in segs],
            [d for d, _, _ in segs],
            seg_start=[s for _, s, _ in segs],
            pad_to=rows * L if self.pad and n_tok < rows * L else None,
            pad_id=self.pad_id,
        )
        self.step += 1
        self.tokens_seen += n_tok
        self.stats["emitted_tokens"] += n_tok
        return batch

    def _truncate_rows(self, L, rows):
        segs = []
        while len(segs) < rows:
            if self._pending:
                d, s, toks = self._pending.pop(0)
            else:
                arr = self._pull()
                if arr is None:
                    break
                d, s, toks = self._last_id, 0, arr
            if len(toks) == 0:
                continue
            self.stats["truncated_tokens"] += max(0, len(toks) - L)
            segs.append((d, s, toks[:L]))
        return segs

    def _reshape_rows(self, L, rows):
        segs = []
        need = rows * L
        # the row is one segment that may span documents; it takes the id/offset of its first token
        row_parts: list[tuple[int, int, np.ndarray]] = []
        row_len = 0
        while need > 0:
            if not self._pending:
                arr = self._pull()
                if arr is None:
                    break
                if len(arr):
                    self._pending.append((self._last_id, 0, arr))
                continue
            d, s, toks = self._pending[0]
            take = min(len(toks), L - row_len, need)
            row_parts.append((d, s, toks[:take]))
            row_len += take
            need -= take
            if take == len(toks):
                self._pending.pop(0)
            else:
                self._pending[0] = (d, s + take, toks[take:])
            if row_len == L:
                segs.append((row_parts[0][0], row_parts[0][1], np.concatenate([p for _, _, p in row_parts])))
                row_parts, row_len = [], 0
        if row_parts:  # end of stream: a short last row
            segs.append((row_parts[0][0], row_parts[0][1], np.concatenate([p for _, _, p in row_parts])))
        return segs

    def _packed_rows(self, L, rows):
        from seqpack.plan import OnlinePacker

        # Pieces longer than the current L (left from a longer earlier L) are re-split first.
        items: list[tuple[int, int, np.ndarray]] = []
        for d, s, toks in self._pending:
            items.extend((d, s + o, toks[o : o + L]) for o in range(0, len(toks), L))
        have = sum(len(t) for _, _, t in items)
        while have < rows * L or len(items) < self.buffer_docs:
            arr = self._pull()
            if arr is None:
                break
            d = self._last_id
            items.extend((d, o, arr[o : o + L]) for o in range(0, len(arr), L))
            have += len(arr)
        if not items:
            self._pending = []
            return []
        # Best-fit over the whole window, then keep the fullest `rows` bins (oldest items break ties);
        # the rest wait for the next step.
        packer = OnlinePacker(L, buffer_docs=len(items) + 1, min_fill=0.0)
        packer.add_many(
            np.arange(len(items), dtype=np.int64), np.array([len(t) for _, _, t in items], np.int64)
        )
        bins = packer.flush()
        loads = np.array([sum(len(items[k][2]) for k in b) for b in bins])
        order = sorted(range(len(bins)), key=lambda b: (-loads[b], int(bins[b].min())))
        chosen = sorted(order[:rows], key=lambda b: int(bins[b].min()))
        used = set()
        segs = []
        for b in chosen:
            for k in bins[b]:
                segs.append(items[int(k)])
                used.add(int(k))
        self._pending = [it for k, it in enumerate(items) if k not in used]
        return segs

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "pending": [(int(d), int(s), t.tolist()) for d, s, t in self._pending],
            "stats": dict(self.stats),
        }
        return self.source.save_into(state)

    def load_state_dict(self, state: Mapping) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self._pending = [(int(d), int(s), np.asarray(t, np.int64)) for d, s, t in state["pending"]]
        self.stats = dict(state["stats"])
        self.source.restore_from(state)


# ------------------------------------------------------------------------------------------------ config
@dataclass
class DecomposeConfig:
    """``curriculum.decompose``: see :func:`seqpack.stages.decompose.decompose_lengths`."""

    min_log2: int = 8
    max_log2: int = 13
    overlong: str = "random"
    remainder: str = "drop"
    pad_to_fixed: bool = False


@dataclass
class CurriculumConfig:
    """The validated ``curriculum:`` section."""

    progress: str = "steps"
    tokens_per_step: int | None = None
    seed: int = 0
    decompose: DecomposeConfig | None = None
    buckets: BucketCurriculum | None = None
    boundaries: list[int] | None = None
    seqlen: SeqlenSchedule | None = None
    seqlen_mode: str = "pack"

    def to_dict(self) -> dict:
        return asdict(self)


_TOP_KEYS = ("progress", "tokens_per_step", "seed", "decompose", "buckets", "boundaries", "seqlen")


def _only_keys(cfg: Mapping, allowed: Sequence[str], where: str) -> None:
    for key in cfg:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}; allowed keys: {_choices(allowed)}")


def _int_key(cfg: Mapping, key: str, where: str, default, minimum: int | None = None):
    v = cfg.get(key, default)
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}.{key}: must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{where}.{key}: must be >= {minimum}, got {v}")
    return v


def parse_curriculum_config(cfg: Mapping[str, Any] | None) -> CurriculumConfig:
    """Validate the ``curriculum:`` section of a loader config (already parsed from YAML/TOML).

    Keys: ``progress`` (steps|tokens), ``tokens_per_step``, ``seed``, ``decompose`` {min_log2,
    max_log2, overlong: random|cap, remainder: drop|emit, pad_to_fixed}, ``buckets`` {odds: name or
    list, n_cycles, weighting: odds|odds_by_mass, table: [{at, odds}]}, ``boundaries`` (plain length
    bucketing), ``seqlen`` {DeepSpeed keys + mode: pack|truncate|reshape}. Errors name the key and
    the allowed values.
    """
    cfg = dict(cfg or {})
    where = "curriculum"
    _only_keys(cfg, _TOP_KEYS, where)
    progress = cfg.get("progress", "steps")
    if progress not in PROGRESS_UNITS:
        raise ValueError(
            f"curriculum.progress: {progress!r} not allowed; allowed: {_choices(PROGRESS_UNITS)}"
        )
    out = CurriculumConfig(
        progress=progress,
        tokens_per_step=_int_key(cfg, "tokens_per_step", where, None, 1),
        seed=_int_key(cfg, "seed", where, 0, 0),
    )
    if "decompose" in cfg:
        d = cfg["decompose"] or {}
        w = "curriculum.decompose"
        _only_keys(d, ("min_log2", "max_log2", "overlong", "remainder", "pad_to_fixed"), w)
        dc = DecomposeConfig(
            min_log2=_int_key(d, "min_log2", w, 8, 0),
            max_log2=_int_key(d, "max_log2", w, 13, 0),
            overlong=d.get("overlong", "random"),
            remainder=d.get("remainder", "drop"),
            pad_to_fixed=bool(d.get("pad_to_fixed", False)),
        )
        if dc.max_log2 < dc.min_log2:
            raise ValueError(f"{w}.max_log2 ({dc.max_log2}) must be >= min_log2 ({dc.min_log2})")
        if dc.max_log2 > 40:
            raise ValueError(f"{w}.max_log2: must be <= 40, got {dc.max_log2}")
        if dc.overlong not in ("random", "cap"):
            raise ValueError(f"{w}.overlong: {dc.overlong!r} not allowed; allowed: 'random', 'cap'")
        if dc.remainder not in ("drop", "emit"):
            raise ValueError(f"{w}.remainder: {dc.remainder!r} not allowed; allowed: 'drop', 'emit'")
        if out.tokens_per_step is not None and out.tokens_per_step % (1 << dc.max_log2):
            raise ValueError(
                f"curriculum.tokens_per_step ({out.tokens_per_step}) must be divisible by the largest bucket "
                f"2^max_log2 = {1 << dc.max_log2}"
            )
        out.decompose = dc
    if "boundaries" in cfg:
        b = cfg["boundaries"]
        if (
            not isinstance(b, list)
            or not b
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in b)
        ):
            raise ValueError(f"curriculum.boundaries: a non-empty list of positive integers, got {b!r}")
        if any(y <= x for x, y in zip(b, b[1:])):
            raise ValueError(f"curriculum.boundaries: must be strictly increasing, got {b}")
        out.boundaries = list(b)
    if "buckets" in cfg:
        bc = cfg["buckets"] or {}
        w = "curriculum.buckets"
        _only_keys(bc, ("odds", "n_cycles", "weighting", "table"), w)
        odds = bc.get("odds", "uniform")
        if not isinstance(odds, (str, list)):
            raise ValueError(f"{w}.odds: a name ({_choices(NAMED_ODDS)}) or a list of numbers, got {odds!r}")
        table = None
        if "table" in bc:
            if not isinstance(bc["table"], list):
                raise ValueError(f"{w}.table: a list of {{at, odds}} rows, got {bc['table']!r}")
            table = []
            for r, row in enumerate(bc["table"]):
                if not isinstance(row, Mapping) or set(row) != {"at", "odds"}:
                    raise ValueError(
                        f"{w}.table[{r}]: each row needs exactly the keys 'at' and 'odds', got {row!r}"
                    )
                table.append((float(row["at"]), list(row["odds"])))
        out.buckets = BucketCurriculum(
            odds=odds,
            n_cycles=bc.get("n_cycles", 1),
            weighting=bc.get("weighting", "odds"),
            table=table,
            progress=progress,
        )
        n = None
        if out.decompose is not None:
            n = out.decompose.max_log2 - out.decompose.min_log2 + 1
        elif out.boundaries is not None:
            n = len(out.boundaries)
        if n is not None:
            out.buckets.check(n)
        elif not isinstance(odds, str):
            _check_odds(odds, len(odds), f"{w}.odds")
    if "seqlen" in cfg:
        s = cfg["seqlen"] or {}
        if not isinstance(s, Mapping):
            raise ValueError(f"curriculum.seqlen: must be a table/mapping, got {type(s).__name__}")
        out.seqlen = SeqlenSchedule.from_config(s)
        out.seqlen_mode = s.get("mode", "pack")
        if out.seqlen_mode not in LENGTH_MODES:
            raise ValueError(
                f"curriculum.seqlen.mode: {out.seqlen_mode!r} not allowed; allowed: {_choices(LENGTH_MODES)}"
            )
    return out


def load_curriculum_config(path: str | Path) -> CurriculumConfig:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) loader config and validate its ``curriculum:``."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from e
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from e
    else:
        raise ValueError(f"{path}: config must end in .yaml, .yml or .toml")
    if not isinstance(data, Mapping) or "curriculum" not in data:
        raise ValueError(f"{path}: no 'curriculum:' section")
    try:
        return parse_curriculum_config(data["curriculum"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# -------------------------------------------------------------------------------------------------- plot
def simulate_bucket_draws(cfg: CurriculumConfig, steps: int) -> tuple[list[int], np.ndarray]:
    """Bucket draws over ``steps`` for a corpus with equal token mass per bucket (for plotting).

    Returns ``(bucket_log2s, drawn [steps])`` (-1 once the simulated epoch is used up).
    """
    if cfg.decompose is not None:
        log2s = list(range(cfg.decompose.min_log2, cfg.decompose.max_log2 + 1))
    elif cfg.boundaries is not None:
        log2s = list(cfg.boundaries)
    else:
        raise ValueError("curriculum: plotting bucket odds needs 'decompose' or 'boundaries'")
    n = len(log2s)
    batches = np.full(n, steps // n, np.int64)
    batches[: steps - batches.sum()] += 1
    sampler = BucketSampler(batches, cfg.buckets or BucketCurriculum(progress=cfg.progress), seed=cfg.seed)
    tps = cfg.tokens_per_step or 1
    drawn = np.full(steps, -1, np.int64)
    for s in range(steps):
        i = sampler.next(s if cfg.progress == "steps" else s * tps)
        if i is None:
            break
        drawn[s] = i
    return log2s, drawn


def plot_curriculum(cfg: CurriculumConfig, steps: int, out: str | Path) -> Path:
    """Draw bucket odds (rolling draw frequency) and/or the max length over ``steps`` into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if cfg.buckets is not None or cfg.decompose is not None:
        panels.append("buckets")
    if cfg.seqlen is not None:
        panels.append("seqlen")
    if not panels:
        raise ValueError("curriculum: nothing to plot (no 'buckets'/'decompose' and no 'seqlen')")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    x = np.arange(steps)
    unit = cfg.progress
    for ax, panel in zip(axes[:, 0], panels):
        if panel == "buckets":
            log2s, drawn = simulate_bucket_draws(cfg, steps)
            window = max(1, steps // 50)
            kernel = np.ones(window) / window
            freqs = [np.convolve((drawn == i).astype(float), kernel, mode="same") for i in range(len(log2s))]
            label = (lambda v: f"D{v} (2^{v})") if cfg.decompose is not None else (lambda v: f"<= {v}")
            ax.stackplot(x, freqs, labels=[label(v) for v in log2s])
            ax.set_ylabel(f"bucket share\n(rolling {window} steps)")
            ax.set_ylim(0, 1)
            cyc = cfg.buckets.n_cycles if cfg.buckets else 1
            odds = cfg.buckets.odds if cfg.buckets else "uniform"
            ax.set_title(f"bucket draws: odds={odds}, n_cycles={cyc} (equal token mass per bucket)")
            ax.legend(loc="upper right", fontsize=7, ncol=2)
        else:
            tps = cfg.tokens_per_step or 1
            t = x if unit == "steps" else x * tps
            ax.plot(x, [cfg.seqlen(v) for v in t])
            ax.set_ylabel("max sequence length")
            ax.set_title(f"max length: {cfg.seqlen.schedule_type}")
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _cmd_plot(args) -> int:
    cfg = load_curriculum_config(args.config)
    path = plot_curriculum(cfg, args.steps, args.output)
    print(f"wrote {path}")
    return 0


def add_subcommand(subparsers) -> None:
    """``seqpack curriculum plot CONFIG --steps N -o out.png``."""
    p = subparsers.add_parser("curriculum", help="length curricula: plot a config's schedules")
    sub = p.add_subparsers(dest="curriculum_command", required=True)
    plot = sub.add_parser("plot", help="draw bucket odds / max length over training")
    plot.add_argument("config", help="loader config (.yaml/.yml/.toml) with a curriculum: section")
    plot.add_argument("--steps", type=int, required=True, help="optimizer steps to draw")
    plot.add_argument("-o", "--output", default="curriculum.png", help="PNG path")
    plot.set_defaults(func=_cmd_plot)


# ------------------------------------------------------------------------------------------ loader stage
SEQLEN_STAGE_KEYS = ("type", "tokens_per_step", "batch_size", "pad", "buffer_docs")


def validate_seqlen_stage(cfg: dict, base_dir: str | None = None) -> dict:
    """Check ``stage: {type: seqlen}``: the schedule is ``curriculum.seqlen`` (with ``mode``)."""
    stage = dict(cfg["stage"])
    _only_keys({k: v for k, v in stage.items()}, SEQLEN_STAGE_KEYS, "stage (type 'seqlen')")
    raw = cfg.get("curriculum") or {}
    cur = parse_curriculum_config(raw)
    if cur.seqlen is None:
        raise ValueError("curriculum.seqlen: the 'seqlen' stage needs a max-length schedule there")
    tps = stage.get("tokens_per_step")
    if tps is not None and cur.tokens_per_step is not None and tps != cur.tokens_per_step:
        raise ValueError(
            f"stage.tokens_per_step ({tps}) and curriculum.tokens_per_step ({cur.tokens_per_step}) disagree"
        )
    out = {"type": "seqlen", "tokens_per_step": tps if tps is not None else cur.tokens_per_step}
    out["batch_size"] = _int_key(stage, "batch_size", "stage", None, 1)
    out["buffer_docs"] = _int_key(stage, "buffer_docs", "stage", 256, 1)
    out["pad"] = stage.get("pad", False)
    if not isinstance(out["pad"], bool):
        raise ValueError(f"stage.pad: expected true or false, got {out['pad']!r}")
    _make_seqlen([], out, cur)  # every remaining check (one of tokens_per_step / batch_size, peak length)
    return {**cfg, "stage": out}


def _make_seqlen(source, stage: Mapping, cur: CurriculumConfig, stride: int = 1, offset: int = 0, pad_id=0):
    stream = SeqlenCurriculum(
        source,
        cur.seqlen,
        tokens_per_step=stage["tokens_per_step"],
        batch_size=stage["batch_size"],
        mode=cur.seqlen_mode,
        progress=cur.progress,
        pad=stage["pad"],
        pad_id=pad_id,
        buffer_docs=stage["buffer_docs"],
    )
    stream.step_stride, stream.step_offset = stride, offset
    return stream


def seqlen_factory(docs, stage: dict, ctx):
    """Loader factory: :class:`SeqlenCurriculum` over the consumer's documents (state nested)."""
    from seqpack.stages.decompose import StreamStage

    cur = parse_curriculum_config(ctx.config.get("curriculum"))
    return StreamStage(
        docs, lambda src: _make_seqlen(src, stage, cur, ctx.num_workers, ctx.worker_id, ctx.pad_id), "seqlen"
    )
