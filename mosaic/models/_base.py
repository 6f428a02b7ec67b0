"""Pieces shared by the CIFAR-style networks: default config, registration, head API, init and builder."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Type, TypeVar

import torch
from torch import nn
from timm.models import build_model_with_cfg, register_model

from mosaic.norms import CIFAR10_MEAN, CIFAR10_STD

from .errors import ModelError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CifarNet",
    "ConvBnAct",
    "build_cifar",
    "cifar_cfg",
    "conv_stage",
    "register_cifar",
]

# names registered through `register_cifar`, in registration order
CIFAR_MODELS: List[str] = []

FnT = TypeVar("FnT", bound=Callable[..., nn.Module])


def cifar_cfg(*, first_conv: str, classifier: str = "fc", **overrides: Any) -> Dict[str, Any]:
    """Weightless timm pretrained_cfg for a CIFAR net: 3x32x32 input, 10 classes, data.py's CIFAR-10 mean/std."""
    cfg: Dict[str, Any] = dict(
        url="",
        num_classes=10,
        input_size=(3, 32, 32),
        crop_pct=1.0,
        interpolation="bilinear",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        first_conv=first_conv,
        classifier=classifier,
    )
    cfg.update(overrides)
    return cfg


def register_cifar(fn: FnT) -> FnT:
    """Register a factory in timm's model registry and remember it as one of mosaic's CIFAR nets."""
    if fn.__name__ not in CIFAR_MODELS:
        CIFAR_MODELS.append(fn.__name__)
    return register_model(fn)


def check_input(x: torch.Tensor, in_chans: int, arch: str) -> None:
    """Raise a one-line ModelError when `x` is not a (B, in_chans, H, W) batch."""
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing: shapes are unknown, skip the check
        return
    if x.ndim == 3 and x.shape[0] == in_chans:
        raise ModelError(
            f"{arch} got a single image shaped {tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
        )
    if x.ndim != 4:
        raise ModelError(f"{arch} expects a batch shaped (B, {in_chans}, H, W); got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ModelError(
            f"{arch} was built for {in_chans}-channel images but got {x.shape[1]} channels "
            f"(shape {tuple(x.shape)}); build it with in_chans={x.shape[1]} or convert the images"
        )


class ConvBnAct(nn.Module):
    """A bias-free conv followed by BatchNorm and ReLU (the basic unit of the plain CNNs)."""

    def __init__(self, in_chs: int, out_chs: int, *, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        # activations are never in-place so that feature taps on any module see unmodified outputs
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def conv_stage(in_chs: int, widths: Sequence[int], *, pool: bool) -> nn.Sequential:
    """A VGG-style stage: optional 2x2 max-pool (ceil mode, so odd and tiny maps work) then 3x3 ConvBnAct layers."""
    layers: List[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)] if pool else []
    for width in widths:
        layers.append(ConvBnAct(in_chs, width))
        in_chs = width
    return nn.Sequential(*layers)


class CifarNet(nn.Module):
    """Base class giving the CIFAR nets timm's head API: global-average-pool + linear classifier `fc`."""

    # number of entries in `feature_info`; timm's features_only wrapper returns all of them by default
    num_feature_levels: int = 5

    num_classes: int
    num_features: int
    in_chans: int
    feature_info: List[Dict[str, Any]]

    def _init_head(self, num_features: int, num_classes: int) -> None:
        """Create the classifier (identity when num_classes == 0, timm's convention for feature extractors)."""
        self.num_features = self.head_hidden_size = num_features
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def init_weights(self) -> None:
        """Kaiming-normal (fan_out, ReLU) convs, BatchNorm weight 1 / bias 0, zero classifier bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last feature map, shaped (B, num_features, H', W')."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global-average-pool and flatten the feature map, then classify unless `pre_logits`."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """Return the final linear layer (timm API)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier with a fresh one for `num_classes` outputs (0 gives an identity head)."""
        if global_pool not in (None, "avg"):
            raise ModelError(
                f"{type(self).__name__} only supports global_pool='avg', got {global_pool!r}; "
                "use forward_features() for the unpooled map"
            )
        ref = next(self.parameters())
        self.num_classes = num_classes
        if num_classes > 0:
            self.fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.fc.bias)
        else:
            self.fc = nn.Identity()


ModelT = TypeVar("ModelT", bound=CifarNet)


def build_cifar(
    model_cls: Type[ModelT],
    variant: str,
    pretrained: bool,
    *,
    feature_levels: Optional[int] = None,
    **kwargs: Any,
) -> ModelT:
    """Build a registered CIFAR net with timm's builder (sets pretrained_cfg, supports features_only=True).

    `feature_levels` is the length of the model's feature_info (default: the class's num_feature_levels).
    """
    if pretrained:
        raise ModelError(
            f"no pretrained weights exist for '{variant}' (a CIFAR-style net defined by mosaic); "
            "use pretrained=False and train one with `mosaic train-teacher`, or load a checkpoint"
        )
    in_chans = kwargs.get("in_chans", 3)
    levels = tuple(range(feature_levels or model_cls.num_feature_levels))
    model = build_model_with_cfg(model_cls, variant, pretrained=False, feature_cfg=dict(out_indices=levels), **kwargs)
    # There are no weights, so the cfg describes the model as built: its class count and input channels.
    # Non-RGB inputs get a neutral 0.5/0.5 normalisation instead of the CIFAR-10 statistics.
    cfg = dict(model.pretrained_cfg)
    if hasattr(model, "num_classes"):
        cfg["num_classes"] = model.num_classes
    cfg["input_size"] = (in_chans, *cfg["input_size"][1:])
    if in_chans != 3:
        cfg["mean"], cfg["std"] = (0.5,) * in_chans, (0.5,) * in_chans
    model.pretrained_cfg = model.default_cfg = cfg
    return model
