"""DFQ-style generator (Choi et al., "Data-Free Network Quantization With Adversarial Knowledge Distillation",
CVPR-W 2020), as the MosaicKD and CMI papers run it as a data-free KD baseline.

DFQ is the benchmark loop of `baselines.datafree.generative` with four of its weights set. One step =
1 G step (student in eval mode), then `student_steps` KD steps on fresh generated images:

    L_G = bn * sum_l ||mu_l(x) - mu_l^T||_2 + ||var_l(x) - var_l^T||_2   # teacher's BN statistics
        + oh * CE(T(x), argmax T(x))                                     # confident teacher
        + balance * sum_c pbar_c ln pbar_c                               # balanced classes
        - adv * KL(T(x) || S(x))                                         # images where S disagrees with T
    L_S = T^2 * KL(T(x)/T || S(x)/T)

Defaults: CMI's script scripts/dfq/dfq_cifar10_wrn402_wrn161.sh, the same as Fast-Datafree's
scripts/dfq_cifar.sh (adv 1, bn 1, oh 1, balance 20, T 20, lr_g 1e-3, 10 KD steps per generator step) and
its GenerativeSynthesizer (Adam betas 0.5/0.999, nz 256). Unlike that toolkit's driver, which hands the
synthesiser the teacher as "student" and so zeroes the adversarial term, the real student is used here.
The generator is that toolkit's decoder (`width=2`) at a constant lr; the cpu-small rows ran this toolkit's
DCGAN width (`width=4`) on the run's cosine (`generator_schedule=run`), which their suites pin. DFQ has one
recipe: its defaults are the benchmark's already.
"""
from __future__ import annotations

from torch import Tensor

from baselines.datafree.generative import GenerativeSynthesis, benchmark
from mosaic.methods import register_method


@register_method("dfq")
class DFQ(GenerativeSynthesis):
    """Data-free: a generator matching the teacher's BN statistics, confident, balanced and adversarial."""
    defaults = benchmark(
        lambda_bn=1.0,           # BN-statistics weight (CMI script: --bn 1)
        lambda_onehot=1.0,       # one-hot weight (CMI script: --oh 1)
        lambda_balance=20.0,     # class-balance weight, natural log (CMI script: --balance 20)
        lambda_adv=1.0,          # adversarial weight (CMI script: --adv 1)
        student_steps=10,        # KD steps per generator step (CMI WRN-40-2 -> WRN-16-1 script: --kd_steps 10)
        temperature=20.0,        # KD temperature of the student loss (CMI script: --T 20)
    )
    needs = {}                   # data-free: no data stream

    def generator_losses(self, fake: Tensor) -> dict[str, Tensor]:
        """The generator terms (unweighted) for generator outputs."""
        return self.synthesis_terms(fake)

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        return self.generative_step()
