"""FitNets hints: the regressed student feature map should equal the teacher's hint layer."""
from __future__ import annotations

from torch import Tensor


def check_same_shape(student: Tensor, teacher: Tensor, *, what: str) -> None:
    """Raise a ValueError naming both shapes when a student and a teacher tensor differ in shape."""
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student shape {tuple(student.shape)} does not match teacher shape "
                         f"{tuple(teacher.shape)}; map the student layer with an adapter (1x1 conv / linear) "
                         f"or choose layers of the same size")


def hint_loss(regressed: Tensor, hint: Tensor) -> Tensor:
    """Mean squared error between the regressor's output on the student layer and the teacher's hint layer.

    Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015): L_HT = 1/2 ||u_h(x) - r(v_g(x))||^2.
    We average over all elements instead of summing (so the weight does not depend on the map size)
    and drop the 1/2; the method multiplies by `weight`, default 100 as in the single-stage FitNets of
    the CRD benchmark (Tian et al. 2020), since the paper's two-stage schedule has no single weight.
    """
    check_same_shape(regressed, hint, what="FitNets hint")
    return (regressed.float() - hint.float()).pow(2).mean()
