"""Classic knowledge-distillation losses as pure functions of tensors (one file per family)."""
from baselines.losses.adversarial import discriminator_loss, logit_l1, student_adversarial_loss
from baselines.losses.attention import at_pair_loss, attention_map, attention_transfer
from baselines.losses.fitnets import check_same_shape, hint_loss
from baselines.losses.hinton import hinton_kd, logit_loss, soft_kl
from baselines.losses.multi_teacher import ensemble_log_probs, ensemble_probs, multi_teacher_kd, teacher_weights
from baselines.losses.mutual import mutual_loss
from baselines.losses.nst import KERNELS, channel_vectors, mmd2, nst_loss
from baselines.losses.rkd import normalized_distances, rkd_angle, rkd_distance, rkd_loss, triplet_cosines

__all__ = [
    "KERNELS", "at_pair_loss", "attention_map", "attention_transfer", "channel_vectors", "check_same_shape",
    "discriminator_loss", "ensemble_log_probs", "ensemble_probs", "hint_loss", "hinton_kd", "logit_l1",
    "logit_loss", "mmd2", "multi_teacher_kd", "mutual_loss", "normalized_distances", "nst_loss", "rkd_angle",
    "rkd_distance", "rkd_loss", "soft_kl", "student_adversarial_loss", "teacher_weights", "triplet_cosines",
]
