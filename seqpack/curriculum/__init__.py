"""Length curricula over training progress, and their config.

Two families, both functions of progress ``t`` (optimizer steps, or tokens seen):

- **Bucket odds** (``odds.py``; dataset decomposition, Pouransari et al. Algorithm 1):
  :class:`BucketCurriculum` says how likely each length bucket is to supply the next step;
  :class:`BucketSampler` draws the bucket of every step from a seeded RNG shared by all ranks.
- **Max-length schedules** (``schedule.py``; sequence-length warmup, Li et al.; DeepSpeed
  ``curriculum_learning`` with ``curriculum_type: seqlen``): :class:`SeqlenSchedule` maps ``t`` to a
  maximum length. The stage that applies it to a document stream is
  :class:`seqpack.stages.seqlen.SeqlenCurriculum`.

Config (``config.py``): the ``curriculum:`` section of a loader config, checked by
:func:`parse_curriculum_config`. ``plot.py``: ``seqpack curriculum plot CONFIG --steps N -o out.png``.
This package imports no stage: the stages import it.
"""

from seqpack.lazy import lazy_exports

# defining module -> the public names it gives, imported on first access (seqpack/lazy.py)
_SOURCES: dict[str, tuple[str, ...]] = {
    "seqpack.curriculum.config": (
        "CurriculumConfig", "DecomposeConfig", "load_curriculum_config", "parse_curriculum_config",
    ),
    "seqpack.curriculum.odds": (
        "NAMED_ODDS", "PROGRESS_UNITS", "WEIGHTINGS", "BucketCurriculum", "BucketSampler", "named_odds",
    ),
    "seqpack.curriculum.plot": ("add_subcommand", "plot_curriculum", "simulate_bucket_draws"),
    "seqpack.curriculum.schedule": ("LENGTH_MODES", "SCHEDULE_TYPES", "SeqlenSchedule"),
}
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)

__all__ = ["CurriculumConfig", "DecomposeConfig", "load_curriculum_config", "parse_curriculum_config"]
__all__ += ["NAMED_ODDS", "PROGRESS_UNITS", "WEIGHTINGS", "BucketCurriculum", "BucketSampler", "named_odds"]
__all__ += ["add_subcommand", "plot_curriculum", "simulate_bucket_draws"]
__all__ += ["LENGTH_MODES", "SCHEDULE_TYPES", "SeqlenSchedule"]
