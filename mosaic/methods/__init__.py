"""Methods and their registry: the one place that explains how to add a method.

A method owns its players and its training step; the engine (mosaic.engine) owns everything
else: devices, precision, LR schedules, evaluation, checkpoints, logging, the run folder.
A complete method (tests/test_engine.py runs this example as written):

    import torch
    from mosaic.losses import kd_loss
    from mosaic.methods import Context, Method, register_method

    @register_method("my_kd")
    class MyKD(Method):
        '''Hinton KD on the OOD pool: `mosaic distill method=my_kd my_kd.temperature=2 ...`.'''
        defaults = {"temperature": 4.0}   # options, set as `my_kd.temperature=...`
        needs = {"ood": 1}                # batches per step from each stream: "train" (labelled
                                          #   in-domain: batch["train"], batch["train_labels"]) or "ood"
        players = ("student",)            # networks the engine prepares (devices, DDP, precision,
                                          #   checkpoints); "<player>_opt" gets the run's LR schedule

        def __init__(self, ctx: Context) -> None:
            super().__init__(ctx)             # self.teacher (frozen), self.student, self.opts, self.ctx
            self.student_opt = self.student_optimizer()  # SGD from `student.*`

        def step(self, batch: dict, step: int) -> dict:
            x = self.ctx.normalize(batch["ood"])  # [0, 1] images, augmented on the device
            with torch.no_grad():
                t_logits = self.teacher(x)
            loss = kd_loss(self.student(x), t_logits, temperature=self.opts["temperature"])
            self.update(loss, self.student_opt)   # zero_grad, backward (Accelerate), step
            return {"loss": loss.detach()}        # tensors: the engine syncs only when it logs

A step must not call `.item()`. Optional hooks (defaults in `Method`): `requires_teacher`
(False to train without one), `stream_needs(opts)` (needs that depend on options),
`eval_model()` (the network evaluated and saved), `sample_images(n)` (sample grids),
`results()` (extra results.json entries), `budget()` (the student's updates and images over
the run, recorded in results.json: override it when a step makes several student updates or
its own images), `state_dict` / `load_state_dict` (state beyond players and optimizers that a
resume needs, such as a synthetic image pool), and `lr_lambda(player, schedule)` (a player's
own LR schedule). For a student that is no
classifier of the data's classes (MKD anomaly detection, mosaic/anomaly/method.py):
`same_classes` (False: the teacher's classes need not be the data's, its features are
used), `evaluator(test)` (built once from data.test, an ImageSet; returns a function giving
the metrics logged as eval/<name>; None, the default, means the engine's top-1 / agreement
of `eval_model()`) and `save(folder)` (extra files for the run folder, written at the end
by the main process). The Context also mixes (`ctx.mix(x)`: the run's function-matching view,
identity unless `mix` is set; call it on each student batch before the teacher and student
forwards), predicts (`ctx.predict`), loads the test set (`ctx.test_set()`) and loads classifiers
(`ctx.load_classifier`). Methods in other packages register through the
`mosaic_kd.methods` entry point group (see pyproject.toml; `baselines` is one).
"""
from __future__ import annotations

import contextlib
import difflib
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Iterator

import torch
from torch import Tensor, nn

from mosaic.config import ConfigError
from mosaic.methods.context import Context

if TYPE_CHECKING:
    from mosaic.data import ImageSet

__all__ = ["Context", "Method", "frozen_bn_stats", "get_method", "list_methods", "method_defaults",
           "no_param_grad", "register_method", "sgd"]


def sgd(params: Iterable[nn.Parameter], student_cfg: dict) -> torch.optim.Optimizer:
    """SGD from the config's student section (lr, momentum, weight_decay, nesterov); foreach kernels."""
    return torch.optim.SGD(params, lr=student_cfg["lr"], momentum=student_cfg["momentum"],
                           weight_decay=student_cfg["weight_decay"], nesterov=student_cfg["nesterov"],
                           foreach=True)


