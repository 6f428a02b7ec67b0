"""Hinton knowledge distillation on labelled in-domain images or, label-free, on the OOD pool (`kd_ood`)."""
from __future__ import annotations

import torch
from torch import Tensor

from baselines.classic.common import StreamMethod, check_fraction
from mosaic.config import ConfigError
from mosaic.losses import hinton_kd
from mosaic.methods import Context, register_method


@register_method("kd")
class KD(StreamMethod):
    """Hinton KD: (1 - alpha) CE + alpha T^2 KL to the teacher's soft outputs (KD alone without labels)."""
    defaults = {
        "temperature": 4.0,  # softmax temperature T; the soft term is scaled by T^2 (Hinton et al. 2015)
        "alpha": 0.9,        # weight of the soft term; 1 - alpha goes to CE on labels (ignored without labels)
        "stream": "train",   # train: labelled in-domain images | ood: the unlabelled OOD pool (label-free KD)
        "batches": 1,        # student updates per step, each on its own images from the stream
        "update_batches": 1, # stream batches per update: each update sees update_batches x batch_size images
    }
    loss_key = "loss"

    @classmethod
    def resolved(cls, opts: dict) -> dict:
        """KD's options, `batches` and `update_batches` checked."""
        for key in ("batches", "update_batches"):
            b = opts.get(key, 1)
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ConfigError(f"{cls.name}.{key} must be a positive integer, got {b!r}")
        return opts

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        check_fraction(self.name, "alpha", self.opts["alpha"])
        if ctx.cfg.get("mix", "none") != "none" and self.stream == "train" and self.opts["alpha"] < 1:
            raise ConfigError(f"mix={ctx.cfg['mix']} mixes the images, so their labels no longer fit: use "
                              f"{self.name}.alpha=1 (KD alone, as function matching does) or mix=none")
        self.student_opt = self.student_optimizer()

    def budget(self) -> dict[str, int]:
        """`batches` updates per step, each on update_batches x batch_size images."""
        return self.count_budget(self.ctx.steps * self.opts.get("batches", 1),
                                 self.opts.get("update_batches", 1) * self.ctx.batch_size)

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_all, y_all = self.inputs(batch)
        n = self.ctx.batch_size * self.opts.get("update_batches", 1)
        for i, x in enumerate(x_all.split(n)):
            y = None if y_all is None else y_all[i * n:(i + 1) * n]
            x = self.ctx.mix(x)  # function matching: one mixed view for teacher and student (identity by default)
            with torch.no_grad():
                t_logits = self.teacher(x)
            loss = hinton_kd(self.student(x), t_logits, y, temperature=self.opts["temperature"],
                             alpha=self.opts["alpha"])
            self.update(loss, self.student_opt)
        return {self.loss_key: loss.detach()}


@register_method("kd_ood")
class KDOnOOD(KD):
    """The control every OOD method is judged against: `kd` on the OOD images alone at temperature 1.

    A configuration of `kd` (stream=ood, label-free so alpha plays no part) with its own option names.
    Its defaults give the student MosaicKD's default budget at the same `steps` and `batch_size`:
    5 updates per step (MosaicKD's student_steps), each on 2 x batch_size images (MosaicKD's
    batch_size generated + batch_size OOD), all of them OOD here.
    """
    defaults = {
        "temperature": 1.0,  # KD temperature T (loss scaled by T^2)
        "student_steps": 5,  # student updates per step (MosaicKD's student_steps)
        "update_batches": 2, # OOD batches per update: 2 x batch_size images (MosaicKD's generated + OOD per update)
    }
    loss_key = "loss_s"

    @classmethod
    def resolved(cls, opts: dict) -> dict:
        """kd's options for this configuration."""
        for key in ("student_steps", "update_batches"):
            if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1:
                raise ConfigError(f"kd_ood.{key} must be a positive integer, got {opts[key]!r}")
        return {"temperature": opts["temperature"], "alpha": 1.0, "stream": "ood", "batches": opts["student_steps"],
                "update_batches": opts["update_batches"]}
