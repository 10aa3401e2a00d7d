"""What a training run logs: jsonl + TensorBoard + tqdm, on the main process only (used by pipelines.trainer)."""
from __future__ import annotations

import json
from pathlib import Path


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
