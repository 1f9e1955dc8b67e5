"""LLaDA and Dream checkpoints read natively into the built-in model class (``models/formats.py``,
``models/native.py``): logits equal the upstream reference logits of the tiny fixtures (float32, CPU, atol
1e-5), padded and unpadded; Dream's shifted logits reach the masked head, the sampler, the lm-eval likelihood
and packed rows; sharded checkpoints; and one-line errors for what the loader cannot read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mdm_scale.config.schema import ConfigError
from mdm_scale.models.native import load_native, native_config, native_format
from mdm_scale.models.safetensors_dir import INDEX, write_safetensors

ATOL = 1e-5
"""The fixtures' tolerance: the upstream code's own summation-order noise is 1.4e-6 to 1.9e-6."""
MASK_ID = 500  # both fixtures


def load(path, **config_changes):
    config = native_config(path, native_format(path))
    for key, value in config_changes.items():
        setattr(config, key, value)
    return load_native(path, config).eval()


def shifted(raw: torch.Tensor) -> torch.Tensor:
    """Dream's reading of raw logits: position j's prediction is raw[j - 1], position 0's is raw[0]."""
    return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)


def reference(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "reference.safetensors"))


def expected_logits(path, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference logits as the model must return them (Dream: shifted), and where to compare them: every
    position unpadded, the real positions padded (LLaDA masks padded keys, Dream keys and queries; at real
    positions both equal the built-in key mask)."""
    ref = reference(path)
    logits = ref["logits_padded" if padded else "logits"]
    if path.name.startswith("dream"):
        logits = shifted(logits)
    where = ref["attention_mask_padded"].bool() if padded else torch.ones(logits.shape[:2], dtype=torch.bool)
    return logits, where


def assert_matches_reference(logits: torch.Tensor, expected: torch.Tensor, where: torch.Tensor) -> None:
    error = (logits - expected)[where].abs().max().item()
    assert error <= ATOL, f"max |logits - reference| = {error:.3g} > {ATOL}"


def model_logits(model, path, padded: bool) -> torch.Tensor:
    ref = reference(path)
    with torch.no_grad():
        if padded:
            return model(ref["input_ids_padded"], ref["attention_mask_padded"].bool()).logits
        return model(ref["input_ids"]).logits


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", ["llada", "dream"])
def test_logits_equal_the_upstream_reference(name, padded, llada_fixture, dream_fixture):
    path = llada_fixture if name == "llada" else dream_fixture
    model = load(path)
    assert model.config.source_format == name and model.config.logit_shift == (name == "dream")
    assert_matches_reference(model_logits(model, path, padded), *expected_logits(path, padded))


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_the_parity_check_fails_when_the_reference_moves_by_1e_3(name, llada_fixture, dream_fixture):
    path = llada_fixture if name == "llada" else dream_fixture
    logits = model_logits(load(path), path, padded=False)
    expected, where = expected_logits(path, padded=False)
    moved = expected.clone()
    moved[1, 5, 7] += 1e-3
    with pytest.raises(AssertionError, match="max \\|logits - reference\\|"):
        assert_matches_reference(logits, moved, where)


def test_sharded_bf16_checkpoint_loads_tensor_by_tensor(llada_fixture, tmp_path):
    """The released 8B checkpoints are bf16 shards with an index: the loader reads them into the same
    parameters as the single file (cast exactly), and a missing shard or a wrong index entry is an error."""
    tensors = load_file(str(llada_fixture / "model.safetensors"))
    sharded = tmp_path / "sharded"
    files = write_safetensors(((k, v.to(torch.bfloat16)) for k, v in sorted(tensors.items())), sharded,
                              max_shard_bytes=40_000)
    assert len(files) > 3 and (sharded / INDEX).is_file()
    shutil.copy(llada_fixture / "config.json", sharded)
    model = load(sharded)
    single = load(llada_fixture)
    for (name, got), (_, want) in zip(model.state_dict().items(), single.state_dict().items()):
        assert torch.equal(got, want.to(torch.bfloat16).float()), name
    index = json.loads((sharded / INDEX).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = files[-1].name
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=f"{INDEX}: tensor '{first}' is not in {files[-1].name}"):
        load(sharded)
    files[0].unlink()
    with pytest.raises(ConfigError, match=f"lists {files[0].name}, which is missing"):
        load(sharded)


# ---- Dream's shift reaches every path that reads the model ----------------------------------------------------
def test_dream_masked_loss_is_the_cross_entropy_of_the_shifted_reference(dream_fixture):
    """The masked-only head (and the full-logits loss) at the [MASK] positions of the reference input, among
    them position 0 of row 1, which reads its own state."""
    ref = reference(dream_fixture)
    ids = ref["input_ids"]
    positions = (ids.reshape(-1) == MASK_ID).nonzero().squeeze(1)
    assert 24 in positions.tolist()  # row 1, position 0
    targets = torch.arange(len(positions)) * 7 % 512
    coef = torch.rand(len(positions), generator=torch.Generator().manual_seed(0))
    expected_ce = F.cross_entropy(shifted(ref["logits"]).reshape(-1, 512)[positions], targets, reduction="none")
    for head in ("masked", "full"):
        with torch.no_grad():
            out = load(dream_fixture, loss_head=head)(ids, loss_positions=positions, loss_targets=targets,
                                                      loss_coef=coef)
        assert torch.allclose(out.token_ce, expected_ce, atol=ATOL), head
        assert out.loss.item() == pytest.approx((coef * expected_ce).sum().item(), abs=1e-4)


def test_dream_sampler_decodes_from_the_shifted_logits(dream_fixture):
    """Reference row 0 is 21 tokens then three [MASK]s: the sampler's first forward is exactly the reference
    input, so its first choice (the most confident of the three positions) follows the shifted reference,
    which here differs from what the raw logits would choose."""
    from mdm_scale.generation.sampler import SamplingConfig, diffusion_generate

    ref = reference(dream_fixture)
    prompt = ref["input_ids"][0, :21].tolist()
    assert ref["input_ids"][0, 21:].eq(MASK_ID).all()

    def first_choice(logits):
        window = logits[0, 21:].clone()
        window[:, MASK_ID] = -torch.inf
        confidence, token = torch.softmax(window, -1).max(-1)
        return int(confidence.argmax()), int(token[confidence.argmax()])

    expected = first_choice(shifted(ref["logits"]))
    assert expected != first_choice(ref["logits"])  # the check can tell the two conventions apart
    model = load(dream_fixture)
    calls = []
    original = model.forward

    def recorded(*args, **kwargs):
        calls.append(kwargs["input_ids"].clone())
        return original(*args, **kwargs)

    model.forward = recorded
    out = diffusion_generate(model, [prompt], [0], MASK_ID, 481, SamplingConfig(3, 3, 3), torch.device("cpu"))
    assert torch.equal(calls[0][0], ref["input_ids"][0])
    position, token = expected
    assert out[0, 21 + position].item() == token and calls[1][0, 21 + position].item() == token


def test_dream_lm_eval_likelihood_reads_the_shifted_logits(dream_fixture):
    """lm-eval's Monte Carlo likelihood with ``mc_num = 3`` on a 3-token continuation masks 1, 2 and 3
    positions; the third draw masks them all, which is the reference input: its term is the sum of the shifted
    reference's log-probabilities of the continuation."""
    from mdm_scale.generation.lm_eval_model import likelihood_terms

    ref = reference(dream_fixture)
    prefix, continuation = ref["input_ids"][0, :21].tolist(), [7, 300, 42]
    terms = likelihood_terms(load(dream_fixture), prefix, continuation, MASK_ID, 3, 0, 1234, 3, torch.device("cpu"))
    logp = torch.log_softmax(shifted(ref["logits"])[0, 21:].double(), -1)
    assert terms[2].item() == pytest.approx(sum(logp[i, c].item() for i, c in enumerate(continuation)), abs=1e-4)


def test_dream_shift_restarts_at_each_packed_record(dream_fixture):
    """Two records in one packed row (document ids, positions restarting at 0): each record's logits are those
    it has alone; the second record's first position reads its own state, never the first record's last."""
    ref = reference(dream_fixture)
    a, b = ref["input_ids"][0, :10], ref["input_ids"][1, :14]
    row = torch.cat([a, b])[None]
    documents = torch.tensor([[0] * 10 + [1] * 14])
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    model = load(dream_fixture)
    with torch.no_grad():
        packed = model(row, document_ids=documents, position_ids=positions).logits[0]
        alone_a, alone_b = model(a[None]).logits[0], model(b[None]).logits[0]
    assert torch.allclose(packed[:10], alone_a, atol=ATOL)
    assert torch.allclose(packed[10:], alone_b, atol=ATOL)


# ---- what the loader refuses, in one line naming the file ---------------------------------------------------
def copy_fixture(path, out, **config_changes):
    """A copy of a fixture with config.json fields changed (None: removed)."""
    shutil.copytree(path, out)
    config = json.loads((out / "config.json").read_text())
    config.update(config_changes)
    config = {k: v for k, v in config.items() if v is not None}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_unsupported_fields_and_unknown_formats_are_refused_naming_the_file(llada_fixture, dream_fixture, tmp_path):
    from mdm_scale.models.loading import auto_config

    alibi = copy_fixture(llada_fixture, tmp_path / "alibi", alibi=True)
    with pytest.raises(ConfigError, match=f"{alibi}/config.json: 'alibi' = True is not supported"):
        native_config(alibi, native_format(alibi))
    scaled = copy_fixture(dream_fixture, tmp_path / "yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match=f"{scaled}/config.json: 'rope_parameters' = .*yarn.* is not supported"):
        native_config(scaled, native_format(scaled))
    unknown = copy_fixture(llada_fixture, tmp_path / "unknown", model_type="mystery", architectures=["MysteryLM"],
                           auto_map=None)
    assert native_format(unknown) is None
    with pytest.raises(ConfigError, match=f"{unknown}/config.json: unknown format .*reads LLaDA, Dream"):
        auto_config(unknown, trust_remote_code=False)


def test_tensors_that_do_not_fit_the_config_are_refused(llada_fixture, tmp_path):
    tensors = load_file(str(llada_fixture / "model.safetensors"))
    missing = copy_fixture(llada_fixture, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if "blocks.1.up_proj" not in k}, str(missing / "model.safetensors"))
    with pytest.raises(ConfigError, match="tensor 'model.transformer.blocks.1.up_proj.weight' is missing"):
        load(missing)
    extra = copy_fixture(llada_fixture, tmp_path / "extra")
    save_file({**tensors, "model.transformer.blocks.0.q_proj.bias": torch.zeros(64)}, str(extra / "model.safetensors"))
    with pytest.raises(ConfigError, match="tensor 'model.transformer.blocks.0.q_proj.bias' .* has no place"):
        load(extra)
    wider = copy_fixture(llada_fixture, tmp_path / "wider", mlp_hidden_size=256)
    with pytest.raises(ConfigError, match=r"tensor shapes \[\[192, 64\], \[192, 64\]\] .* do not fit"):
        load(wider)


def test_dream_with_its_own_code_is_refused(dream_fixture):
    with pytest.raises(ConfigError, match="Dream checkpoint: its own code .* returns unshifted logits"):
        native_format(dream_fixture, trust_remote_code=True)
