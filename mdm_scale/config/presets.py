"""Named shapes of the built-in model, from CPU-test size to an 8B LLaDA-shaped config.

Parameter counts (vocabulary 32k unless noted, untied embeddings): ``tiny`` for tests and the CPU quickstart;
``small`` ~10M and ``base`` ~50M for single-GPU experiments; ``1b`` is the 1.1B shape of the throughput
reference (d 2048, 20 layers); ``8b`` follows LLaDA-8B (d 4096, 32 layers, 32 heads, SwiGLU 12288, vocabulary
126464). ``vocab_size`` is always replaced by the tokenizer's size when the model is built for a run.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4),
    "quickstart": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4),
    "base": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
               vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=32,
               vocab_size=126464, rope_theta=500000.0, max_position_embeddings=8192),
}
