"""The benchmark's generator loop (CMI / Fast-Datafree `GenerativeSynthesizer` and `datafree_kd.py`), as a base.

The table most data-free papers copy (CMI, Fang et al. 2021; zju-vipa/Fast-Datafree `scripts/*_cifar.sh`)
runs DAFL, ZSKT, DFAD and DFQ through one loop that differs only in five weights. One step =

    1 generator step, student in eval mode (BatchNorm on running statistics), on
        L_G = bn * sum_l ||mu_l - mu_l^T|| + ||var_l - var_l^T||   # teacher's BN statistics
            + oh * CE(T(x), argmax T(x))                           # confident teacher
            + act * -mean |f_T(x)|                                 # strong penultimate features
            + balance * sum_c pbar_c ln pbar_c                     # balanced classes (natural log)
            + adv * -D(S(x), T(x))                                 # where the student disagrees
    then `student_steps` KD steps, each on fresh generator images, on D_s(S(x), T(x)),

with D = KL(T || S) at T=1 (batch mean; `adversary=kl`) or the mean absolute logit difference (`adversary=l1`,
DFAD), and D_s the KD loss at `temperature` (`student_loss=kl`) or the same L1 (`student_loss=l1`, DFAD).
The generator: the benchmark's decoder (`width=2`: Linear to ngf*2 maps, two upsample-conv-BN-LeakyReLU
blocks, sigmoid), Adam betas 0.5/0.999 at a constant lr (the run's schedule drives only the student); its
images are normalised for the classifiers.

Two things the shipped `datafree_kd.py` does differently, both left out here on purpose (experiments/parity.py
runs the reference both ways): it hands the synthesiser the *teacher* as its student, so D(T(x), T(x)) = 0 and
the adversarial term never moves the generator (ZSKT and DFAD, whose only generator term it is, then distil
from an untrained generator), and it replaces the `--T 20` KD criterion by a T=1 one for these four methods.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

from baselines.datafree.common import (BNStatHooks, GeneratorMethod, check_positive, eval_mode,
                                       logits_and_features, make_student_opt, require)
from mosaic.losses import activation_loss, balance_loss, kd_loss, logit_l1, onehot_loss
from mosaic.methods import Context, no_param_grad

DISTANCES = ("kl", "l1")
GENERATOR_SCHEDULES = ("constant", "run")
WEIGHTS = {"g_bn": "lambda_bn", "g_oh": "lambda_onehot", "g_act": "lambda_act", "g_balance": "lambda_balance",
           "g_adv": "lambda_adv"}  # each generator term and the option that weighs it

# The benchmark loop's shared settings (Fast-Datafree datafree_kd.py and GenerativeSynthesizer; scripts/*_cifar.sh).
BENCHMARK = {
    "nz": 256,               # noise dimension (datafree_kd.py: 256; 512 for DAFL)
    "ngf": 64,               # generator width (datafree_kd.py: Generator(ngf=64))
    "width": 2,              # projected map of ngf*2 channels (Fast-Datafree models/generator.py)
    "head": "sigmoid",       # sigmoid images, normalised for the classifiers (Generator + Normalizer)
    "lr_g": 1e-3,            # generator Adam lr (scripts: --lr_g 1e-3)
    "generator_schedule": "constant",  # generator lr: constant (GenerativeSynthesizer: no scheduler) | run
    "betas": [0.5, 0.999],   # generator Adam betas (GenerativeSynthesizer)
    "lambda_bn": 0.0,        # BN-statistics weight (--bn)
    "lambda_onehot": 0.0,    # one-hot weight (--oh)
    "lambda_act": 0.0,       # activation weight (--act)
    "lambda_balance": 0.0,   # class-balance weight, natural log (--balance)
    "lambda_adv": 0.0,       # adversarial weight (--adv)
    "adversary": "kl",       # D of the adversarial term: kl (KLDiv at T=1) | l1 (DFAD: torch.nn.L1Loss)
    "student_loss": "kl",    # the student's loss: kl at `temperature` | l1 (DFAD)
    "student_steps": 5,      # KD steps per generator step (scripts: --kd_steps 5; DFQ 10)
    "temperature": 20.0,     # KD temperature (scripts: --T 20; DFAD 1)
    "student_optimizer": "sgd",  # the config's student section (datafree_kd.py: SGD, momentum 0.9, lr --lr)
}


def benchmark(**changes) -> dict:
    """The benchmark loop's settings with one method's script values."""
    unknown = set(changes) - set(BENCHMARK)
    if unknown:
        raise KeyError(f"not a benchmark setting: {sorted(unknown)}")
    return {**BENCHMARK, **changes}


class GenerativeSynthesis(GeneratorMethod):
    """Base of the methods that can run the benchmark loop: `generative_step` (module docstring).

    A subclass sets the five weights, `adversary`, `student_loss`, `student_steps` and `temperature` in
    the defaults of the recipe that uses the loop; `uses_benchmark_loop()` says whether this run does. Every
    recipe gets the student optimizer (`student_optimizer`, the config's SGD by default) and, where the
    recipe has `student_steps`, its check.
    """

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        o = self.opts
        if "student_steps" in o:
            check_positive(self.name, o, "student_steps")
        self.student_opt = make_student_opt(self.student.parameters(), o, ctx, self.name)  # every recipe's
        if self.uses_benchmark_loop():
            for key in ("adversary", "student_loss"):
                require(o[key] in DISTANCES, f"{self.name}.{key} must be one of {', '.join(DISTANCES)}, "
                                             f"got {o[key]!r}")
            require(o["generator_schedule"] in GENERATOR_SCHEDULES,
                    f"{self.name}.generator_schedule must be constant or run, got {o['generator_schedule']!r}")
            require(any(o[k] for k in WEIGHTS.values()),
                    f"{self.name}: every generator weight is 0, so the generator never learns: set one of "
                    f"{', '.join(WEIGHTS.values())}")
            self.bn_hooks = BNStatHooks(ctx.teacher) if o["lambda_bn"] else None

    def uses_benchmark_loop(self) -> bool:
        """True when this run's options are the benchmark loop's (the recipe `benchmark`, or DFQ always)."""
        return self.opts.get("recipe", "benchmark") == "benchmark"

    def lr_lambda(self, player: str, schedule: Callable[[int, int], float]) -> Callable[[int], float]:
        """The run's schedule, except a constant generator lr under `generator_schedule=constant`."""
        if player == "generator" and self.uses_benchmark_loop() and self.opts["generator_schedule"] == "constant":
            return lambda step: 1.0
        return super().lr_lambda(player, schedule)

    def distance(self, kind: str, s_logits: Tensor, t_logits: Tensor, temperature: float = 1.0) -> Tensor:
        """KL(T || S) at `temperature` (batch mean, times T^2) for kind kl; the mean absolute difference for l1."""
        if kind == "l1":
            return logit_l1(s_logits, t_logits)
        return kd_loss(s_logits, t_logits, temperature=temperature)

    def synthesis_terms(self, fake: Tensor) -> dict[str, Tensor]:
        """The generator terms with a non-zero weight (unweighted) for generator outputs; student in eval mode."""
        o = self.opts
        x = self.to_classifier(fake)
        with self.bn_hooks or contextlib.nullcontext():
            if o["lambda_act"]:
                t_logits, t_feat = logits_and_features(self.teacher, x)
            else:
                t_logits = self.teacher(x)
        terms = {}
        if self.bn_hooks is not None:
            terms["g_bn"] = self.bn_hooks.loss()
        if o["lambda_onehot"]:
            terms["g_oh"] = onehot_loss(t_logits)
        if o["lambda_act"]:
            terms["g_act"] = activation_loss(t_feat)
        if o["lambda_balance"]:
            terms["g_balance"] = balance_loss(t_logits)
        if o["lambda_adv"]:
            terms["g_adv"] = -self.distance(o["adversary"], self.student(x), t_logits)
        return terms

    def generator_step(self) -> tuple[Tensor, dict[str, Tensor]]:
        """One generator update on the weighted terms, the student frozen in eval mode; its loss and terms."""
        with no_param_grad(self.student), eval_mode(self.student):
            terms = self.synthesis_terms(self.generate())
            loss_g = sum(self.opts[WEIGHTS[k]] * v for k, v in terms.items())
            self.update(loss_g, self.generator_opt)
        return loss_g, terms

    def kd_step(self) -> Tensor:
        """One student update on fresh generator images (no gradient to the generator); its loss."""
        o = self.opts
        with torch.no_grad():
            x = self.ctx.mix(self.to_classifier(self.generate()))  # one view for teacher and student
            t_logits = self.teacher(x)
        loss_s = self.distance(o["student_loss"], self.student(x), t_logits, o["temperature"])
        self.update(loss_s, self.student_opt)
        return loss_s

    def generative_step(self) -> dict[str, Tensor]:
        """The benchmark loop's step: one generator update, then `student_steps` KD updates."""
        loss_g, terms = self.generator_step()
        for _ in range(self.opts["student_steps"]):
            loss_s = self.kd_step()
        return {"loss_g": loss_g.detach(), "loss_s": loss_s.detach(), **{k: v.detach() for k, v in terms.items()}}
