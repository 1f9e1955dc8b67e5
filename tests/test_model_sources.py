"""Models from local Hugging Face directories (``models/loading.py``), built on the fly with tiny random weights,
no hub: a directory with its own modelling code (``trust_remote_code``, as LLaDA's releases ship it), ModernBERT,
the [MASK] id taken from the model config, and the tokenizer's chat template in the data path. LLaDA and Dream
themselves are read natively: ``test_native_formats.py``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

from conftest import read_scalars, tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.config.schema import ConfigError
from mdm_scale.training.trainer import Trainer

# ---- a directory with its own modelling code -------------------------------------------------------------------
# As LLaDA's releases do, it ships configuration_remote.py / modeling_remote.py next to its weights; config.json
# names them in auto_map (AutoConfig and AutoModel only: there is no AutoModelForMaskedLM entry), and
# RemoteMLM(input_ids, attention_mask) returns full logits, from a small bidirectional network of our own.
CONFIGURATION = '''
from transformers import PretrainedConfig


class RemoteMLMConfig(PretrainedConfig):
    model_type = "remote_mlm"

    def __init__(self, d_model=32, n_layers=1, n_heads=4, vocab_size=64, mask_token_id=None,
                 max_sequence_length=256, **kwargs):
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.vocab_size, self.mask_token_id, self.max_sequence_length = vocab_size, mask_token_id, max_sequence_length
        super().__init__(**kwargs)
'''
MODELING = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_remote import RemoteMLMConfig


class RemoteMLM(PreTrainedModel):
    config_class = RemoteMLMConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(config.d_model, config.n_heads, 2 * config.d_model,
                                                               dropout=0.0, batch_first=True)
                                    for _ in range(config.n_layers))
        self.ff_out = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.wte(input_ids)
        pad = None if attention_mask is None else attention_mask == 0
        for block in self.blocks:  # no causal mask: every position attends to every other
            h = block(h, src_key_padding_mask=pad)
        return CausalLMOutputWithPast(logits=self.ff_out(h))
'''


def no_mask_tokenizer(texts: list[str], chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A character tokenizer without a [MASK] token (as LLaDA's: its mask id lives only in its model config)."""
    specials = ["<pad>", "<eos>", "<unk>"]
    chars = sorted(set("".join(texts)) - set(specials))
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def synth_texts(synth: Path) -> list[str]:
    return [(synth / name).read_text() for name in ("train.jsonl", "eval.jsonl")]


@pytest.fixture(scope="module")
def remote_dir(synth_dir, tmp_path_factory) -> Path:
    """config.json + remote code + random weights + a tokenizer without a mask token; the mask id (one past the
    tokenizer's vocabulary, as LLaDA reserves its own) is in the config only."""
    out = tmp_path_factory.mktemp("remote")
    tokenizer = no_mask_tokenizer(synth_texts(synth_dir))
    tokenizer.save_pretrained(str(out))
    (out / "configuration_remote.py").write_text(CONFIGURATION)
    (out / "modeling_remote.py").write_text(MODELING)
    mask_id = len(tokenizer) + 1
    config = {"model_type": "remote_mlm", "architectures": ["RemoteMLM"], "d_model": 32, "n_layers": 1, "n_heads": 4,
              "vocab_size": len(tokenizer) + 8, "mask_token_id": mask_id, "max_sequence_length": 256,
              "auto_map": {"AutoConfig": "configuration_remote.RemoteMLMConfig",
                           "AutoModel": "modeling_remote.RemoteMLM"}}
    (out / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)  # random weights built by the directory's own classes, as a release ships them
    model = AutoModel.from_config(AutoConfig.from_pretrained(str(out), trust_remote_code=True),
                                  trust_remote_code=True)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "config.json").write_text(json.dumps(config))  # save_pretrained rewrote it; keep the release's form
    return out


def trainer(synth: Path, out: Path, env, **overrides) -> Trainer:
    return Trainer(load_config([], tiny_overrides(synth, out, **overrides)), env)


def test_remote_directory_needs_trust_remote_code_then_trains_with_the_config_mask_id(synth_dir, remote_dir, tmp_path,
                                                                                    dist_env):
    remote = {"model.path": str(remote_dir), "data.tokenizer": str(remote_dir)}
    with pytest.raises(ConfigError, match=r"'model.path' = .*config.json names modelling code shipped in the "
                                          r"directory \(auto_map\); set model.trust_remote_code=true"):
        trainer(synth_dir, tmp_path / "refused", dist_env, **remote)
    assert not (tmp_path / "refused").exists()

    t = trainer(synth_dir, tmp_path / "run", dist_env, **remote, **{"model.trust_remote_code": True,
                                                                  "train.max_steps": 16, "train.lr": 3e-3})
    mask_id = json.loads((remote_dir / "config.json").read_text())["mask_token_id"]
    assert t.data.tokenizer.mask_token_id is None and t.mask_token_id == mask_id
    assert type(t.engine.module.model).__name__ == "RemoteMLM"  # loaded through AutoModel, remote class
    noisy = t.objective.corrupt(t.loader.micro_batch_at(0, 0))
    assert (noisy.model_inputs()["input_ids"] == mask_id).sum() == noisy.masked_tokens > 0
    losses = read_scalars(t.fit()["tensorboard_dir"], "train/loss")
    assert sum(losses[s] for s in range(13, 17)) < sum(losses[s] for s in range(1, 5)) - 0.5


