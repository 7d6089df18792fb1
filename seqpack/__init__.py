"""seqpack: variable-length training data into efficient, correct batches for long-context models.

Public API re-exports only. Read the pipeline in file order: ``sources/`` (readers, tokenization)
-> ``stages/`` (packing, decomposition, ChunkFlow, MIL; planned by ``plan/``) -> ``batch.py``
(VarlenBatch) -> ``pipeline.py`` / ``loader.py``. The map: ``docs/architecture.md``.
"""

from seqpack.batch import IGNORE_INDEX, VarlenBatch
from seqpack.curriculum import (
    BucketCurriculum,
    BucketSampler,
    SeqlenSchedule,
    load_curriculum_config,
    parse_curriculum_config,
)
from seqpack.loader import SeqpackLoader, build_loader
from seqpack.mil import (
    FeatureBagError,
    FeatureBagSource,
    FeatureFiles,
    InMemoryBags,
    LabelTable,
    MILBatch,
    PackedView,
    PackMIL,
    SafetensorsBags,
    WebDatasetBags,
    compose_labels,
    compose_survival_label,
    read_feature_bags,
    read_labels,
)
from seqpack.plan import OnlinePacker, PackPlan, pack
from seqpack.plan.balance import CostModel, RankAssignment, assign_ranks, split_ranks
from seqpack.plan.chunks import ChunkAction, ChunkPlan, build_schedule, plan_chunks
from seqpack.plan.decompose import Decomposition, decompose_lengths
from seqpack.shards import PackedRowReader, SeqpackShardReader, read_manifest
from seqpack.sources.read import read
from seqpack.sources.records import Document, Record, SourceError
from seqpack.sources.tokenize import ByteTokenizer, tokenize
from seqpack.stages import StageContext, register_stage, register_transform
from seqpack.stages.balance import balance_batches, empty_batch
from seqpack.stages.bucket import LengthBucketing
from seqpack.stages.chunkflow import Chunk, build_chunks
from seqpack.stages.decompose import DecomposedDataset, StreamingDecomposer, decompose_documents
from seqpack.stages.pack import PackStage
from seqpack.stages.pack_offline import pack_documents
from seqpack.stages.seqlen import SeqlenCurriculum
from seqpack.train.checks import (
    PackingError,
    PackingReport,
    assert_packing_safe,
    check_packing,
    install_packing_guard,
)
from seqpack.train.chunkflow import ChunkFlowExecutor, chunkflow_step
from seqpack.train.loss import (
    count_doc_targets,
    loss_normalizer,
    loss_weights,
    packed_loss,
    step_normalizer,
    with_loss_weights,
)

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
