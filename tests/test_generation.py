"""Decoding, answer scoring, ``mdm-scale eval`` and the export round trip (all in this process, tiny models)."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_overrides
from mdm_scale.cli import main
from mdm_scale.config.loader import load_config
from mdm_scale.data.records import DataError
from mdm_scale.generation import sampler
from mdm_scale.generation.answers import AnswerPattern, Score
from mdm_scale.generation.evaluate import read_prompt_records
from mdm_scale.generation.model_source import load_generation_model
from mdm_scale.generation.sampler import GenerationError, SamplingConfig
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.kv_cache import KVCache
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion, build_attention_mask, rotary_tables
from mdm_scale.training.trainer import Trainer

MASK, PAD, EOS, VOCAB = 2, 0, 1, 40
CPU = torch.device("cpu")


def random_model(causal: bool = False, layers: int = 2, sharp: bool = False) -> MDMForMaskedDiffusion:
    """A random tiny model in fp64, so that padding changes no argmax through rounding. ``sharp`` scales the
    output layer by 60, which spreads the confidences over (0, 1) (a random head gives about 1/V everywhere), so
    that a threshold step unmasks several positions in some rows and one in others, and the attention
    projections by 8, so that attention is far from uniform and depends on the positions."""
    torch.manual_seed(0)
    config = MDMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, causal=causal, mask_token_id=MASK)
    model = MDMForMaskedDiffusion(config).double().eval()
    if sharp:
        with torch.no_grad():
            model.lm_head.weight.mul_(60.0)
            for layer in model.model.layers:
                layer.attn.qkv_proj.weight.mul_(8.0)
    return model


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]


class KnownLogits:
    """A stub masked-diffusion "model" with known outputs: at answer position p (after the prompt width) the
    logit of ``tokens[p]`` is ``scores[p]`` and every other logit is 0, whatever the input. It records the
    input of every call, so a test sees the state of the answer window before each step."""

    def __init__(self, width: int, tokens: list[int], scores: list[float]):
        self.width, self.tokens, self.scores, self.inputs = width, tokens, scores, []

    def __call__(self, input_ids, attention_mask=None):
        self.inputs.append(input_ids.clone())
        logits = torch.zeros(*input_ids.shape, VOCAB, dtype=torch.float64)
        for p, (token, score) in enumerate(zip(self.tokens, self.scores)):
            logits[:, self.width + p, token] = score
        return SimpleNamespace(logits=logits)

    def filled_per_step(self, out: torch.Tensor, row: int = 0) -> list[set[int]]:
        """Answer positions unmasked by each step of row ``row``."""
        states = [x[row, self.width:] != MASK for x in [*self.inputs, out]]
        return [set((after & ~before).nonzero().flatten().tolist()) for before, after in zip(states, states[1:])]


# Block 1 holds the highest scores, and inside each block the order is not left to right: a sampler that
# ignores blocks, fills positions in order, or keeps the least confident prediction first decodes differently.
ANSWER = [11, 12, 13, 14, 15, 16, 17, 18]
SCORES = [1.0, 3.0, 2.0, 0.5, 5.0, 4.0, 6.0, 4.5]


@pytest.mark.parametrize("steps, order", [(8, [{1}, {2}, {0}, {3}, {6}, {4}, {7}, {5}]),
                                          (4, [{1, 2}, {0, 3}, {4, 6}, {5, 7}]),
                                          (2, [{0, 1, 2, 3}, {4, 5, 6, 7}])])
def test_low_confidence_remasking_keeps_the_most_confident_predictions_block_by_block(steps, order):
    width = max(map(len, PROMPTS))
    model = KnownLogits(width, ANSWER, SCORES)
    cfg = SamplingConfig(gen_length=8, steps=steps, block_length=4)
    out = sampler.diffusion_generate(model, PROMPTS, [0, 1, 2], MASK, PAD, cfg, CPU)
    for row in range(len(PROMPTS)):
        assert model.filled_per_step(out, row) == order
        assert out[row, width:].tolist() == ANSWER
    padded, _ = sampler.left_pad(PROMPTS, width, PAD)
    assert torch.equal(out[:, :width], padded) and len(model.inputs) == steps
    for before in model.inputs:
        assert torch.equal(before[:, :width], padded)  # the prompt is never masked or rewritten


def test_random_remasking_unmasks_the_positions_of_a_block_in_a_uniformly_random_order():
    """400 records, one position per step: the first position kept is uniform over the block's 4 (counts within
    4.5 binomial standard deviations of 100; confidence order would always pick position 1), and the decoded
    tokens are still the argmax."""
    records = 400
    model = KnownLogits(1, ANSWER[:4], SCORES[:4])
    cfg = SamplingConfig(gen_length=4, steps=4, block_length=4, remasking="random", seed=11)
    out = sampler.diffusion_generate(model, [[5]] * records, list(range(records)), MASK, PAD, cfg, CPU)
    assert (out[:, 1:] == torch.tensor(ANSWER[:4])).all()
    first = (model.inputs[1][:, 1:] != MASK).int().argmax(1)
    counts = torch.bincount(first, minlength=4).tolist()
    bound = 4.5 * (records * 0.25 * 0.75) ** 0.5
    assert all(abs(c - records / 4) < bound for c in counts), counts


@pytest.mark.parametrize("temperature, p_high", [(0.0, 1.0), (1.0, 0.75), (0.5, 0.9)])
def test_temperature_samples_from_the_softmax_of_the_scaled_logits(temperature, p_high):
    """Two candidate tokens with logits 0 and log 3 (all others far below): softmax(logits / T) gives the higher
    one probability 3/4 at T = 1 and 9/10 at T = 1/2. One step decodes the whole window, so each of the
    64 x 16 positions is one draw; the share is within 4.5 binomial standard deviations."""
    records, length, low, high = 64, 16, 21, 22
    width = 1

    class TwoTokens(KnownLogits):
        def __call__(self, input_ids, attention_mask=None):
            logits = torch.full((*input_ids.shape, VOCAB), -1e4, dtype=torch.float64)
            logits[..., low], logits[..., high] = 0.0, torch.log(torch.tensor(3.0))
            return SimpleNamespace(logits=logits)

    cfg = SamplingConfig(gen_length=length, steps=1, block_length=length, temperature=temperature, seed=2)
    out = sampler.diffusion_generate(TwoTokens(width, [], []), [[5]] * records, list(range(records)), MASK, PAD,
                                     cfg, CPU)[:, width:]
    assert set(out.unique().tolist()) <= {low, high}
    share = float((out == high).double().mean())
    bound = 4.5 * (p_high * (1 - p_high) / out.numel()) ** 0.5
    assert abs(share - p_high) <= bound, share


FAST_OPTIONS = [{}, {"threshold": 0.5}, {"threshold": 0.5, "cache": "prefix"}, {"threshold": 0.5, "cache": "dual"},
                {"steps": 6, "cache": "dual"}]


@pytest.mark.parametrize("options", FAST_OPTIONS)
def test_diffusion_is_deterministic_for_a_seed_and_independent_of_the_batch(options):
    """Each prompt decodes alone as in the batch. With the threshold, the rows of this model take different numbers
    of steps in a block (the batch waits for its slowest row): the noise of a row must not depend on that."""
    model = random_model(sharp=True)
    cfg = SamplingConfig(**{"gen_length": 12, "steps": 12, "block_length": 4, "temperature": 1.0, "seed": 7,
                            **options})
    first = sampler.diffusion_generate(model, PROMPTS, [10, 11, 12], MASK, PAD, cfg, CPU)[:, -12:]
    again = sampler.diffusion_generate(model, PROMPTS, [10, 11, 12], MASK, PAD, cfg, CPU)[:, -12:]
    assert torch.equal(first, again) and not (first == MASK).any()
    for row, key in enumerate([10, 11, 12]):
        alone = sampler.diffusion_generate(model, [PROMPTS[row]], [key], MASK, PAD, cfg, CPU)[:, -12:]
        assert torch.equal(alone[0], first[row])  # left padding and batch neighbours change nothing
    other_seed = sampler.diffusion_generate(model, PROMPTS, [10, 11, 12], MASK, PAD, replace(cfg, seed=8), CPU)
    assert not torch.equal(first, other_seed[:, -12:])


class ScoredSteps:
    """A stub model whose confidences the test sets: on its c-th call it predicts token ``10 + c`` at every answer
    position (so the output tells at which call a position was unmasked), with logit ``scores[row][p]`` at
    answer position p and 0 for every other token."""

    def __init__(self, width: int, scores: list[list[float]]):
        self.width, self.scores, self.calls = width, torch.tensor(scores, dtype=torch.float64), 0

    def __call__(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, VOCAB, dtype=torch.float64)
        logits[:, self.width:, 10 + self.calls] = self.scores
        self.calls += 1
        return SimpleNamespace(logits=logits)


def test_threshold_unmasks_exactly_the_masked_positions_above_it_and_at_least_the_most_confident_one():
    """Threshold 0.9 over 39 candidate tokens ([MASK] is never predicted): a logit s gives confidence
    e^s / (e^s + 38), above 0.9 iff s > 5.835 (5.83 -> 0.8996, 5.85 -> 0.9013). Row 0 has 2 positions above in
    each block, then one per step by confidence; row 1 has its whole first block above (one step, then it waits
    unchanged while row 0 finishes) and nothing above in its second block (one per step, most confident first).
    A position decoded on call c holds token 10 + c."""
    scores = [[7.0, 2.0, 5.83, 6.5, 1.0, 5.85, 3.0, 8.0],
              [9.0, 9.0, 9.0, 9.0, 0.5, 0.4, 0.3, 0.2]]
    model = ScoredSteps(3, scores)
    cfg = SamplingConfig(gen_length=8, block_length=4, threshold=0.9)
    decoding = sampler.Decoding(model, [[5, 6, 7], [8, 9, 4]], [0, 1], MASK, PAD, cfg, CPU)
    out = decoding.run()
    calls = (out[:, 3:] - 10).tolist()
    assert calls == [[0, 2, 1, 0, 5, 3, 4, 3],
                     [0, 0, 0, 0, 3, 4, 5, 6]]
    assert model.calls == 3 + 4  # block 0 ends when row 0 has no mask left, block 1 when row 1 has none
    assert decoding.row_forwards.tolist() == [3 + 3, 1 + 4]  # the forwards a row waits through do not count
    assert out[:, :3].tolist() == [[5, 6, 7], [8, 9, 4]]


def hybrid_reference(model: MDMForMaskedDiffusion, refreshed: torch.Tensor, current: torch.Tensor,
                     key_mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Logits at positions [start, end) of ``current`` under the cache's semantics, computed without any cache:
    in every layer, the input is the refresh forward's (of ``refreshed``) except at [start, end), which carries
    ``current``'s own hidden states; each block runs on the whole sequence."""
    inner = model.model
    cos, sin = rotary_tables(current.shape[1], model.config.head_dim, model.config.rope_theta, CPU, torch.float64)
    mask = build_attention_mask(key_mask, None, False)
    old, new = inner.embed_tokens(refreshed), inner.embed_tokens(current)[:, start:end]
    for layer in inner.layers:
        hybrid = old.clone()
        hybrid[:, start:end] = new
        new = layer(hybrid, cos, sin, mask)[:, start:end]
        old = layer(old, cos, sin, mask)
    return model.lm_head(inner.norm(new))


