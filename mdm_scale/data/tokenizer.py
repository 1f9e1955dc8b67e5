"""Tokenizers: a local Hugging Face tokenizer directory, or a character tokenizer built from the data.

The character tokenizer is a real ``tokenizers`` BPE model with no merges (every character is a token) wrapped
in ``PreTrainedTokenizerFast``, so it saves with ``save_pretrained`` and loads with ``AutoTokenizer`` without
any custom code. Its vocabulary is the sorted set of characters of the training (and eval) text after four
special tokens: ``<|pad|>`` 0, ``<|eos|>`` 1, ``<|mask|>`` 2, ``<|unk|>`` 3. A run saves it under
``<output_dir>/tokenizer`` and a resumed run reloads that copy, so ids never shift.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "eos_token": "<|eos|>", "mask_token": "<|mask|>",
                  "unk_token": "<|unk|>"}


def build_char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    specials = list(SPECIAL_TOKENS.values())
    vocab = {token: i for i, token in enumerate(specials + sorted(chars - set(specials)))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def load_tokenizer(spec: str, saved_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """``spec`` is a local directory, or ``char`` with a character tokenizer saved in ``saved_dir`` (building
    one from the records is ``data/cache.char_tokenizer``'s)."""
    if spec == "char":
        if saved_dir is None or not (saved_dir / "tokenizer.json").is_file():
            raise ValueError("a char tokenizer is built from the records (data/cache.py) or loaded from a run")
        return AutoTokenizer.from_pretrained(str(saved_dir))
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"config key 'data.tokenizer' = {spec!r}: not a local directory (mdm-scale "
                                f"never downloads; use 'char' or a directory with tokenizer files)")
    return AutoTokenizer.from_pretrained(str(path))


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the ids a tokenizer gives: its backend (vocabulary, merges, normaliser,
    pre-tokenizer, post-processor, added tokens; not its padding or truncation settings), special tokens and chat
    template. Not where it was loaded from: a run's saved copy matches the tokenizer it was saved from."""
    if tokenizer.is_fast:
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        backend.pop("truncation", None)
        backend.pop("padding", None)
    else:
        backend = sorted(tokenizer.get_vocab().items())
    described = [backend, tokenizer.special_tokens_map, tokenizer.chat_template or ""]
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int | None]:
    """(pad id, end-of-sequence id). Pad falls back to EOS, then 0; EOS falls back to SEP (BERT), else None."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return pad, eos
