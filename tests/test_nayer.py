"""NAYER: noisy layers, the balanced target cycle, keep-best, BN statistics by hand, gradients, embeddings, engine."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from baselines.datafree.nayer import Nayer, NoisyLayers, balanced_targets, class_embedding
from conftest import train_killed_at
from mosaic.config import ConfigError
from mosaic.losses import batch_stats
from mosaic.models import create_model
from test_datafree import B, CLASSES, engine_cfg, grads, make
from test_pool_methods import _method_state

# 4 images of 3 classes per round: groups of 3, so two noisy layers (the second for the one random image)
NAYER_SMALL = {"nz": 16, "ngf": 8, "g_steps": 3, "pool_size": 64, "warmup": 1, "warmup_loops": 2, "loops": 1,
               "g_life": 3}


def test_balanced_targets_cycle_the_classes_then_draw_the_rest():
    torch.manual_seed(0)
    t = balanced_targets(23, 10)
    assert t[:20].tolist() == list(range(10)) * 2 and len(t) == 23
    assert all(0 <= c < 10 for c in t[20:].tolist())
    assert balanced_targets(400, 10).bincount().tolist() == [40] * 10  # the published CIFAR-10 round
    assert balanced_targets(2, 5).shape == (2,)  # fewer images than classes: all drawn


def test_noisy_layers_apply_one_layer_per_group_and_redraw_from_a_unit_normal():
    torch.manual_seed(0)
    noisy = NoisyLayers(4, 6, batch=7, group=3)
    assert len(noisy.layers) == 3  # ceil(7 / 3)
    noisy.reset()
    w = torch.cat([layer.weight.flatten() for layer in noisy.layers])
    assert all(torch.equal(layer.bias, torch.zeros(6)) for layer in noisy.layers)
    big = NoisyLayers(100, 1000, batch=1, group=1)
    big.reset()
    assert abs(big.layers[0].weight.mean().item()) < 0.01 and abs(big.layers[0].weight.std().item() - 1) < 0.01
    e = torch.randn(7, 4)
    out = noisy(e)
    by_hand = torch.cat([e[0:3] @ noisy.layers[0].weight.T, e[3:6] @ noisy.layers[1].weight.T,
                         e[6:7] @ noisy.layers[2].weight.T])
    assert torch.allclose(out, by_hand, atol=1e-6)
    noisy.reset()
    assert not torch.equal(w, torch.cat([layer.weight.flatten() for layer in noisy.layers]))  # fresh draws
    with pytest.raises(ValueError, match="need 4 noisy layers"):
        noisy(torch.randn(10, 4))


def test_each_round_redraws_the_noisy_layers_and_keeps_its_lowest_loss_images(monkeypatch):
    m = make("nayer", **NAYER_SMALL)
    drawn, outputs = [], []
    real_reset = NoisyLayers.reset

    def spy_reset(self):
        real_reset(self)
        drawn.append(copy.deepcopy([layer.weight for layer in self.layers]))
    monkeypatch.setattr(NoisyLayers, "reset", spy_reset)
    real_forward = m.generator.forward
    m.generator.forward = lambda targets: outputs.append(real_forward(targets)) or outputs[-1]
    losses = iter([3.0, 1.0, 2.0])  # the second of the three iterates is the lowest
    real_weighted = m.weighted
    monkeypatch.setattr(m, "weighted", lambda terms: real_weighted(terms) * 0 + next(losses))
    m.synthesis_round(adversarial=False)
    assert len(drawn) == 1 and len(outputs) == 3 and len(m.pool) == B
    kept = (outputs[1].detach().clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(m.pool.latest(B), kept)
    losses = iter([5.0, 6.0, 7.0])
    m.synthesis_round(adversarial=False)
    assert len(drawn) == 2 and not torch.equal(drawn[0][0], drawn[1][0])  # a fresh noisy layer per round
    assert torch.equal(m.pool.latest(B), (outputs[3].detach().clamp(0, 1) * 255).round().to(torch.uint8))


def test_rounds_per_synthesis_and_generator_rebuilds_follow_the_reference_schedule():
    m = make("nayer", **NAYER_SMALL)  # warm-up 1 synthesis of 2 rounds, then 1 round; rebuilt every 3
    kept, rebuilt = [], []
    for k in range(5):
        before = m.generator
        m.synthesize(adversarial=k >= 1)
        m.syntheses += 1  # as InterleavedSynthesis.step counts them
        rebuilt.append(m.generator is not before)
        kept.append(len(m.pool))
    assert kept == [2 * B, 3 * B, 4 * B, 5 * B, 6 * B]
    # k % 3 == 0 or (k - 1) % 3 == 0: syntheses 0, 1, 3, 4 start from a new generator
    assert rebuilt == [True, True, False, True, True]
    ref = make("nayer", **NAYER_SMALL)
    ref.opts = {**ref.opts, "warmup": 20, "g_life": 10}  # the published schedule (a 10-step run cannot hold it)
    due = []
    for k in range(45):
        ref.syntheses = k
        due.append(ref.rebuild_due())
    assert [k for k, d in enumerate(due) if d] == [0, 10, 20, 30, 40]  # the published 20 / 10


def test_bn_statistics_term_matches_a_hand_computation():
    """R = sum_l ||mu_l(x) - mu_l^T||_2 + ||var_l(x) - var_l^T||_2 over the teacher's BN inputs (momentum 0)."""
    m = make("nayer", **{**NAYER_SMALL, "bn_momentum": 0.0})
    inputs = []
    layers = [mod for mod in m.teacher.modules() if isinstance(mod, nn.BatchNorm2d)]
    handles = [mod.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach())) for mod in layers]
    x = torch.rand(B, 3, 16, 16)
    torch.manual_seed(4)
    terms = m.synthesis_terms(x, torch.arange(B) % CLASSES, adversarial=False)
    for h in handles:
        h.remove()
    want = 0.0
    for mod, h in zip(layers, inputs):
        mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
        want += (mean - mod.running_mean).norm() + (var - mod.running_var).norm()
    assert len(layers) >= 2 and terms["bn"].item() == pytest.approx(want.item(), rel=1e-5)
    mean, var = batch_stats(inputs[0])
    assert torch.allclose(mean, inputs[0].mean(dim=(0, 2, 3)), atol=1e-6)


