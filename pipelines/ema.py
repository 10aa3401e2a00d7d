"""The exponential moving average of a model that evaluation and the exported checkpoint use (pipelines.trainer)."""
from __future__ import annotations

import copy

import torch
from torch import nn


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
