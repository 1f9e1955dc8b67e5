"""Data: records from local files (several sources, mixed by weight) -> tokenizer -> token stores, tokenized once and
memory-mapped (the data cache) -> a keyed stream of examples -> rank-sharded micro-batches."""
