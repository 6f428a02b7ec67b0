"""Pieces shared by the data-free baselines: BatchNorm-statistics hooks, the generator player, option checks."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mosaic.config import ConfigError
from mosaic.losses import batch_stats, bn_stat_distance, bn_stat_loss
from mosaic.methods import Context, Method, sgd
from mosaic.models import unwrap_model
from mosaic.players import Generator
from mosaic.players.generator import HEADS
from mosaic.precision import autocast_like, to_fp32


# ----------------------------------------------------------------------------- BatchNorm statistics

class BNStatHooks:
    """Forward hooks on every BatchNorm2d of a model, comparing each layer's batch statistics with its running ones.

    Usage: ``with BNStatHooks(teacher) as bn: teacher(x); loss = bn.loss(first_multiplier=10)``.
    Each hooked forward records, per layer, ||mean(x) - running_mean||_2 + ||var(x) - running_var||_2
    of the layer's input x (biased variance over batch and space), with the autograd graph kept so
    the distance can be minimised through x. Layers are ordered as in `model.modules()`; a later
    forward overwrites the values of an earlier one.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in unwrap_model(model).modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ConfigError(f"{type(unwrap_model(model)).__name__} has no BatchNorm2d layer, so its feature "
                              f"statistics cannot be matched: use a teacher with BatchNorm or set the BN weight to 0")
        self.distances: dict[int, Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def _hook(self, index: int):
        def hook(module: nn.BatchNorm2d, inputs: Any, output: Any) -> None:
            mean, var = batch_stats(inputs[0])
            self.distances[index] = bn_stat_distance(mean, var, module.running_mean, module.running_var)
        return hook

    def attach(self) -> "BNStatHooks":
        """Register the hooks (idempotent) and forget earlier values."""
        self.distances.clear()
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        return self

    def remove(self) -> None:
        """Remove the hooks; the recorded distances stay until the next attach."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def loss(self, *, first_multiplier: float = 1.0) -> Tensor:
        """Sum of the recorded per-layer distances, the first layer's scaled by `first_multiplier`."""
        return bn_stat_loss([self.distances[i] for i in sorted(self.distances)], first_multiplier=first_multiplier)

    def __enter__(self) -> "BNStatHooks":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()


# ----------------------------------------------------------------------------- teacher features

def logits_and_features(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits and penultimate (pooled, pre-logits) features of a timm-style classifier in one pass."""
    net = unwrap_model(model)
    if not (hasattr(net, "forward_features") and hasattr(net, "forward_head")):
        raise ConfigError(f"{type(net).__name__} has no forward_features/forward_head (timm API), so its "
                          f"penultimate features are unknown: use a timm or mosaic CIFAR teacher")
    with autocast_like(net):  # the run's per-forward autocast, as net(x) would get
        fmap = net.forward_features(x)
        return to_fp32((net.forward_head(fmap), net.forward_head(fmap, pre_logits=True)))


# ----------------------------------------------------------------------------- modes

@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put `module` in eval mode (BatchNorm uses running statistics and leaves them alone), then restore its mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# ----------------------------------------------------------------------------- option checks

def require(condition: bool, message: str) -> None:
    """Raise a ConfigError with `message` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def check_positive(section: str, opts: dict, *keys: str) -> None:
    """Every `opts[key]` must be a positive integer; the error names `section.key`."""
    for key in keys:
        v = opts[key]
        require(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                f"{section}.{key} must be a positive integer, got {v!r}")


def make_student_opt(params, opts: dict, ctx: Context, section: str) -> torch.optim.Optimizer:
    """SGD from the config's student section, or Adam at `opts['lr_s']` when opts['student_optimizer'] is 'adam'."""
    kind = opts.get("student_optimizer", "sgd")
    if kind == "sgd":
        return sgd(params, ctx.cfg["student"])
    require(kind == "adam", f"{section}.student_optimizer must be sgd or adam, got {kind!r}")
    return torch.optim.Adam(params, lr=opts["lr_s"], foreach=True)


# ----------------------------------------------------------------------------- generator-based methods

class GeneratorMethod(Method):
    """Base of the generator-based baselines: a `mosaic.players.Generator`, its Adam optimizer and sample grids.

    Subclasses read `nz`, `ngf`, `lr_g`, `betas` and `head` (default sigmoid) from
    their options, optionally `bn_eps` and `width` (default 4: see `Generator`), and build the student's
    optimizer. A sigmoid head makes pixels in
    [0, 1] that are normalised for the classifiers; a `tanh_bn` or `bn` head already makes the classifiers'
    normalised input (the original codes feed it straight to the teacher). `to_classifier` and `to_images`
    hide that difference: teacher and student always see `to_classifier(fake)`, grids show `to_images(fake)`.
    """
    players = ("generator", "student")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        o = self.opts
        check_positive(self.name, o, "nz", "ngf")
        self.head = o.get("head", "sigmoid")
        require(self.head in HEADS, f"{self.name}.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        bn_eps = o.get("bn_eps", 1e-5)
        require(isinstance(bn_eps, (int, float)) and not isinstance(bn_eps, bool) and bn_eps > 0,
                f"{self.name}.bn_eps must be a positive number, got {bn_eps!r}"
                + (" (YAML reads 1e-5 as text: write 1.0e-5)" if isinstance(bn_eps, str) else ""))
        width = o.get("width", 4)
        require(width in (2, 4), f"{self.name}.width must be 2 (the CMI / Fast-Datafree decoder) or 4 (DCGAN), "
                                 f"got {width!r}")
        try:
            generator = Generator(nz=o["nz"], ngf=o["ngf"], image_size=ctx.image_size, channels=ctx.channels,
                                  head=self.head, bn_eps=float(bn_eps), width=width)
        except ValueError as err:
            raise ConfigError(f"{self.name}: {err} (data.image_size)") from None
        self.generator = generator.to(ctx.device)
        self.generator_opt = torch.optim.Adam(self.generator.parameters(), lr=o["lr_g"],
                                              betas=tuple(o["betas"]), foreach=True)

    def budget(self) -> dict[str, int]:
        """`student_steps` (default 1) student updates per step, each on batch_size generated images."""
        return self.count_budget(self.ctx.steps * self.opts.get("student_steps", 1), self.ctx.batch_size)

    def generate(self, n: int | None = None) -> Tensor:
        """n (default: batch_size) generator outputs from fresh noise (pass them through `to_classifier`)."""
        z = torch.randn(n or self.ctx.batch_size, self.opts["nz"], device=self.ctx.device)
        return self.generator(z)

    def to_classifier(self, fake: Tensor) -> Tensor:
        """Generator outputs as teacher/student input: normalised for the sigmoid head, unchanged otherwise."""
        return self.ctx.normalize(fake) if self.head == "sigmoid" else fake

    def to_images(self, fake: Tensor) -> Tensor:
        """Generator outputs as images in [0, 1]: unchanged for the sigmoid head, else de-normalised and clamped."""
        if self.head == "sigmoid":
            return fake
        mean = self.ctx.mean.to(fake.device, fake.dtype).view(1, -1, 1, 1)
        std = self.ctx.std.to(fake.device, fake.dtype).view(1, -1, 1, 1)
        return (fake * std + mean).clamp(0, 1)

    @torch.no_grad()
    def sample_images(self, n: int) -> Tensor:
        """n images from fixed noise, sorted by the teacher's predicted class."""
        return self.sort_by_teacher(self.to_images(self.accelerator.unwrap_model(self.generator).fixed_samples(n)))
