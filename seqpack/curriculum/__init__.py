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

from seqpack.curriculum.config import (
    CurriculumConfig,
    DecomposeConfig,
    load_curriculum_config,
    parse_curriculum_config,
)
from seqpack.curriculum.odds import (
    NAMED_ODDS,
    PROGRESS_UNITS,
    WEIGHTINGS,
    BucketCurriculum,
    BucketSampler,
    named_odds,
)
from seqpack.curriculum.plot import add_subcommand, plot_curriculum, simulate_bucket_draws
from seqpack.curriculum.schedule import LENGTH_MODES, SCHEDULE_TYPES, SeqlenSchedule

__all__ = ["CurriculumConfig", "DecomposeConfig", "load_curriculum_config", "parse_curriculum_config"]
__all__ += ["NAMED_ODDS", "PROGRESS_UNITS", "WEIGHTINGS", "BucketCurriculum", "BucketSampler", "named_odds"]
__all__ += ["add_subcommand", "plot_curriculum", "simulate_bucket_draws"]
__all__ += ["LENGTH_MODES", "SCHEDULE_TYPES", "SeqlenSchedule"]
