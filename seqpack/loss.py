"""Moved to :mod:`seqpack.train.loss`. Temporary re-exports so ``seqpack/__init__.py`` keeps importing
until the merge points it at the new module; delete this file then."""

from seqpack.train.loss import (  # noqa: F401
    count_doc_targets,
    loss_normalizer,
    loss_weights,
    packed_loss,
    step_normalizer,
    with_loss_weights,
)
