"""Multi-teacher KD: the student learns the (weighted) average of several teachers' soft outputs."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from baselines.classic.common import StreamMethod, check_fraction
from mosaic.config import ConfigError
from mosaic.losses import multi_teacher_kd, teacher_weights
from mosaic.methods import Context, register_method
from mosaic.models import freeze


@register_method("multi_teacher")
class MultiTeacherKD(StreamMethod):
    """KD from the run's teacher plus `teachers`: (1 - alpha) CE + alpha T^2 KL(sum_i w_i p_i^T || p_s^T)."""
    defaults = {
        "teachers": [],      # extra teacher checkpoints (model.safetensors / run folders), used after the run's teacher
        "weights": None,     # one weight per teacher, the run's teacher first (null: equal); normalised to sum 1
        "temperature": 4.0,  # softmax temperature T of every teacher and the student; loss scaled by T^2
        "alpha": 0.9,        # weight of the soft term; 1 - alpha goes to CE on labels (ignored without labels)
        "stream": "train",   # train: labelled in-domain images | ood: the unlabelled OOD pool (label-free)
    }

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        o = self.opts
        check_fraction(self.name, "alpha", o["alpha"])
        paths = o["teachers"] or []
        if isinstance(paths, str):
            paths = [paths]
        self.teachers: list[nn.Module] = [self.teacher]
        for path in paths:
            model, meta = ctx.load_classifier(path)
            if meta["num_classes"] != ctx.num_classes:
                raise ConfigError(f"multi_teacher.teachers: '{path}' has {meta['num_classes']} classes but the task "
                                  f"has {ctx.num_classes}; every teacher must share the run teacher's classes")
            if "mean" in meta and not torch.allclose(torch.tensor(meta["mean"], dtype=torch.float32),
                                                     ctx.mean.float().cpu(), atol=1e-3):
                warnings.warn(f"multi_teacher.teachers: '{path}' was trained with normalisation mean "
                              f"{meta['mean']}, but every teacher sees images normalised with the run's "
                              f"{[round(v, 4) for v in ctx.mean.tolist()]}", stacklevel=2)
            self.teachers.append(freeze(model).to(ctx.device))
        try:
            self.weights = teacher_weights(len(self.teachers), o["weights"])
        except ValueError as err:
            raise ConfigError(f"multi_teacher.weights: {err} (the run's teacher first)") from None
        self.student_opt = self.student_optimizer()

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        o = self.opts
        x, y = self.inputs(batch)
        with torch.no_grad():
            t_logits = [teacher(x) for teacher in self.teachers]
        s_logits = self.student(x)
        loss = multi_teacher_kd(s_logits, t_logits, y, temperature=o["temperature"], alpha=o["alpha"],
                                weights=self.weights)
        self.update(loss, self.student_opt)
        return {"loss": loss.detach()}
