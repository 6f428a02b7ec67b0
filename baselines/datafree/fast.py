"""Fast (Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022; code: Fast-Datafree).

A meta generator G_0 is learned so that a few steps adapt it to a new batch. Each synthesis
copies G_0 to G, draws noise z and runs `g_steps` Adam steps on G and z (learning rates lr_g
and lr_z) against the frozen teacher T:

    L = bn * sum_l R_l^mmt(x) + oh * CE(T(x), y) + adv * L_adv(x),   x = aug(G(z))
    R_l^mmt = ||mu_l^T - ((1 - m) mu_l(x) + m mu_l^ema)||_2 + ||var_l^T - ((1 - m) var_l(x) + m var_l^ema)||_2
    L_adv = -mean_i [argmax S(x)_i == argmax T(x)_i] KL(T(x)_i || S(x)_i)   (off during warm-up)

aug is a random crop with 4 px padding + flip; mu^ema, var^ema are each BN layer's batch
statistics of past syntheses, averaged with momentum m (`bn_momentum`, updated after each
synthesis from its last iteration). The lowest-loss iterate goes to the image pool
(baselines.datafree.pool), then G_0 is meta-updated from the adapted G:

    meta=fomaml   first-order MAML (the reference scripts, --is_maml 1): the gradients of all
                  inner steps, summed, feed an Adam step of G_0 at lr_g * g_steps, betas (0.5, 0.999)
    meta=reptile  Reptile: G_0 <- G_0 + lr_meta * (G - G_0)

The student learns KD at temperature T on augmented pool batches; `warmup` synthesis-only
steps come first (see InterleavedSynthesis), the last of them already adversarial: the reference
counts a synthesis before testing `ep >= warmup`, so its adversary starts at synthesis number `warmup`.
Not ported: the reference's `reset_l0` (a re-initialisation of G_0's first layer at epoch 120 + warmup,
whose module test is always true).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from baselines.datafree.common import BNStatHooks, require
from baselines.datafree.pool import InterleavedSynthesis
from mosaic.augment import Augment
from mosaic.losses import batch_stats, bn_stat_distance, cross_entropy, masked_adversarial_kl
from mosaic.methods import Context, register_method

META_RULES = ("fomaml", "reptile")


class MomentumBNHooks(BNStatHooks):
    """BNStatHooks whose batch statistics are blended with an average over past syntheses (Fast's bn_mmt)."""

    def __init__(self, model, *, momentum: float) -> None:
        super().__init__(model)
        self.momentum = momentum
        self.ema: dict[int, tuple[Tensor, Tensor]] = {}
        self.last: dict[int, tuple[Tensor, Tensor]] = {}

    def _hook(self, index: int):
        def hook(module, inputs: Any, output: Any) -> None:
            mean, var = batch_stats(inputs[0])
            self.last[index] = (mean.detach(), var.detach())
            if index in self.ema and self.momentum > 0:
                m, (mean_ema, var_ema) = self.momentum, self.ema[index]
                mean, var = (1 - m) * mean + m * mean_ema, (1 - m) * var + m * var_ema
            self.distances[index] = bn_stat_distance(mean, var, module.running_mean, module.running_var)
        return hook

    def update_average(self) -> None:
        """Fold the last forward's statistics into the average (the first synthesis sets it)."""
        if self.momentum <= 0:
            return
        m = self.momentum
        for i, (mean, var) in self.last.items():
            old = self.ema.get(i)
            self.ema[i] = (mean, var) if old is None else (m * old[0] + (1 - m) * mean, m * old[1] + (1 - m) * var)

    def state_dict(self) -> dict:
        return {i: (mean.cpu(), var.cpu()) for i, (mean, var) in self.ema.items()}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.ema = {int(i): (mean.to(device), var.to(device)) for i, (mean, var) in state.items()}


class MomentumSynthesis(InterleavedSynthesis):
    """Base of Fast and NAYER: their synthesis objective on augmented views, and the lowest-loss iterate.

    bn * sum_l R_l^mmt(x) + oh * CE(T(x), y) + adv * L_adv(x), x = aug(G(...)) (module docstring), with
    the options bn_momentum, lambda_bn, lambda_oh and lambda_adv. The BN average is in the state_dict.
    """

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        o = self.opts
        require(0 <= o["bn_momentum"] < 1, f"{self.name}.bn_momentum must be in [0, 1), got {o['bn_momentum']!r}")
        self.bn_hooks = MomentumBNHooks(ctx.teacher, momentum=o["bn_momentum"])
        self.augment_view = Augment(image_size=ctx.image_size, padding=4, flip=True)

    def synthesis_terms(self, x: Tensor, targets: Tensor, *, adversarial: bool) -> dict[str, Tensor]:
        """The unweighted terms for generated images x in [0, 1]."""
        x = self.ctx.normalize(self.augment_view(x))
        with self.bn_hooks:
            t_logits = self.teacher(x)
        terms = {"bn": self.bn_hooks.loss(), "oh": cross_entropy(t_logits, targets)}
        if adversarial and self.opts["lambda_adv"] > 0:
            with self.student_for_synthesis() as student:
                terms["adv"] = masked_adversarial_kl(student(x), t_logits)
        else:
            terms["adv"] = t_logits.new_zeros(())
        return terms

    def weighted(self, terms: dict[str, Tensor]) -> Tensor:
        """The synthesis objective: the terms times their weights."""
        o = self.opts
        return o["lambda_bn"] * terms["bn"] + o["lambda_oh"] * terms["oh"] + o["lambda_adv"] * terms["adv"]

    @staticmethod
    @torch.no_grad()
    def keep_lowest(best: tuple[Tensor, Tensor | None], x: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, images) of the lowest-loss iterate so far, updated with (x, loss) without a host sync."""
        best_loss, best_x = best
        best_x = x.detach() if best_x is None else torch.where(loss < best_loss, x.detach(), best_x)
        return torch.minimum(loss.detach(), best_loss), best_x

    def state_dict(self) -> dict:
        """The InterleavedSynthesis state and the BN average."""
        return {**super().state_dict(), "bn_ema": self.bn_hooks.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bn_hooks.load_state_dict(state["bn_ema"], self.ctx.device)


@register_method("fast")
class Fast(MomentumSynthesis):
    """Data-free: a meta-learned generator adapted in a few steps per batch into a pool, KD on the pool."""
    defaults = {
        "pool_size": 56320,      # images kept (FIFO); the reference makes 220 batches of 256 = 56,320
        "synth_batch": None,     # images per synthesis (null: batch_size; reference: synthesis_batch_size = 256)
        "synth_every": 400,      # KD steps per synthesis (scripts/fast_cifar.sh: kd_steps = ep_steps 400)
        "warmup": 20,            # synthesis-only steps before KD, adversarial term off (fast_cifar.sh: --warmup 20)
        "g_steps": 5,            # inner steps per synthesis: Fast-5 (fast_cifar.sh: --g_steps 5; Fast-2: 2, Fast-10: 10)
        "nz": 256,               # noise dimension (Fast-Datafree datafree_kd.py: nz 256)
        "ngf": 64,               # generator width (Fast-Datafree: Generator ngf 64)
        "lr_g": 3e-3,            # inner Adam lr of G (fast_cifar.sh, g_steps 5: --lr_g 3e-3)
        "lr_z": 0.01,            # inner Adam lr of z (fast_cifar.sh, g_steps 5: --lr_z 0.01)
        "betas": [0.5, 0.999],   # inner and meta Adam betas (FastMetaSynthesizer)
        "meta": "fomaml",        # fomaml (fast_cifar.sh: --is_maml 1) | reptile (G_0 += lr_meta * (G - G_0))
        "lr_meta": 0.5,          # Reptile step size when meta=reptile (not in the reference scripts)
        "bn_momentum": 0.9,      # average of past BN statistics blended into R_l (fast_cifar.sh: --bn_mmt 0.9)
        "lambda_bn": 10.0,       # BN-statistics weight (fast_cifar.sh: --bn 10)
        "lambda_oh": 0.4,        # CE to the targets (fast_cifar.sh, WRN teacher: --oh 0.4)
        "lambda_adv": 1.1,       # adversarial weight (fast_cifar.sh, WRN teacher: --adv 1.1)
        "temperature": 20.0,     # KD temperature on the pool (fast_cifar.sh: --T 20)
    }

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        o = self.opts
        require(o["meta"] in META_RULES, f"fast.meta must be one of {', '.join(META_RULES)}, got {o['meta']!r}")
        require(0 < o["lr_meta"] <= 1, f"fast.lr_meta must be in (0, 1], got {o['lr_meta']!r}")
        self.meta_opt = torch.optim.Adam(self.generator.parameters(), lr=o["lr_g"] * o["g_steps"],
                                         betas=tuple(o["betas"]))

    def adapt(self, *, adversarial: bool) -> tuple[torch.nn.Module, Tensor, dict[str, Tensor]]:
        """G adapted from G_0 by g_steps inner steps, the lowest-loss images, and the last terms.

        Under meta=fomaml the inner gradients are summed into G_0's .grad (zeroed first).
        """
        o, dev, n = self.opts, self.ctx.device, self.synth_batch
        fast = copy.deepcopy(self.generator)
        z = torch.randn(n, o["nz"], device=dev).requires_grad_(True)
        targets = torch.randint(0, self.ctx.num_classes, (n,), device=dev)
        opt = torch.optim.Adam([{"params": list(fast.parameters())}, {"params": [z], "lr": o["lr_z"]}],
                               lr=o["lr_g"], betas=tuple(o["betas"]))
        if o["meta"] == "fomaml":
            self.meta_opt.zero_grad(set_to_none=False)
            for p in self.generator.parameters():
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        best = (torch.full((), float("inf"), device=dev), None)
        for _ in range(o["g_steps"]):
            x = fast(z)
            terms = self.synthesis_terms(x, targets, adversarial=adversarial)
            loss = self.weighted(terms)
            best = self.keep_lowest(best, x, loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # generators and noise are no players: a backward without gradient scaling
            if o["meta"] == "fomaml":
                with torch.no_grad():
                    for p, q in zip(self.generator.parameters(), fast.parameters()):
                        if q.grad is not None:
                            p.grad.add_(q.grad)
            opt.step()
        return fast, best[1], {"g_loss": loss.detach(), **{f"g_{k}": v.detach() for k, v in terms.items()}}

    @torch.no_grad()
    def meta_update(self, fast: torch.nn.Module) -> None:
        """Move G_0 towards the adapted G: an Adam step on the summed inner gradients, or the Reptile rule."""
        if self.opts["meta"] == "fomaml":
            self.meta_opt.step()
            return
        for p, q in zip(self.generator.parameters(), fast.parameters()):
            p.add_(q - p, alpha=self.opts["lr_meta"])

    def adversarial_due(self) -> bool:
        """From synthesis number `warmup` (1-based) on: FastMetaSynthesizer's `ep += 1` precedes `ep >= warmup`."""
        return self.syntheses + 1 >= self.opts["warmup"]

    def synthesize(self, *, adversarial: bool = True) -> dict[str, Tensor]:
        """Adapt a copy of G_0 for g_steps, add its lowest-loss images to the pool, update the BN average and G_0."""
        fast, best_x, terms = self.adapt(adversarial=adversarial)
        self.bn_hooks.update_average()
        self.meta_update(fast)
        self.pool.add(best_x)
        return terms

    def state_dict(self) -> dict:
        """Pool, meta generator, syntheses and BN average (MomentumSynthesis) and the meta optimizer."""
        return {**super().state_dict(), "meta_opt": self.meta_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.meta_opt.load_state_dict(state["meta_opt"])
