"""Baseline methods on mosaic's engine; importing this package registers them."""
from baselines import kd_ood  # noqa: F401
from baselines import dafl, deepinversion, dfad, dfq, zskt  # noqa: F401  (data-free baselines)
from baselines import adv_kd, at, born_again, dml, fitnets, kd, multi_teacher, nst, rkd  # noqa: F401

__all__ = ["adv_kd", "at", "born_again", "dml", "fitnets", "kd", "kd_ood", "multi_teacher", "nst", "rkd"]
__all__ += ["dafl", "deepinversion", "dfad", "dfq", "zskt"]
