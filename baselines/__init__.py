"""Baseline methods on mosaic's engine, in three families; importing this package registers them.

    classic/   KD losses on real images (in-domain or the OOD pool): kd, kd_ood, fitnets, at, nst, rkd,
               adv_kd, dml, born_again, multi_teacher
    datafree/  methods that synthesise their images: dafl, zskt, dfad, dfq, deepinversion, cmi, fast, nayer
    ood/       methods that synthesise from the OOD pool: mosaic_ref (MosaicKD as its reference code runs)
"""
from baselines.classic import adv_kd, at, born_again, dml, fitnets, kd, multi_teacher, nst, rkd  # noqa: F401
from baselines.datafree import cmi, dafl, deepinversion, dfad, dfq, fast, nayer, zskt  # noqa: F401
from baselines.ood import mosaic_ref  # noqa: F401
