"""Chat records ``{"messages": [...]}`` (data/chat.py, data/dataset.py): exactly the assistant turns are scored,
with the tokenizer's chat template or the plain one, jointly or one sequence per turn; bad conversations name
file and line; evaluation prompts with the conversation up to its last assistant turn, as training saw it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from conftest import write_jsonl
from mdm_scale.config.schema import DataConfig
from mdm_scale.data.build import build_data
from mdm_scale.data.dataset import encode_prompts
from mdm_scale.data.loader import collate
from mdm_scale.data.records import DataError
from mdm_scale.diffusion.masks import BernoulliMasks, mask_probability
from mdm_scale.diffusion.objective import MDMObjective
from mdm_scale.diffusion.t_samplers import UniformT
from mdm_scale.generation.answers import AnswerPattern
from mdm_scale.generation.evaluate import read_prompt_records

CHATML = ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor -%}"
          "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and + 1?"},
                {"role": "assistant", "content": "4 + 1 = 5 #### 5"}]


def chatml_tokenizer(path: Path, template: str = CHATML) -> str:
    """A character tokenizer with ChatML's special tokens and a chat template, saved as a directory."""
    specials = ["<|pad|>", "<|im_end|>", "<|mask|>", "<|unk|>", "<|im_start|>"]
    chars = sorted(set("".join(m["role"] + m["content"] for m in CONVERSATION) + "\nabcdefghijklmnopqrstuvwxyz"))
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[],
                                   unk_token="<|unk|>"))
    backend.add_special_tokens(specials)
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|im_end|>",
                                        mask_token="<|mask|>", unk_token="<|unk|>")
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(path))
    return str(path)


