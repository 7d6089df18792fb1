"""The tiny real transformers Llama that the consumer tests run packed batches through.

A plain module rather than a conftest fixture: DDP tests build the same model inside spawned worker
processes, where fixtures do not exist. ``transformers`` is imported on call so a test module can
still skip on ``pytest.importorskip("transformers")`` before it gets here.
"""

from __future__ import annotations

import torch


def tiny_llama(
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 256,
    attn: str = "sdpa",
    use_cache: bool = False,
    seed: int = 0,
):
    """A ``LlamaForCausalLM`` with seeded weights (``torch.manual_seed(seed)`` just before it is
    built, so every call with the same arguments returns identical parameters)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        attn_implementation=attn,
        use_cache=use_cache,
    )
    return transformers.LlamaForCausalLM(config)
