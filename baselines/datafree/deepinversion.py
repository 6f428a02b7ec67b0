"""DeepInversion (Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020).

Images are optimised directly (Adam on the pixels) so that the frozen teacher's BatchNorm
layers see the statistics they stored during training, the teacher predicts the target
labels, and image priors keep them smooth:

    L = ce * CE(T(x~), y) + bn * (m * R_1 + sum_{l>1} R_l)      # R_l = ||mu_l - mu_l^T||_2 + ||var_l - var_l^T||_2
      + tv_l2 * TV_l2(x~) + tv_l1 * TV_l1(x~) + l2 * mean_i ||x~_i||_2
      + competition * (1 - JS(T(x~)/tau || S(x~)/tau))          # Adaptive DeepInversion (ADI), off by default

x~ is the pixel variable after a random roll of up to `jitter` pixels and (optionally) a
random horizontal flip; y are class-balanced targets; pixels are kept in the valid image range.

Settings by image size (the null defaults of `jitter`, `flip`, `first_bn_multiplier`): at 32 px or
less, the official CIFAR-10 code (cifar10/deepinversion_cifar10.py: roll of up to 2 px at 32x32,
no flip, every BN layer weighted 1); above, the official ImageNet code (30 px at 224 scaled to the
image size, flip, first BN layer x10). The CIFAR jitter is scaled the same way below 32 px (1 at
16 px). An explicit value always wins.

Synthesis / KD split of a run: the first ceil(pool_size / synth_batch) engine steps each
synthesise one batch (`di_iters` Adam steps) into the pool; every remaining step is one KD
step of the student on an augmented batch drawn from the pool, so `steps` must exceed the
synthesis steps. The pool (baselines.datafree.pool, uint8, per process) is part of the method's
state_dict: a resume keeps the images made so far and synthesises only the missing batches. The run's LR schedule
spans all steps, so its first synthesis-steps slice passes before KD starts (200 of 80,200
steps, 0.25%, in experiments/configs/deepinversion_cifar10.yaml).

ADI's competition term uses the current student, which during synthesis is the initial
one; give a trained student (student.checkpoint) when setting `competition` > 0.

`recipe=benchmark`: the DeepInv row of the CMI / Fast-Datafree benchmark (scripts/deepinv_cifar.sh
through datafree_kd.py and DeepInvSyntheiszer), which interleaves synthesis with KD instead:
before every `synth_every` (400) KD steps one batch of 256 is inverted (1,000 Adam steps, lr 0.1,
betas 0.5 / 0.99) into a pool that keeps every batch, so the adversary sees the current student:

    L = oh * CE(T(x~), y) + bn * (sum_l R_l^T + student_bn * sum_l R_l^S) + adv * (-jsdiv_T3(S(x~), T(x~)))

with y uniform random labels, x~ the pixels rolled by up to 1/8 of the side and flipped, R^S the
student's own BN distances in eval mode (student_bn -0.001), the clamped divergence of
`mosaic.losses.clamped_js_competition`, no image prior, and the last iterate kept (the reference's
"best" inputs alias the optimised tensor, so they are the last iterate too). KD at T 20.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from baselines.datafree.common import BNStatHooks, check_positive, require
from baselines.datafree.pool import PoolDistillation
from mosaic.augment import to_float
from mosaic.losses import (clamped_js_competition, competition_loss, cross_entropy, image_l2, total_variation_l1,
                           total_variation_l2)
from mosaic.methods import Context, register_method


COMPETITION_FORMS = ("adi", "clamped")
TARGETS = ("balanced", "random")


def inversion_settings(image_size: int, *, recipe: str = "paper") -> dict:
    """The jitter, flip and first-BN weight for an image side: official CIFAR code <= 32 px, ImageNet above;
    the benchmark recipe's roll of 1/8 of the side with flip (Fast-Datafree's jitter_and_flip)."""
    if recipe == "benchmark":
        return {"jitter": max(1, image_size // 8), "flip": True, "first_bn_multiplier": 1.0}
    if image_size <= 32:  # cifar10/deepinversion_cifar10.py: lim_0 = lim_1 = 2, no flip, plain sum over BN layers
        return {"jitter": max(1, round(2 * image_size / 32)), "flip": False, "first_bn_multiplier": 1.0}
    # imagenet_inversion.py / deepinversion.py: jitter 30 at 224, flip, first_bn_multiplier 10
    return {"jitter": round(30 * image_size / 224), "flip": True, "first_bn_multiplier": 10.0}


@register_method("deepinversion")
class DeepInversion(PoolDistillation):
    """Data-free: a pool of images inverted from the teacher's BN statistics, then KD on the pool."""
    defaults = {
        "pool_size": 51200,           # images synthesised before KD (CMI's DeepInv benchmark: 200 batches of 256)
        "synth_batch": None,          # images optimised together (null: batch_size; official CIFAR code: 256)
        "di_iters": 2000,             # Adam steps per synthesised batch (official CIFAR code: iters_mi 2000)
        "lr": 0.05,                   # Adam lr on the pixels (official CIFAR README, paper parameters: di_lr 0.05)
        "betas": [0.9, 0.999],        # Adam betas on the pixels (official CIFAR code: torch defaults)
        "jitter": None,               # max random roll in pixels; null: <= 32 px the CIFAR code's 2 at 32 scaled
                                      #   (1 at 16 px), else the ImageNet code's 30 at 224 scaled (9 at 64 px)
        "flip": None,                 # random horizontal flip each iteration; null: off <= 32 px (CIFAR code),
                                      #   on above (ImageNet code)
        "lambda_ce": 1.0,             # CE to the targets (official: main_loss_multiplier 1)
        "lambda_bn": 10.0,            # BN-statistics weight (official CIFAR README, paper parameters: r_feature 10)
        "first_bn_multiplier": None,  # extra weight of the first BN layer; null: 1 <= 32 px (CIFAR code),
                                      #   10 above (ImageNet code)
        "tv_l2": 2.5e-5,              # L2 total variation (official CIFAR code: di_var_scale 2.5e-5)
        "tv_l1": 0.0,                 # L1 total variation (official ImageNet code default: 0)
        "l2": 3e-8,                   # image L2-norm prior (paper's CIFAR-10 setting, alpha_l2 = 3e-8)
        "competition": 0.0,           # ADI competition weight (official default cig_scale 0: plain DeepInversion)
        "competition_temperature": 3.0,  # softmax temperature of the competition's JS divergence (official: 3)
        "competition_form": "adi",    # adi: 1 - JS(p_T, p_S) (official ADI); clamped: Fast-Datafree's -jsdiv
        "student_bn": 0.0,            # weight of the student's own BN distances inside the BN term (eval mode)
        "targets": "balanced",        # labels of a batch: balanced (every class equally, shuffled) or random
        "synth_every": None,          # null: synthesise the whole pool first (official code); N: one batch
                                      #   before every N KD steps into a FIFO pool of pool_size (benchmark)
        "temperature": 20.0,          # KD temperature on the pool (CMI's DeepInv benchmark: --T 20)
    }
    recipes = {"benchmark": {
        **defaults,
        "pool_size": 51200,           # datafree_kd.py keeps every batch: 200 epochs x 256
        "synth_every": 400,           # scripts/deepinv_cifar.sh: --kd_steps 400 --ep_steps 400 (one batch each)
        "di_iters": 1000,             # --g_steps 1000
        "lr": 0.1,                    # --lr_g 0.1
        "betas": [0.5, 0.99],         # DeepInvSyntheiszer's Adam on the pixels
        "lambda_bn": 10.0,            # --bn 10
        "lambda_ce": 1.0,             # --oh 1
        "tv_l2": 0.0, "l2": 0.0,      # datafree_kd.py: tv=0.0, l2=0.0
        "competition": 1.0,           # --adv 1
        "competition_form": "clamped",  # -jsdiv(s_out, t_out, T=3)
        "student_bn": -0.001,         # loss_bn = sum R^T - 0.001 * sum R^S
        "targets": "random",          # torch.randint labels
        "temperature": 20.0,          # --T 20
    }}

    def __init__(self, ctx: Context) -> None:
        check_positive("deepinversion", ctx.opts, "pool_size", "di_iters")
        super().__init__(ctx, pool_size=ctx.opts["pool_size"])
        o = self.opts
        self.synth_batch = o["synth_batch"] or ctx.batch_size
        check_positive(self.name, {"synth_batch": self.synth_batch}, "synth_batch")
        require(o["competition_form"] in COMPETITION_FORMS,
                f"deepinversion.competition_form must be one of {', '.join(COMPETITION_FORMS)}, "
                f"got {o['competition_form']!r}")
        require(o["targets"] in TARGETS, f"deepinversion.targets must be one of {', '.join(TARGETS)}, "
                                         f"got {o['targets']!r}")
        self.interleaved = o["synth_every"] is not None
        if self.interleaved:
            check_positive(self.name, o, "synth_every")
            require(self.synth_batch <= o["pool_size"], f"deepinversion.synth_batch {self.synth_batch} exceeds "
                                                        f"deepinversion.pool_size {o['pool_size']}: raise pool_size")
            self.synth_steps = 0  # every step is a KD step, some start with a synthesis
        else:
            self.synth_steps = math.ceil(o["pool_size"] / self.synth_batch)
            require(ctx.steps > self.synth_steps,
                    f"deepinversion spends its first {self.synth_steps} steps synthesising the pool "
                    f"(ceil(pool_size {o['pool_size']} / synth_batch {self.synth_batch})) and KD needs at least "
                    f"one more: raise steps above {self.synth_steps} or lower deepinversion.pool_size")
        settings = inversion_settings(ctx.image_size, recipe=o.get("recipe", "paper"))
        self.jitter, self.flip, self.first_bn_multiplier = (settings[k] if o[k] is None else o[k]
                                                            for k in ("jitter", "flip", "first_bn_multiplier"))
        require(isinstance(self.jitter, int) and 0 <= self.jitter < ctx.image_size,
                f"deepinversion.jitter must be an integer in [0, {ctx.image_size}), got {self.jitter!r}")
        require(isinstance(self.flip, bool), f"deepinversion.flip must be true, false or null, got {self.flip!r}")
        require(isinstance(self.first_bn_multiplier, (int, float)) and self.first_bn_multiplier >= 0,
                f"deepinversion.first_bn_multiplier must be a number >= 0 or null, got {self.first_bn_multiplier!r}")
        self.bn_hooks = BNStatHooks(ctx.teacher)
        self.student_bn_hooks = BNStatHooks(self.student) if o["student_bn"] else None
        shape = (1, ctx.channels, 1, 1)
        self.lo = ((0.0 - ctx.mean) / ctx.std).view(shape)  # the valid pixel range in normalised space
        self.hi = ((1.0 - ctx.mean) / ctx.std).view(shape)

    # ------------------------------------------------------------------------- synthesis

    def jitter_flip(self, v: Tensor) -> Tensor:
        """The pixel variable rolled by a random offset of up to `jitter` pixels and flipped with probability 1/2."""
        if self.jitter > 0:
            dx, dy = torch.randint(-self.jitter, self.jitter + 1, (2,)).tolist()  # CPU draw: no device sync
            v = torch.roll(v, shifts=(dx, dy), dims=(2, 3))
        if self.flip and bool(torch.rand(()) < 0.5):
            v = torch.flip(v, dims=(3,))
        return v

    def synthesis_losses(self, x: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """The unweighted inversion terms for normalised images x (first BN layer already scaled in 'bn')."""
        o = self.opts
        with self.bn_hooks:
            t_logits = self.teacher(x)
        terms = {"ce": cross_entropy(t_logits, targets),
                 "bn": self.bn_hooks.loss(first_multiplier=self.first_bn_multiplier),
                 "tv_l2": total_variation_l2(x), "tv_l1": total_variation_l1(x), "l2": image_l2(x)}
        if o["competition"] > 0 or self.student_bn_hooks is not None:
            with self.student_for_synthesis() as student, (self.student_bn_hooks or contextlib.nullcontext()):
                s_logits = student(x)  # eval mode: the student's BN statistics stay as they are
            compete = competition_loss if o["competition_form"] == "adi" else clamped_js_competition
            terms["comp"] = compete(s_logits, t_logits, temperature=o["competition_temperature"])
            if self.student_bn_hooks is not None:
                terms["bn_student"] = self.student_bn_hooks.loss()
        return terms

    def weighted(self, terms: dict[str, Tensor]) -> Tensor:
        """The inversion objective: the terms times their weights."""
        o = self.opts
        bn = terms["bn"] + o["student_bn"] * terms["bn_student"] if "bn_student" in terms else terms["bn"]
        loss = (o["lambda_ce"] * terms["ce"] + o["lambda_bn"] * bn + o["tv_l2"] * terms["tv_l2"]
                + o["tv_l1"] * terms["tv_l1"] + o["l2"] * terms["l2"])
        if "comp" in terms and o["competition"] > 0:
            loss = loss + o["competition"] * terms["comp"]
        return loss

    def synthesize(self, n: int) -> tuple[Tensor, dict[str, Tensor]]:
        """n images in [0, 1] optimised for `di_iters` Adam steps, and the last iteration's terms."""
        o, dev = self.opts, self.ctx.device
        if o["targets"] == "random":
            targets = torch.randint(0, self.ctx.num_classes, (n,), device=dev)
        else:
            targets = (torch.arange(n, device=dev) % self.ctx.num_classes)[torch.randperm(n, device=dev)]
        v = torch.randn(n, self.ctx.channels, self.ctx.image_size, self.ctx.image_size, device=dev)
        v = torch.clamp(v, self.lo, self.hi).requires_grad_(True)
        opt = torch.optim.Adam([v], lr=o["lr"], betas=tuple(o["betas"]))
        for _ in range(o["di_iters"]):
            terms = self.synthesis_losses(self.jitter_flip(v), targets)
            loss = self.weighted(terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # pixels are no player: fp32 pixels, a backward without gradient scaling
            opt.step()
            with torch.no_grad():
                v.copy_(torch.clamp(v, self.lo, self.hi))
        images = (v.detach() * self.ctx.std.view(self.lo.shape) + self.ctx.mean.view(self.lo.shape)).clamp(0, 1)
        return images, {"loss": loss.detach(), **{k: t.detach() for k, t in terms.items()}}

    @property
    def filled(self) -> int:
        """Images in the pool so far."""
        return len(self.pool)

    def synthesis_step(self) -> dict[str, Tensor]:
        """Synthesise the next batch of the pool (interleaved: a full batch, replacing the oldest once full)."""
        n = self.synth_batch if self.interleaved else min(self.synth_batch, self.opts["pool_size"] - self.filled)
        images, terms = self.synthesize(n)
        self.pool.add(images)
        return {f"di_{k}": v for k, v in terms.items()}

    def kd_updates(self) -> int:
        """Every step after the synthesis steps is one KD step (interleaved: every step)."""
        return self.ctx.steps - self.synth_steps

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        if not self.interleaved:
            return self.synthesis_step() if self.filled < self.opts["pool_size"] else self.kd_step()
        losses = self.synthesis_step() if step % self.opts["synth_every"] == 0 else {}
        losses.update(self.kd_step())
        return losses

    # ------------------------------------------------------------------------- run state

    @torch.no_grad()
    def sample_images(self, n: int) -> Tensor | None:
        """The first n images of the pool (None before the first batch is made)."""
        return to_float(self.pool.images()[:n]) if self.filled else None

    def results(self) -> dict:
        return {"di_pool_images": self.filled, "di_syntheses": math.ceil(self.pool.added / self.synth_batch),
                "di_synthesis_steps": self.synth_steps,
                "di_kd_steps": self.ctx.steps - self.synth_steps}
