"""Streaming readers, tokenization, mixtures and shuffling."""
