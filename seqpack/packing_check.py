"""Moved to :mod:`seqpack.train.checks`. Temporary re-exports so ``seqpack/__init__.py`` keeps importing
until the merge points it at the new module; delete this file then."""

from seqpack.train.checks import (  # noqa: F401
    PackingError,
    PackingReport,
    assert_packing_safe,
    check_packing,
    install_packing_guard,
)
