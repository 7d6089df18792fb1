"""Pure planners: document lengths in, plans out (numpy and numba only, never torch).

``overflow`` (what happens to a document longer than a bin), ``pack`` (:class:`PackPlan` and
:func:`pack`), ``online`` (the bounded-buffer :class:`OnlinePacker` shared with the streaming stage).
"""

from seqpack.plan.online import OnlinePacker
from seqpack.plan.overflow import (
    LENGTH_OVERFLOW,
    OVERFLOW_POLICIES,
    PACK_OVERFLOW,
    TURN_OVERFLOW,
    expand_overflow,
    split_at_turns,
)
from seqpack.plan.pack import (
    ALGORITHMS,
    PackPlan,
    assign_bins,
    csr_from_assignment,
    group_ids,
    pack,
)

__all__ = ["ALGORITHMS", "LENGTH_OVERFLOW", "OVERFLOW_POLICIES", "PACK_OVERFLOW", "TURN_OVERFLOW"]
__all__ += ["OnlinePacker", "PackPlan", "assign_bins", "csr_from_assignment", "expand_overflow"]
__all__ += ["group_ids", "pack", "split_at_turns"]
