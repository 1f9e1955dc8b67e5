"""The ``generate``, ``eval``, ``export`` and ``lm-eval`` subcommands of ``mdm-scale`` (registered by
``mdm_scale/cli.py``).

Under a launcher (``deepspeed --num_gpus N --module mdm_scale.cli eval ...``) the records are sharded over the
ranks; rank 0 prints the result.
"""

from __future__ import annotations

import argparse
import json
import sys


def _quiet() -> None:
    from mdm_scale.training.metrics import quiet_third_party_logs

    quiet_third_party_logs()


def _sampling(args: argparse.Namespace):
    from mdm_scale.generation.sampler import sampling_config

    return sampling_config(args.gen_length, args.steps, args.block_length, args.temperature, args.remasking,
                           args.seed, args.threshold, args.cache, args.cuda_graph)


def _answers(args: argparse.Namespace):
    from mdm_scale.generation.answers import AnswerPattern

    return AnswerPattern(args.answer_regex)


def _generate(args: argparse.Namespace) -> int:
    _quiet()
    from mdm_scale.generation.evaluate import PromptRecord, read_prompt_records, run_generation

    if args.data is not None:
        records = read_prompt_records(args.data, None)
    elif args.prompt:
        records = [PromptRecord(prompt, None, i) for i, prompt in enumerate(args.prompt, start=1)]
    else:
        print("mdm-scale generate: give --prompt TEXT (repeatable) or --data FILE.jsonl", file=sys.stderr)
        return 2
    summary = run_generation(args.checkpoint, records, args.out, _sampling(args), args.batch_size, None, args.dtype,
                             args.trust_remote_code)
    if summary is not None:
        for line in summary.pop("lines", []):
            print(line)
        if args.out:
            print(json.dumps(summary), flush=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    _quiet()
    from mdm_scale.generation.evaluate import read_prompt_records, run_generation

    answers = _answers(args)
    summary = run_generation(args.checkpoint, read_prompt_records(args.data, answers), args.out, _sampling(args),
                             args.batch_size, answers,
                             args.dtype, args.trust_remote_code)
    if summary is not None:
        summary.pop("lines", None)
        print(json.dumps(summary), flush=True)
    return 0


def _export(args: argparse.Namespace) -> int:
    _quiet()
    from mdm_scale.generation.export import export_checkpoint

    print(f"exported to {export_checkpoint(args.checkpoint, args.out, args.trust_remote_code, args.lora_adapter_only)}")
    return 0


def _lm_eval(args: argparse.Namespace) -> int:
    from mdm_scale.generation.sampler import GenerationError

    _quiet()
    try:
        from lm_eval.__main__ import cli_evaluate

        import mdm_scale.generation.lm_eval_model  # noqa: F401  (registers --model mdm_scale)
    except ModuleNotFoundError as err:
        raise GenerationError(f"mdm-scale lm-eval needs lm-eval: pip install 'mdm-scale[lm-eval]' ({err})") from None
    sys.argv = ["lm-eval", *args.harness_args]  # lm-eval's command line reads sys.argv
    cli_evaluate()
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="training output dir, checkpoints/step_* dir, or a Hugging Face dir (mdm-scale export)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow modelling code shipped in the dir")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def _decoding(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gen-length", type=int, default=128, help="answer window / new tokens (default 128)")
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps (default: gen-length)")
    parser.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (default: "
                        "gen-length)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    parser.add_argument("--seed", type=int, default=0, help="key of the decoding noise (temperature > 0)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="fast decoding: each step unmasks every position of the block whose confidence is above "
                        "this (and at least one), so a block takes as many forwards as it needs (e.g. 0.9; replaces "
                        "--steps); default: the fixed schedule of --steps")
    parser.add_argument("--cache", choices=["none", "prefix", "dual"], default="none",
                        help="fast decoding: approximate key/value cache of the positions before the block (prefix), "
                        "or before and after it (dual), refreshed at each block (built-in model only)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="fast decoding on a GPU: record each batch's forward once in a CUDA graph and replay it "
                        "at every step (the same result without the per-kernel launch cost that bounds small "
                        "batches; with --cache none)")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per forward on each rank")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 on GPU, fp32 on CPU")


def add_generation_commands(commands) -> None:
    generate = commands.add_parser("generate", help="decode prompts with a checkpoint")
    _common(generate)
    generate.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    generate.add_argument("--data", default=None, help="JSONL file of {\"prompt\"} or chat {\"messages\"} records "
                          "instead of --prompt")
    generate.add_argument("--out", default=None, help="write {prompt, prediction} JSONL here instead of stdout")
    _decoding(generate)
    generate.set_defaults(func=_generate)

    evaluate = commands.add_parser("eval", help="exact-match accuracy of a checkpoint on a JSONL file")
    _common(evaluate)
    evaluate.add_argument("--data", required=True, help="JSONL: {\"prompt\", \"answer\" or \"response\"}, or chat "
                          "{\"messages\"} (prompt: up to the last assistant turn, which holds the answer)")
    evaluate.add_argument("--out", required=True, help="predictions JSONL, one line per input record, in order")
    evaluate.add_argument("--answer-regex", default=None,
                          help="regex for the answer (group 1 if any; last match); default: text after the last ####")
    _decoding(evaluate)
    evaluate.set_defaults(func=_eval)

    export = commands.add_parser("export", help="write a training checkpoint as a Hugging Face directory")
    _common(export)
    export.add_argument("--out", required=True, help="new directory (safetensors, config, tokenizer)")
    export.add_argument("--lora-adapter-only", action="store_true",
                        help="a LoRA run: write a PEFT adapter directory (adapters only, for the run's model.path) "
                             "instead of merging the adapters into the weights")
    export.set_defaults(func=_export)

    lm_eval = commands.add_parser("lm-eval", add_help=False, help="run lm-eval (EleutherAI's harness) with --model "
                                  "mdm_scale registered; every argument goes to lm-eval (docs: lm_eval_model.py)")
    lm_eval.set_defaults(func=_lm_eval)
