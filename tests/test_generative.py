"""The benchmark recipe (`recipe=benchmark`): CMI / Fast-Datafree's generator loop for DAFL, ZSKT, DFAD (and DFQ)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from hand import approx
from mosaic.config import ConfigError, resolve
from mosaic.methods import method_defaults
from test_datafree import ENGINE_OPTS, SMALL, engine_cfg, grads, make

BENCH = {"recipe": "benchmark", **SMALL}


def test_recipe_picks_the_benchmark_defaults_and_overrides_still_win():
    paper = resolve(overrides=["method=dafl"], method_defaults=method_defaults)["dafl"]
    assert paper["recipe"] == "paper" and paper["lambda_ie"] == 5.0 and paper["head"] == "tanh_bn"
    bench = resolve(overrides=["method=dafl", "dafl.recipe=benchmark", "dafl.student_steps=3"],
                    method_defaults=method_defaults)["dafl"]
    assert bench["recipe"] == "benchmark" and "lambda_ie" not in bench
    assert (bench["nz"], bench["lambda_onehot"], bench["lambda_act"], bench["lambda_balance"]) == (512, 1.0, 0.001, 20.0)
    assert (bench["width"], bench["head"], bench["betas"], bench["temperature"]) == (2, "sigmoid", [0.5, 0.999], 20.0)
    assert bench["student_steps"] == 3  # the user's value over the recipe's 5
    zskt = method_defaults("zskt", "benchmark")
    assert zskt["lambda_adv"] == 1.0 and zskt["lambda_onehot"] == 0.0 and "beta" not in zskt
    dfad = method_defaults("dfad", "benchmark")
    assert (dfad["adversary"], dfad["student_loss"], dfad["student_steps"]) == ("l1", "l1", 5)


def test_recipe_errors_name_the_choices():
    with pytest.raises(ConfigError, match="paper, benchmark"):
        resolve(overrides=["method=dafl", "dafl.recipe=cmi"], method_defaults=method_defaults)
    with pytest.raises(ConfigError, match="no recipes"):
        resolve(overrides=["method=kd_ood", "kd_ood.recipe=benchmark"], method_defaults=method_defaults)
    with pytest.raises(ConfigError, match="unknown key|not a|lambda_ie"):  # a paper-only key under the benchmark
        resolve(overrides=["method=dafl", "dafl.recipe=benchmark", "dafl.lambda_ie=3"],
                method_defaults=method_defaults)
    with pytest.raises(ConfigError, match="every generator weight is 0"):
        make("zskt", **BENCH, lambda_adv=0.0)
    with pytest.raises(ConfigError, match="adversary"):
        make("dfad", **BENCH, adversary="l2")


def test_benchmark_generator_has_the_reference_decoder_width():
    m = make("dafl", **BENCH)
    assert m.generator.project.out_features == 8 * 2 * (16 // 4) ** 2  # ngf * 2 channels at size / 4
    assert m.generator.head == "sigmoid"
    assert m.generator_opt.param_groups[0]["betas"] == (0.5, 0.999)


def teacher_view(m, fake):
    return m.ctx.normalize(fake)


def test_dafl_benchmark_terms_match_hand_computation():
    m = make("dafl", **BENCH)
    fake = m.generate()
    terms = m.synthesis_terms(fake)
    assert set(terms) == {"g_oh", "g_act", "g_balance"}  # zero weights make no term
    x = teacher_view(m, fake)
    logits = m.teacher(x).double()
    p = torch.softmax(logits, 1)
    pbar = p.mean(0)
    feat = m.teacher.forward_features(x).mean(dim=(2, 3))
    assert terms["g_oh"].item() == approx(-p.max(1).values.log().mean().item())
    assert terms["g_act"].item() == approx(-feat.abs().mean().item())
    assert terms["g_balance"].item() == approx((pbar * pbar.log()).sum().item())  # natural log, not DAFL's log10


def test_zskt_and_dfad_benchmark_adversaries_match_hand_computation():
    for name in ("zskt", "dfad"):
        m = make(name, **BENCH)
        with torch.no_grad():
            fake = m.generate()
            terms = m.synthesis_terms(fake)
            x = teacher_view(m, fake)
            t, s = m.teacher(x).double(), m.student(x).double()
        assert set(terms) == {"g_adv"}
        if name == "dfad":
            hand = -(s - t).abs().mean().item()
        else:  # KL(T || S) at T=1, summed over classes, mean over the batch (no division by the classes)
            p_t = torch.softmax(t, 1)
            hand = -(p_t * (p_t.log() - torch.log_softmax(s, 1))).sum(1).mean().item()
        assert terms["g_adv"].item() == approx(hand)


def count_steps(opt: torch.optim.Optimizer, log: list, name: str) -> None:
    opt.register_step_post_hook(lambda *_: log.append(name))


@pytest.mark.parametrize("name", ["dafl", "zskt", "dfad", "dfq"])
def test_benchmark_step_order_modes_and_gradients(name):
    """One generator update with the student frozen in eval mode, then student_steps KD updates;
    the generator gets gradients, the teacher never does, and the student's KD images are fresh and detached."""
    opts = {**BENCH, "student_steps": 3} if name != "dfq" else {**SMALL, "student_steps": 3}
    m = make(name, **opts)
    log, modes = [], []
    count_steps(m.generator_opt, log, "g")
    count_steps(m.student_opt, log, "s")
    m.student.register_forward_pre_hook(lambda mod, inp: modes.append(mod.training))
    t_before = [p.detach().clone() for p in m.teacher.parameters()]
    losses = m.step({}, 0)
    assert log == ["g", "s", "s", "s"]
    assert modes[0] is False if m.opts["lambda_adv"] else True  # the adversary sees the eval-mode student
    assert all(modes[-3:])                                      # KD in train mode
    assert m.student.training
    assert all(torch.equal(a, b) for a, b in zip(t_before, m.teacher.parameters()))
    assert all(p.grad is None for p in m.teacher.parameters())
    assert torch.isfinite(losses["loss_g"]) and torch.isfinite(losses["loss_s"])
    assert grads(m.generator).abs().sum() > 0


