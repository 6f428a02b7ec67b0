"""Baseline methods on mosaic's engine; importing this package registers them."""
from baselines import kd_ood  # noqa: F401

__all__ = ["kd_ood"]
