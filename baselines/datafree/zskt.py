"""ZSKT (Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching", NeurIPS 2019).

A generator G seeks images on which the student S disagrees with the teacher T; S then
matches T's outputs and attention maps on them. One step = 1 G step, then `student_steps`
(10) S steps on G's images for the same noise batch:

    L_G = -KL(T(x) || S(x)),          x = G(z)
    L_S =  KL(T(x) || S(x)) + beta * sum_l mean (a_S^l(x) - a_T^l(x))^2

KL is averaged over batch *and* classes, as PyTorch's kl_div 'mean' in the official code;
a^l is the L2-normalised channel-mean of squares of layer l's output (attention transfer).
Both players use Adam with gradient-norm clipping at 5 (official code).

`zskt.recipe=benchmark` runs the CMI / Fast-Datafree benchmark instead (scripts/zskt_cifar.sh through
`baselines.datafree.generative`): the generator on -KL(T || S) alone (batch mean, T=1), then 5 KD steps at
T=20 on fresh images, no attention transfer, the config's SGD student, the benchmark's sigmoid decoder.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from baselines.datafree.common import require
from baselines.datafree.generative import GenerativeSynthesis, benchmark
from mosaic.losses import at_pair_loss, kd_loss
from mosaic.methods import Context, no_param_grad, register_method
from mosaic.models import FeatureTaps, feature_info_of, feature_taps

_STAGE = re.compile(r"(^|\.)layer\d+$")


def stage_modules(model: nn.Module) -> list[tuple[str, int]]:
    """(module, reduction) of the stage entries (`layerN`) of a model's feature_info; all entries if none match."""
    info = feature_info_of(model)
    stages = [d for d in info if _STAGE.search(str(d.get("module", "")))] or info
    return [(str(d["module"]), int(d.get("reduction", 0))) for d in stages]


def pair_layers(teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
    """(teacher layer, student layer) pairs: each student stage with the last teacher stage of equal reduction."""
    t_stages, s_stages = stage_modules(teacher), stage_modules(student)
    require(bool(t_stages) and bool(s_stages), "zskt cannot find stage modules (model.feature_info is empty): "
                                               "set zskt.at_layers=[[teacher_layer, student_layer], ...]")
    pairs = []
    for s_name, s_red in s_stages:
        match = [t_name for t_name, t_red in t_stages if t_red == s_red]
        require(bool(match), f"zskt: no teacher stage has the reduction {s_red} of student layer '{s_name}' "
                             f"(teacher stages: {t_stages}); set zskt.at_layers=[[teacher_layer, student_layer], ...]")
        pairs.append((match[-1], s_name))
    return pairs


@register_method("zskt")
class ZSKT(GenerativeSynthesis):
    """Data-free: adversarial belief matching, the generator maximising KL(T || S), plus attention transfer."""
    defaults = {
        "nz": 100,                 # noise dimension (official CIFAR-10 script: --z_dim 100)
        "ngf": 64,                 # generator width (mosaic's Generator, shared by the generator baselines)
        "head": "bn",              # generator output (official models/generator.py: a final BatchNorm2d(3))
        "lr_g": 1e-3,              # generator Adam lr (official: --generator_learning_rate 1e-3)
        "betas": [0.9, 0.999],     # generator Adam betas (official: torch defaults)
        "student_optimizer": "adam",  # adam (official) | sgd (the config's student section, as CMI's benchmark)
        "lr_s": 2e-3,              # student Adam lr when student_optimizer=adam (official: 2e-3)
        "student_steps": 10,       # student steps per generator step (official CIFAR-10: n_student_iter 10)
        "beta": 250.0,             # attention-transfer weight (official: --AT_beta 250)
        "temperature": 1.0,        # KL temperature (official: --KL_temperature 1)
        "clip_grad": 5.0,          # gradient-norm clip of both players (official: 5; 0 disables)
        "at_layers": None,         # [[teacher_layer, student_layer], ...]; null: stage modules paired by reduction
    }
    recipes = {"benchmark": benchmark(
        lambda_adv=1.0,            # scripts/zskt_cifar.sh: --adv 1 (every other weight 0: no attention term)
        temperature=20.0,          # --T 20
    )}
    needs = {}                     # data-free: no data stream

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        if self.uses_benchmark_loop():
            return
        o = self.opts
        pairs = o["at_layers"] if o["at_layers"] is not None else pair_layers(ctx.teacher, ctx.student)
        require(all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs),
                f"zskt.at_layers must be a list of [teacher_layer, student_layer] pairs, got {pairs!r}")
        self.t_layers = [p[0] for p in pairs]
        self.s_layers = [p[1] for p in pairs]
        FeatureTaps(ctx.teacher, self.t_layers)  # fail now, with close matches, on unknown layer names
        FeatureTaps(ctx.student, self.s_layers)

    def divergence(self, s_logits: Tensor, t_logits: Tensor) -> Tensor:
        """KL(T || S) averaged over batch and classes at the option's temperature."""
        return kd_loss(s_logits, t_logits, temperature=self.opts["temperature"], reduction="mean")

    def generator_losses(self, fake: Tensor) -> dict[str, Tensor]:
        """The paper recipe's adversarial term -KL(T || S) on generator outputs; gradients reach G through T and S."""
        x = self.to_classifier(fake)
        return {"g_adv": -self.divergence(self.student(x), self.teacher(x))}

    def _clip(self, module: nn.Module) -> None:
        if self.opts["clip_grad"] > 0:
            self.accelerator.clip_grad_norm_(module.parameters(), self.opts["clip_grad"])

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        if self.uses_benchmark_loop():
            return self.generative_step()
        o = self.opts
        z = torch.randn(self.ctx.batch_size, o["nz"], device=self.ctx.device)
        with no_param_grad(self.student):
            g = self.generator_losses(self.generator(z))
        self.generator_opt.zero_grad(set_to_none=True)
        self.backward(g["g_adv"])
        self._clip(self.generator)
        self.generator_opt.step()

        # The student's batch: the updated generator's images of the same noise, teacher outputs computed once.
        with torch.no_grad(), feature_taps(self.teacher, self.t_layers, detach=True) as t_feats:
            x = self.ctx.mix(self.to_classifier(self.generator(z)))  # one view for teacher and student
            t_logits = self.teacher(x)
        for _ in range(o["student_steps"]):
            with feature_taps(self.student, self.s_layers) as s_feats:
                s_logits = self.student(x)
            loss_kl = self.divergence(s_logits, t_logits)
            loss_at = sum((at_pair_loss(s_feats[s], t_feats[t]) for s, t in zip(self.s_layers, self.t_layers)),
                          loss_kl.new_zeros(()))
            loss_s = loss_kl + o["beta"] * loss_at
            self.student_opt.zero_grad(set_to_none=True)
            self.backward(loss_s)
            self._clip(self.student)
            self.student_opt.step()
        return {"loss_g": g["g_adv"].detach(), "loss_s": loss_s.detach(), "s_kl": loss_kl.detach(),
                "s_at": loss_at.detach()}
