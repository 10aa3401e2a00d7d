"""The one training-loop skeleton every stage uses: accelerate, gradient accumulation, clipping (per model), LR warm-up
and schedule, EMA, skipping non-finite steps, logging (TensorBoard + jsonl + tqdm), atomic checkpoints and exact
resume.

A stage supplies its models, its data and, per model, a loss function; the trainer owns the step:

    trainer = Trainer(cfg.loop, run_dir, kind="tokenizer", model_config=to_dict(cfg.model), full_config=to_dict(cfg))
    g = trainer.add("g", generator, optimizer, ema=True)   # the first model added is the one checkpoints export
    trainer.add("d", discriminator, d_optimizer)

    def train_step(micro_batches, step) -> dict[str, float]:
        return trainer.step("g", micro_batches, lambda batch: {"recon/l1": ..., "vq/commit": ...},
                            weights={"recon/l1": 1.0, "vq/commit": 1.0})
    trainer.fit(batches=lambda start: ..., train_step=train_step, evaluate=eval_fn)

`Trainer.step(name, micro_batches, loss_fn, weights)` is the whole optimisation protocol, written once: for each
micro-batch, under autocast, `loss_fn(batch)` returns named scalar losses (DAC-style: the names are the config's
weight keys and the logged keys); the total `sum(w * losses[k])` over `weights` is checked, and its backward
runs with DDP's gradient sync only on the last micro-batch; every other registered model is `frozen` meanwhile (a
discriminator inside the generator's loss gets no gradient and no all-reduce). Then: clip (`grad_clip`, or the model's
entry in `grad_clip_by_model`), optimiser, LR scheduler, EMA. It returns the losses averaged over the micro-batches,
plus `lr/<name>` and `grad_norm/<name>`.

A non-finite total on any process (or a non-finite gradient norm, when clipping without an fp16 loss scaler) skips
the step on every process: no optimiser, scheduler or EMA update, the gradients zeroed, a warning naming the step and
the non-finite losses, `skipped/<name>` = 1 in the step's logs (which are then always written). After
`max_nonfinite_steps` consecutive skips of one model the run stops with `NonFiniteLoss` (a UserError, so one line
naming the fix, and a FloatingPointError), and `save` refuses to write non-finite weights: no checkpoint holds them.

Several processes (`accelerate launch` / `torchrun`, one or many nodes) run plain DDP: every process holds the whole
model, gradients are all-reduced, and the main process (global rank 0) alone writes config.json, logs and checkpoints
into the run directory, which on several nodes must be one shared filesystem path: resume and the check that a fresh
run does not overwrite one read it on every process, and refuse (on every process alike) when they see different
checkpoints there. FSDP, DeepSpeed and Megatron-LM shard or take over the model and its step: `Trainer` refuses them.

Resume is exact: every step reseeds torch/python RNGs from (seed, step, rank), the data stream is a pure function of
(seed, position) (`batches(start_micro_batch)`), and the checkpoint holds raw + EMA weights, optimiser and scheduler
states, the fp16 loss scaler's state (when there is one) and the step. So a resumed run draws the same numbers as an
uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, gather_object
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.files import write_text_atomic
from data.errors import UserError
from pipelines.checkpoint import latest_checkpoint, load_checkpoint, load_state, load_weights, save_checkpoint
from pipelines.config import ConfigError
from pipelines.ema import EMA
from pipelines.train_log import Logger
from tokenizer.losses import weighted_sum


@dataclass
class LoopConfig:
    steps: int = 1000  # optimiser steps in the whole run
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4  # peak learning rate
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine decays to min_lr_ratio after warm-up
    warmup_steps: int = 0  # linear LR warm-up; audio GAN training NaNs without it
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float = 0.0  # max global grad norm per optimiser; 0 = off
    # per model name, over grad_clip, e.g. {"g": 1000.0, "d": 10.0} (DAC's); a model not named uses grad_clip
    grad_clip_by_model: dict[str, float] = field(default_factory=dict)
    # consecutive steps of one model with a non-finite loss (each skipped) that stop the run; 1 = stop at the first
    max_nonfinite_steps: int = 10
    ema_decay: float = 0.999  # EMA of the exported model; 0 = no EMA
    log_every: int = 10  # steps between log lines
    eval_every: int = 200  # steps between evaluations (and at the end)
    ckpt_every: int = 200  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 0  # everything random derives from this
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    resume: bool = False  # continue from the newest checkpoint in the run directory

    def __post_init__(self) -> None:
        check_at_least_one(**{f"loop.{k}": getattr(self, k)
                              for k in ("steps", "grad_accum", "log_every", "eval_every", "ckpt_every")})
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--loop.lr={self.lr}: the learning rate must be a finite number > 0")


def check_at_least_one(**settings: int) -> None:
    """A ConfigError naming the first of `settings` (dotted key -> value) below 1 (a count or an interval)."""
    for key, value in settings.items():
        if value < 1:
            raise ConfigError(f"--{key}={value}: it must be >= 1")


class NonFiniteLoss(UserError, FloatingPointError):
    """`loop.max_nonfinite_steps` consecutive steps of one model had a non-finite loss: the run stops (the settings
    diverge; the newest checkpoint holds finite weights)."""


def lr_lambda(cfg: LoopConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        if cfg.lr_schedule == "cosine":
            t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        raise ValueError(f"lr_schedule={cfg.lr_schedule!r}: choose constant or cosine")
    return f


def make_accelerator(cfg: LoopConfig) -> Accelerator:
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"  # bf16 on this CPU is ~100x slower than fp32
    # cpu=True on a machine without CUDA: otherwise accelerate ignores the launcher's rank/world-size variables and
    # every process trains alone.
    # broadcast_buffers=False: DDP would otherwise re-send every buffer from rank 0 on every forward, and SimVQ's
    # frozen codebook is a K x D buffer (134 MB at K=262,144). DDP still syncs all buffers once when it wraps the
    # model; the frozen codebook never changes and EMA-VQ all-reduces its own updates.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


# accelerate modes that shard the model or run the optimiser step themselves, and the variables `accelerate launch` sets
# for them: this trainer exports, checkpoints and resumes whole state dicts and owns the step (clipping, skipping).
SHARDED_MODES = {"FSDP": (DistributedType.FSDP, "ACCELERATE_USE_FSDP"),
                 "DeepSpeed": (DistributedType.DEEPSPEED, "ACCELERATE_USE_DEEPSPEED"),
                 "Megatron-LM": (DistributedType.MEGATRON_LM, "ACCELERATE_USE_MEGATRON_LM")}


def check_distributed_mode(accelerator: Accelerator | None = None) -> None:
    """Refuse FSDP / DeepSpeed / Megatron-LM, asked for through the launcher's environment or set on `accelerator`,
    with one line naming the setting and the fix. Under FSDP the rank-0-only state_dict() of `save` would hang (the
    other ranks never join the gather), and the EMA copy, the optimiser state and resume all assume whole tensors."""
    for name, (mode, variable) in SHARDED_MODES.items():
        asked = os.environ.get(variable, "false").lower() == "true"
        if asked or (accelerator is not None and accelerator.distributed_type == mode):
            how = f"{variable}=true" if asked else f"distributed_type {mode.value}"
            raise UserError(
                f"accelerate is set to {name} ({how}), which this trainer does not support (it checkpoints, exports "
                f"and resumes whole, unsharded models: a sharded one would hang at the first checkpoint): run plain "
                f"DDP, i.e. answer NO to FSDP, DeepSpeed and Megatron-LM in `accelerate config` (distributed_type "
                f"MULTI_GPU, or `accelerate launch --multi_gpu` without --use_fsdp/--use_deepspeed); every prior size "
                f"fits one GPU, and --batch_size lower with --loop.grad_accum higher keeps the effective batch")


def seed_everything(seed: int, step: int, rank: int) -> None:
    s = (seed * 1_000_003 + step * 7_919 + rank) % (2**63)
    torch.manual_seed(s)
    random.seed(s)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Backpropagate through `module` without training it (the discriminator inside the generator's gan/g term).

    Its weights stop requiring grad, so backward computes no gradient for them (it still flows through the module to
    its input): no wasted backward into it, and no gradient for DDP's hooks to all-reduce, which they did on every
    generator micro-step, only for the result to be zeroed before the module's own step. A DDP module also runs in
    no_sync, so that DDP does not even prepare a gradient sync for this backward.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    no_sync = module.no_sync() if isinstance(module, DistributedDataParallel) else contextlib.nullcontext()
    with no_sync:
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


class Trainer:
    def __init__(self, cfg: LoopConfig, run_dir: str | Path, kind: str, model_config: dict, full_config: dict,
                 accelerator: Accelerator | None = None):
        self.cfg, self.kind = cfg, kind
        self.run_dir = Path(run_dir)
        self.model_config, self.full_config = model_config, full_config
        check_distributed_mode()  # before accelerate sets anything up
        self.accelerator = accelerator or make_accelerator(cfg)
        check_distributed_mode(self.accelerator)
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.ema: EMA | None = None
        self.global_step = 0  # loop steps taken, skipped ones too (the data position); `step` takes one
        self.nonfinite_streak: dict[str, int] = {}  # consecutive skipped steps per model
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "config.json", json.dumps(full_config, indent=2))

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def add(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, ema: bool = False) -> nn.Module:
        """Register a model and its optimiser; returns the prepared (possibly DDP-wrapped) model."""
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self.models[name], self.optimizers[name] = model, optimizer
        self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg))
        if ema and self.cfg.ema_decay > 0:
            self.ema = EMA(self.unwrap(name), self.cfg.ema_decay)
        return model

    def unwrap(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self.models[name])

    @property
    def main(self) -> str:
        return next(iter(self.models))

    def eval_model(self) -> nn.Module:
        """The weights evaluation and export use: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.unwrap(self.main)

    def autocast(self):
        return self.accelerator.autocast()

    # ------------------------------------------------------------------ optimisation
    def step(self, name: str, micro_batches: Sequence[Any], loss_fn: Callable[[Any], dict[str, torch.Tensor]],
             weights: Mapping[str, float]) -> dict[str, float]:
        """One optimiser step of model `name` over `micro_batches`; returns the named losses averaged over them,
        `grad_norm/<name>` (when clipping) and `lr/<name>`, or `skipped/<name>` for a skipped step. See the module
        docstring for the protocol."""
        model, n = self.models[name], len(micro_batches)
        others = [m for other, m in self.models.items() if other != name]
        logs: dict[str, float] = {}
        bad: list[str] | None = None  # the non-finite weighted losses, once a micro-batch has any
        for i, batch in enumerate(micro_batches):
            # DDP all-reduces gradients on the last micro-batch only; the other models only pass gradients through
            sync = contextlib.nullcontext() if i == n - 1 else self.accelerator.no_sync(model)
            with sync, contextlib.ExitStack() as stack:
                for m in others:
                    stack.enter_context(frozen(m))
                with self.autocast():
                    losses = loss_fn(batch)
                total = weighted_sum(losses, weights)
                if self._any_process(not torch.isfinite(total)):  # every process skips together: no lone all-reduce
                    bad = [k for k, w in weights.items() if w != 0 and not torch.isfinite(losses[k])]
                    bad = bad or (["the weighted total"] if not torch.isfinite(total) else ["on another process"])
                else:
                    self.accelerator.backward(total / n)
            for k, v in losses.items():
                logs[k] = logs.get(k, 0.0) + float(v.detach()) / n
            if bad is not None:
                return {**logs, **self._skip(name, bad, {k: float(v.detach()) for k, v in losses.items()})}
        return {**logs, **self._optimizer_step(name)}

    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), "sum").item() > 0)

    def _skip(self, name: str, bad: list[str], values: dict[str, float]) -> dict[str, float]:
        """A step of `name` that must not update anything: zero its gradients, count, warn, or stop the run."""
        self.optimizers[name].zero_grad(set_to_none=True)
        streak = self.nonfinite_streak[name] = self.nonfinite_streak.get(name, 0) + 1
        limit = self.cfg.max_nonfinite_steps
        if streak >= limit:
            raise NonFiniteLoss(
                f"non-finite {name} loss at step {self.global_step}: {values}; lower --loop.lr or add "
                f"--loop.warmup_steps / --loop.grad_clip / --loop.grad_clip_by_model, then rerun with "
                f"--loop.resume=true (the newest checkpoint holds finite weights). {streak} consecutive steps of "
                f"{name!r} were non-finite ({', '.join(bad)}), --loop.max_nonfinite_steps={limit}")
        warnings.warn(f"step {self.global_step}: non-finite {name} loss ({', '.join(bad)}); the step is skipped "
                      f"({streak} in a row, the run stops at --loop.max_nonfinite_steps={limit})", RuntimeWarning,
                      stacklevel=3)
        return {f"skipped/{name}": 1.0}

    def _optimizer_step(self, name: str) -> dict[str, float]:
        model, opt = self.models[name], self.optimizers[name]
        logs = {}
        clip = self.cfg.grad_clip_by_model.get(name, self.cfg.grad_clip)
        if clip > 0:
            norm = self.accelerator.clip_grad_norm_(model.parameters(), clip)
            logs[f"grad_norm/{name}"] = float(norm)
            # an fp16 loss scaler skips overflowing steps itself (and lowers its scale): not a failure of the run
            if not math.isfinite(float(norm)) and self.accelerator.scaler is None:
                return {**logs, **self._skip(name, [f"grad_norm/{name}"], logs)}
        opt.step()
        self.schedulers[name].step()
        opt.zero_grad(set_to_none=True)
        self.nonfinite_streak[name] = 0
        if name == self.main and self.ema is not None:
            self.ema.update(self.unwrap(name))
        logs[f"lr/{name}"] = self.schedulers[name].get_last_lr()[0]
        return logs

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """Write a checkpoint of this step; returns its path on the main process, None on the others. Every process
        checks the weights (so all refuse non-finite ones together) and waits until the main process has written."""
        self.accelerator.wait_for_everyone()
        weights = {"model": self.eval_model().state_dict()}
        if self.ema is not None:
            weights["raw"] = self.unwrap(self.main).state_dict()
        for name in list(self.models)[1:]:
            weights[name] = self.unwrap(name).state_dict()
        bad = [f"{group}/{k}" for group, sd in weights.items() for k, v in sd.items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"refusing to write the step-{self.global_step} checkpoint of {self.run_dir}: "
                                     f"{len(bad)} tensors hold non-finite values ({', '.join(bad[:4])}); resume from "
                                     f"the newest checkpoint with a lower --loop.lr or with gradient clipping")
        path = self._write(weights) if self.accelerator.is_main_process else None
        self.accelerator.wait_for_everyone()  # a process that goes on (or ends the run) finds the checkpoint on disk
        return path

    def _write(self, weights: dict[str, dict[str, torch.Tensor]]) -> Path:
        state = {"step": self.global_step, "ema_updates": self.ema.updates if self.ema else 0,
                 "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                 "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()}}
        if self.accelerator.scaler is not None:  # fp16: the loss scale and its growth counter, for an exact resume
            state["scaler"] = self.accelerator.scaler.state_dict()
        config = {"kind": self.kind, "config": self.model_config, "train_config": self.full_config,
                  "step": self.global_step}
        path = save_checkpoint(self.run_dir / "checkpoints" / f"step-{self.global_step:09d}", config=config,
                               weights=weights, state=state)
        old = sorted((self.run_dir / "checkpoints").glob("step-[0-9]*"))[:-self.cfg.keep_checkpoints]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return path

    def latest_checkpoint(self) -> Path | None:
        """The run directory's newest checkpoint, the same on every process: a UserError on every process when
        they see different ones (a run directory that is not one shared path on every node)."""
        ckpt = latest_checkpoint(self.run_dir)
        if self.accelerator.num_processes > 1:
            seen = gather_object([None if ckpt is None else str(ckpt)])  # one entry per process
            if len(set(seen)) > 1:
                raise UserError(f"--out={self.run_dir}: the {len(seen)} processes see different newest checkpoints "
                                f"there (by rank: {seen}); on several nodes the run directory must be one shared "
                                f"filesystem path (NFS, Lustre, ...) mounted at the same place on every node")
        return ckpt

    def resume(self) -> bool:
        """Load the newest checkpoint of this run, if any; returns whether one was found."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return False
        names = ["model"] + (["raw"] if self.ema is not None else []) + list(self.models)[1:]
        _, weights = load_checkpoint(ckpt, names=tuple(names))
        state = load_state(ckpt)

        def load(model: nn.Module, name: str) -> None:  # the model this run's settings build: they may differ
            try:
                model.load_state_dict(weights[name])  # the module's own (some upgrade older checkpoints' keys)
            except RuntimeError:  # torch lists every key: name the file and what differs instead
                load_weights(model, weights[name], ckpt, name, model_from="these settings build",
                             fix=f"resume {self.run_dir} with the settings it was started with (its config.json), "
                             "or choose another --out")
                raise
        load(self.unwrap(self.main), "raw" if self.ema is not None else "model")
        if self.ema is not None:
            load(self.ema.module, "model")
            self.ema.updates = state["ema_updates"]
        for name in list(self.models)[1:]:
            load(self.unwrap(name), name)
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        for n, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][n])
        scaler = self.accelerator.scaler
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        elif scaler is not None:
            self.accelerator.print(f"{ckpt} holds no fp16 loss-scaler state (saved by an older version or a non-fp16 "
                                   f"run): the loss scale starts again from its initial value")
        self.global_step = state["step"]
        self.accelerator.print(f"resumed from {ckpt} at step {self.global_step}")
        return True

    # ------------------------------------------------------------------ the loop
    def fit(self, batches: Callable[[int], Iterator], train_step: Callable[[list, int], dict[str, float]],
            evaluate: Callable[[int], dict[str, float]] | None = None) -> dict[str, float]:
        """Run to cfg.steps. `batches(k)` yields micro-batches starting at micro-batch k of the run."""
        cfg = self.cfg
        unknown = sorted(set(cfg.grad_clip_by_model) - set(self.models))
        if unknown or cfg.max_nonfinite_steps < 1:
            raise UserError(f"--loop.grad_clip_by_model names {unknown}, not models of this stage ({list(self.models)})"
                            if unknown else f"--loop.max_nonfinite_steps={cfg.max_nonfinite_steps}: it must be >= 1 "
                            f"(1 = stop at the first non-finite loss)")
        if cfg.resume:
            self.resume()
        elif self.latest_checkpoint() is not None:
            raise UserError(f"--out={self.run_dir} already holds checkpoints: pass --loop.resume=true to continue "
                            f"that run, or choose another --out")
        log = Logger(self.run_dir, self.accelerator.is_main_process, cfg.steps, self.global_step)
        stream = batches(self.global_step * cfg.grad_accum)
        last_logs: dict[str, float] = {}
        t0, steps_timed = time.perf_counter(), 0
        try:
            while self.global_step < cfg.steps:
                seed_everything(cfg.seed, self.global_step, self.accelerator.process_index)
                micro = [next(stream) for _ in range(cfg.grad_accum)]
                for m in self.models.values():
                    m.train()
                logs = train_step(micro, self.global_step)
                self.global_step += 1
                step, last = self.global_step, self.global_step == cfg.steps
                steps_timed += 1
                log.advance()
                if step % cfg.log_every == 0 or last or any(k.startswith("skipped/") for k in logs):
                    logs["steps_per_s"] = steps_timed / (time.perf_counter() - t0)
                    t0, steps_timed = time.perf_counter(), 0
                    log.log(step, logs)
                    last_logs = logs
                if evaluate is not None and (step % cfg.eval_every == 0 or last):
                    with torch.no_grad():
                        ev = evaluate(step)
                    log.log(step, ev)
                    last_logs = {**last_logs, **ev}
                if step % cfg.ckpt_every == 0 or last:
                    self.save()
        finally:
            log.close()
        return last_logs
