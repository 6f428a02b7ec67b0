"""Evaluation: the student's and teacher's top-1 and their agreement, during a run and for `mosaic evaluate`."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from mosaic.data import ImageSet, load_split
from mosaic.engine.folder import RunError
from mosaic.engine.task import check_checkpoints, check_task, load_teacher
from mosaic.methods import Context, Method
from mosaic.models import load_classifier


class Evaluator:
    """Top-1 of the student, of the teacher (computed once) and their agreement on the test set."""

    def __init__(self, test: ImageSet, ctx: Context, *, batch_size: int) -> None:
        acc = ctx.accelerator
        self.ctx, self.batch_size = ctx, batch_size
        if test.labels is None:
            raise RunError(f"the test set '{test.name}' has no labels: data.test must be a labelled data set")
        self.images = test.images[acc.process_index::acc.num_processes].to(ctx.device)
        self.labels = test.labels[acc.process_index::acc.num_processes].to(ctx.device)
        self.total = len(test)
        self.teacher_pred = None
        self.teacher_top1 = None
        if ctx.teacher is not None:
            self.teacher_pred = ctx.predict(ctx.teacher, self.images, batch_size=batch_size).argmax(1)
            self.teacher_top1 = self._fraction((self.teacher_pred == self.labels).sum())

    def _fraction(self, count: Tensor) -> float:
        return float(self.ctx.accelerator.reduce(count.float(), reduction="sum").item()) / self.total

    def __call__(self, model: nn.Module) -> dict[str, float]:
        pred = self.ctx.predict(model, self.images, batch_size=self.batch_size).argmax(1)
        out = {"student_top1": self._fraction((pred == self.labels).sum())}
        if self.teacher_pred is not None:
            out["teacher_top1"] = self.teacher_top1
            out["agreement"] = self._fraction((pred == self.teacher_pred).sum())
        return out


def run_evaluator(method: Method, test: ImageSet | None, ctx: Context, *,
                  batch_size: int) -> Callable[[], dict[str, float]] | None:
    """The run's evaluation on data.test (None without one): the method's own (Method.evaluator), else top-1."""
    if test is None:
        return None
    own = method.evaluator(test)
    if own is not None:
        return own
    top1 = Evaluator(test, ctx, batch_size=batch_size)
    return lambda: top1(method.eval_model())


def evaluate(model_path: str, cfg: dict) -> dict[str, Any]:
    """Top-1 of a saved model on cfg's test set, and agreement with cfg's teacher when given."""
    from accelerate import Accelerator

    if not cfg["data"]["test"]:
        raise RunError("nothing to evaluate on: set data.test=<labelled data set>")
    check_checkpoints(cfg)
    accelerator = Accelerator(cpu=cfg["cpu"])  # evaluation runs in fp32 (Context.predict)
    model, meta = load_classifier(model_path)
    d = cfg["data"]
    test = load_split(cfg, "test", image_size=meta.get("image_size"), channels=meta.get("in_chans"))
    teacher, teacher_meta = (None, {})
    if cfg["teacher"]["checkpoint"]:
        teacher, teacher_meta = load_teacher(cfg, {"test": test}, required=True)
    check_task(cfg | {"data": {**d, "image_size": meta.get("image_size", d["image_size"]),
                               "channels": meta.get("in_chans", d["channels"])}}, {"test": test}, meta)
    device = accelerator.device
    mean, std = meta.get("mean", test.mean), meta.get("std", test.std)
    ctx = Context(cfg=cfg, opts={}, teacher=teacher.to(device) if teacher is not None else None, student=model,
                  num_classes=meta["num_classes"], image_size=test.images.shape[-1], channels=test.images.shape[1],
                  mean=torch.tensor(mean, device=device), std=torch.tensor(std, device=device), device=device,
                  accelerator=accelerator, steps=0, batch_size=cfg["eval_batch_size"])
    scores = Evaluator(test, ctx, batch_size=cfg["eval_batch_size"])(model.to(device))
    return {"model": str(model_path), "arch": meta.get("arch"), "test": test.name, "images": len(test), **scores}
