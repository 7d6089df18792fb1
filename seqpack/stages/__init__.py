"""Length-aware stages: each a stateful iterator over documents."""