@pytest.mark.parametrize("start, end", [(11, 19), (11, 15), (10, 15)], ids=["prefix", "dual", "dual_shifted"])
@torch.no_grad()
def test_cached_forward_reuses_the_refresh_keys_and_values_outside_the_forwarded_positions(start, end):
    """Prompts left-padded to 7, answer window 12, block 1 = positions [11, 15): the forward of [start, end) against
    the cache recorded at the refresh equals the semantics in kv_cache.py computed without a cache, at two
    successive steps (the first step's writes into the cache must not leak into the second); and, the model
    having 3 layers, it differs from the exact full forward (the cache is approximate there)."""
    model = random_model(layers=3)
    torch.manual_seed(1)
    prompt, real = sampler.left_pad(PROMPTS, 7, PAD)
    window = torch.full((3, 12), MASK)
    window[:, :4] = torch.randint(3, VOCAB, (3, 4))  # block 0 decoded
    refreshed = torch.cat([prompt, window], 1)
    key_mask = torch.cat([real, torch.ones(3, 12, dtype=torch.bool)], 1)
    cache = KVCache()
    model(input_ids=refreshed, attention_mask=key_mask, kv_cache=cache)
    current = refreshed.clone()
    for _ in range(2):  # two steps of block 1, each unmasking two more of its positions
        still = (current[:, 11:15] == MASK).nonzero()
        current[:, 11:15][still[:6, 0], still[:6, 1]] = torch.randint(3, VOCAB, (len(still[:6]),))
        cached = model(input_ids=current[:, start:end], attention_mask=key_mask, kv_cache=cache,
                       query_start=start).logits
        reference = hybrid_reference(model, refreshed, current, key_mask, start, end)
        assert (cached - reference).abs().max() < 1e-10
        exact = model(input_ids=current, attention_mask=key_mask).logits[:, start:end]
        assert (cached - exact).abs().max() > 1e-4