def test_benchmark_kd_loss_is_hinton_kd_at_the_recipes_temperature():
    m = make("zskt", **BENCH)
    torch.manual_seed(5)
    seen = {}
    m.student.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0].detach(), s=out.detach()))
    loss = m.kd_step().item()
    t = m.teacher(seen["x"]).double() / 20.0
    s = seen["s"].double() / 20.0
    p_t = torch.softmax(t, 1)
    hand = 400.0 * (p_t * (p_t.log() - torch.log_softmax(s, 1))).sum(1).mean().item()
    assert loss == pytest.approx(hand, rel=1e-3)  # fp32 KL of near-equal distributions, times T^2 = 400


def test_dfq_defaults_are_the_benchmark_scripts():
    d = method_defaults("dfq")
    assert "recipe" not in d
    assert (d["lambda_bn"], d["lambda_onehot"], d["lambda_balance"], d["lambda_adv"]) == (1.0, 1.0, 20.0, 1.0)
    assert (d["student_steps"], d["temperature"], d["width"], d["nz"]) == (10, 20.0, 2, 256)
    assert d["generator_schedule"] == "constant"


@pytest.mark.parametrize("method", ["dafl", "zskt", "dfad"])
def test_benchmark_recipe_runs_through_the_engine(method, tiny_task, tiny_teacher, tmp_path, monkeypatch):
    from mosaic.engine import train
    monkeypatch.setitem(ENGINE_OPTS, method, {**BENCH, "student_steps": 2})
    res = train(engine_cfg(tiny_task, tiny_teacher, tmp_path, method, method))
    assert res["steps"] == 3 and res["student_updates"] == 6
    cfg = yaml.safe_load((tmp_path / method / "config.yaml").read_text())
    assert cfg[method]["recipe"] == "benchmark" and cfg[method]["width"] == 2  # the run folder says what ran


def test_list_methods_names_the_recipes(capsys):
    from mosaic.cli import main
    assert main(["list-methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["dafl"].endswith("(recipes: paper, benchmark)") and "recipes" not in lines["dfq"]


CONFIGS = sorted((Path(__file__).parents[1] / "experiments" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_resolves(path):
    cfg = resolve(yaml_path=path, method_defaults=method_defaults)
    if "_benchmark_" in path.stem:  # the benchmark table's protocol: 80,000 KD steps of 256 in all
        o = cfg[cfg["method"]]
        assert o.get("recipe", "benchmark") == "benchmark" and cfg["batch_size"] == 256
        if cfg["method"] == "deepinversion":  # every step a KD step, one batch of 256 before every 400
            assert cfg["steps"] == 80_000 and o["synth_every"] == 400 and o["pool_size"] == 200 * 256
        else:
            assert o["width"] == 2 and cfg["steps"] * o["student_steps"] == 80_000


def test_benchmark_generator_lr_is_constant_and_the_students_follows_the_run():
    m = make("dafl", **BENCH)
    cosine = lambda step, total: 0.5  # noqa: E731  (any schedule: the generator must ignore it)
    assert m.lr_lambda("generator", cosine)(7) == 1.0 and m.lr_lambda("student", cosine)(7) == 0.5
    run = make("dafl", **BENCH, generator_schedule="run")
    assert run.lr_lambda("generator", cosine)(7) == 0.5
    paper = make("dafl", **SMALL)  # the paper recipe keeps the run's schedule on both players
    assert paper.lr_lambda("generator", cosine)(7) == 0.5


def test_old_dfq_rows_pin_what_they_ran():
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
    from suite import load_spec
    for suite, row in [("cpu-small", "dfq"), ("cpu-small-datafree-s1", "dfq"), ("cpu-small-datafree-probe", "dfq-ss2")]:
        spec = load_spec(suite)[1]["methods"][row]
        assert spec["dfq.width"] == 4 and spec["dfq.generator_schedule"] == "run", suite
