"""MosaicKD as the reference code runs it (zju-vipa/MosaicKD, kd_mosaic.py): the row every OOD table compares with.

The same four players, losses, weights, optimisers and update order as `mosaic` (it is a
configuration of mosaic.methods.mosaic_kd.MosaicKD), with the discriminator as the reference
code has it:

    D step   L_D = local * (sum BCE(D(n(G(z))) -> 0) + sum BCE(D(n(x_plain)) -> 1)) / (2 B)
    G step   L_G = local * sum BCE(D(n(G(z))) -> 1) / B + align * H(T) + balance * sum pbar log2 pbar
                   - adv * KL(T || S)                      (the same G(z) as the D step)
    S steps  student_steps x  T^2 KL(T(x)/T || S(x)/T),  x = n([G(z'); x_ood])

D sees whole images (its 10x10-receptive-field PatchGAN map is the only "patch"), normalised
with the in-domain statistics (n), and its real images x_plain are un-augmented pool images
from a shuffle of their own (`ood_plain` stream; the reference uses a second loader with
test-time transforms); the student's x_ood are augmented. Sums run over each image's logit map.
One difference remains by design: the engine normalises every image with the in-domain
statistics, where the reference normalises pool images with the pool's registry statistics.
"""
from __future__ import annotations

from mosaic.methods import register_method
from mosaic.methods.mosaic_kd import MosaicKD

# What the reference fixes (MosaicKD's options, their reference values); the rest stay options of mosaic_ref.
REFERENCE = {
    "patch_size": None,         # whole images to D
    "patches": 1,
    "patch_layout": "random",   # unused without crops
    "local_reduction": "sum",   # sum over the logit map, / B
    "crop_reduction": "mean",   # one "crop" (the image) per image
    "d_real": "plain",          # un-augmented real images
    "d_normalize": True,        # D sees normalised images
    "d_whole": False,           # the whole image is D's only view already
    "student_bn": "mixed",      # every student forward updates BN running statistics
    "fast_crop": True,          # unused without crops
}


@register_method("mosaic_ref")
class MosaicRef(MosaicKD):
    """The reference MosaicKD loop: whole normalised images to the PatchGAN, its real ones un-augmented."""
    defaults = {k: v for k, v in MosaicKD.defaults.items() if k not in REFERENCE}

    @classmethod
    def resolved(cls, opts: dict) -> dict:
        """mosaic's options: the user's (weights, widths, steps, speed switches) with the reference's D set-up."""
        return {**opts, **REFERENCE}
