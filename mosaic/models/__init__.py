"""Model zoo: CIFAR-style nets registered in timm, plus building, freezing, checkpoint and feature-tap helpers.

Importing this package registers resnet18_cifar, resnet34_cifar, wrn16_1, wrn16_2, wrn40_1, wrn40_2,
vgg11_bn_cifar, cnn_tiny and cnn_small, so ``timm.create_model(name, num_classes=..., in_chans=...)`` builds them.
"""

from . import resnet_cifar, small_cnn, vgg_cifar, wrn  # noqa: F401  (registers the models with timm)
from ._base import CIFAR10_MEAN, CIFAR10_STD, CifarNet
from .checkpoint import LoadReport, load_state, read_state_dict
from .errors import CheckpointError, ModelError
from .factory import check_forward, create_model, list_cifar_models
from .taps import FeatureTaps, feature_info_of, feature_taps, resolve_layer
from .saved import load_classifier, load_model, save_model
from .utils import count_params, freeze, is_frozen, unwrap_model

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CheckpointError",
    "CifarNet",
    "FeatureTaps",
    "LoadReport",
    "ModelError",
    "check_forward",
    "count_params",
    "create_model",
    "feature_info_of",
    "feature_taps",
    "freeze",
    "is_frozen",
    "list_cifar_models",
    "load_classifier",
    "load_model",
    "load_state",
    "read_state_dict",
    "resolve_layer",
    "save_model",
    "unwrap_model",
]
