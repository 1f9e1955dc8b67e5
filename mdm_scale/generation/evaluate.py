"""``mdm-scale generate`` and ``mdm-scale eval``: decode a JSONL file of prompts, batched and sharded over ranks.

Input records (JSONL) are ``{"prompt": str}`` or a chat record ``{"messages": [...]}``, plus, for ``eval``, the
gold answer: ``"answer"`` (taken as is, after normalisation), or ``"response"`` (the answer is extracted from it
like from a prediction). A chat record's prompt is the conversation up to its last assistant turn, rendered as in
training (``data/chat.py``) with the generation prompt, and that turn is its response. A bad record stops the run
with file and line before any model is loaded.

Rank r of W decodes records r, r + W, r + 2W, ... in micro-batches of similar prompt length (less padding;
masked-diffusion noise is keyed by the record's index, so results do not depend on W or on the batching
order); rank 0 gathers everything and writes one ``{"prompt", "prediction", "answer", "correct"}`` line per
input record, in input order. A prediction is the decoded text up to the first EOS. For a masked diffusion model
the summary also gives ``forwards_per_prompt``, the mean number of forwards a prompt took part in while its block
still had a mask (``Decoding.row_forwards``): ``gen_length`` divided by it is the tokens decoded per forward, which
``--threshold`` makes adaptive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mdm_scale.data.chat import split_for_eval
from mdm_scale.data.records import DataError, check_messages
from mdm_scale.distributed.env import DistEnv, launched_or_single
from mdm_scale.generation.answers import AnswerPattern, Score, normalize
from mdm_scale.generation.model_source import GenerationModel, load_generation_model
from mdm_scale.generation.sampler import Decoding, SamplingConfig, greedy_generate
from mdm_scale.training.checkpoint import write_atomic


@dataclass
class PromptRecord:
    prompt: str | list[dict]
    """A text, or a conversation (``{role, content}`` messages) to continue with an assistant turn."""
    gold: str | None
    line: int


def read_prompt_records(path: str | Path, answers: AnswerPattern | None) -> list[PromptRecord]:
    """Records of a JSONL file; with ``answers`` (eval) each must carry a gold answer."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: file not found")
    records = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{where}: not valid JSON ({err})") from None
            prompt, response = _prompt_and_response(record, where)
            gold = None
            if answers is not None:
                if isinstance(record.get("answer"), (str, int, float)):
                    gold = normalize(str(record["answer"]))
                elif isinstance(response, str):
                    gold = answers.extract(response)
                if not gold:
                    raise DataError(f"{where}: no gold answer (needs 'answer', or a 'response' or last assistant "
                                    f"turn with an answer {answers.description})")
            records.append(PromptRecord(prompt, gold, number))
    if not records:
        raise DataError(f"--data {path}: the file holds no records")
    return records


def _prompt_and_response(record, where: str) -> tuple[str | list[dict], str | None]:
    """A text prompt and its ``response`` field, or a conversation up to its last assistant turn and that turn."""
    if isinstance(record, dict) and record.get("messages") is not None:
        problem = check_messages(record["messages"], need_answer=False)
        if problem is not None:
            raise DataError(f"{where}: {problem}")
        prompt, response = split_for_eval(record["messages"])
        if not prompt:
            raise DataError(f"{where}: no message before the last assistant turn to prompt with")
        return prompt, response
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
        raise DataError(f"{where}: expected an object with a non-empty string 'prompt', or 'messages'")
    response = record.get("response")
    return record["prompt"], response if isinstance(response, str) else None


def generate_predictions(gm: GenerationModel, prompts: list[str | list[dict]], sampling: SamplingConfig,
                         batch_size: int, env: DistEnv) -> tuple[list[str], list[int]] | None:
    """Predicted texts for ``prompts`` in input order, and the forwards each masked-diffusion prompt took (empty
    for ARM checkpoints), on rank 0 (None on other ranks)."""
    forwards: dict[int, int] = {}
    texts = decode_shard(gm, prompts, sampling, batch_size, env.rank, env.world_size, env.device, forwards)
    if env.world_size > 1:
        gathered: list[tuple[dict[int, str], dict[int, int]] | None] = [None] * env.world_size
        dist.all_gather_object(gathered, (texts, forwards))
        texts = {k: v for part, _ in gathered for k, v in part.items()}
        forwards = {k: v for _, part in gathered for k, v in part.items()}
    if not env.is_main:
        return None
    return [texts[i] for i in range(len(prompts))], [forwards[i] for i in sorted(forwards)]