def shifted(model: MDMForMaskedDiffusion) -> MDMForMaskedDiffusion:
    """The same weights with Dream's convention (``config.logit_shift``): the logits at position i are read from
    the hidden state at i - 1 (the first position keeps its own)."""
    model.config.logit_shift = True
    return model


@pytest.mark.parametrize("shift", [False, True], ids=["plain", "logit_shift"])
@pytest.mark.parametrize("options", FAST_OPTIONS[1:])
def test_cached_decoding_equals_uncached_decoding_where_the_cache_is_exact(options, shift):
    """A one-layer model: the keys and values at a position depend on its token alone, and the tokens outside the
    block never change while the block is decoded, so both caches are exact and decode what the uncached sampler
    decodes (also for a model with a logit shift, whose cached steps forward one position before the block). A
    deep model with one step per block: every step is a refresh, bit for bit the uncached forward."""
    model = random_model(layers=1, sharp=True)
    model = shifted(model) if shift else model
    cfg = SamplingConfig(**{"gen_length": 12, "steps": 12, "block_length": 4, "temperature": 1.0, "seed": 3,
                            **options})
    uncached = sampler.diffusion_generate(model, PROMPTS, [4, 5, 6], MASK, PAD, replace(cfg, cache="none"), CPU)
    assert torch.equal(sampler.diffusion_generate(model, PROMPTS, [4, 5, 6], MASK, PAD, cfg, CPU), uncached)
    deep = random_model(layers=3, sharp=True)
    one_step = replace(cfg, steps=3, threshold=None)
    assert torch.equal(sampler.diffusion_generate(deep, PROMPTS, [4, 5, 6], MASK, PAD, one_step, CPU),
                       sampler.diffusion_generate(deep, PROMPTS, [4, 5, 6], MASK, PAD,
                                                  replace(one_step, cache="none"), CPU))


