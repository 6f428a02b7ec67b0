"""metrics.jsonl and the experiment trackers (Accelerate's `log_with`): the run's metric records."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mosaic.engine.folder import RunError

# pip package of each Accelerate tracker whose import name differs from its tracker name
PACKAGES = {"comet_ml": "comet-ml"}


def check_trackers(log_with: Any) -> list:
    """The trackers `log_with` asks for (names, or accelerate GeneralTracker instances); unknown names and
    trackers whose package is missing are errors, "none" (or null) is no tracker."""
    from accelerate.tracking import GeneralTracker, get_available_trackers
    from accelerate.utils import LoggerType

    wanted = log_with if isinstance(log_with, (list, tuple)) else [log_with]
    names = [str(t) for t in LoggerType]
    available = {str(t) for t in get_available_trackers()}
    out = []
    for tracker in wanted:
        if isinstance(tracker, GeneralTracker):
            out.append(tracker)
            continue
        name = str(tracker).lower() if tracker is not None else "none"
        if name == "none":
            continue
        if name not in names:
            raise RunError(f"log_with={tracker!r} is not a tracker Accelerate knows: use one of "
                           f"{', '.join(names + ['none'])}")
        if name != "all" and name not in available:
            raise RunError(f"log_with={name} needs the {name} package, which is not installed: "
                           f"pip install {PACKAGES.get(name, name)}, or set log_with=none")
        out.append(name)
    return out


def tracker_names(log_with: Any) -> Any:
    """`log_with` as the config file records it: tracker instances replaced by their names."""
    if isinstance(log_with, (list, tuple)):
        return [tracker_names(t) for t in log_with]
    return log_with if log_with is None or isinstance(log_with, str) else str(getattr(log_with, "name", log_with))


class MetricLog:
    """Appends metric records to metrics.jsonl and hands them to the Accelerator's trackers, main process only."""

    def __init__(self, folder: Path, *, enabled: bool, resume_step: int | None, accelerator=None) -> None:
        self.path = folder / "metrics.jsonl"
        self.enabled = enabled
        self.accelerator = accelerator
        if not enabled:
            return
        if resume_step is not None:  # drop lines written after the checkpoint
            self.truncate(resume_step)
        elif self.path.exists():
            self.path.unlink()

    def truncate(self, step: int) -> None:
        """Drop the lines written after `step` (the run went back to a checkpoint at that step)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, step: int, values: dict[str, float]) -> None:
        """Append one record {"step": step, **values} and log the values at `step` to the trackers."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.accelerator is not None:
            self.accelerator.log(values, step=step)

    def last_losses(self) -> dict[str, float]:
        """The latest value of every non-evaluation metric in the file (for results.json)."""
        out: dict[str, float] = {}
        if not self.enabled or not self.path.exists():
            return out
        for line in self.path.read_text().splitlines():
            rec = json.loads(line)
            out.update({k: v for k, v in rec.items() if not k.startswith("eval/") and k not in ("step", "elapsed_s")})
        return out
