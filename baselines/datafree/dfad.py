"""DFAD (Fang et al., "Data-Free Adversarial Distillation", arXiv 1912.11006, 2019).

A generator G and the student S play a min-max game on the mean absolute difference of
teacher and student logits. One step = `student_steps` (5) S steps, each on fresh images,
then 1 G step (the official loop's order):

    L_S =  mean |S(x) - T(x)|,   x = G(z) detached, fresh z per student step
    L_G = -mean |S(x) - T(x)|,   x = G(z); gradients reach G through both T and S

`dfad.recipe=benchmark` runs the CMI / Fast-Datafree benchmark instead (scripts/dfad_cifar.sh through
`baselines.datafree.generative`): the same L1 game, but 1 generator step (student in eval mode) then 5 student
steps, the benchmark's sigmoid decoder, Adam betas 0.5/0.999 and the config's SGD student.
"""
from __future__ import annotations

import torch
from torch import Tensor

from baselines.datafree.generative import GenerativeSynthesis, benchmark
from mosaic.losses import logit_l1
from mosaic.methods import no_param_grad, register_method


@register_method("dfad")
class DFAD(GenerativeSynthesis):
    """Data-free: a generator maximising, and a student minimising, the L1 distance of their logits."""
    defaults = {
        "nz": 256,               # noise dimension (official DFAD_cifar.py: --nz 256)
        "ngf": 64,               # generator width (official GeneratorA: ngf 64)
        "head": "tanh_bn",       # generator output (official GeneratorA: Tanh, BatchNorm2d(nc, affine=False))
        "lr_g": 1e-3,            # generator Adam lr (official: --lr_G 1e-3)
        "betas": [0.9, 0.999],   # generator Adam betas (official: torch defaults)
        "student_steps": 5,      # student steps per generator step (official: 5)
    }
    recipes = {"benchmark": benchmark(
        lambda_adv=1.0,          # scripts/dfad_cifar.sh: --adv 1
        adversary="l1",          # datafree_kd.py: criterion L1Loss for dfad
        student_loss="l1",       # the same criterion for the student
        temperature=1.0,         # --T 1 (unused by the L1 loss)
    )}
    needs = {}                   # data-free: no data stream

    def generator_losses(self, fake: Tensor) -> dict[str, Tensor]:
        """The adversarial term -L1(S(x), T(x)) on generator outputs."""
        x = self.to_classifier(fake)
        return {"g_adv": -logit_l1(self.student(x), self.teacher(x))}

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        if self.uses_benchmark_loop():
            return self.generative_step()
        for _ in range(self.opts["student_steps"]):
            with torch.no_grad():
                x = self.ctx.mix(self.to_classifier(self.generate()))  # one view for teacher and student
                t_logits = self.teacher(x)
            loss_s = logit_l1(self.student(x), t_logits)
            self.update(loss_s, self.student_opt)

        with no_param_grad(self.student):
            g = self.generator_losses(self.generate())
        self.update(g["g_adv"], self.generator_opt)
        return {"loss_s": loss_s.detach(), "loss_g": g["g_adv"].detach()}
