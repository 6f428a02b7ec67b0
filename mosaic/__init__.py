"""mosaic-kd: knowledge distillation when the teacher's data is gone (MosaicKD and baselines)."""
__version__ = "0.1.0"

from mosaic import models  # noqa: F401  (registers the CIFAR networks in timm)
