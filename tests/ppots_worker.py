"""One rank of the 2-rank P-POTS test (``test_ppots_distributed.py``): train with P-POTS + MIRROR, record what
the sampler did, resume from the checkpoint and record again. Writes ``<out>/rank<r>.pt``.

    deepspeed --num_gpus 2 tests/ppots_worker.py OUT SYNTH_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from conftest import tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.distributed.env import init_distributed, shutdown_distributed
from mdm_scale.training.metrics import quiet_third_party_logs
from mdm_scale.training.trainer import Trainer

# x0 = 3 sequences over 2 ranks (rank 1 pads with filler forwards), refits at steps 2 and 4, saved at step 5
# with statistics pending since the refit, resumed to step 7 (a refit at step 6).
SETTINGS = {
    "variance.t_sampler": {"name": "ppots", "x0": 3, "bins": 16, "masks": 2, "restarts": 4, "refit_every": 2,
                           "half_life": 4.0},
    "variance.masks": {"name": "mirror", "single_above": 0.9}, "train.max_steps": 5,
    "train.micro_batch_size": 4, "train.log_every": 2, "data.eval_file": None,
}


def record_run(trainer: Trainer) -> dict:
    """Train, recording the drawn noise and each refit's local statistics (what the all-reduce sums)."""
    sampler = trainer.objective.t_sampler
    record = {"initial": sampler.state_dict(), "pending": [], "draws": []}
    refit, corrupt = sampler.on_optimizer_step, trainer.objective.corrupt

    def recording_refit(step: int) -> bool:
        if step % sampler.settings.refit_every == 0:
            record["pending"].append(sampler.sums.pending.clone())
        return refit(step)

    def recording_corrupt(batch, *args, **kwargs):
        noisy = corrupt(batch, *args, **kwargs)
        record["draws"].append({"sample_index": batch.sample_index.clone(), "t": noisy.t.clone(),
                                "weight": noisy.weight.clone(), "input_ids": noisy.input_ids.clone(),
                                "row_sample": noisy.row_sample.clone()})
        return noisy

    sampler.on_optimizer_step, trainer.objective.corrupt = recording_refit, recording_corrupt
    trainer.fit()
    record["final"] = sampler.state_dict()
    return record


def main(out: Path, synth: Path) -> None:
    quiet_third_party_logs()
    env = init_distributed()
    run_dir = out / "run"
    record = record_run(Trainer(load_config(["configs/quickstart.yaml"], tiny_overrides(synth, run_dir, **SETTINGS)),
                                env))
    longer = tiny_overrides(synth, run_dir, **{**SETTINGS, "train.max_steps": 7})
    resumed = Trainer(load_config(["configs/quickstart.yaml"], longer), env)
    record["restored"] = resumed.objective.t_sampler.state_dict()
    resumed.fit()
    record["resumed_final"] = resumed.objective.t_sampler.state_dict()
    torch.save(record, out / f"rank{env.rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    out_dir, synth_dir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    main(Path(out_dir), Path(synth_dir))
