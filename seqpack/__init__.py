"""seqpack: variable-length training data into efficient, correct batches for long-context models.

Public API re-exports only, loaded lazily (``seqpack/lazy.py``): ``import seqpack`` imports nothing
heavy and ``seqpack.X`` imports only the module defining ``X`` (``seqpack.pack`` never imports torch).
Read the pipeline in file order: ``sources/`` (readers, tokenization)
-> ``stages/`` (packing, decomposition, ChunkFlow, MIL; planned by ``plan/``) -> ``batch.py``
(VarlenBatch) -> ``pipeline.py`` / ``loader.py``. The map: ``docs/architecture.md``.
"""

from seqpack.lazy import lazy_exports

# defining module -> the public names it gives, imported on first access (seqpack/lazy.py)
_SOURCES: dict[str, tuple[str, ...]] = {
    "seqpack.batch": ("IGNORE_INDEX", "VarlenBatch"),
    "seqpack.curriculum": (
        "BucketCurriculum", "BucketSampler", "SeqlenSchedule", "load_curriculum_config",
        "parse_curriculum_config",
    ),
    "seqpack.loader": ("SeqpackLoader", "build_loader"),
    "seqpack.mil": (
        "FeatureBagError", "FeatureBagSource", "FeatureFiles", "InMemoryBags", "LabelTable", "MILBatch",
        "PackedView", "PackMIL", "SafetensorsBags", "WebDatasetBags", "compose_labels",
        "compose_survival_label", "read_feature_bags", "read_labels",
    ),
    "seqpack.plan": ("OnlinePacker", "PackPlan", "pack"),
    "seqpack.plan.balance": ("CostModel", "RankAssignment", "assign_ranks", "split_ranks"),
    "seqpack.plan.chunks": ("ChunkAction", "ChunkPlan", "build_schedule", "plan_chunks"),
    "seqpack.plan.decompose": ("Decomposition", "decompose_lengths"),
    "seqpack.shards": ("PackedRowReader", "SeqpackShardReader", "read_manifest"),
    "seqpack.sources.read": ("read",),
    "seqpack.sources.records": ("Document", "Record", "SourceError"),
    "seqpack.sources.tokenize": ("ByteTokenizer", "tokenize"),
    "seqpack.stages": ("StageContext", "register_stage", "register_transform"),
    "seqpack.stages.balance": ("balance_batches", "empty_batch"),
    "seqpack.stages.bucket": ("LengthBucketing",),
    "seqpack.stages.chunkflow": ("Chunk", "build_chunks"),
    "seqpack.stages.decompose": ("DecomposedDataset", "StreamingDecomposer", "decompose_documents"),
    "seqpack.stages.pack": ("PackStage",),
    "seqpack.stages.pack_offline": ("pack_documents",),
    "seqpack.stages.seqlen": ("SeqlenCurriculum",),
    "seqpack.train.checks": (
        "PackingError", "PackingReport", "assert_packing_safe", "check_packing", "install_packing_guard",
    ),
    "seqpack.train.chunkflow": ("ChunkFlowExecutor", "chunkflow_step"),
    "seqpack.train.loss": (
        "count_doc_targets", "loss_normalizer", "loss_weights", "packed_loss", "step_normalizer",
        "with_loss_weights",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)

__all__ = ["IGNORE_INDEX", "OnlinePacker", "PackPlan", "VarlenBatch", "pack", "pack_documents"]
__all__ += ["Chunk", "ChunkAction", "ChunkFlowExecutor", "ChunkPlan", "build_chunks", "build_schedule"]
__all__ += ["chunkflow_step", "plan_chunks"]
__all__ += ["BucketCurriculum", "BucketSampler", "SeqlenCurriculum", "SeqlenSchedule"]
__all__ += ["load_curriculum_config", "parse_curriculum_config"]
__all__ += ["DecomposedDataset", "Decomposition", "LengthBucketing", "StreamingDecomposer"]
__all__ += ["decompose_documents", "decompose_lengths"]
__all__ += ["FeatureBagError", "FeatureBagSource", "FeatureFiles", "InMemoryBags", "LabelTable"]
__all__ += ["SafetensorsBags", "WebDatasetBags", "read_feature_bags", "read_labels"]
__all__ += ["MILBatch", "PackMIL", "PackedView", "compose_labels", "compose_survival_label"]
__all__ += ["CostModel", "RankAssignment", "assign_ranks", "balance_batches", "empty_batch", "split_ranks"]
__all__ += ["PackStage", "SeqpackLoader", "StageContext", "build_loader", "register_stage"]
__all__ += ["register_transform"]
__all__ += ["read", "tokenize", "Document", "Record", "SourceError", "ByteTokenizer"]
__all__ += ["PackingError", "PackingReport", "assert_packing_safe", "check_packing", "install_packing_guard"]
__all__ += ["count_doc_targets", "loss_normalizer", "loss_weights", "packed_loss", "step_normalizer"]
__all__ += ["with_loss_weights"]
__all__ += ["PackedRowReader", "SeqpackShardReader", "read_manifest"]
__version__ = "0.1.0"
