"""MosaicKD (Fang et al., "Mosaicking to Distill: Knowledge Distillation from Out-of-Domain Data", NeurIPS 2021).

Four players: a generator G, a patch discriminator D shown random local crops of real
OOD images and of G's images, the frozen teacher T and the student S. One outer
iteration = 1 D step, 1 G step, then `student_steps` S steps:

    L_D = local * BCE(D(crops(ood)) -> 1, D(crops(G(z))) -> 0)   # summed over each crop's logit map
    L_G = local * BCE(D(crops(G(z))) -> 1)          # mosaic: OOD local patterns
        + align * mean_i H(T(G(z_i)))                # label-space alignment: confident teacher
        + balance * sum_c pbar_c log2 pbar_c         # balanced classes (reference code uses log2)
        - adv * KL(T(G(z)) || S(G(z)))               # DRO: seek images where T and S disagree
    L_S = T^2 * KL(T(x)/T || S(x)/T),  x = G(z) and OOD images

Where D departs from the reference code (zju-vipa/MosaicKD kd_mosaic.py, re-implemented as the
`mosaic_ref` method) is an option each: the reference shows D whole images (a PatchGAN map over the
image; `patch_size=null`), normalised (`d_normalize`), its real ones un-augmented from a shuffle of
their own (`d_real=plain`); the defaults show D crops of [0, 1] images from the student's augmented
OOD stream. `patch_layout=cover` (crops on a grid reaching every border) with `crop_reduction=sum`
gives every pixel a local gradient each step and the local term the reference's weight per image.
`d_whole` shows D each image whole beside its random crops (the sum of the two views' losses).

Function matching (`mix`, an engine option): each student update's batch goes through `ctx.mix`
once and the teacher and the student both see that mixed view.

`student_bn=ood` keeps generated images out of the student's BatchNorm running statistics
(the ones it is evaluated and deployed with): its forwards on mixed batches and in the G step
normalise with batch statistics but leave the running ones alone, and one extra no-grad
forward of each step's OOD half updates them (its random draws come from a forked stream,
so the weights end exactly as under `mixed`). The reference code mixes them in (`mixed`).

Speed switches (options below) change how the step runs, never what it computes: at equal
seed on CPU fp32 the losses match with them on or off (tests/test_speed_switches.py).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import kornia.augmentation as K
import torch
from einops import repeat
from torch import Tensor, nn

from mosaic.config import ConfigError
from mosaic.losses import balance_loss, entropy, kd_loss, patch_gan_loss
from mosaic.methods import Context, Method, frozen_bn_stats, no_param_grad, register_method
from mosaic.players import Generator, PatchDiscriminator
from mosaic.players.patches import grid_offsets, grid_patches, random_patches


@register_method("mosaic")
class MosaicKD(Method):
    """Out-of-domain distillation by mosaicking OOD patches into in-domain-looking images."""
    defaults = {
        "nz": 100,              # noise dimension
        "ngf": 64,              # generator width
        "ndf": 128,             # discriminator width
        "patch_size": 16,       # side of the crops the discriminator sees (pixels; <= image size); null: the whole
                                #   image, uncropped (the reference code)
        "patches": 2,           # random crops per image for the discriminator (patch_layout=random)
        "patch_layout": "random",  # random: `patches` uniform random crops (kornia's RandomCrop draws) | cover: the
                                #   ceil(side / patch_size)^2 crops of an even grid from border to border, so every
                                #   pixel is in a crop each step (`patches` unused)
        "lambda_local": 1.0,    # patch GAN term (D and G)
        "local_reduction": "sum",  # sum each crop's logit map (reference code: sum over the map) | mean
        "crop_reduction": "mean",  # over an image's crops: mean | sum (with cover and local_reduction=sum: the
                                #   reference's whole-image weight when the crops tile the image)
        "d_real": "augmented",  # D's real images: augmented (the student's OOD stream, crop padding and flips) |
                                #   plain (un-augmented pool images from a stream of their own, as the reference)
        "d_normalize": False,   # D sees images normalised with the in-domain statistics (reference) | [0, 1] images
        "d_whole": False,       # D also sees each image whole beside its crops; each view's loss keeps the weight it
                                #   has alone (the crops' as in the default, the whole image's as in mosaic_ref), summed
        "lambda_align": 1.0,    # teacher entropy on generated images
        "lambda_balance": 10.0, # class balance of the teacher's mean prediction
        "lambda_adv": 1.0,      # adversarial (DRO) term
        "student_steps": 5,     # student steps per outer iteration
        "temperature": 1.0,     # KD temperature of the student loss
        "lr_g": 1e-3,           # Adam learning rate of G and D
        "betas": [0.5, 0.999],  # Adam betas of G and D
        "synthetic_batch": None,  # generated images per step (null: batch_size)
        "student_bn": "mixed",  # where the student's BatchNorm running statistics come from: mixed (every student
                                #   forward, as the reference code) | ood (OOD images only; see below)
        # speed switches (same algorithm, same random draws):
        "fast_crop": True,      # crops by one gather, kornia's random draws (false: kornia RandomCrop, slice per crop)
        "batch_teacher": None,  # one frozen-teacher forward for all student steps (false: one per step; null: on
                                #   except on CPU, where it only raises peak memory)
        "inference_mode": True, # teacher targets of the student steps under torch.inference_mode (false: no_grad)
        "fused_optim": True,    # fused Adam/SGD kernels where the device has them (false: foreach kernels)
    }
    players = ("generator", "discriminator", "student")

    @classmethod
    def resolved(cls, opts: dict) -> dict:
        """The options the method runs with (a registered configuration, such as mosaic_ref, fixes some)."""
        return opts

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.opts = o = self.resolved(ctx.opts)
        name = self.name
        if ctx.image_size % 4 or ctx.image_size < 8:
            raise ConfigError(f"the MosaicKD generator makes images whose side is a multiple of 4 (>= 8); "
                              f"data.image_size={ctx.image_size} cannot be produced")
        if o["patch_size"] is not None and not 4 <= o["patch_size"] <= ctx.image_size:
            raise ConfigError(f"{name}.patch_size={o['patch_size']} must lie in [4, {ctx.image_size}] "
                              f"(the image size), or be null for whole images")
        for key, allowed in (("local_reduction", ("sum", "mean")), ("crop_reduction", ("sum", "mean")),
                             ("patch_layout", ("random", "cover")), ("d_real", ("augmented", "plain")),
                             ("student_bn", ("mixed", "ood"))):
            if o[key] not in allowed:
                raise ConfigError(f"{name}.{key} must be {' or '.join(allowed)}, got {o[key]!r}")
        if o["d_whole"] and o["patch_size"] is None:
            raise ConfigError(f"{name}.d_whole=true adds the whole image beside D's crops, but {name}.patch_size=null "
                              f"already shows D whole images only: set a patch_size, or d_whole=false")
        if o["student_steps"] < 1 or o["patches"] < 1:
            raise ConfigError(f"{name}.student_steps and {name}.patches must be >= 1")
        self.generator = Generator(nz=o["nz"], ngf=o["ngf"], image_size=ctx.image_size,
                                   channels=ctx.channels).to(ctx.device)
        self.discriminator = PatchDiscriminator(channels=ctx.channels, ndf=o["ndf"]).to(ctx.device)
        adam = {"lr": o["lr_g"], "betas": tuple(o["betas"])}
        self.generator_opt = make_optimizer(torch.optim.Adam, self.generator.parameters(), fused=o["fused_optim"],
                                            **adam)
        self.discriminator_opt = make_optimizer(torch.optim.Adam, self.discriminator.parameters(),
                                                fused=o["fused_optim"], **adam)
        if o["fused_optim"]:
            sc = ctx.cfg["student"]
            self.student_opt = make_optimizer(torch.optim.SGD, self.student.parameters(), fused=True, lr=sc["lr"],
                                              momentum=sc["momentum"], weight_decay=sc["weight_decay"],
                                              nesterov=sc["nesterov"])
        else:
            self.student_opt = self.student_optimizer()
        self.crop = K.RandomCrop((o["patch_size"], o["patch_size"])) if o["patch_size"] is not None else None
        self.synthetic_batch = o["synthetic_batch"] or ctx.batch_size
        self._compiled: dict[int, tuple[nn.Module, Callable]] = {}
        batched = o["batch_teacher"]
        self.batch_teacher = ctx.device.type != "cpu" if batched is None else bool(batched)

    @classmethod
    def stream_needs(cls, opts: dict) -> dict[str, int]:
        """One OOD batch per student step, plus the discriminator's: augmented, or un-augmented under d_real=plain."""
        o = cls.resolved(opts)
        if o["d_real"] == "plain":
            return {"ood": o["student_steps"], "ood_plain": 1}
        return {"ood": 1 + o["student_steps"]}

    def budget(self) -> dict[str, int]:
        """student_steps updates per step, each on synthetic_batch generated + batch_size OOD images."""
        return self.count_budget(self.ctx.steps * self.opts["student_steps"],
                                 self.synthetic_batch + self.ctx.batch_size)

    def crops(self, images: Tensor) -> Tensor:
        """What D sees of each image: its crops (random or cover layout) stacked copy-major, or the image itself."""
        o = self.opts
        if o["patch_size"] is None:
            return images
        if o["patch_layout"] == "cover":
            return grid_patches(images, patch_size=o["patch_size"])
        if o["fast_crop"]:
            return random_patches(images, patch_size=o["patch_size"], copies=o["patches"])
        return self.crop(repeat(images, "b c h w -> (n b) c h w", n=o["patches"]))

    def d_view(self, images: Tensor) -> Tensor:
        """D's input for images in [0, 1]: their crops, normalised first under d_normalize."""
        return self.crops(self.ctx.normalize(images) if self.opts["d_normalize"] else images)

    def run(self, module: nn.Module) -> Callable[..., Tensor]:
        """`module` itself, or its torch.compile'd twin (made once, shares the parameters) under `compile=true`.

        The engine compiles the prepared players; this covers what it cannot: the teacher and
        the unwrapped student and discriminator of the generator step.
        """
        if not self.ctx.cfg.get("compile") or isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            return module
        held = self._compiled.get(id(module))
        if held is None or held[0] is not module:
            held = self._compiled[id(module)] = (module, torch.compile(module))
        return held[1]

    @property
    def crops_per_image(self) -> int:
        """How many crops of each image D sees: 1 (whole image), the cover grid's count, or `patches`."""
        o, side = self.opts, self.ctx.image_size
        if o["patch_size"] is None:
            return 1
        if o["patch_layout"] == "cover":
            return len(grid_offsets(side, o["patch_size"])) ** 2
        return o["patches"]

    def d_loss(self, disc: Callable[[Tensor], Tensor], images: Tensor, *, real: bool) -> Tensor:
        """D's patch-GAN loss on images in [0, 1]: on their crops, plus on the whole images under d_whole."""
        x = self.ctx.normalize(images) if self.opts["d_normalize"] else images  # normalised once for both views
        loss = self.local_loss(disc(self.crops(x)), real=real)
        if self.opts["d_whole"]:  # __init__ refuses d_whole without crops (patch_size=null)
            loss = loss + patch_gan_loss(disc(x), real=real, reduction=self.opts["local_reduction"])
        return loss

    def local_loss(self, logits: Tensor, *, real: bool) -> Tensor:
        """The patch-GAN loss of D's maps: this run's reduction over each map, then over each image's crops."""
        loss = patch_gan_loss(logits, real=real, reduction=self.opts["local_reduction"])
        if self.opts["crop_reduction"] == "sum":  # the mean over an image's crops times their number
            loss = loss * self.crops_per_image
        return loss

    def generator_losses(self, fake: Tensor) -> dict[str, Tensor]:
        """The four generator terms (unweighted) for generated images in [0, 1].

        Student and discriminator run unwrapped here: they only pass gradients to the
        generator, so a distributed wrapper must not wait for their parameter gradients.
        """
        student = self.run(self.accelerator.unwrap_model(self.student))
        disc = self.run(self.accelerator.unwrap_model(self.discriminator))
        x = self.ctx.normalize(fake)
        t_logits = self.run(self.teacher)(x)  # one teacher forward feeds the align, balance and adversarial terms
        with self._bn_kept(student):
            s_logits = student(x)
        return {
            "g_local": self.d_loss(disc, fake, real=True),
            "g_align": entropy(t_logits),
            "g_balance": balance_loss(t_logits, base=2.0),
            "g_adv": -kd_loss(s_logits, t_logits),
        }

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        o, B = self.opts, self.ctx.batch_size
        ood = batch["ood"].split(B)
        real, ood = (batch["ood_plain"], ood) if o["d_real"] == "plain" else (ood[0], ood[1:])
        D, S = self.run(self.discriminator), self.run(self.student)

        # 1. Patch discrimination: real OOD crops -> 1, generated crops -> 0.
        fake = self._generate(self.synthetic_batch)
        loss_d = o["lambda_local"] * 0.5 * (self.d_loss(D, real, real=True) + self.d_loss(D, fake.detach(), real=False))
        self.update(loss_d, self.discriminator_opt)

        # 2. Generation: mosaic OOD patches into images the teacher finds in-domain and the student gets wrong.
        with no_param_grad(self.discriminator, self.student):
            g = self.generator_losses(fake)
            loss_g = (o["lambda_local"] * g["g_local"] + o["lambda_align"] * g["g_align"]
                      + o["lambda_balance"] * g["g_balance"] + o["lambda_adv"] * g["g_adv"])
        self.update(loss_g, self.generator_opt)

        # 3. Distillation on fresh generated images plus OOD images (one mixed view of them under `mix`).
        for x, t_logits, ood_x in self._distillation_batches(ood):
            with self._bn_kept(self.student):
                loss_s = kd_loss(S(x), t_logits, temperature=o["temperature"])
            self.update(loss_s, self.student_opt)
            if o["student_bn"] == "ood":  # running statistics from the (un-mixed) OOD half alone
                self._track_bn(ood_x)

        out = {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "loss_s": loss_s.detach()}
        out.update({k: v.detach() for k, v in g.items()})
        return out

    def _distillation_batches(self, ood: Sequence[Tensor]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(inputs, teacher logits, un-mixed OOD part) of each student step: fresh generated images plus one OOD batch.

        Inputs are normalised and, under `mix`, the one mixed view teacher and student share. G does not
        change during the student steps, so under mosaic.batch_teacher every step's images are generated
        (and mixed) first, in the same order from the same random draws, and the frozen teacher, in eval
        mode, labels them all in one forward.
        """
        teacher = self.run(self.teacher)
        targets = torch.inference_mode if self.opts["inference_mode"] else torch.no_grad
        steps = range(self.opts["student_steps"])
        B = self.ctx.batch_size

        def inputs(k: int) -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                x = self.ctx.normalize(torch.cat([self._generate(self.synthetic_batch), ood[k]]))
                return self.ctx.mix(x), x[len(x) - B:]

        if not self.batch_teacher:
            for k in steps:
                x, ood_x = inputs(k)
                with targets():
                    t_logits = teacher(x)
                yield x, t_logits, ood_x
            return
        xs, ood_xs = zip(*(inputs(k) for k in steps))
        with targets():
            t_all = teacher(torch.cat(xs)).split([len(x) for x in xs])
        yield from zip(xs, t_all, ood_xs)

    @torch.no_grad()
    def _track_bn(self, ood: Tensor) -> None:
        """One train-mode student forward of `ood` that only refreshes BN running statistics.

        Its random draws (dropout, drop-path) come from a forked stream, so the training run
        makes exactly the draws, and ends with exactly the weights, of `student_bn=mixed`.
        """
        cuda = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            self.run(self.accelerator.unwrap_model(self.student))(ood)

    def _bn_kept(self, student: nn.Module):
        """Under student_bn=ood, a context in which the student's forward leaves its BN running statistics alone."""
        return frozen_bn_stats(student) if self.opts["student_bn"] == "ood" else contextlib.nullcontext()

    def _generate(self, n: int) -> Tensor:
        """n generated images in [0, 1] from fresh noise."""
        return self.run(self.generator)(torch.randn(n, self.opts["nz"], device=self.ctx.device))

    @torch.no_grad()
    def sample_images(self, n: int) -> Tensor:
        """n images from fixed noise, sorted by the teacher's predicted class."""
        return self.sort_by_teacher(self.accelerator.unwrap_model(self.generator).fixed_samples(n))


def make_optimizer(cls: type[torch.optim.Optimizer], params, *, fused: bool = False,
                   **options) -> torch.optim.Optimizer:
    """`cls(params, **options)` with fused kernels when asked and the device has them, else foreach kernels."""
    params = list(params)
    if fused:
        try:
            return cls(params, fused=True, **options)
        except RuntimeError:  # no fused kernel for these parameters' device or dtype
            pass
    return cls(params, foreach=True, **options)