@pytest.mark.parametrize("shift", [False, True], ids=["plain", "logit_shift"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_each_block_records_the_cache_once_and_then_forwards_only_the_positions_its_mode_recomputes(cache, shift):
    """Prompts padded to 7, 3 blocks of 4, 4 steps each: every block's first forward is the whole sequence (the
    refresh, into an empty cache), its other three forward [a, 19) (prefix) or [a, a + 4) (dual) from the block's
    start a, or from a - 1 with a logit shift."""
    model = random_model()
    model = shifted(model) if shift else model
    calls = []
    model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(
        (kwargs.get("query_start", 0), kwargs["input_ids"].shape[1], kwargs["kv_cache"].length)), with_kwargs=True)
    cfg = SamplingConfig(gen_length=12, steps=12, block_length=4, cache=cache)
    sampler.diffusion_generate(model, PROMPTS, [0, 1, 2], MASK, PAD, cfg, CPU)
    expected = []
    for a in (7, 11, 15):
        s = a - shift
        expected += [(0, 19, 0)] + [(s, (19 if cache == "prefix" else a + 4) - s, 19)] * 3
    assert calls == expected


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_decoding_saves_nothing_for_backward_whoever_calls_it(cache):
    """``eval``, the lm-eval model and ``tools/bench/decode_speed.py`` call ``Decoding`` with autograd on and a model
    whose parameters require grad: no forward of it may save a tensor for backward. (With the cache, each cached
    step's in-place write into the cache hung that step's graph, with all its activations, on the cache until the
    block ended: issue 28's out-of-memory at batch 32.)"""
    model = random_model()
    assert torch.is_grad_enabled() and all(p.requires_grad for p in model.parameters())
    cfg = SamplingConfig(gen_length=8, steps=8, block_length=4, cache=cache)
    decoding = sampler.Decoding(model, PROMPTS, [0, 1, 2], MASK, PAD, cfg, CPU)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        forwards = decoding.decode_block(0) + decoding.decode_block(1)
    assert forwards == 8 and saved == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("options", [{"steps": 12}, {"threshold": 0.5}], ids=["fixed", "threshold"])
def test_cuda_graph_decoding_replays_one_recorded_forward_and_decodes_what_eager_decoding_decodes(options):
    """Padded prompts (an attention mask), sampled noise: the graphed sampler runs the model's Python forward
    twice per batch (the warm-up and the recording) however many steps it takes, and its output equals the eager
    sampler's exactly (a replay runs the recorded kernels on the buffers as they are at that step)."""
    model = random_model(sharp=True).cuda()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    cfg = SamplingConfig(gen_length=12, steps=12, block_length=4, temperature=1.0, seed=3)
    cfg = replace(cfg, **options)
    cuda = torch.device("cuda")
    eager = sampler.diffusion_generate(model, PROMPTS, [4, 5, 6], MASK, PAD, cfg, cuda)
    eager_forwards = len(calls)
    calls.clear()
    graphed = sampler.diffusion_generate(model, PROMPTS, [4, 5, 6], MASK, PAD, replace(cfg, cuda_graph=True), cuda)
    assert eager_forwards >= 3 and len(calls) == 2
    assert torch.equal(graphed, eager)


def test_the_kv_cache_refuses_a_forward_with_autograd():
    """A cached forward that records a graph would keep it alive through the cache: a clear error instead."""
    with pytest.raises(ValueError, match=r"forwards without autograd: run them under torch.no_grad\(\)"):
        random_model()(input_ids=torch.full((1, 6), MASK), kv_cache=KVCache())


def test_transfer_counts_split_each_block_evenly():
    assert sampler.transfer_counts(10, 4) == [3, 3, 2, 2] and sampler.transfer_counts(7, 7) == [1] * 7
    assert sampler.transfer_counts(3, 5) == [1, 1, 1, 0, 0]


def test_sampling_settings_are_checked():
    with pytest.raises(GenerationError, match="--block-length 5: must divide --gen-length 16"):
        SamplingConfig(gen_length=16, block_length=5).check()
    with pytest.raises(GenerationError, match="--steps 3: must be a multiple of the number of blocks"):
        SamplingConfig(gen_length=16, block_length=8, steps=3).check()
    with pytest.raises(GenerationError, match=r"--threshold 1.5: must be in \[0, 1\]"):
        SamplingConfig(threshold=1.5).check()
    with pytest.raises(GenerationError, match="--threshold needs --remasking low_confidence"):
        SamplingConfig(threshold=0.9, remasking="random").check()
    with pytest.raises(GenerationError, match="--cache 'full': choose none, prefix or dual"):
        SamplingConfig(cache="full").check()
    with pytest.raises(GenerationError, match="--cache dual: KnownLogits has no cache-aware forward"):
        sampler.diffusion_generate(KnownLogits(1, [], []), [[5]], [0], MASK, PAD, SamplingConfig(cache="dual"), CPU)
    with pytest.raises(GenerationError, match="--cuda-graph with --cache prefix: .* give one of them"):
        SamplingConfig(cuda_graph=True, cache="prefix").check()
    with pytest.raises(GenerationError, match="--cuda-graph needs a CUDA device; decoding runs on cpu"):
        sampler.diffusion_generate(random_model(), [[5]], [0], MASK, PAD, SamplingConfig(cuda_graph=True), CPU)


def test_generate_and_eval_read_the_fast_decoding_options(capsys):
    from mdm_scale.cli import build_parser
    from mdm_scale.generation.cli import _sampling

    common = ["--checkpoint", "missing", "--gen-length", "16", "--block-length", "4"]
    args = build_parser().parse_args(["eval", *common, "--data", "d", "--out", "o", "--threshold", "0.9", "--cache",
                                      "dual"])
    assert _sampling(args) == SamplingConfig(gen_length=16, steps=16, block_length=4, threshold=0.9, cache="dual")
    args = build_parser().parse_args(["generate", *common, "--prompt", "a", "--cache", "prefix"])
    assert _sampling(args) == SamplingConfig(gen_length=16, steps=16, block_length=4, cache="prefix")
    args = build_parser().parse_args(["generate", *common, "--prompt", "a", "--threshold", "0.9", "--cuda-graph"])
    assert _sampling(args) == SamplingConfig(gen_length=16, steps=16, block_length=4, threshold=0.9, cuda_graph=True)
    capsys.readouterr()
    assert main(["generate", *common, "--prompt", "a", "--steps", "8", "--threshold", "0.9"]) == 2
    assert "--steps 8 and --threshold 0.9: give one" in capsys.readouterr().err  # before any model is loaded


def test_greedy_arm_decoding_matches_a_step_by_step_argmax():
    model = random_model(causal=True)
    out = sampler.greedy_generate(model, PROMPTS, PAD, None, 5, CPU)
    for row, prompt in enumerate(PROMPTS):
        ids = list(prompt)
        for _ in range(5):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert out[row].tolist() == ids[len(prompt):]


def test_greedy_arm_decoding_stops_once_every_row_has_ended():
    eos, word, words_before_eos = EOS, 7, [1, 3, 2]  # row r writes `word` n_r times, then EOS

    class Scripted:  # a causal "model" whose next token depends only on how much of its answer a row has written
        calls = 0

        def __call__(self, input_ids, attention_mask):
            Scripted.calls += 1
            logits = torch.zeros(*input_ids.shape, VOCAB)
            for row, prompt in enumerate(PROMPTS):
                written = torch.arange(input_ids.shape[1]) - (len(prompt) - 1)
                logits[row, :, word] = (written < words_before_eos[row]).double()
                logits[row, :, eos] = (written >= words_before_eos[row]).double()
            return SimpleNamespace(logits=logits)

    out = sampler.greedy_generate(Scripted(), PROMPTS, PAD, eos, 6, CPU)
    for row, n in enumerate(words_before_eos):
        assert out[row].tolist() == [word] * n + [eos] * (6 - n)
    assert Scripted.calls == max(words_before_eos) + 1  # not 6: the loop ends when the last row emits EOS


def test_answer_extraction_and_scoring_of_malformed_predictions():
    hashes = AnswerPattern()
    assert hashes.extract("12 + 7 = 19. #### 19") == "19"
    assert hashes.extract("#### 3 then #### 1,234.") == "1234"
    assert hashes.extract(" #### $42 ") == "42"
    for malformed in ("no marker here", "####", "####   ", "", None, 17, ["#### 1"]):
        assert hashes.extract(malformed) is None
    boxed = AnswerPattern(r"\\boxed\{([^}]*)\}")
    assert boxed.extract(r"so \boxed{7} or \boxed{8}") == "8"
    assert boxed.extract("no box") is None
    with pytest.raises(ValueError, match="--answer-regex '\\(': not a valid regular expression"):
        AnswerPattern("(")
    score = Score()
    for predicted, gold in (("19", "19"), (None, "3"), ("4", "5"), (hashes.extract("garbage"), "1")):
        score.add(predicted, gold)
    assert (score.correct, score.total, score.no_answer, score.accuracy) == (1, 4, 2, 0.25)


def test_eval_records_are_checked_with_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "response": "x #### 3"}\n\n{"prompt": "b", "answer": 4}\n')
    records = read_prompt_records(good, AnswerPattern())
    assert [(r.gold, r.line) for r in records] == [("3", 1), ("4", 3)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "response": "no answer"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no gold answer"):
        read_prompt_records(bad, AnswerPattern())
    bad.write_text('{"prompt": "a", "answer": "1"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_prompt_records(bad, AnswerPattern())
    assert len(read_prompt_records(bad.with_name("good.jsonl"), None)) == 2


def test_export_round_trip_generates_identically(synth_dir, tmp_path, dist_env, capsys):
    """Train (ZeRO-3 shards), export, reload with transformers: same weights, same predictions, same accuracy."""
    from transformers import AutoModelForMaskedLM

    run_dir = tmp_path / "run"
    cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(
        synth_dir, run_dir, **{"train.max_steps": 8, "data.response_eos_pad": 40}))
    Trainer(cfg, dist_env).fit()
    export_dir = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(export_dir)]) == 0
    assert (export_dir / "model.safetensors").is_file() and (export_dir / "tokenizer.json").is_file()

    hf = AutoModelForMaskedLM.from_pretrained(str(export_dir))
    assert isinstance(hf, MDMForMaskedDiffusion)
    from_checkpoint = load_generation_model(run_dir, CPU, torch.float32).model.state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, from_checkpoint[name]), name

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(line for line in (synth_dir / "eval.jsonl").read_text().splitlines(True)[:6]))
    results = {}
    for source in (run_dir, export_dir):
        out = tmp_path / f"pred_{source.name}.jsonl"
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(source), "--data", str(data), "--out", str(out), "--gen-length",
                     "40", "--steps", "20", "--block-length", "20", "--temperature", "0.5", "--batch-size", "4"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        predictions = [json.loads(line) for line in out.read_text().splitlines()]
        assert summary["total"] == len(predictions) == 6 and summary["forwards_per_prompt"] == 20
        assert [p["prompt"] for p in predictions] == [json.loads(x)["prompt"] for x in data.read_text().splitlines()]
        results[source.name] = (summary["accuracy"], [p["prediction"] for p in predictions])
    assert results["run"] == results["export"]
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(export_dir)]) == 2  # never overwrites


