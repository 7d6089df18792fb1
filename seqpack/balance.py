"""Moved: the planner to :mod:`seqpack.plan_balance`, the loader side to :mod:`seqpack.stages.balance`.

Temporary re-exports so ``seqpack/__init__.py`` keeps importing until the merge points it at the new
modules; delete this file then.
"""

from seqpack.plan_balance import (  # noqa: F401
    METHODS,
    CostModel,
    RankAssignment,
    assign_ranks,
    imbalance,
    num_steps,
    split_ranks,
    step_imbalance,
)
from seqpack.stages.balance import RankBalance, balance_batches, balance_transform, empty_batch  # noqa: F401
