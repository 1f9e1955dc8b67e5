"""One rank of the 2-rank ZeRO-3 load of the LLaDA fixture (``test_native_training.py``): build the trainer
(the model partitioned under ``zero.Init`` and filled module by module), record which ranks read tensor data,
each parameter's partition size, the gathered weights and the logits of the reference input, train one step.
Writes ``<out>/rank<r>.pt``.

    deepspeed --num_gpus 2 tests/native_zero3_worker.py OUT SYNTH_DIR FIXTURE_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.distributed.env import init_distributed, shutdown_distributed
from mdm_scale.models.safetensors_dir import SafetensorsDir
from mdm_scale.training.metrics import quiet_third_party_logs
from mdm_scale.training.trainer import Trainer


def main(out: Path, synth: Path, fixture: Path) -> None:
    quiet_third_party_logs()
    env = init_distributed()
    reads = []
    original = SafetensorsDir.get
    SafetensorsDir.get = lambda self, name: reads.append(name) or original(self, name)
    cfg = load_config([], tiny_overrides(synth, out / "run", **{
        "model.path": str(fixture), "model.mask_token_id": 500, "train.zero_stage": 3, "train.max_steps": 1,
        "data.eval_file": None}))
    trainer = Trainer(cfg, env)
    SafetensorsDir.get = original
    model = trainer.engine.module
    partitions = {name: (p.ds_tensor.numel(), p.ds_numel) for name, p in model.named_parameters()}
    weights = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            weights[name] = p.detach().clone()
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(input_ids=load_file(str(fixture / "reference.safetensors"))["input_ids"]).logits
    trainer.engine.train()
    loss, _ = trainer.train_step()
    torch.save({"reads": reads, "partitions": partitions, "weights": weights, "logits": logits,
                "loss": float(loss)}, out / f"rank{env.rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank")))  # the launcher adds it
