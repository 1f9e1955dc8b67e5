"""``mdm-scale export`` ships its modelling code: plain transformers, without mdm-scale, loads the directory."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap

import torch

from mdm_scale.generation.model_source import load_generation_model

# Runs with ``python -I -S``: no PYTHONPATH, no current directory and no .pth files (so not the editable install
# of mdm-scale either); only the site-packages directories (torch, transformers) are put on the path by hand.
LOAD_WITHOUT_MDM_SCALE = textwrap.dedent("""
    import importlib.util, sys
    sys.path.extend(sys.argv[1].split(":"))
    assert importlib.util.find_spec("mdm_scale") is None, "mdm_scale is importable"
    import torch
    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained(sys.argv[2], trust_remote_code=True, dtype=torch.float32).eval()
    assert "mdm_scale" not in sys.modules
    ids = torch.load(sys.argv[3])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.save({"logits": logits, "module": type(model).__module__}, sys.argv[4])
""")


def test_export_loads_with_transformers_alone_and_gives_the_checkpoints_logits(tiny_export, tmp_path):
    run_dir, export_dir = tiny_export
    config = (export_dir / "config.json").read_text()
    assert '"AutoModelForMaskedLM": "modeling_mdm.MDMForMaskedDiffusion"' in config
    assert {"modeling_mdm.py", "configuration_mdm.py", "kernels.py", "kv_cache.py", "masked_head.py"} <= {
        p.name for p in export_dir.iterdir()}

    gm = load_generation_model(run_dir, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, len(gm.tokenizer), (3, 17), generator=torch.Generator().manual_seed(0))
    ids[:, 5:9] = gm.mask_token_id
    torch.save(ids, tmp_path / "ids.pt")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", LOAD_WITHOUT_MDM_SCALE, ":".join(site.getsitepackages()),
                           str(export_dir), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["module"].startswith("transformers_modules."), out["module"]  # the shipped copy ran
    with torch.no_grad():
        expected = gm.model(input_ids=ids).logits
    assert torch.equal(out["logits"], expected)


def test_export_is_model_path_of_a_new_run(tiny_export, synth_dir, tmp_path, dist_env):
    """Fine-tuning from an export uses the installed modelling code, never the copy shipped with it."""
    from conftest import tiny_overrides
    from mdm_scale.config.loader import load_config
    from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion
    from mdm_scale.training.trainer import Trainer

    _, export_dir = tiny_export
    cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, tmp_path / "run", **{
        "model.path": str(export_dir), "data.tokenizer": str(export_dir), "train.max_steps": 1}))
    trainer = Trainer(cfg, dist_env)
    assert type(trainer.engine.module) is MDMForMaskedDiffusion
    assert trainer.fit()["step"] == 1
