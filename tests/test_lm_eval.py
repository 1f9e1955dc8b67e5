"""``--model mdm_scale`` for lm-eval: the Monte Carlo likelihood estimate against exact enumeration, and
``mdm-scale lm-eval`` end to end on local tasks (a generation task and a multiple-choice task), offline."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from itertools import combinations

import pytest
import torch

from conftest import REPO
from mdm_scale.cli import main
from mdm_scale.data.tokenizer import build_char_tokenizer
from mdm_scale.generation.lm_eval_model import MDMScaleLM, likelihood_terms, pair_key
from mdm_scale.generation.sampler import GenerationError
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion

CONTEXT = "Mia has 12 shells. How many?\n"


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory):
    """A random tiny model with a character tokenizer, saved as a Hugging Face directory."""
    directory = tmp_path_factory.mktemp("random_lm")
    tokenizer = build_char_tokenizer([CONTEXT + "0123456789 #"])
    torch.manual_seed(0)
    model = MDMForMaskedDiffusion(MDMConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            mask_token_id=tokenizer.mask_token_id))
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def random_lm(directory, **model_args) -> MDMScaleLM:
    """lm-eval's model class on the random model (what ``--model mdm_scale`` builds)."""
    return MDMScaleLM(pretrained=str(directory), **{"gen_length": 4, "batch_size": 200, "device": "cpu",
                                                    **model_args})


def token_log_probs(lm: MDMScaleLM, prefix: list[int], target: list[int], masked: tuple[int, ...]) -> list[float]:
    """log p(c_i | x, c with ``masked`` replaced by [MASK]) for i in ``masked`` (one forward)."""
    x = torch.tensor([prefix + target])
    for i in masked:
        x[0, len(prefix) + i] = lm.gm.mask_token_id
    with torch.no_grad():
        logp = torch.log_softmax(lm.gm.model(input_ids=x).logits[0].double(), dim=-1)
    return [float(logp[len(prefix) + i, target[i]]) for i in masked]


def exact_bound(lm: MDMScaleLM, prefix: list[int], target: list[int]) -> float:
    """E_{l ~ U{1..L}} E_{M ~ U(l-subsets)} [(L / l) sum_{i in M} log p(c_i | ...)] by enumerating every mask."""
    length = len(target)
    total = 0.0
    for count in range(1, length + 1):
        subsets = list(combinations(range(length), count))
        mean = sum(sum(token_log_probs(lm, prefix, target, m)) for m in subsets) / len(subsets)
        total += (length / count) * mean / length
    return total


def test_one_token_continuation_is_scored_exactly(random_model_dir):
    lm = random_lm(random_model_dir, mc_num=16)
    prefix, target = lm.encode_pair(CONTEXT, "7")
    assert len(target) == 1
    estimate, _ = lm.score(CONTEXT, "7")
    assert estimate == pytest.approx(token_log_probs(lm, prefix, target, (0,))[0], abs=1e-9)


def test_monte_carlo_estimate_is_unbiased_for_the_bound(random_model_dir):
    """600 stratified draws of a 3-token continuation against the bound computed over all 7 masks; the
    tolerance is 4 standard errors of the draws (conservative: stratification only lowers the error)."""
    lm = random_lm(random_model_dir, mc_num=600)
    prefix, target = lm.encode_pair(CONTEXT, "#14")
    assert len(target) == 3

    def terms(mc_num: int, seed: int) -> torch.Tensor:
        return likelihood_terms(lm.gm.model, prefix, target, lm.gm.mask_token_id, mc_num, seed,
                                pair_key(CONTEXT, "#14"), 200, torch.device("cpu"))

    draws = terms(600, 0)
    exact = exact_bound(lm, prefix, target)
    error = 4 * float(draws.std()) / math.sqrt(len(draws))
    assert abs(float(draws.mean()) - exact) < error, (float(draws.mean()), exact, error)
    few = terms(12, 0)
    assert float(few.mean()) == random_lm(random_model_dir, mc_num=12).score(CONTEXT, "#14")[0]  # keyed by text
    assert not torch.equal(terms(12, 1), few)  # another seed draws other masks


