"""metrics.jsonl (and TensorBoard when installed): the run's metric records, written by the main process."""
from __future__ import annotations

import json
from pathlib import Path


class MetricLog:
    """Appends metric records to metrics.jsonl (and TensorBoard when installed), main process only."""

    def __init__(self, folder: Path, *, enabled: bool, resume_step: int | None) -> None:
        self.path = folder / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None:  # drop lines written after the checkpoint
            self.truncate(resume_step)
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(folder / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def truncate(self, step: int) -> None:
        """Drop the lines written after `step` (the run went back to a checkpoint at that step)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, step: int, values: dict[str, float]) -> None:
        """Append one record {"step": step, **values}."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def last_losses(self) -> dict[str, float]:
        """The latest value of every non-evaluation metric in the file (for results.json)."""
        out: dict[str, float] = {}
        if not self.enabled or not self.path.exists():
            return out
        for line in self.path.read_text().splitlines():
            rec = json.loads(line)
            out.update({k: v for k, v in rec.items() if not k.startswith("eval/") and k not in ("step", "elapsed_s")})
        return out

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.tb is not None:
            self.tb.close()
