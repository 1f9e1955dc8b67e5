"""Data: local JSONL/parquet records -> tokenizer -> token sequences -> rank-sharded micro-batches."""
