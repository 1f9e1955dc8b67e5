"""The training loop, top to bottom: config -> memory plan -> data -> model -> objective -> DeepSpeed engine ->
steps -> logging, evaluation and checkpoints.

One optimiser step = ``grad_accum`` micro-batches per rank. For each micro-batch the objective corrupts the
clean batch on the host (keyed noise, no device sync), the engine runs forward and backward, and
``engine.step()`` applies the update at the accumulation boundary (DeepSpeed scales the loss by
1/grad_accum and averages gradients over ranks, so the update follows the mean loss over the global batch).
The next micro-batch is loaded and corrupted while the device still runs this one's backward (``_prefetch``):
its noise is a function of its keys, so only a noise service (a refit of p(t), a MIRROR switch) can change it
between two steps, and across those boundaries it is drawn when it is used.

Noise services (``diffusion/service.py``: the t-sampler, the EMA baseline, the online variance monitor) are one
list, called at the same points of every step; what a checkpoint holds besides the engine is two tables of
stateful parts (``client_parts``, the same on every rank; ``rank_parts``, per rank), saved and restored in one
place (``_checkpoint_state``, ``_restore``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mdm_scale.config.deepspeed_json import build_deepspeed_config
from mdm_scale.config.legacy import upgrade_config
from mdm_scale.config.loader import check_batch_arithmetic, defaults_like, leaves
from mdm_scale.config.schema import Config, ConfigError
from mdm_scale.config.variance import BernoulliMasksConfig, MirrorMasksConfig
from mdm_scale.core.batch import Batch
from mdm_scale.core.noise import Stream
from mdm_scale.data.build import RunData, build_data
from mdm_scale.data.cache import Ranks
from mdm_scale.data.loader import TrainLoader, eval_batches
from mdm_scale.data.tokenizer import special_ids
from mdm_scale.diffusion.build import masks_for, t_sampler_for
from mdm_scale.diffusion.ema_baseline import EMABaseline
from mdm_scale.diffusion.masks import BernoulliMasks
from mdm_scale.diffusion.objective import ARMObjective, MDMObjective, NoisyBatch, TrainedMicroBatch
from mdm_scale.diffusion.online_variance import MonitorSettings, Probe, VarianceMonitor
from mdm_scale.diffusion.service import NoiseService
from mdm_scale.diffusion.t_samplers import UniformT
from mdm_scale.distributed.env import (
    DistEnv,
    all_reduce_sum,
    barrier,
    check_ranks_agree,
    init_distributed,
)
from mdm_scale.models.flops import flops_per_token
from mdm_scale.models.loading import build_model, load_hf_config, resolve_mask_token_id
from mdm_scale.models.zero3 import parameter_shapes
from mdm_scale.training.checkpoint import CheckpointManager, load_rank_parts, write_atomic
from mdm_scale.training.faults import NonFiniteGuard
from mdm_scale.training.memory_plan import (
    MemoryPlan,
    MemoryPlanError,
    ModelNotCountable,
    ModelShape,
    make_plan,
    model_shape,
    this_machine,
    vocab_for_plan,
)
from mdm_scale.training.metrics import MetricLogger, Throughput
from mdm_scale.training.optimizer.engine import initialize_engine, require_cpu_adam
from mdm_scale.training.ppots_estimate import initial_fit
from mdm_scale.training.preemption import StopRequest
from mdm_scale.training.step_timer import NoTimer
from mdm_scale.training.zero_stage import resolve_zero_stage

# Config keys that define a run: an output directory with checkpoints of a run that differs in one of these
# holds another run. Everything else (max_steps, lr, logging, ...) may change when a run is continued.
RUN_IDENTITY = ("seed", "model", "data.train_file", "data.train_files", "data.tokenizer", "data.task",
                "data.seq_len", "train.objective", "variance")


class Trainer:
    """``data`` may be given instead of read from ``cfg.data`` files (benchmarks, programmatic use)."""

    def __init__(self, cfg: Config, env: DistEnv | None = None, data: RunData | None = None):
        self.cfg = cfg
        self.env = env or init_distributed()
        self.global_batch = check_batch_arithmetic(cfg, self.env.world_size)
        self.out = Path(cfg.train.output_dir)
        self.checkpoints = CheckpointManager(self.out / "checkpoints", self.env, cfg.train.keep_last, self.info)
        self.resume_from = self._resume_point()
        self._check_run_identity()
        check_ranks_agree("the configuration", json.dumps(asdict(cfg), sort_keys=True), self.env)
        hf_config = load_hf_config(cfg)
        counted = self._model_shape(cfg, hf_config, data)
        self.cfg = cfg = resolve_zero_stage(cfg, None if counted is None else counted[0].parameters, self.env,
                                            self.info, self.checkpoints.saved_zero_stage(self.resume_from))
        self.plan = self._memory_plan(cfg, counted)
        require_cpu_adam(cfg)

        self.data = data or build_data(cfg.data, cfg.seed, self.out / "tokenizer", Ranks.of(self.env))
        self.info(f"data: {self.data.summary()}")
        if cfg.data.packing and self.data.task != "sft":
            raise ConfigError(f"config key 'data.packing' = True: packs SFT records; the {self.data.task} data "
                              f"is already cut into full blocks of data.seq_len")
        check_ranks_agree("the data", self.data.train.fingerprint(), self.env)
        self.pad_id, _ = special_ids(self.data.tokenizer)

        self.mask_token_id = resolve_mask_token_id(cfg, self.data.tokenizer, hf_config)
        self.ds_config = build_deepspeed_config(cfg, self.env.world_size, self.env.on_gpu)
        self.ds_config.update(self.checkpoints.load_settings(self.resume_from, cfg.train.zero_stage))  # elastic
        model = build_model(cfg, self.data.tokenizer, self.mask_token_id, hf_config, self.ds_config, cfg.seed)
        self.shapes = parameter_shapes(model)
        self.trained = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        if self.resume_from is not None:
            self.checkpoints.check_compatible(self.resume_from, self.shapes, self.global_batch)
        self._write_run_files()
        self.engine = self._initialize_engine(model)
        self.info(f"model: {sum(_numel(s) for s in self.shapes.values()) / 1e6:.2f}M parameters, "
                  f"ZeRO stage {cfg.train.zero_stage}, {self.env.world_size} rank(s) on {self.env.device.type}, "
                  f"global batch {self.global_batch}")

        self.objective, self.eval_objective = self._objectives()
        self.loader = TrainLoader(self.data.train, cfg.seed, self.env.rank, self.env.world_size,
                                  cfg.train.micro_batch_size, cfg.train.grad_accum, self.pad_id,
                                  cfg.data.pad_to_multiple_of, cfg.data.seq_len, cfg.data.group_by_length,
                                  cfg.data.packing)
        self.services = self._noise_services()
        self.step = 0
        self.next_micro: tuple[tuple[int, int], Batch, NoisyBatch] | None = None  # ((step, micro), clean, noisy)
        self.seen = torch.zeros(2, dtype=torch.float64)  # forward rows and tokens of all ranks, counted so far
        self.uncounted = torch.zeros(2, dtype=torch.float64)  # this rank's since the last count_seen()
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, self.info)
        self.timer = NoTimer()  # a StepTimer here splits each step's time into sections (diagnostics)
        # Checkpointed besides the engine, by name: parts the same on every rank (rank 0's are saved) and per rank.
        self.client_parts = {"nonfinite": self.guard}
        self.rank_parts = {service.state_key: service for service in self.services}
        if self.resume_from is not None:
            self._restore(self.resume_from)
        else:
            initial_fit(self)  # P-POTS: the offline estimate of p(t) before the first step

    # ---- set-up -------------------------------------------------------------------------------------------
    def info(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    def _resume_point(self) -> Path | None:
        mode = self.cfg.train.resume
        if mode == "never":
            if self.checkpoints.complete():
                raise ConfigError(f"train.output_dir '{self.out}' already holds checkpoints and train.resume=never; "
                                  f"choose a new output_dir or set train.resume=auto")
            return None
        if mode == "auto":
            return self.checkpoints.find_resumable()
        path = Path(mode)
        problem = self.checkpoints.verify(path, checksums=True)
        if problem is not None:
            raise ConfigError(f"config key 'train.resume' = {mode!r}: not a usable checkpoint ({problem})")
        return path

    def _check_run_identity(self) -> None:
        run_file = self.out / "run.json"
        if not run_file.is_file() or not self.checkpoints.complete():
            return
        previous = leaves(upgrade_config(json.loads(run_file.read_text())["config"], str(run_file)))
        current, defaults = leaves(asdict(self.cfg)), leaves(asdict(defaults_like(self.cfg)))
        for key, now in current.items():
            if not any(key == k or key.startswith(k + ".") for k in RUN_IDENTITY):
                continue
            # A key that the earlier run's mdm-scale did not have yet ran with its default behaviour.
            before = previous.get(key, defaults.get(key))
            if before != now:
                raise ConfigError(f"train.output_dir '{self.out}' holds another run ({key}: {before!r} there, "
                                  f"{now!r} here); choose a new train.output_dir")

    def _model_shape(self, cfg: Config, hf_config, data: RunData | None) -> tuple[ModelShape, str] | None:
        """The model counted on the meta device (``training/memory_plan.py``) and where its vocabulary size came
        from; None (with a note) for a ``model.path`` architecture that cannot be built there."""
        vocab, source = (len(data.tokenizer), "the given data") if data is not None else \
            vocab_for_plan(cfg, hf_config, self.out / "tokenizer")
        try:
            return model_shape(cfg, vocab, hf_config), source
        except ModelNotCountable as err:
            self.info(f"memory plan: not available, model.path {cfg.model.path!r} cannot be built on the meta "
                      f"device ({err})")
            return None

    def _memory_plan(self, cfg: Config, counted: tuple[ModelShape, str] | None) -> MemoryPlan | None:
        """Print the memory plan; one that does not fit this machine stops the run here, in seconds, before the
        data and the model are built (unless ``train.memory_check`` is false)."""
        if counted is None:
            return None
        shape, source = counted
        plan = make_plan(cfg, self.env.world_size, shape, this_machine(self.env.device, self.env.world_size), source)
        self.info("\n".join(plan.lines()))
        if cfg.train.memory_check and not plan.fits:
            raise MemoryPlanError(plan.refusal())
        return plan

    def _write_run_files(self) -> None:
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not (self.out / "tokenizer").is_dir():
                self.data.tokenizer.save_pretrained(str(self.out / "tokenizer"))
            write_atomic(self.out / "run.json", json.dumps(
                {"config": asdict(self.cfg), "world_size": self.env.world_size, "deepspeed": self.ds_config},
                indent=2))
        barrier()

    def _initialize_engine(self, model):
        return initialize_engine(model, self.cfg, self.ds_config, self.env.on_gpu)

    def _objectives(self):
        cfg = self.cfg
        if cfg.train.objective == "arm":
            return ARMObjective(), ARMObjective()
        train = MDMObjective(t_sampler_for(cfg.variance, cfg.seed, self.global_batch),
                             masks_for(cfg.variance, cfg.seed), self.mask_token_id)
        # The held-out loss always uses uniform t and one Bernoulli mask with fixed keys, so it is the same
        # estimate of the NELBO whatever variance-reduction method trains the model.
        evaluation = MDMObjective(UniformT(cfg.seed), BernoulliMasks(cfg.seed, cfg.variance.eps), self.mask_token_id)
        return train, evaluation

    def _noise_services(self) -> list[NoiseService]:
        """The mdm objective's t-sampler, EMA baseline (``variance.ema.bins`` > 0) and online variance monitor,
        in the order their collectives run on every rank; none for the arm objective."""
        v = self.cfg.variance
        if self.cfg.train.objective != "mdm":
            return []
        ema = [EMABaseline(v.ema.bins, v.ema.rate, self.env.device)] if v.ema.bins else []
        monitor = VarianceMonitor(MonitorSettings.from_config(v), self.objective.t_sampler.quantile, self._probe(),
                                  switch=self._set_mirror)
        return [self.objective.t_sampler, *ema, monitor]

    def _probe(self) -> Probe | None:
        """The online variance probe, unless ``variance.probe.every`` or ``.fraction`` is 0 or the rows are packed
        (the probe re-draws whole sequences, one per row)."""
        v = self.cfg.variance
        if v.probe.every == 0 or v.probe.fraction == 0:
            return None
        if self.cfg.data.packing:
            self.info("online variance: no probe with data.packing (A and B are not measured; V is)")
            return None
        return Probe(self.objective, masks_for(v, self.cfg.seed, MirrorMasksConfig()),
                     masks_for(v, self.cfg.seed, BernoulliMasksConfig()), self.cfg.seed, v.probe.fraction)

    def _set_mirror(self, on: bool, from_step: int, why: str = "") -> None:
        """``masks: auto``: MIRROR on or off from optimiser step ``from_step`` (0-based) on, with half the
        sequences per micro-batch while on, so the forward rows per step stay fixed."""
        kind = MirrorMasksConfig() if on else BernoulliMasksConfig()
        self.objective.masks = masks_for(self.cfg.variance, self.cfg.seed, kind)
        micro = self.cfg.train.micro_batch_size
        self.loader.set_micro_batch(from_step, micro // 2 if on else micro)
        if why:
            self.info(f"variance.masks=auto: MIRROR {'on' if on else 'off'} from step {from_step + 1}: {why}")

    def service(self, kind: type) -> NoiseService:
        """The noise service of class ``kind`` (diagnostics and tests)."""
        return next(s for s in self.services if isinstance(s, kind))

    def _checkpoint_state(self) -> tuple[dict, dict]:
        """(client state, rank state). samples_seen counts global batches of the configured size (with ``masks:
        auto`` the sequences per step vary, the rows do not); the checkpoint checks the global batch against it
        on resume."""
        client = {"step": self.step, "samples_seen": self.step * self.global_batch,
                  "rows_seen": self.seen[0].item(), "tokens_seen": self.seen[1].item(),
                  **{name: part.state_dict() for name, part in self.client_parts.items()}}
        return client, {name: part.state_dict() for name, part in self.rank_parts.items()}

    def _restore(self, path: Path) -> None:
        client = self.checkpoints.load(self.engine, path, self.shapes, self.global_batch)
        self.step = int(client["step"])
        self.seen = torch.tensor([client.get("rows_seen", 0.0), client.get("tokens_seen", 0.0)], dtype=torch.float64)
        for name, part in self.client_parts.items():
            part.load_state_dict(client.get(name, {}))
        load_rank_parts(self.rank_parts, path, self.env.rank, self.env.world_size)
        self.info(f"resumed from {path} at step {self.step}")

    # ---- the loop -----------------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step. Returns the summed micro-batch losses (a device scalar) and host counts
        [micro-batches, masked, eligible, tokens]; nothing here waits for the device.

        ``tokens`` counts the non-pad tokens the model processed (MIRROR's two rows per sequence both count).
        """
        self.lr = self.engine.get_lr()[0]  # the rate this step applies (the scheduler moves on after it)
        loss = torch.zeros((), dtype=torch.float64, device=self.env.device)
        counts = torch.zeros(4, dtype=torch.float64)
        accum = self.cfg.train.grad_accum
        for micro in range(accum):
            batch, noisy = self._micro_batch(self.step, micro)
            for service in self.services:
                service.probe(self.step, batch, self._evaluate)
            with self.timer.section("data"):
                noisy = noisy.to(self.env.device, non_blocking=True)
            with self.timer.section("forward"):
                out = self.engine(**noisy.model_inputs())
            step_loss = out.loss
            for service in self.services:
                step_loss = service.adjust_loss(step_loss, noisy)
            with self.timer.section("backward"):
                self.engine.backward(step_loss)
            if micro + 1 < accum:
                self._prefetch(self.step, micro + 1)
            elif self._noise_fixed_after(self.step + 1):
                self._prefetch(self.step + 1, 0)
            with self.timer.section("optimizer"):
                self.engine.step()
            with self.timer.section("sampler"):
                trained = TrainedMicroBatch(noisy, out.token_ce)
                for service in self.services:
                    service.observe(trained)
            rows_per_sample = noisy.rows / len(batch.sample_index)
            real = batch.input_ids.numel() if batch.attention_mask is None else int(batch.attention_mask.sum())
            counts += torch.tensor([1.0, noisy.masked_tokens, noisy.eligible_tokens * rows_per_sample,
                                    real * rows_per_sample], dtype=torch.float64)
            loss += step_loss.detach()
            forward_rows = len(noisy.input_ids)  # the model's rows (packed rows hold several sequences)
            self.uncounted += torch.tensor([forward_rows, real * rows_per_sample], dtype=torch.float64)
        self.step += 1
        with self.timer.section("sampler"):
            for service in self.services:
                service.on_optimizer_step(self.step)  # pool statistics (all-reduce), refit p(t), switch MIRROR
        return loss, counts

    def _micro_batch(self, step: int, micro: int) -> tuple[Batch, NoisyBatch]:
        """Micro-batch ``micro`` of optimiser step ``step`` (0-based), clean and corrupted (on the host)."""
        if self.next_micro is not None and self.next_micro[0] == (step, micro):
            _, batch, noisy = self.next_micro
        else:
            with self.timer.section("data"):
                batch = self.loader.micro_batch_at(step, micro)
            with self.timer.section("sampler"):
                noisy = self.objective.corrupt(batch)
        self.next_micro = None
        return batch, noisy

    def _prefetch(self, step: int, micro: int) -> None:
        """Load and corrupt a micro-batch now, while the device runs the queued backward, instead of after the
        optimiser step, when the device would wait for the host."""
        if step < self.cfg.train.max_steps:
            self.next_micro = ((step, micro), *self._micro_batch(step, micro))

    def _noise_fixed_after(self, step: int) -> bool:
        """Whether the end of optimiser step ``step`` (1-based) leaves the next step's noise as it is: no service
        changes it (a refit of p(t), a ``masks: auto`` decision, which also changes the sequences per micro-batch)."""
        return not any(service.changes_after(step) for service in self.services)

    @torch.no_grad()
    def _evaluate(self, noisy: NoisyBatch) -> TrainedMicroBatch:
        """A noise service's extra rows (the online variance probe) through the engine without gradient, at the
        current parameters (every rank calls it at the same time: ZeRO-3 gathers parameters collectively)."""
        with self.timer.section("probe"):
            noisy = noisy.to(self.env.device, non_blocking=True)
            self.engine.eval()
            out = self.engine(**noisy.model_inputs())
            self.engine.train()
        return TrainedMicroBatch(noisy, out.token_ce)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.data.eval is None:
            return None
        self.engine.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for batch in eval_batches(self.data.eval, self.env.rank, self.env.world_size, self.cfg.train.micro_batch_size,
                                  self.cfg.train.eval_samples, self.pad_id, self.cfg.data.pad_to_multiple_of,
                                  self.cfg.data.seq_len):
            noisy = self.eval_objective.corrupt(batch, Stream.EVAL_T, Stream.EVAL_MASK).to(self.env.device)
            out = self.engine(**noisy.model_inputs())
            per_sample = noisy.sample_losses(noisy.row_losses(out.token_ce))
            valid = batch.valid.to(self.env.device)
            sums += torch.stack([(per_sample * valid).sum().double(), valid.sum().double()])
        self.engine.train()
        all_reduce_sum(sums)
        return float(sums[0] / sums[1].clamp(min=1))

    def count_seen(self) -> None:
        """Add every rank's forward rows and non-pad tokens since the last call to ``self.seen`` (collective).
        They count every forward of training, including steps the non-finite guard skipped: compute spent."""
        self.seen += all_reduce_sum(self.uncounted.to(self.env.device)).cpu()
        self.uncounted.zero_()

    def model_flops_per_token(self) -> float | None:
        """Model FLOPs per trained token (``models/flops.py``, T = data.seq_len; weight gradients of the trained
        parameters only, so about 4 N with LoRA), or None for a model whose config names its depth and width
        otherwise."""
        config = self.engine.module.config
        layers, width = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
        if layers is None or width is None:
            return None
        return flops_per_token(sum(_numel(s) for s in self.shapes.values()), layers, width, self.cfg.data.seq_len,
                               self.trained)

    def save(self) -> Path:
        self.count_seen()
        client, ranked = self._checkpoint_state()
        return self.checkpoints.save(self.engine, self.step, client, self.shapes, ranked)

    def fit(self) -> dict:
        cfg = self.cfg.train
        tb_dir = Path(self.cfg.logging.tensorboard_dir or self.out / "tensorboard") if self.cfg.logging.tensorboard \
            else None
        logger = MetricLogger(self.env.is_main, tb_dir, self.cfg.logging.progress_bar, cfg.max_steps, self.step)
        window_loss = torch.zeros((), dtype=torch.float64, device=self.env.device)
        window_counts = torch.zeros(4, dtype=torch.float64)
        throughput, eval_loss, last_eval_step = Throughput(), None, -1
        stop, stopped_by = StopRequest(self.env), None
        start = time.perf_counter()
        self.engine.train()
        while self.step < cfg.max_steps:
            step_loss, step_counts = self.train_step()
            if self.guard.update(self.step, self.engine.was_step_applied()):
                window_loss += step_loss
                window_counts += step_counts
            elif self.guard.tripped:
                raise self.guard.error(self.step, self.save())
            logger.advance()
            interval = self.step % cfg.log_every == 0 or self.step == cfg.max_steps
            if interval:
                window = torch.cat([window_loss.reshape(1), window_counts.to(self.env.device)])
                loss, micro, masked, eligible, tokens = all_reduce_sum(window).tolist()
                values = {"loss": loss / micro if micro else float("nan"), "lr": self.lr,
                          "skipped_steps": self.guard.skipped,
                          "tokens_per_s": throughput.rate(tokens), "masked_fraction": masked / max(eligible, 1)}
                grad_norm = self.engine.get_global_grad_norm()
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                self.count_seen()
                values.update(rows_seen=self.seen[0].item(), tokens_seen=self.seen[1].item())
                if self.env.on_gpu:
                    values["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                logger.log(self.step, "train", values)
                window_loss.zero_()
                window_counts.zero_()
            for service in self.services:
                logged = service.log(self.step, interval)
                if logged and service.log_console:
                    logger.log(self.step, service.log_prefix, logged)
                elif logged:
                    logger.log_objects(self.step, service.log_prefix, logged)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                eval_loss, last_eval_step = self._log_eval(logger), self.step
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
            if stop.should_stop():
                stopped_by = stop.acknowledge()
                break
        if last_eval_step != self.step and stopped_by is None:
            eval_loss = self._log_eval(logger)
        path = self.save()
        logger.close()
        flops = self.model_flops_per_token()
        summary = {"step": self.step, "eval_loss": eval_loss, "checkpoint": str(path), "rows": self.seen[0].item(),
                   "tokens": self.seen[1].item(), "flops": None if flops is None else flops * self.seen[1].item(),
                   "tensorboard_dir": str(tb_dir) if tb_dir else None, "seconds": time.perf_counter() - start,
                   "stopped_by": stopped_by}
        if stopped_by is not None:
            self.info(f"stopped by {stopped_by} at step {self.step}; checkpoint {path}; run again to resume")
        if eval_loss is not None:
            self.info(f"final eval loss: {eval_loss:.4f} (step {self.step})")
        if tb_dir is not None:
            self.info(f"TensorBoard logs: {tb_dir}  (view with: tensorboard --logdir {tb_dir})")
        return summary

    def _log_eval(self, logger: MetricLogger) -> float | None:
        loss = self.evaluate()
        if loss is not None:
            logger.log(self.step, "eval", {"loss": loss})
            logger.flush()
        return loss


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def train(cfg: Config) -> dict:
    return Trainer(cfg).fit()