def expected(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Ids and scored flags of a sequence written out segment by segment (text, scored)."""
    ids, scored = [], []
    for text, flag in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        scored += [flag] * len(piece)
    return ids, scored


CHATML_SEGMENTS = [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>\n"
                    "<|im_start|>assistant\n", False), ("4<|im_end|>\n", True),
                   ("<|im_start|>user\nand + 1?<|im_end|>\n<|im_start|>assistant\n", False),
                   ("4 + 1 = 5 #### 5<|im_end|>\n", True)]
PLAIN_SEGMENTS = [("<|system|>\nBe brief.\n<|user|>\n2 + 2?\n<|assistant|>\n", False), ("4<|eos|>", True),
                  ("<|user|>\nand + 1?\n<|assistant|>\n", False), ("4 + 1 = 5 #### 5<|eos|>", True)]


@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_a_multi_turn_conversation_scores_exactly_its_assistant_turns(template, tmp_path):
    tokenizer = chatml_tokenizer(tmp_path / "tok") if template == "chatml" else "char"
    segments = CHATML_SEGMENTS if template == "chatml" else PLAIN_SEGMENTS
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    joint = build_data(DataConfig(train_file=train, tokenizer=tokenizer, seq_len=256), 0, tmp_path / "run")
    ids, scored = joint.train.example(0)
    assert len(joint.train) == 1
    assert (ids.tolist(), scored.tolist()) == expected(joint.tokenizer, segments)

    # per_turn: one sequence per assistant turn, the earlier turns (the first answer too) unscored prompt
    per_turn = build_data(DataConfig(train_file=train, tokenizer=tokenizer, seq_len=256, chat_turns="per_turn"), 0,
                          tmp_path / "run")
    assert len(per_turn.train) == 2
    first, second = per_turn.train.example(0), per_turn.train.example(1)
    assert (first[0].tolist(), first[1].tolist()) == expected(joint.tokenizer, segments[:2])
    assert (second[0].tolist(), second[1].tolist()) == expected(
        joint.tokenizer, [segments[0], (segments[1][0], False), *segments[2:]])

    # the loss normalises each sequence by its scored tokens: every masked token is weighted 1 / (pi(t) n)
    batch = collate(joint.train, [0], [0], 0, 8, 256)
    assert batch.loss_mask[0, :len(ids)].tolist() == scored.tolist() and not batch.loss_mask[0, len(ids):].any()
    noisy = MDMObjective(UniformT(3), BernoulliMasks(3, 1e-3), joint.tokenizer.mask_token_id).corrupt(batch)
    assert len(noisy.token_scale) > 0
    torch.testing.assert_close(noisy.token_scale, 1.0 / (mask_probability(noisy.t, 1e-3) * int(scored.sum()))
                               .expand_as(noisy.token_scale))

    # evaluation prompts with the conversation up to the last assistant turn: training's tokens before it
    evaluation = read_prompt_records(Path(train), AnswerPattern())
    assert evaluation[0].prompt == CONVERSATION[:4] and evaluation[0].gold == "5"
    prompt_ids = expected(joint.tokenizer, segments[:3])[0]
    assert encode_prompts(joint.tokenizer, [evaluation[0].prompt], False) == [prompt_ids]


def test_eos_padding_and_lengths_of_chat_sequences(tmp_path):
    """``response_eos_pad`` pads the last assistant turn with EOS (scored); an over-long sequence is cut at
    seq_len, or dropped; a first answer beyond seq_len is a bad record."""
    tok = chatml_tokenizer(tmp_path / "tok")
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    padded = build_data(DataConfig(train_file=train, tokenizer=tok, seq_len=256, response_eos_pad=30), 0, tmp_path)
    ids, scored = padded.train.example(0)
    plain_ids, plain_scored = expected(padded.tokenizer, CHATML_SEGMENTS)
    last_turn = len(padded.tokenizer("4 + 1 = 5 #### 5<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert ids.tolist() == plain_ids + [padded.tokenizer.eos_token_id] * (30 - last_turn)
    assert scored.tolist() == plain_scored + [True] * (30 - last_turn)

    cut = build_data(DataConfig(train_file=train, tokenizer=tok, seq_len=len(plain_ids) - 3), 0, tmp_path)
    ids, scored = cut.train.example(0)
    assert ids.tolist() == plain_ids[:-3] and scored.tolist() == plain_scored[:-3]
    assert cut.train.counts["truncated (over-long)"] == 1
    dropped_cfg = DataConfig(train_file=train, tokenizer=tok, seq_len=len(plain_ids) - 3, overlong="drop")
    with pytest.raises(DataError, match=r"no usable records \({'dropped \(over-long\)': 1}\)"):
        build_data(dropped_cfg, 0, tmp_path)
    first_answer = len(expected(cut.tokenizer, CHATML_SEGMENTS[:1])[0])
    with pytest.raises(DataError, match=rf"chat.jsonl:1: over-long prompt \({first_answer} tokens"):
        build_data(DataConfig(train_file=train, tokenizer=tok, seq_len=first_answer), 0, tmp_path)


BAD_CHATS = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
     "content not a string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "empty assistant turn"),
    ({"messages": []}, "field 'messages' must be a non-empty list"),
]


@pytest.mark.parametrize("record, problem", BAD_CHATS)
def test_a_bad_conversation_names_file_and_line_or_is_skipped_and_counted(record, problem, tmp_path):
    good = {"messages": CONVERSATION}
    train = write_jsonl(tmp_path / "chat.jsonl", [good, good, record, good])
    with pytest.raises(DataError, match=rf"chat.jsonl:3: {problem}"):
        build_data(DataConfig(train_file=train, seq_len=256), 0, tmp_path)
    data = build_data(DataConfig(train_file=train, seq_len=256, on_bad_record="skip"), 0, tmp_path)
    assert len(data.train) == 3 and data.train.counts == {problem: 1}


def test_a_template_that_rewrites_earlier_turns_fails_jointly_and_works_per_turn(tmp_path):
    """A template that shows only the last assistant answer (as some drop earlier reasoning) does not render a
    conversation's beginning as the beginning of the whole: joint mode names the record, per_turn works."""
    last_answer_only = CHATML.replace("{{ m['content'] }}", "{% if m['role'] != 'assistant' or loop.last %}"
                                                            "{{ m['content'] }}{% endif %}")
    tok = chatml_tokenizer(tmp_path / "tok", last_answer_only)
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DataError, match=r"chat.jsonl:1: chat template not prefix-stable .*data.chat_turns=per_turn"):
        build_data(DataConfig(train_file=train, tokenizer=tok, seq_len=256), 0, tmp_path)
    data = build_data(DataConfig(train_file=train, tokenizer=tok, seq_len=256, chat_turns="per_turn"), 0, tmp_path)
    ids, scored = data.train.example(1)
    answer = data.tokenizer("4 + 1 = 5 #### 5<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert ids[scored].tolist() == answer and np.flatnonzero(scored).tolist() == list(range(len(ids) - len(answer),
                                                                                            len(ids)))