class Method:
    """Base class of a method: players, optimizers and one `step`; see the module docstring."""
    name: ClassVar[str] = ""
    defaults: ClassVar[dict] = {}
    recipes: ClassVar[dict[str, dict]] = {}   # other full default sets, picked with `<method>.recipe=NAME`
    needs: ClassVar[dict[str, int]] = {}
    players: ClassVar[tuple[str, ...]] = ("student",)
    requires_teacher: ClassVar[bool] = True   # False: the method trains without a teacher (supervised, DML)
    same_classes: ClassVar[bool] = True       # False: the teacher's classes need not match the data's (MKD)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.opts = ctx.opts
        self.teacher = ctx.teacher
        self.student = ctx.student
        self.accelerator = ctx.accelerator

    @classmethod
    def stream_needs(cls, opts: dict) -> dict[str, int]:
        """Images per step from each data stream, in batches; override when options change it."""
        return dict(cls.needs)

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Run one training step and return its scalar losses (tensors, no host sync)."""
        raise NotImplementedError

    def eval_model(self) -> nn.Module:
        """The network evaluated on the test set and saved at the end (the student)."""
        return self.student

    def evaluator(self, test: ImageSet) -> Callable[[], dict[str, float]] | None:
        """The method's own evaluation on the test set (built once), or None for the engine's top-1 of eval_model."""
        return None

    def save(self, folder: Path) -> None:
        """Write extra files into the run folder at the end of the run (main process only); default none."""

    @torch.no_grad()
    def sample_images(self, n: int) -> Tensor | None:
        """Up to n images in [0, 1] for the run's sample grid, or None (no synthesiser)."""
        return None

    @torch.no_grad()
    def sort_by_teacher(self, images: Tensor) -> Tensor:
        """Images in [0, 1] reordered by the teacher's predicted class (for sample grids)."""
        pred = self.teacher(self.ctx.normalize(images)).argmax(1)
        return images[torch.argsort(pred, stable=True)]

    def results(self) -> dict:
        """Extra entries for results.json."""
        return {}

    def budget(self) -> dict[str, int | None]:
        """What the student trained on over the whole run, all processes together (results.json).

        `student_updates`: student optimizer steps; `student_images`: images summed over those updates.
        Default: one update per step on every image the step draws from its streams; None for both when the
        method draws no stream (its images are made, not drawn: override it with its own count).
        """
        needs = type(self).stream_needs(self.ctx.opts)
        if not needs:
            return {"student_updates": None, "student_images": None}
        return self.count_budget(self.ctx.steps, sum(needs.values()) * self.ctx.batch_size)

    def count_budget(self, updates: int, images_per_update: int) -> dict[str, int]:
        """`budget()`'s dict for `updates` student updates of `images_per_update` images each, per process."""
        return {"student_updates": updates,
                "student_images": updates * images_per_update * self.accelerator.num_processes}

    def state_dict(self) -> dict:
        """Method state beyond players and optimizers that a resume needs."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def backward(self, loss: Tensor) -> None:
        """Backward through Accelerate (gradient scaling under fp16)."""
        self.accelerator.backward(loss)

    def update(self, loss: Tensor, *optimizers: torch.optim.Optimizer) -> None:
        """Zero the optimizers' gradients, back-propagate `loss` through Accelerate and step them all."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.backward(loss)
        for opt in optimizers:
            opt.step()

    def student_optimizer(self, params: Iterable[nn.Parameter] | None = None) -> torch.optim.Optimizer:
        """The config's student optimizer (SGD from `student.*`) over `params`, default the student's."""
        return sgd(self.student.parameters() if params is None else params, self.ctx.cfg["student"])

    def lr_lambda(self, player: str, schedule: Callable[[int, int], float]) -> Callable[[int], float]:
        """Learning-rate multiplier of `player`'s optimizer at each step of the run.

        `schedule(step, total)` is the run's schedule (`schedule`, `warmup`) over `total` steps; the default
        applies it over the whole run. Override to schedule differently (born-again networks restart it
        in every generation).
        """
        return lambda step: schedule(step, self.ctx.steps)


@contextlib.contextmanager
def no_param_grad(*modules: nn.Module) -> Iterator[None]:
    """Let gradients flow through `modules` to their inputs without computing their parameter grads."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def frozen_bn_stats(*modules: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm layers of `modules` normalise with batch statistics but leave their running ones alone."""
    layers = [m for mod in modules for m in mod.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


_METHODS: dict[str, type[Method]] = {}
_PLUGINS_LOADED = False
_PLUGIN_NAMES: list[str] = []  # the entry points loaded (empty when the package is not installed)


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator that makes a method available as `method=<name>`."""
    def deco(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method '{name}' is registered twice ({_METHODS[name].__module__} and {cls.__module__})")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def _load_plugins() -> None:
    """Import the built-in methods and every `mosaic_kd.methods` entry point once.

    The registry imports nothing above it: methods outside this package (`baselines`, MKD in
    `mosaic.anomaly`) register through the entry point group, as outside projects do.
    """
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from mosaic.methods import mosaic_kd, supervised  # noqa: F401  (registration side effect)
    for ep in metadata.entry_points(group="mosaic_kd.methods"):
        ep.load()
        _PLUGIN_NAMES.append(ep.name)


def list_methods() -> list[str]:
    """Names of all registered methods."""
    _load_plugins()
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    """Look a method up by name; unknown names get close matches."""
    _load_plugins()
    if name not in _METHODS:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        if not _PLUGIN_NAMES:
            hint += ("; no `mosaic_kd.methods` entry points were found (baselines, mkd), so mosaic-kd is not "
                     "installed: run `pip install -e .` in the checkout")
        raise ConfigError(f"unknown method '{name}'{hint} (known: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def method_defaults(name: str, recipe: str | None = None) -> dict:
    """The option defaults of a method (its config section), those of `recipe` when the method has recipes.

    A method with `recipes` (e.g. DAFL's `benchmark`: the Fast-Datafree scripts' settings) gets a `recipe`
    option: `paper` (its `defaults`) or one of the recipes' names, each a full set of defaults.
    """
    cls = get_method(name)
    if not cls.recipes:
        if recipe not in (None, "paper"):
            raise ConfigError(f"method '{name}' has no recipes, so {name}.recipe={recipe!r} means nothing: "
                              f"remove it")
        return dict(cls.defaults)
    known = ["paper", *cls.recipes]
    if recipe not in (None, *known):
        raise ConfigError(f"unknown {name}.recipe {recipe!r}: use one of {', '.join(known)}")
    chosen = cls.recipes[recipe] if recipe not in (None, "paper") else cls.defaults
    return {"recipe": recipe or "paper", **chosen}
