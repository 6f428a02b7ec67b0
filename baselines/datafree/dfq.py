"""DFQ-style generator (Choi et al., "Data-Free Network Quantization With Adversarial Knowledge Distillation",
CVPR-W 2020), as the MosaicKD and CMI papers run it as a data-free KD baseline.

One step = 1 G step, then `student_steps` KD steps on fresh generated images:

    L_G = bn * sum_l ||mu_l(x) - mu_l^T||_2 + ||var_l(x) - var_l^T||_2   # teacher's BN statistics
        + oh * CE(T(x), argmax T(x))                                     # confident teacher
        + balance * sum_c pbar_c ln pbar_c                               # balanced classes
        - adv * KL(T(x) || S(x))                                         # images where S disagrees with T
    L_S = T^2 * KL(T(x)/T || S(x)/T)

Defaults: CMI's script scripts/dfq/dfq_cifar10_wrn402_wrn161.sh (adv 1, bn 1, oh 1,
balance 20, T 20, lr_g 1e-3, 10 KD steps per generator step) and its GenerativeSynthesizer
(Adam betas 0.5/0.999, nz 256). Unlike that toolkit's driver, which hands the synthesiser the
teacher as "student" and so zeroes the adversarial term, the real student is used here. As in
that synthesiser, the student is in eval mode for the generator step (BatchNorm on running
statistics, which the generator's images do not change); it is back in train mode for KD.
"""
from __future__ import annotations

import torch
from torch import Tensor

from baselines.datafree.common import BNStatHooks, GeneratorMethod, check_positive, eval_mode, make_student_opt
from mosaic.losses import balance_loss, kd_loss, onehot_loss
from mosaic.methods import Context, no_param_grad, register_method


@register_method("dfq")
class DFQ(GeneratorMethod):
    """Data-free: a generator matching the teacher's BN statistics, confident, balanced and adversarial."""
    defaults = {
        "nz": 256,               # noise dimension (CMI datafree_kd.py: nz 256 for dfq)
        "ngf": 64,               # generator width (CMI: Generator ngf 64)
        "head": "sigmoid",       # generator output (CMI's Generator ends in a sigmoid; its synthesiser normalises)
        "lr_g": 1e-3,            # generator Adam lr (CMI script: --lr_g 1e-3)
        "betas": [0.5, 0.999],   # generator Adam betas (CMI GenerativeSynthesizer)
        "lambda_bn": 1.0,        # BN-statistics weight (CMI script: --bn 1)
        "lambda_onehot": 1.0,    # one-hot weight (CMI script: --oh 1)
        "lambda_balance": 20.0,  # class-balance weight, natural log (CMI script: --balance 20)
        "lambda_adv": 1.0,       # adversarial weight (CMI script: --adv 1)
        "student_steps": 10,     # KD steps per generator step (CMI WRN-40-2 -> WRN-16-1 script: --kd_steps 10)
        "temperature": 20.0,     # KD temperature of the student loss (CMI script: --T 20)
    }
    needs = {}                   # data-free: no data stream

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        check_positive(self.name, self.opts, "student_steps")
        self.student_opt = make_student_opt(self.student.parameters(), self.opts, ctx, self.name)
        self.bn_hooks = BNStatHooks(ctx.teacher)

    def generator_losses(self, fake: Tensor) -> dict[str, Tensor]:
        """The four generator terms (unweighted) for generator outputs."""
        x = self.to_classifier(fake)
        with self.bn_hooks:
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        return {"g_bn": self.bn_hooks.loss(), "g_oh": onehot_loss(t_logits), "g_balance": balance_loss(t_logits),
                "g_adv": -kd_loss(s_logits, t_logits)}

    def generator_step(self) -> tuple[Tensor, dict[str, Tensor]]:
        """One generator update with the student in eval mode (CMI's synthesiser); its weighted loss and terms."""
        o = self.opts
        with no_param_grad(self.student), eval_mode(self.student):
            g = self.generator_losses(self.generate())
            loss_g = (o["lambda_bn"] * g["g_bn"] + o["lambda_onehot"] * g["g_oh"]
                      + o["lambda_balance"] * g["g_balance"] + o["lambda_adv"] * g["g_adv"])
            self.update(loss_g, self.generator_opt)
        return loss_g, g

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        o = self.opts
        loss_g, g = self.generator_step()
        for _ in range(o["student_steps"]):
            with torch.no_grad():
                x = self.ctx.mix(self.to_classifier(self.generate()))  # one view for teacher and student
                t_logits = self.teacher(x)
            loss_s = kd_loss(self.student(x), t_logits, temperature=o["temperature"])
            self.update(loss_s, self.student_opt)
        return {"loss_g": loss_g.detach(), "loss_s": loss_s.detach(), **{k: v.detach() for k, v in g.items()}}