def test_sharded_decoding_equals_single_rank_decoding(synth_dir):
    """Records split over 2 ranks and batched differently decode exactly as on one rank (keyed noise)."""
    from mdm_scale.data.tokenizer import build_char_tokenizer
    from mdm_scale.generation.evaluate import decode_shard
    from mdm_scale.generation.model_source import GenerationModel

    tokenizer = build_char_tokenizer([(synth_dir / "train.jsonl").read_text()])
    torch.manual_seed(0)
    config = MDMConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, mask_token_id=tokenizer.mask_token_id)
    gm = GenerationModel(MDMForMaskedDiffusion(config).double().eval(), tokenizer, tokenizer.mask_token_id, False,
                         False, "test")
    prompts = [json.loads(line)["prompt"] for line in (synth_dir / "eval.jsonl").read_text().splitlines()[:7]]
    cfg = SamplingConfig(gen_length=8, steps=4, block_length=4, temperature=1.0, seed=5)
    single = decode_shard(gm, prompts, cfg, 3, 0, 1, CPU)
    shards = {**decode_shard(gm, prompts, cfg, 2, 0, 2, CPU), **decode_shard(gm, prompts, cfg, 4, 1, 2, CPU)}
    assert sorted(single) == list(range(7)) and shards == single


def test_response_eos_pad_fills_the_answer_window_with_eos_in_the_loss(synth_dir):
    from mdm_scale.data.build import build_data
    from mdm_scale.data.loader import collate

    cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, synth_dir / "unused",
                                                                  **{"data.response_eos_pad": 60}))
    run_data = build_data(cfg.data, cfg.seed, synth_dir / "no_saved_tokenizer")
    data, eos = run_data.train, run_data.tokenizer.eos_token_id
    ids, scored = data.example(0)
    assert scored.sum() == 60 and scored[-60:].all()
    tail = ids[scored]
    first_eos = list(tail).index(eos)
    assert all(int(t) == eos for t in tail[first_eos:]) and first_eos > 0
    batch = collate(data, [0], [0], 0, 8, 192)
    assert int(batch.loss_mask.sum()) == 60



def test_a_response_of_exactly_response_eos_pad_tokens_has_no_room_for_its_eos(synth_dir):
    """The padded response holds at least one EOS: n tokens need data.response_eos_pad >= n + 1, else the
    response counts as over-long and is cut to the window (data.overlong = truncate), losing its EOS."""
    from mdm_scale.data.build import build_data

    lengths = [len(json.loads(line)["response"]) for line in (synth_dir / "train.jsonl").read_text().splitlines()]
    n, truncated = lengths[0], {}  # char tokenizer: one token per character
    for pad, eos_count in ((n, 0), (n + 1, 1)):
        cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, synth_dir / "unused",
                                                                      **{"data.response_eos_pad": pad}))
        run_data = build_data(cfg.data, cfg.seed, synth_dir / "no_saved_tokenizer")
        ids, scored = run_data.train.example(0)
        tail = [int(t) for t in ids[scored]]
        assert len(tail) == pad and tail.count(run_data.tokenizer.eos_token_id) == eos_count
        truncated[pad] = run_data.train.counts["truncated (response over data.response_eos_pad)"]
    assert truncated[n] - truncated[n + 1] == lengths.count(n)  # exactly the responses of n tokens