def test_model_mask_token_id_overrides_tokenizer_and_model_config(synth_dir, remote_dir, tmp_path, dist_env):
    from mdm_scale.models.loading import load_hf_config, resolve_mask_token_id

    tokenizer = no_mask_tokenizer(synth_texts(synth_dir))
    for overrides, expected in (({}, None), ({"model.path": str(remote_dir), "model.trust_remote_code": True},
                                             len(tokenizer) + 1),
                                ({"model.path": str(remote_dir), "model.trust_remote_code": True,
                                  "model.mask_token_id": 3}, 3)):
        cfg = load_config([], tiny_overrides(synth_dir, tmp_path, **overrides))
        if expected is None:
            with pytest.raises(ConfigError, match="no \\[MASK\\] token: .* set model.mask_token_id"):
                resolve_mask_token_id(cfg, tokenizer, load_hf_config(cfg))
        else:
            assert resolve_mask_token_id(cfg, tokenizer, load_hf_config(cfg)) == expected


def test_modernbert_masked_lm_trains_through_the_same_path(synth_dir, tmp_path, dist_env):
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from mdm_scale.data.tokenizer import build_char_tokenizer
    from mdm_scale.models.loading import HFMaskedLMAdapter

    vocab = len(build_char_tokenizer(synth_texts(synth_dir))) + 8
    torch.manual_seed(0)
    ModernBertForMaskedLM(ModernBertConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=256, local_attention=16, pad_token_id=0, eos_token_id=1, bos_token_id=3,
        cls_token_id=3, sep_token_id=1, attn_implementation="sdpa")).save_pretrained(tmp_path / "modernbert")
    t = trainer(synth_dir, tmp_path / "run", dist_env, **{"model.path": str(tmp_path / "modernbert"),
                                                          "train.max_steps": 16, "train.lr": 3e-3})
    assert isinstance(t.engine.module, HFMaskedLMAdapter)
    assert type(t.engine.module.model).__name__ == "ModernBertForMaskedLM"
    losses = read_scalars(t.fit()["tensorboard_dir"], "train/loss")
    assert sum(losses[s] for s in range(13, 17)) < sum(losses[s] for s in range(1, 5)) - 0.5


CHAT_TEMPLATE = textwrap.dedent("""\
    {%- for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor -%}
    {%- if add_generation_prompt %}<assistant>{% endif -%}""")


def test_chat_template_wraps_every_prompt_in_training_and_generation(synth_dir, tmp_path):
    """``data.chat_template: true``: the prompt tokens are exactly the template's text (user turn + generation
    prompt), the response follows unchanged, and generation encodes its prompts the same way."""
    from mdm_scale.data.build import build_data
    from mdm_scale.data.dataset import encode_prompts

    records = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()]
    tok_dir = tmp_path / "tokenizer"
    no_mask_tokenizer(synth_texts(synth_dir) + ["<>/userasistn"], CHAT_TEMPLATE).save_pretrained(str(tok_dir))
    data = {}
    for template in (True, False):
        cfg = load_config([], tiny_overrides(synth_dir, tmp_path / "run", **{
            "data.tokenizer": str(tok_dir), "data.chat_template": template, "model.mask_token_id": 2}))
        data[template] = build_data(cfg.data, cfg.seed, tmp_path / "unused")
    tokenizer = data[True].tokenizer
    ids, prompt_len = data[True].train.example(0)
    assert tokenizer.decode(ids[:prompt_len]) == f"<user>{records[0]['prompt']}</user><assistant>"
    assert tokenizer.decode(ids[prompt_len:]) == records[0]["response"] + "<eos>"
    plain_ids, plain_len = data[False].train.example(0)
    assert tokenizer.decode(plain_ids[:plain_len]) == records[0]["prompt"]
    assert list(ids[prompt_len:]) == list(plain_ids[plain_len:])
    assert encode_prompts(tokenizer, [records[0]["prompt"]], True) == [list(ids[:prompt_len])]


def test_generate_decodes_a_remote_directory_only_with_trust_remote_code(remote_dir, capsys):
    """``mdm-scale generate`` on the directory with its own code: refused with a one-line error without
    ``--trust-remote-code``; with it, the remote model decodes with the config's [MASK] id."""
    from mdm_scale.cli import main
    from mdm_scale.data.dataset import encode_prompts
    from mdm_scale.generation.evaluate import decode_answer
    from mdm_scale.generation.model_source import load_generation_model
    from mdm_scale.generation.sampler import SamplingConfig, diffusion_generate

    argv = ["generate", "--checkpoint", str(remote_dir), "--prompt", "Mia has 3 shells.", "--gen-length", "6"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mdm-scale: error: --checkpoint {remote_dir}: {remote_dir}/config.json names modelling "
                          f"code shipped in the directory") and \
        "--trust-remote-code" in err and len(err.splitlines()) == 1, err
    assert main([*argv, "--trust-remote-code"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    gm = load_generation_model(remote_dir, torch.device("cpu"), torch.float32, trust_remote_code=True)
    assert gm.mask_token_id == json.loads((remote_dir / "config.json").read_text())["mask_token_id"]
    out = diffusion_generate(gm.model, encode_prompts(gm.tokenizer, ["Mia has 3 shells."], False), [0],
                             gm.mask_token_id, gm.tokenizer.pad_token_id, SamplingConfig(6, 6, 6), torch.device("cpu"))
    assert printed == {"prompt": "Mia has 3 shells.",
                       "prediction": decode_answer(gm.tokenizer, out[0, -6:].tolist(), gm.tokenizer.eos_token_id)}
