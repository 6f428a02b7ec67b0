"""Classic KD losses (baselines/losses) against hand computations in plain Python on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from baselines.features import make_adapter
from baselines.losses import (at_pair_loss, attention_map, attention_transfer, check_same_shape, discriminator_loss,
                              ensemble_probs, hint_loss, hinton_kd, logit_l1, mmd2, multi_teacher_kd, mutual_loss,
                              nst_loss, rkd_angle, rkd_distance, rkd_loss, student_adversarial_loss)
from mosaic.config import ConfigError


# ----------------------------------------------------------------------------- plain-Python references


def softmax(row: list[float], T: float = 1.0) -> list[float]:
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ce(row: list[float], label: int) -> float:
    return -math.log(softmax(row)[label])


def huber(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T_ = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
Y = [1, 2]

# ----------------------------------------------------------------------------- Hinton KD


def test_hinton_kd_matches_hand_computation():
    T, alpha = 2.0, 0.7
    soft = sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(S, T_)) / 2
    hard = sum(ce(s, y) for s, y in zip(S, Y)) / 2
    want = (1 - alpha) * hard + alpha * T * T * soft
    got = hinton_kd(tensor(S), tensor(T_), torch.tensor(Y), temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_hinton_kd_t_squared_factor_and_label_free_variant():
    for T in (1.0, 3.0, 5.0):
        kl_mean = sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(S, T_)) / 2
        got = hinton_kd(tensor(S), tensor(T_), None, temperature=T, alpha=0.3)  # alpha ignored without labels
        assert got.item() == pytest.approx(T * T * kl_mean, rel=1e-6)
    # T=3: the loss is 9 x the plain KL, not the KL itself
    kl3 = sum(kl(softmax(t, 3.0), softmax(s, 3.0)) for s, t in zip(S, T_)) / 2
    assert hinton_kd(tensor(S), tensor(T_), temperature=3.0).item() / kl3 == pytest.approx(9.0, rel=1e-6)


def test_hinton_kd_zero_for_identical_logits_and_alpha_limits():
    assert hinton_kd(tensor(S), tensor(S), temperature=4.0).item() == pytest.approx(0.0, abs=1e-7)
    hard = sum(ce(s, y) for s, y in zip(S, Y)) / 2
    assert hinton_kd(tensor(S), tensor(T_), torch.tensor(Y), alpha=0.0).item() == pytest.approx(hard, rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        hinton_kd(tensor(S), tensor(T_), torch.tensor(Y), alpha=1.5)


# ----------------------------------------------------------------------------- multi-teacher


def test_multi_teacher_weighted_average_matches_hand_computation():
    T2 = [[0.0, 1.0, 0.0], [-1.0, 2.0, 0.5]]
    T, alpha, w = 2.0, 0.6, [0.25, 0.75]
    soft = 0.0
    for i in range(2):
        p1, p2 = softmax(T_[i], T), softmax(T2[i], T)
        p = [w[0] * a + w[1] * b for a, b in zip(p1, p2)]
        soft += kl(p, softmax(S[i], T)) / 2
    hard = sum(ce(s, y) for s, y in zip(S, Y)) / 2
    want = (1 - alpha) * hard + alpha * T * T * soft
    got = multi_teacher_kd(tensor(S), [tensor(T_), tensor(T2)], torch.tensor(Y), temperature=T, alpha=alpha,
                           weights=[1.0, 3.0])  # normalised to 0.25 / 0.75
    assert got.item() == pytest.approx(want, rel=1e-6)
    equal = ensemble_probs([tensor(T_), tensor(T2)], temperature=1.0)
    assert equal[0, 1].item() == pytest.approx(0.5 * softmax(T_[0])[1] + 0.5 * softmax(T2[0])[1], rel=1e-6)
    only_second = multi_teacher_kd(tensor(S), [tensor(T_), tensor(T2)], temperature=T, weights=[0.0, 2.0])
    kl2 = sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(S, T2)) / 2
    assert only_second.item() == pytest.approx(T * T * kl2, rel=1e-6)  # a zero weight drops a teacher
    with pytest.raises(ValueError, match="2 teachers"):
        multi_teacher_kd(tensor(S), [tensor(T_), tensor(T2)], weights=[1.0])


# ----------------------------------------------------------------------------- FitNets


def test_hint_loss_matches_hand_computation_and_rejects_other_shapes():
    a = [[[[1.0, 2.0]], [[0.0, -1.0]]]]          # (1, 2, 1, 2)
    b = [[[[0.5, 2.0]], [[1.0, 1.0]]]]
    want = ((1 - 0.5) ** 2 + 0 + (0 - 1) ** 2 + (-1 - 1) ** 2) / 4
    assert hint_loss(tensor(a), tensor(b)).item() == pytest.approx(want)
    assert hint_loss(tensor(a), tensor(a)).item() == 0.0
    with pytest.raises(ValueError, match=r"\(1, 2, 1, 2\).*\(1, 3, 1, 2\)"):
        hint_loss(tensor(a), torch.zeros(1, 3, 1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        check_same_shape(torch.zeros(2, 3), torch.zeros(2, 4), what="x")


def test_adapters_map_channels_and_reject_spatial_mismatch():
    conv = make_adapter("fitnets", "layer1", (32, 8, 8), "layer1", (64, 8, 8))
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    assert conv(torch.zeros(2, 32, 8, 8)).shape == (2, 64, 8, 8)
    lin = make_adapter("fitnets", "fc", (10,), "fc", (20,))
    assert isinstance(lin, nn.Linear) and lin.out_features == 20
    with pytest.raises(ConfigError, match=r"'layer1'.*\(32, 8, 8\).*'layer2'.*\(64, 4, 4\)"):
        make_adapter("fitnets", "layer1", (32, 8, 8), "layer2", (64, 4, 4))
    with pytest.raises(ConfigError, match=r"\(32, 8, 8\).*\(64,\)"):
        make_adapter("fitnets", "layer1", (32, 8, 8), "fc", (64,))


# ----------------------------------------------------------------------------- attention transfer

FA = [[[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, -1.0]]]]    # (1, 2, 2, 2)
FB = [[[[0.0, 1.0], [2.0, 1.0]], [[1.0, 1.0], [0.0, 2.0]], [[2.0, 0.0], [1.0, 0.0]]]]  # (1, 3, 2, 2)


def hand_attention(f: list) -> list[float]:
    """Mean over channels of squared activations at each position (row-major), L2-normalised."""
    chans = f[0]
    a = [sum(c[i][j] ** 2 for c in chans) / len(chans) for i in range(2) for j in range(2)]
    norm = math.sqrt(sum(v * v for v in a))
    return [v / norm for v in a]


def test_attention_map_is_normalised_mean_of_squares():
    qa = hand_attention(FA)  # positions: (1+9)/2, (4+0)/2, (0+1)/2, (1+1)/2 = 5, 2, 0.5, 1
    assert qa[0] == pytest.approx(5 / math.sqrt(25 + 4 + 0.25 + 1))
    got = attention_map(tensor(FA))
    assert got.shape == (1, 4)
    assert got[0].tolist() == pytest.approx(qa)
    assert got.norm(dim=1).item() == pytest.approx(1.0)
    assert attention_map(3.7 * tensor(FA))[0].tolist() == pytest.approx(qa)  # scale of the activations drops out


def test_attention_transfer_matches_hand_computation_over_pairs():
    qa, qb = hand_attention(FA), hand_attention(FB)
    pair = sum((x - y) ** 2 for x, y in zip(qa, qb)) / 4  # mean over batch (1) and positions (4)
    assert at_pair_loss(tensor(FA), tensor(FB)).item() == pytest.approx(pair)
    two = attention_transfer([tensor(FA), tensor(FB)], [tensor(FB), tensor(FB)], beta=1000.0)
    assert two.item() == pytest.approx(1000.0 / 2 * (pair + 0.0))
    assert attention_transfer([tensor(FA)], [tensor(FA)]).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 2\).*\(1, 2, 4, 4\)"):
        at_pair_loss(tensor(FA), torch.zeros(1, 2, 4, 4, dtype=torch.float64))


# ----------------------------------------------------------------------------- NST

NS = [[[[1.0, 0.0, 2.0]], [[0.0, 1.0, 1.0]]]]                          # (1, 2, 1, 3): 2 channels of 3 positions
NT = [[[[1.0, 1.0, 0.0]], [[2.0, 0.0, 0.0]], [[0.0, 3.0, 4.0]]]]        # (1, 3, 1, 3)


def unit_channels(f: list) -> list[list[float]]:
    out = []
    for c in f[0]:
        v = c[0]
        n = math.sqrt(sum(x * x for x in v))
        out.append([x / n for x in v])
    return out


def hand_mmd(s: list, t: list, k) -> float:
    S_, T2 = unit_channels(s), unit_channels(t)
    tt = sum(k(a, b) for a in T2 for b in T2) / len(T2) ** 2
    ss = sum(k(a, b) for a in S_ for b in S_) / len(S_) ** 2
    st = sum(k(a, b) for a in S_ for b in T2) / (len(S_) * len(T2))
    return tt + ss - 2 * st


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def test_nst_kernels_match_hand_computation():
    linear = hand_mmd(NS, NT, dot)
    poly = hand_mmd(NS, NT, lambda a, b: dot(a, b) ** 2)
    gauss = hand_mmd(NS, NT, lambda a, b: math.exp(-dist(a, b) ** 2 / (2 * 0.5)))
    assert mmd2(tensor(NS), tensor(NT), kernel="linear").item() == pytest.approx(linear, rel=1e-6)
    assert mmd2(tensor(NS), tensor(NT), kernel="poly").item() == pytest.approx(poly, rel=1e-6)
    assert mmd2(tensor(NS), tensor(NT), kernel="gaussian", sigma2=0.5).item() == pytest.approx(gauss, rel=1e-6)
    # default sigma^2: mean squared distance over all pairs of the pooled channel vectors
    pool = unit_channels(NS) + unit_channels(NT)
    s2 = sum(dist(a, b) ** 2 for a in pool for b in pool) / len(pool) ** 2
    gauss_auto = hand_mmd(NS, NT, lambda a, b: math.exp(-dist(a, b) ** 2 / (2 * s2)))
    assert mmd2(tensor(NS), tensor(NT), kernel="gaussian").item() == pytest.approx(gauss_auto, rel=1e-6)
    # the linear-kernel MMD is the squared distance between the mean channel vectors
    ms = [sum(c) / 2 for c in zip(*unit_channels(NS))]
    mt = [sum(c) / 3 for c in zip(*unit_channels(NT))]
    assert linear == pytest.approx(dist(ms, mt) ** 2)
    assert len({round(linear, 6), round(poly, 6), round(gauss, 6)}) == 3  # the kernels really differ


def test_nst_loss_weight_batch_mean_and_identity():
    two = torch.cat([tensor(NS), tensor(NS) * 2.0])  # scaling a sample does not change its normalised channels
    poly = hand_mmd(NS, NT, lambda a, b: dot(a, b) ** 2)
    got = nst_loss(two, torch.cat([tensor(NT), tensor(NT)]), kernel="poly", weight=50.0)
    assert got.item() == pytest.approx(50.0 / 2 * poly, rel=1e-6)
    for kernel in ("linear", "poly", "gaussian"):
        assert mmd2(tensor(NT), tensor(NT), kernel=kernel).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="unknown NST kernel 'rbf'"):
        mmd2(tensor(NS), tensor(NT), kernel="rbf")
    with pytest.raises(ValueError, match=r"\(1, 2, 1, 3\).*\(1, 3, 1, 4\)"):
        mmd2(tensor(NS), torch.zeros(1, 3, 1, 4, dtype=torch.float64))


# ----------------------------------------------------------------------------- RKD


def hand_rkd(s: list, t: list) -> tuple[float, float, float]:
    """Distance and angle terms by plain loops (pairs i != j, triplets of distinct i, j, k, angle at j),
    and the largest |psi_D(s) - psi_D(t)|."""
    n = len(s)

    def psi_d(e):
        d = {(i, j): dist(e[i], e[j]) for i in range(n) for j in range(n) if i != j}
        mu = sum(d.values()) / len(d)
        return {k: v / mu for k, v in d.items()}

    def psi_a(e):
        out = {}
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if len({i, j, k}) == 3:
                        u = [a - b for a, b in zip(e[i], e[j])]
                        v = [a - b for a, b in zip(e[k], e[j])]
                        out[i, j, k] = dot(u, v) / (math.sqrt(dot(u, u)) * math.sqrt(dot(v, v)))
        return out

    ds, dt = psi_d(s), psi_d(t)
    as_, at = psi_a(s), psi_a(t)
    d_loss = sum(huber(ds[k] - dt[k]) for k in ds) / len(ds)
    a_loss = sum(huber(as_[k] - at[k]) for k in as_) / len(as_) if as_ else 0.0
    return d_loss, a_loss, max(abs(ds[k] - dt[k]) for k in ds)


def test_rkd_on_a_345_triangle():
    s = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
    t = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    mu_t = (2 + math.sqrt(2)) / 3
    d_want = (huber(3 / 4 - 1 / mu_t) + huber(1 - 1 / mu_t) + huber(5 / 4 - math.sqrt(2) / mu_t)) / 3
    # angles at vertices 0, 1, 2: cos 0 vs 0, 0.6 vs 1/sqrt2, 0.8 vs 1/sqrt2 (each vertex in 2 of 6 triplets)
    a_want = (huber(0.0) + huber(0.6 - 1 / math.sqrt(2)) + huber(0.8 - 1 / math.sqrt(2))) / 3
    assert rkd_distance(tensor(s), tensor(t)).item() == pytest.approx(d_want, rel=1e-6)
    assert rkd_angle(tensor(s), tensor(t)).item() == pytest.approx(a_want, rel=1e-6)
    assert rkd_loss(tensor(s), tensor(t)).item() == pytest.approx(25 * d_want + 50 * a_want, rel=1e-6)


def test_rkd_matches_loops_including_huber_linear_part():
    s = [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [30.0, 0.0, -1.0]]  # an outlier: |psi_s - psi_t| > 1
    t = [[1.0, 1.0], [0.0, 1.0], [2.0, 0.0], [1.0, 2.0]]                       # teacher embedding of another width
    d_want, a_want, largest = hand_rkd(s, t)
    assert largest > 1  # the outlier exercises the linear branch of the Huber loss
    assert rkd_distance(tensor(s), tensor(t)).item() == pytest.approx(d_want, rel=1e-6)
    assert rkd_angle(tensor(s), tensor(t)).item() == pytest.approx(a_want, rel=1e-6)


def test_rkd_zero_for_identical_embeddings_and_scale_invariant():
    e = torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.5, 0.0], [-0.7, 0.2, 1.1], [0.0, 0.0, -0.5]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]], dtype=torch.float64)
    assert rkd_loss(e, e).item() == pytest.approx(0.0, abs=1e-7)
    assert rkd_loss(e, 5.0 * e).item() == pytest.approx(0.0, abs=1e-7)   # relations ignore the teacher's scale
    assert rkd_distance(7.3 * e, t).item() == pytest.approx(rkd_distance(e, t).item(), rel=1e-5)
    assert rkd_angle(0.2 * e + 3.0, t).item() == pytest.approx(rkd_angle(e, t).item(), rel=1e-5)
    assert rkd_distance(e, t).item() > 0
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 2\)"):
        rkd_distance(e, t[:3])


# ----------------------------------------------------------------------------- adversarial logit KD


def test_adversarial_losses_match_hand_computation():
    dt = [[2.0, -1.0], [0.5, 0.5]]            # D's (real, fake) scores on teacher logits
    ds = [[0.0, 1.0], [1.5, -0.5]]            # ... on student logits
    real, fake = 0, 1
    d_want = sum(ce(r, real) for r in dt) / 2 + sum(ce(r, fake) for r in ds) / 2
    assert discriminator_loss(tensor(dt), tensor(ds)).item() == pytest.approx(d_want, rel=1e-6)
    s_want = sum(ce(r, real) for r in ds) / 2
    assert student_adversarial_loss(tensor(ds)).item() == pytest.approx(s_want, rel=1e-6)

    # class-conditioned D: C + 2 = 5 outputs (real, fake, 3 classes)
    dtc = [[2.0, -1.0, 0.0, 1.0, 0.5], [0.5, 0.5, 2.0, 0.0, 0.0]]
    dsc = [[0.0, 1.0, 1.0, 1.0, -1.0], [1.5, -0.5, 0.0, 0.0, 3.0]]
    labels = [1, 2]
    cls_t = sum(ce(r[2:], y) for r, y in zip(dtc, labels)) / 2
    cls_s = sum(ce(r[2:], y) for r, y in zip(dsc, labels)) / 2
    src = sum(ce(r[:2], real) for r in dtc) / 2 + sum(ce(r[:2], fake) for r in dsc) / 2
    got = discriminator_loss(tensor(dtc), tensor(dsc), torch.tensor(labels))
    assert got.item() == pytest.approx(src + cls_t + cls_s, rel=1e-6)
    got_s = student_adversarial_loss(tensor(dsc), torch.tensor(labels))
    assert got_s.item() == pytest.approx(sum(ce(r[:2], real) for r in dsc) / 2 + cls_s, rel=1e-6)
    with pytest.raises(ValueError, match="needs labels"):
        student_adversarial_loss(tensor(dsc))


def test_logit_l1_is_mean_absolute_difference():
    want = sum(abs(a - b) for rs, rt in zip(S, T_) for a, b in zip(rs, rt)) / 6
    assert logit_l1(tensor(S), tensor(T_)).item() == pytest.approx(want)
    assert logit_l1(tensor(S), tensor(S)).item() == 0.0
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\)"):
        logit_l1(tensor(S), torch.zeros(2, 2, dtype=torch.float64))


# ----------------------------------------------------------------------------- deep mutual learning


def test_mutual_loss_matches_hand_computation_and_detaches_peers():
    P2 = [[0.0, 0.0, 1.0], [2.0, 1.0, 0.0]]
    want = sum(ce(s, y) for s, y in zip(S, Y)) / 2
    want += 0.5 * (sum(kl(softmax(t), softmax(s)) for s, t in zip(S, T_)) / 2
                   + sum(kl(softmax(p), softmax(s)) for s, p in zip(S, P2)) / 2)
    own = tensor(S).requires_grad_(True)
    peer = tensor(T_).requires_grad_(True)
    got = mutual_loss(own, [peer, tensor(P2)], torch.tensor(Y))
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.backward()
    assert own.grad is not None and own.grad.abs().sum() > 0
    assert peer.grad is None  # peers are fixed targets
    assert mutual_loss(tensor(S), [tensor(S)]).item() == pytest.approx(0.0, abs=1e-7)
