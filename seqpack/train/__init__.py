"""Training-side helpers: loss normalization over packed documents, packing checks and the guard,
and the ChunkFlow executor. Public names are re-exported from :mod:`seqpack`."""
