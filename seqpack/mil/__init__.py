"""Multiple-instance learning on whole-slide images: feature bags and their file formats, slide
labels, PackMIL sampling and packing, and the MIL batch.

Read in this order: ``bags`` (the source type) -> ``formats`` (files) -> ``labels`` (CSV, hyperslide
labels) -> ``sampling`` (per-slide branch draws) -> ``batch`` (MILBatch) -> ``config`` -> ``packmil``
(the PackMIL dataset). The loader stage ``stage: {type: mil}`` is :mod:`seqpack.stages.mil`.
"""

from seqpack.mil.bags import FeatureBagError, FeatureBagSource, InMemoryBags
from seqpack.mil.batch import MILBatch, PackedView
from seqpack.mil.formats import FeatureFiles, SafetensorsBags, WebDatasetBags, read_feature_bags
from seqpack.mil.labels import LabelTable, compose_labels, compose_survival_label, read_labels
from seqpack.mil.packmil import PackMIL, mil_stage_from_config
from seqpack.mil.sampling import branch_sizes, draw_rows, sample_rows
from seqpack.mil.synthetic import synthetic_feature_bags

__all__ = ["FeatureBagError", "FeatureBagSource", "FeatureFiles", "InMemoryBags", "LabelTable", "MILBatch"]
__all__ += ["PackMIL", "PackedView", "SafetensorsBags", "WebDatasetBags", "branch_sizes", "compose_labels"]
__all__ += ["compose_survival_label", "draw_rows", "mil_stage_from_config", "read_feature_bags"]
__all__ += ["read_labels", "sample_rows", "synthetic_feature_bags"]