def test_gradients_reach_the_noisy_layers_and_the_generator_never_the_teacher():
    m = make("nayer", **NAYER_SMALL)
    m.generator.noisy.reset()
    targets = balanced_targets(B, CLASSES)
    terms = m.synthesis_terms(m.generator(targets), targets, adversarial=True)
    m.weighted(terms).backward()
    noisy = [layer.weight.grad for layer in m.generator.noisy.layers]
    assert all(g is not None and g.abs().sum() > 0 for g in noisy)
    assert grads(m.generator.decoder).abs().sum() > 0 and m.generator.norm.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    assert all(p.grad is None for p in m.student.parameters())
    teacher = copy.deepcopy(m.teacher.state_dict())
    m.synthesize(adversarial=True)
    assert all(torch.equal(v, m.teacher.state_dict()[k]) for k, v in teacher.items())
    assert not m.generator.embedding.requires_grad  # the class embedding is fixed


def test_embeddings_onehot_teacher_rows_and_a_user_file(tmp_path):
    teacher = create_model("cnn_tiny", num_classes=CLASSES)
    assert torch.equal(class_embedding("onehot", teacher, CLASSES), torch.eye(CLASSES))
    rows = class_embedding("teacher", teacher, CLASSES)
    assert torch.equal(rows, teacher.get_classifier().weight.detach())
    table = np.arange(CLASSES * 5, dtype=np.float64).reshape(CLASSES, 5)
    np.save(tmp_path / "clip.npy", table)
    assert torch.equal(class_embedding(str(tmp_path / "clip.npy"), teacher, CLASSES),
                       torch.from_numpy(table).float())
    m = make("nayer", embedding=str(tmp_path / "clip.npy"), **NAYER_SMALL)
    assert m.generator.embedding.shape == (CLASSES, 5) and m.generator.norm.num_features == 5
    m.synthesize(adversarial=False)
    assert len(m.pool) == 2 * B
    np.save(tmp_path / "wrong.npy", table[:2])
    with pytest.raises(ConfigError, match=r"shape \(2, 5\), but the teacher has 3 classes"):
        class_embedding(str(tmp_path / "wrong.npy"), teacher, CLASSES)
    with pytest.raises(ConfigError, match="no file"):
        class_embedding(str(tmp_path / "missing.npy"), teacher, CLASSES)
    with pytest.raises(ConfigError, match="must be onehot or teacher or the path of a .npy"):
        class_embedding("clip", teacher, CLASSES)
    (tmp_path / "bad.npy").write_text("not an array")
    with pytest.raises(ConfigError, match="not a readable .npy"):
        class_embedding(str(tmp_path / "bad.npy"), teacher, CLASSES)
    with pytest.raises(ConfigError, match="embedding=teacher takes the rows"):
        class_embedding("teacher", nn.Sequential(nn.Conv2d(3, 3, 1)), CLASSES)


def test_nayer_counts_its_student_budget_and_bad_options_are_clear():
    m = make("nayer", **{**NAYER_SMALL, "warmup": 3})
    assert m.budget() == {"student_updates": 7, "student_images": 7 * B}  # 10 steps, 3 of them synthesis only
    with pytest.raises(ConfigError, match="nayer.g_life"):
        make("nayer", **{**NAYER_SMALL, "g_life": 0})
    with pytest.raises(ConfigError, match="nayer.bn_momentum"):
        make("nayer", **{**NAYER_SMALL, "bn_momentum": 1.0})


def test_nayer_resumes_to_identical_weights(tiny_task, tiny_teacher, tmp_path, monkeypatch):
    from mosaic.engine import train
    common = dict(steps=5, ckpt_every=1, keep_ckpts=5, **{"nayer.g_life": 2})
    full = train(engine_cfg(tiny_task, tiny_teacher, tmp_path, "full", "nayer", **common))
    # syntheses at steps 0 (warm-up, 2 rounds), 1 and 3 (one round each)
    assert full["nayer_syntheses"] == 3 and full["nayer_images_made"] == 4 * 8  # rounds of batch_size 8
    train_killed_at(monkeypatch, Nayer, 3, engine_cfg(tiny_task, tiny_teacher, tmp_path, "killed", "nayer", **common))
    resumed = train(engine_cfg(tiny_task, tiny_teacher, tmp_path, "killed", "nayer", resume=True, **common))
    assert resumed["final_losses"] == full["final_losses"]
    from mosaic.engine import checkpoints
    a, b = _method_state(checkpoints(tmp_path / "full")[-1]), _method_state(checkpoints(tmp_path / "killed")[-1])
    assert torch.equal(a["pool"], b["pool"])
    assert all(torch.equal(v, b["generator"][k]) for k, v in a["generator"].items())
