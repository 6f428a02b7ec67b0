"""Losses of every method as pure functions of tensors (no state, no modules), one file per family.

    response.py     output distributions: Hinton KD, cross-entropy, logit L1, DML, multi-teacher, JS, agreement
    feature.py      intermediate features: FitNets hints, attention transfer, NST (MMD), MKD value / direction
    relation.py     relations between samples: RKD distance and angle
    adversarial.py  discriminator games: MosaicKD's patch GAN, adversarial logit KD
    datafree.py     data-free priors: DAFL's one-hot / activation terms, BN statistics, DeepInversion's priors and
                    competition terms, CMI's contrastive and CMI / Fast's masked adversarial terms
    generator.py    label-space alignment of generated images: entropy, class balance
"""
from mosaic.losses.adversarial import discriminator_loss, patch_gan_loss, student_adversarial_loss
from mosaic.losses.datafree import (activation_loss, batch_stats, bn_stat_distance, bn_stat_loss,
                                    clamped_js_competition, competition_loss, image_l2, instance_contrastive_loss,
                                    masked_adversarial_kl, onehot_loss, total_variation_l1, total_variation_l2)
from mosaic.losses.feature import (NST_KERNELS, at_pair_loss, attention_map, attention_transfer, channel_vectors,
                                   check_same_shape, direction_loss, hint_loss, mkd_loss, mmd2, nst_loss, value_loss)
from mosaic.losses.generator import balance_loss, entropy
from mosaic.losses.relation import normalized_distances, rkd_angle, rkd_distance, rkd_loss, triplet_cosines
from mosaic.losses.response import (KL_REDUCTIONS, cross_entropy, ensemble_log_probs, ensemble_probs, hinton_kd,
                                    js_divergence, kd_loss, logit_l1, logit_loss, multi_teacher_kd, mutual_loss,
                                    soft_kl, teacher_weights, top1_agreement)

__all__ = [
    "KL_REDUCTIONS", "NST_KERNELS", "activation_loss", "at_pair_loss", "attention_map", "attention_transfer",
    "balance_loss", "batch_stats", "bn_stat_distance", "bn_stat_loss", "channel_vectors", "check_same_shape",
    "clamped_js_competition", "competition_loss", "cross_entropy", "direction_loss", "discriminator_loss",
    "ensemble_log_probs", "ensemble_probs", "entropy", "hint_loss", "hinton_kd", "image_l2",
    "instance_contrastive_loss", "js_divergence",
    "kd_loss", "logit_l1", "logit_loss", "masked_adversarial_kl", "mkd_loss", "mmd2", "multi_teacher_kd",
    "mutual_loss", "normalized_distances", "nst_loss", "onehot_loss", "patch_gan_loss", "rkd_angle", "rkd_distance",
    "rkd_loss", "soft_kl", "student_adversarial_loss", "teacher_weights", "top1_agreement", "total_variation_l1",
    "total_variation_l2", "triplet_cosines", "value_loss",
]
