"""Stages: Nodes that turn a consumer's documents into batches, and the one registry of them.

``stage: {type: NAME, ...}`` in a loader config picks ``STAGES[NAME]``; a non-null top-level
section named in ``TRANSFORMS`` (``balance:``) wraps the stage's batch node. Add a stage by writing
a module here with ``factory(docs, stage_cfg, ctx)``, optional ``padding(stage_cfg, ctx, last)``
and ``validate(cfg, base_dir)``, and one line in ``STAGES`` below (or call :func:`register_stage`
from your own code).
"""

from __future__ import annotations

from seqpack.stages import balance, bucket, chunkflow, decompose, mil, pack, pack_config, packed_rows, seqlen
from seqpack.stages.context import (
    ConfigValidator,
    PaddingFactory,
    StageContext,
    StageEntry,
    StageFactory,
)

STAGES: dict[str, StageEntry] = {
    "pack": StageEntry(pack.pack_factory, pack.pack_padding, pack_config.validate_pack_stage),
    "decompose": StageEntry(decompose.factory, decompose.padding, decompose.validate),
    "bucket": StageEntry(bucket.factory, bucket.padding, bucket.validate),
    "seqlen": StageEntry(seqlen.factory, None, seqlen.validate),
    "chunkflow": StageEntry(chunkflow.factory, chunkflow.padding, chunkflow.validate),
    "mil": StageEntry(mil.factory, mil.padding, mil.validate, documents=False),
    "packed_rows": StageEntry(packed_rows.factory, None, packed_rows.validate, documents=False),
}
TRANSFORMS: dict[str, StageFactory] = {"balance": balance.balance_transform}


def register_stage(
    name: str,
    factory: StageFactory,
    *,
    padding: PaddingFactory | None = None,
    validate: ConfigValidator | None = None,
    documents: bool = True,
    replace: bool = False,
) -> None:
    """Make ``stage: {type: name, ...}`` available to :func:`seqpack.build_loader`.

    Args:
        name: the ``stage.type`` value.
        factory: ``factory(docs, stage_cfg, ctx) -> node``. ``docs`` is a ``torchdata.nodes.BaseNode``
            yielding :class:`~seqpack.sources.records.Document` (``doc_id``, int64 ``tokens``,
            optional bool ``loss_mask``, ``source``) for this consumer only, already mixed and
            shuffled; ``stage_cfg`` is the ``stage`` mapping of the config (``type`` included);
            ``ctx`` is a :class:`StageContext`. The returned node must follow the Node protocol
            (``reset(initial_state)``/``next()``/``get_state()``, nesting ``docs``' state in its own,
            so resume is exact) and yield one training batch per ``next()`` (``VarlenBatch`` or any
            picklable object).
        padding: ``padding(stage_cfg, ctx, last_batch) -> batch``: a zero-loss batch for ranks
            that ran out (DDP step equalization). Defaults to a ``VarlenBatch`` of padding as long
            as ``last_batch`` when that is a VarlenBatch.
        validate: ``validate(cfg, base_dir) -> cfg``, run by :func:`seqpack.config.load_config` on
            the whole config: check the stage's keys (errors naming the key and the allowed values),
            fill defaults, resolve paths against ``base_dir`` (the config file's folder, or None).
        documents: False for stages that read ``cfg["sources"]`` themselves (not text documents):
            the loader then builds no readers, ``docs`` is None, and the config's sources are left
            to ``validate``.
        replace: allow overriding an existing name.
    """
    if name in STAGES and not replace:
        raise ValueError(f"stage {name!r} is already registered")
    STAGES[name] = StageEntry(factory, padding, validate, documents)


def register_transform(name: str, factory: StageFactory, *, replace: bool = False) -> None:
    """Wrap the stage's batch node when the config has a non-null top-level ``name:`` section.

    ``factory(batches, section_cfg, ctx) -> node`` with the same protocol as stage factories.
    """
    if name in TRANSFORMS and not replace:
        raise ValueError(f"transform {name!r} is already registered")
    TRANSFORMS[name] = factory


def stage_entry(name: str) -> StageEntry | None:
    """The registered entry of ``name``, or None."""
    return STAGES.get(name)


def lookup_stage(name: str) -> StageEntry:
    """The registered entry of ``name``; ValueError listing the known names otherwise."""
    if name not in STAGES:
        raise ValueError(f"stage.type {name!r} is not registered (known: {sorted(STAGES)})")
    return STAGES[name]


def active_transforms(cfg: dict) -> list[tuple[str, StageFactory]]:
    """The registered transforms whose top-level section is present (non-null) in ``cfg``, in order."""
    return [(name, factory) for name, factory in TRANSFORMS.items() if cfg.get(name) is not None]


__all__ = ["STAGES", "TRANSFORMS", "StageContext", "StageEntry", "active_transforms", "lookup_stage"]
__all__ += ["register_stage", "register_transform", "stage_entry"]