def decode_shard(gm: GenerationModel, prompts: list[str | list[dict]], sampling: SamplingConfig, batch_size: int,
                 rank: int, world_size: int, device: torch.device, forwards: dict[int, int] | None = None
                 ) -> dict[int, str]:
    """``{record index: predicted text}`` for this rank's records ``rank, rank + world_size, ...``; ``forwards``,
    if given, receives ``{record index: forwards its row took}`` (``Decoding.row_forwards``; masked diffusion)."""
    from mdm_scale.data.dataset import encode_prompts
    from mdm_scale.data.tokenizer import special_ids

    pad_id, eos_id = special_ids(gm.tokenizer)
    if not gm.causal and gm.mask_token_id is None:
        raise DataError("the model has no [MASK] token id (config mask_token_id or tokenizer mask token)")
    mine = list(range(rank, len(prompts), world_size))
    ids = encode_prompts(gm.tokenizer, [prompts[i] for i in mine], gm.chat_template)
    order = sorted(range(len(mine)), key=lambda j: (len(ids[j]), j))
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch_ids = [ids[j] for j in chunk]
        if gm.causal:
            out = greedy_generate(gm.model, batch_ids, pad_id, eos_id, sampling.gen_length, device)
        else:
            decoding = Decoding(gm.model, batch_ids, [mine[j] for j in chunk], gm.mask_token_id, pad_id, sampling,
                                device)
            out = decoding.run()[:, -sampling.gen_length:]
            if forwards is not None:
                forwards.update(zip((mine[j] for j in chunk), decoding.row_forwards.tolist()))
        for j, row in zip(chunk, out.tolist()):
            texts[mine[j]] = decode_answer(gm.tokenizer, row, eos_id)
    return texts


def decode_answer(tokenizer, ids: list[int], eos_id: int | None) -> str:
    """The text of ``ids`` up to the first EOS, special tokens removed."""
    if eos_id is not None and eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def resolve_dtype(dtype: str, on_gpu: bool) -> torch.dtype:
    """``--dtype``: ``bf16``, ``fp32``, or ``auto`` (bf16 on GPU, fp32 on CPU)."""
    return {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype, torch.bfloat16 if on_gpu else torch.float32)


def score_predictions(records: list[PromptRecord], predictions: list[str], answers: AnswerPattern | None
                      ) -> tuple[Score, list[dict]]:
    """One ``{"prompt", "prediction"}`` line per record, with ``answers`` also its extracted ``"answer"`` and
    whether it is ``"correct"``, counted in the score."""
    score, lines = Score(), []
    for record, prediction in zip(records, predictions):
        line = {"prompt": record.prompt, "prediction": prediction}
        if answers is not None:
            line["answer"] = answers.extract(prediction)
            line["correct"] = score.add(line["answer"], record.gold)
        lines.append(line)
    return score, lines


def run_generation(checkpoint: str, records: list[PromptRecord], out: str | None, sampling: SamplingConfig,
                   batch_size: int, answers: AnswerPattern | None, dtype: str = "auto", trust_remote_code: bool = False
                   ) -> dict | None:
    """Decode every record; with ``answers`` also score them. Rank 0 returns the summary line."""
    sampling.check()
    env = launched_or_single()
    gm = load_generation_model(checkpoint, env.device, resolve_dtype(dtype, env.on_gpu), trust_remote_code)
    decoded = generate_predictions(gm, [r.prompt for r in records], sampling, batch_size, env)
    if decoded is None:
        return None
    predictions, forwards = decoded
    score, scored = score_predictions(records, predictions, answers)
    lines = [json.dumps(line) for line in scored]
    if out is not None:
        target = Path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, "\n".join(lines) + "\n")
    summary: dict = {"checkpoint": gm.source, "records": len(records)}
    if forwards:  # masked diffusion: how many forwards a prompt took, on average (gen_length / this: tokens each)
        summary["forwards_per_prompt"] = sum(forwards) / len(forwards)
    if answers is not None:
        summary.update(accuracy=score.accuracy, correct=score.correct, total=score.total, no_answer=score.no_answer)
    if out is not None:
        summary["predictions"] = str(out)
    else:
        summary["lines"] = lines
    return summary
