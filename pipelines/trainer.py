"""The one training-loop skeleton every stage uses: accelerate, gradient accumulation, clipping, LR warm-up and
schedule, EMA, logging (TensorBoard + jsonl + tqdm), atomic checkpoints and exact resume.

A stage supplies three things and keeps its own logic readable:

    trainer = Trainer(cfg.loop, run_dir, kind="tokenizer", model_config=to_dict(cfg.model), full_config=to_dict(cfg))
    trainer.add("g", generator, optimizer, ema=True)      # the first model added is the one checkpoints export
    trainer.add("d", discriminator, d_optimizer)
    trainer.fit(batches=lambda start: ..., train_step=step_fn, evaluate=eval_fn)

`train_step(micro_batches, step) -> dict[str, float]` runs forward/backward for each micro-batch inside
`trainer.accumulating(name, last)` + `trainer.backward(loss)` and ends with `trainer.optimizer_step(name)`.

Resume is exact: every step reseeds torch/python RNGs from (seed, step, rank), the data stream is a pure function of
(seed, position) (`batches(start_micro_batch)`), and the checkpoint holds raw + EMA weights, optimiser and scheduler
states, the fp16 loss scaler's state (when there is one) and the step. So a resumed run draws the same numbers as an
uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch import nn

from data.shards import write_text_atomic
from pipelines.checkpoint import latest_checkpoint, load_checkpoint, load_state, save_checkpoint


@dataclass
class LoopConfig:
    steps: int = 1000  # optimiser steps in the whole run
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4  # peak learning rate
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    warmup_steps: int = 0  # linear LR warm-up; audio GAN training NaNs without it
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float = 0.0  # max global grad norm per optimiser; 0 = off
    ema_decay: float = 0.999  # EMA of the exported model; 0 = no EMA
    log_every: int = 10  # steps between log lines
    eval_every: int = 200  # steps between evaluations (and at the end)
    ckpt_every: int = 200  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 0  # everything random derives from this
    mixed_precision: str = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU; or no | bf16 | fp16
    resume: bool = False  # continue from the newest checkpoint in the run directory


class EMA:
    """Exponential moving average of a model: the weights evaluation and export use.

    The decay ramps as min(decay, (1 + n) / (10 + n)) so that short runs are not dominated by the initial weights.
    What is averaged, module by module (each module's own parameters and buffers):
      - floating-point parameters and buffers are averaged (lerp), buffers because some are learned state that moves
        every step (EMA-VQ's codebook statistics, normalisation statistics): pairing an averaged encoder with the
        latest codebook would mismatch them;
      - buffers named in the module's `ema_constant_buffers` never change after construction and are left alone
        (SimVQ's frozen codebook: copying it every step moved 134 MB at K = 262,144);
      - buffers named in `ema_derived_buffers` are functions of the others: after averaging, the module's
        `refresh_derived_buffers()` recomputes them on the EMA copy (EMA-VQ's embedding from embed_avg/cluster_size);
      - non-floating-point buffers (counters such as BatchNorm's num_batches_tracked) are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged, averaged_src, copied, refresh = [], [], [], []
        for ema_m, m in zip(self.module.modules(), model.modules()):
            for p_ema, p in zip(ema_m.parameters(recurse=False), m.parameters(recurse=False)):
                if p.is_floating_point():
                    averaged.append(p_ema)
                    averaged_src.append(p.detach())
            skip = {*getattr(m, "ema_constant_buffers", ()), *getattr(m, "ema_derived_buffers", ())}
            for (name, b_ema), b in zip(ema_m.named_buffers(recurse=False), m.buffers(recurse=False)):
                if name in skip:
                    continue
                if b.is_floating_point():
                    averaged.append(b_ema)
                    averaged_src.append(b)
                else:
                    copied.append((b_ema, b))
            if getattr(m, "ema_derived_buffers", ()):
                refresh.append(ema_m)
        if averaged:
            torch._foreach_lerp_(averaged, averaged_src, 1.0 - d)
        for b_ema, b in copied:
            b_ema.copy_(b)
        for ema_m in refresh:
            ema_m.refresh_derived_buffers()


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


def seed_everything(seed: int, step: int, rank: int) -> None:
    s = (seed * 1_000_003 + step * 7_919 + rank) % (2**63)
    torch.manual_seed(s)
    random.seed(s)


class Logger:
    """jsonl + TensorBoard + tqdm, on the main process only."""

    def __init__(self, run_dir: Path, enabled: bool, total: int, start: int):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm
        self.jsonl = open(run_dir / "log.jsonl", "a")
        self.tb = SummaryWriter(str(run_dir / "tb"))
        self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        shown = [(k, v) for k, v in values.items() if not k.startswith(("lr/", "grad_norm/"))][:6]
        short = {k: f"{v:.4g}" for k, v in shown}
        self.bar.set_postfix(short, refresh=False)

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()


class Trainer:
    def __init__(self, cfg: LoopConfig, run_dir: str | Path, kind: str, model_config: dict, full_config: dict,
                 accelerator: Accelerator | None = None):
        self.cfg, self.kind = cfg, kind
        self.run_dir = Path(run_dir)
        self.model_config, self.full_config = model_config, full_config
        self.accelerator = accelerator or make_accelerator(cfg)
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.ema: EMA | None = None
        self.step = 0
        self._active: str | None = None
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
    @contextlib.contextmanager
    def accumulating(self, name: str, last: bool):
        """Wrap forward+backward of one micro-batch; gradients are all-reduced only on the last one."""
        self._active = name
        ctx = contextlib.nullcontext() if last else self.accelerator.no_sync(self.models[name])
        with ctx:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss / self.cfg.grad_accum)

    def optimizer_step(self, name: str) -> dict[str, float]:
        model, opt = self.models[name], self.optimizers[name]
        logs = {}
        if self.cfg.grad_clip > 0:
            norm = self.accelerator.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
            logs[f"grad_norm/{name}"] = float(norm)
        opt.step()
        self.schedulers[name].step()
        opt.zero_grad(set_to_none=True)
        if name == self.main and self.ema is not None:
            self.ema.update(self.unwrap(name))
        logs[f"lr/{name}"] = self.schedulers[name].get_last_lr()[0]
        return logs

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        weights = {"model": self.eval_model().state_dict()}
        if self.ema is not None:
            weights["raw"] = self.unwrap(self.main).state_dict()
        for name in list(self.models)[1:]:
            weights[name] = self.unwrap(name).state_dict()
        state = {"step": self.step, "ema_updates": self.ema.updates if self.ema else 0,
                 "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                 "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()}}
        if self.accelerator.scaler is not None:  # fp16: the loss scale and its growth counter, for an exact resume
            state["scaler"] = self.accelerator.scaler.state_dict()
        config = {"kind": self.kind, "config": self.model_config, "train_config": self.full_config,
                  "step": self.step}
        path = save_checkpoint(self.run_dir / "checkpoints" / f"step-{self.step:09d}", config=config,
                               weights=weights, state=state)
        old = sorted((self.run_dir / "checkpoints").glob("step-[0-9]*"))[:-self.cfg.keep_checkpoints]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return path

    def resume(self) -> bool:
        """Load the newest checkpoint of this run, if any; returns whether one was found."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        names = ["model"] + (["raw"] if self.ema is not None else []) + list(self.models)[1:]
        _, weights = load_checkpoint(ckpt, names=tuple(names))
        state = load_state(ckpt)
        self.unwrap(self.main).load_state_dict(weights["raw" if self.ema is not None else "model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(weights["model"])
            self.ema.updates = state["ema_updates"]
        for name in list(self.models)[1:]:
            self.unwrap(name).load_state_dict(weights[name])
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
        self.step = state["step"]
        self.accelerator.print(f"resumed from {ckpt} at step {self.step}")
        return True

    # ------------------------------------------------------------------ the loop
    def fit(self, batches: Callable[[int], Iterator], train_step: Callable[[list, int], dict[str, float]],
            evaluate: Callable[[int], dict[str, float]] | None = None) -> dict[str, float]:
        """Run to cfg.steps. `batches(k)` yields micro-batches starting at micro-batch k of the run."""
        cfg = self.cfg
        if cfg.resume:
            self.resume()
        elif latest_checkpoint(self.run_dir) is not None:
            raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --loop.resume=true to continue "
                                  f"it, or choose another --out")
        log = Logger(self.run_dir, self.accelerator.is_main_process, cfg.steps, self.step)
        stream = batches(self.step * cfg.grad_accum)
        last_logs: dict[str, float] = {}
        t0, steps_timed = time.perf_counter(), 0
        try:
            while self.step < cfg.steps:
                seed_everything(cfg.seed, self.step, self.accelerator.process_index)
                micro = [next(stream) for _ in range(cfg.grad_accum)]
                for m in self.models.values():
                    m.train()
                logs = train_step(micro, self.step)
                self.step += 1
                steps_timed += 1
                log.advance()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logs["steps_per_s"] = steps_timed / (time.perf_counter() - t0)
                    t0, steps_timed = time.perf_counter(), 0
                    log.log(self.step, logs)
                    last_logs = logs
                if evaluate is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    with torch.no_grad():
                        ev = evaluate(self.step)
                    log.log(self.step, ev)
                    last_logs = {**last_logs, **ev}
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save()
        finally:
            log.close()
        return last_logs