def test_is_greedy_says_whether_greedy_decoding_gives_the_continuation(random_model_dir):
    from mdm_scale.generation.evaluate import decode_shard
    from mdm_scale.generation.sampler import SamplingConfig

    lm = random_lm(random_model_dir, mc_num=3, check_greedy=True)
    greedy = decode_shard(lm.gm, [CONTEXT], SamplingConfig(gen_length=3, steps=3, block_length=3), 1, 0, 1,
                          torch.device("cpu"))[0]
    assert len(greedy) == 3 and lm.score(CONTEXT, greedy)[1] is True
    other = "".join("1" if c != "1" else "2" for c in greedy)
    assert lm.score(CONTEXT, other)[1] is False
    assert random_lm(random_model_dir, mc_num=3).score(CONTEXT, greedy)[1] is False  # not asked: not computed


def test_fast_decoding_model_args_reach_the_sampler(random_model_dir):
    lm = random_lm(random_model_dir, block_length=2, threshold=0.9, cache="dual")
    assert (lm.sampling.threshold, lm.sampling.cache, lm.sampling.block_length) == (0.9, "dual", 2)
    assert random_lm(random_model_dir, cache=None).sampling.cache == "none"  # lm-eval reads cache=none as None
    assert random_lm(random_model_dir, threshold=0.9, cuda_graph=True).sampling.cuda_graph
    with pytest.raises(GenerationError, match="--steps 4 and --threshold 0.9: give one"):
        random_lm(random_model_dir, steps=4, threshold=0.9)


def write_tasks(directory, records: list[dict]) -> None:
    """A generation task and a multiple-choice task over local JSONL files (lm-eval's ``json`` loader)."""
    for name in ("gen", "mc"):
        with open(directory / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    def common(name: str) -> str:
        return (f"task: tiny_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {directory / name}.jsonl\ntest_split: test\ndoc_to_text: \"{{{{prompt}}}}\"\n")

    (directory / "gen.yaml").write_text(common("gen") + "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
                                        "generation_kwargs:\n  until: [\".\"]\nmetric_list:\n  - metric: exact_match\n")
    (directory / "mc.yaml").write_text(common("mc") + "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
                                       "doc_to_target: label\nmetric_list:\n  - metric: acc\n")


def test_lm_eval_runs_local_tasks_offline_like_generate(tiny_export, synth_dir, tmp_path, capsys):
    _, export_dir = tiny_export
    records = []
    for line in (synth_dir / "eval.jsonl").read_text().splitlines()[:3]:
        record = json.loads(line)
        answer = record["response"].split("#### ")[-1]
        records.append({"prompt": record["prompt"], "answer": answer, "choices": [answer, str(int(answer) + 1)],
                        "label": 0})
    write_tasks(tmp_path, records)
    sampling = {"gen_length": 16, "block_length": 8, "temperature": 1.0, "seed": 3, "threshold": 0.1, "cache": "dual"}
    model_args = ",".join(f"{k}={v}" for k, v in {"pretrained": export_dir, **sampling, "mc_num": 8}.items())
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mdm_scale.cli", "lm-eval", "--model", "mdm_scale", "--model_args", model_args,
         "--tasks", "tiny_gen,tiny_mc", "--include_path", str(tmp_path), "--batch_size", "4", "--device", "cpu",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=REPO, env={**os.environ, **offline}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(open(glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))[0]).read())["results"]
    assert 0 <= results["tiny_gen"]["exact_match,none"] <= 1 and 0 <= results["tiny_mc"]["acc,none"] <= 1

    def samples(task: str) -> list[dict]:
        path = glob.glob(str(tmp_path / "out" / "*" / f"samples_{task}_*.jsonl"))[0]
        return sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in records))
    capsys.readouterr()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sampling.items()]
    assert main(["generate", "--checkpoint", str(export_dir), "--data", str(prompts), *flags]) == 0
    generated = [json.loads(line)["prediction"].split(".")[0] for line in capsys.readouterr().out.splitlines()]
    assert [s["arguments"]["gen_args_0"]["arg_0"] for s in samples("tiny_gen")] == [r["prompt"] for r in records]
    assert [s["resps"][0][0] for s in samples("tiny_gen")] == generated

    lm = MDMScaleLM(pretrained=str(export_dir), **sampling, mc_num=8, batch_size=4, device="cpu")
    for sample in samples("tiny_mc"):
        for request, response in zip(sample["arguments"].values(), sample["resps"]):
            value = float(response[0][0])
            assert math.isfinite(value) and value < 0
            assert value == pytest.approx(lm.score(request["arg_0"], request["arg_1"])[0], rel=1e-6)
