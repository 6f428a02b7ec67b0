"""Feature taps for the feature-based baselines: choosing layer pairs, probing shapes, building adapters."""
from __future__ import annotations

from typing import Any, ClassVar, Sequence, Union

import torch
from torch import Tensor, nn

from baselines.classic.common import StreamMethod, check_fraction
from mosaic.config import ConfigError
from mosaic.losses import logit_loss
from mosaic.methods import Context
from mosaic.models import FeatureTaps, feature_info_of

LayerRef = Union[str, int]
PICKS = ("all", "middle", "last")


def auto_pairs(student: nn.Module, teacher: nn.Module, *, pick: str) -> list[tuple[int, int]]:
    """Feature indices pairing the last student and teacher stage of every resolution both nets have.

    `pick`: "all" pairs, the "middle" one (FitNets' hint) or the "last" (deepest) one. Pairing by
    feature_info reduction keeps the spatial sizes equal whatever the depths of the two nets.
    """
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
    s_info, t_info = feature_info_of(student), feature_info_of(teacher)
    if not s_info or not t_info:
        raise ConfigError("the student or the teacher has no feature_info to pick layers from: set the method's "
                          "student_layers and teacher_layers to module paths")
    s_last = {d["reduction"]: i for i, d in enumerate(s_info)}
    t_last = {d["reduction"]: i for i, d in enumerate(t_info)}
    shared = sorted(set(s_last) & set(t_last))
    if not shared:
        raise ConfigError("the student and the teacher share no feature resolution: set the method's "
                          "student_layers and teacher_layers explicitly")
    pairs = [(s_last[r], t_last[r]) for r in shared]
    if pick == "middle":
        return [pairs[len(pairs) // 2]]
    if pick == "last":
        return [pairs[-1]]
    return pairs


def _as_list(value: Any) -> list[LayerRef]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def layer_pairs(method: str, opts: dict, student: nn.Module, teacher: nn.Module, *,
                pick: str) -> list[tuple[LayerRef, LayerRef]]:
    """(student layer, teacher layer) pairs from `student_layers` / `teacher_layers`, or automatic when both null."""
    s_opt, t_opt = opts.get("student_layers"), opts.get("teacher_layers")
    if s_opt is None and t_opt is None:
        return auto_pairs(student, teacher, pick=pick)
    if s_opt is None or t_opt is None:
        raise ConfigError(f"set both {method}.student_layers and {method}.teacher_layers (or neither, to pair "
                          f"stages of equal resolution automatically)")
    s_list, t_list = _as_list(s_opt), _as_list(t_opt)
    if len(s_list) != len(t_list) or not s_list:
        raise ConfigError(f"{method}.student_layers ({s_list}) and {method}.teacher_layers ({t_list}) must list "
                          f"equally many (>= 1) layers, paired in order")
    return list(zip(s_list, t_list))


@torch.no_grad()
def probe_shapes(model: nn.Module, layers: Sequence[LayerRef], ctx: Context) -> dict[LayerRef, tuple[int, ...]]:
    """Per-sample output shapes of `layers` for a dummy batch (eval mode, no grad; BatchNorm statistics untouched)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(2, ctx.channels, ctx.image_size, ctx.image_size, device=ctx.device)
    with FeatureTaps(model, list(layers), detach=True) as feats:
        model(ctx.normalize(x))
    model.train(was_training)
    return {layer: tuple(f.shape[1:]) for layer, f in feats.items()}


def pooled(features: Tensor) -> Tensor:
    """Embeddings (B, D) from a tapped output: global average pool of (B, C, H, W) maps, flatten otherwise."""
    return features.mean(dim=(2, 3)) if features.dim() == 4 else features.flatten(1)


def require_same_spatial(method: str, s_name: LayerRef, s_shape: tuple, t_name: LayerRef, t_shape: tuple) -> None:
    """Raise a ConfigError naming both layers and shapes unless both are (C, H, W) maps of one H x W."""
    if len(s_shape) != 3 or len(t_shape) != 3 or s_shape[1:] != t_shape[1:]:
        raise ConfigError(f"{method}: student layer {s_name!r} gives shape {s_shape} but teacher layer "
                          f"{t_name!r} gives shape {t_shape}; pair (C, H, W) maps of the same spatial size")


def make_adapter(method: str, s_name: LayerRef, s_shape: tuple, t_name: LayerRef, t_shape: tuple) -> nn.Module:
    """A learned map from a student layer's shape to its teacher layer's: 1x1 conv for maps, linear for vectors.

    Adapters change the channel / feature count only; other mismatches are a ConfigError naming both shapes.
    """
    if len(s_shape) == 3 and len(t_shape) == 3:
        require_same_spatial(method, s_name, s_shape, t_name, t_shape)
        return nn.Conv2d(s_shape[0], t_shape[0], kernel_size=1, bias=False)
    if len(s_shape) == 1 and len(t_shape) == 1:
        return nn.Linear(s_shape[0], t_shape[0])
    raise ConfigError(f"{method}: student layer {s_name!r} gives shape {s_shape} but teacher layer {t_name!r} gives "
                      f"shape {t_shape}; an adapter maps (C, H, W) -> (C', H, W) or (D,) -> (D',) only")


class Adapters(nn.Module):
    """One adapter per layer pair, applied in order by `forward` (a module call, so DDP syncs its gradients)."""

    def __init__(self, adapters: Sequence[nn.Module]) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(adapters)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        return [adapter(f) for adapter, f in zip(self.adapters, features)]


class PairedTaps:
    """Persistent taps on paired student and teacher layers; read the features after a forward of each."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: Sequence[tuple[LayerRef, LayerRef]]) -> None:
        self.pairs = list(pairs)
        self.student = FeatureTaps(student, [s for s, _ in self.pairs])
        self.teacher = FeatureTaps(teacher, [t for _, t in self.pairs], detach=True)
        self.student.attach()
        self.teacher.attach()

    def features(self) -> tuple[list[Tensor], list[Tensor]]:
        """The student's and the teacher's tapped outputs of the last forward passes, in pair order."""
        s = [self.student.features[layer] for layer, _ in self.pairs]
        t = [self.teacher.features[layer] for _, layer in self.pairs]
        return s, t

    def clear(self) -> None:
        """Drop the captured features (and the autograd graph they hold)."""
        self.student.clear()
        self.teacher.clear()


class FeatureKD(StreamMethod):
    """Base of FitNets, AT, NST and RKD: paired student/teacher taps, the logit loss plus feature terms.

    A subclass sets `pick` (default layer pairing) and implements `feature_terms`, returning
    the weighted feature loss and the terms to log.
    """
    pick: ClassVar[str] = "last"          # layer pairing when none is configured: all | middle | last
    same_spatial: ClassVar[bool] = True   # reject pairs whose maps differ in spatial size

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        check_fraction(self.name, "alpha", self.opts["alpha"])
        self.pairs = layer_pairs(self.name, self.opts, self.student, self.teacher, pick=self.pick)
        if self.same_spatial:
            s_shapes, t_shapes = self.pair_shapes()
            for s, t in self.pairs:
                require_same_spatial(self.name, s, s_shapes[s], t, t_shapes[t])
        self.taps = PairedTaps(self.student, self.teacher, self.pairs)
        self.student_opt = self.student_optimizer()

    def pair_shapes(self) -> tuple[dict, dict]:
        """Output shapes of the paired student and teacher layers, from one probe forward each."""
        return (probe_shapes(self.student, [s for s, _ in self.pairs], self.ctx),
                probe_shapes(self.teacher, [t for _, t in self.pairs], self.ctx))

    def feature_terms(self, s_feats: list[Tensor], t_feats: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted feature loss and the (named) terms to log."""
        raise NotImplementedError

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers one step updates."""
        return [self.student_opt]

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        o = self.opts
        x, y = self.inputs(batch)
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        feature_loss, terms = self.feature_terms(*self.taps.features())
        logit = logit_loss(s_logits, t_logits, y, temperature=o["temperature"], alpha=o["alpha"])
        loss = logit + feature_loss
        self.update(loss, *self.optimizers())
        self.taps.clear()
        return {"loss": loss.detach(), "loss_logit": logit.detach(), **{k: v.detach() for k, v in terms.items()}}
