"""experiments/parity.py without the reference checkout: recipe mapping, the missing-folder error, the verdicts."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
import parity  # noqa: E402
from mosaic.methods import method_defaults  # noqa: E402


def test_benchmark_settings_are_the_toolkits_benchmark_options():
    for method in parity.GENERATIVE:
        s = parity.reference_settings(method, "benchmark")
        o = method_defaults(method) if method == "dfq" else method_defaults(method, "benchmark")
        assert (s["nz"], s["lr_g"], s["kd_steps"], s["T"]) == (o["nz"], o["lr_g"], o["student_steps"],
                                                                o["temperature"])
        assert {k: s[k] for k in parity.TERMS} == {k: o[v] for k, v in parity.TERMS.items()}
    assert parity.reference_settings("dfad", "benchmark")["l1"] is True
    assert parity.reference_settings("dfq", "benchmark")["kd_steps"] == 10


def test_paper_settings_carry_ratio_weights_and_temperature():
    dafl = parity.reference_settings("dafl", "paper")
    assert dafl["kd_steps"] == 1 and dafl["oh"] == 1.0 and dafl["act"] == 0.1 and dafl["adv"] == 0.0
    # DAFL's entropy weight 5 on a log10 is 5 / ln 10 on the reference's natural log: the same loss
    p = torch.tensor([0.5, 0.3, 0.2])
    assert dafl["balance"] * (p * p.log()).sum().item() == pytest.approx(5 * (p * p.log10()).sum().item())
    zskt = parity.reference_settings("zskt", "paper")
    assert zskt["kd_steps"] == 10 and zskt["adv"] == 1.0 and zskt["T"] == 1.0
    assert sum(zskt[k] for k in ("bn", "oh", "act", "balance")) == 0.0
    assert parity.reference_settings("dfad", "paper") is None  # the reference side has nothing else to run


def test_toolkit_steps_give_the_same_student_updates():
    assert parity.toolkit_steps("dafl", "paper", 1000) == 1000
    assert parity.toolkit_steps("zskt", "paper", 1000) == 100
    assert parity.toolkit_steps("dafl", "benchmark", 1000) == 200
    assert parity.toolkit_steps("dfq", "benchmark", 1000) == 100


def test_missing_reference_says_how_to_get_it(tmp_path):
    with pytest.raises(parity.ParityError, match="git clone https://github.com/zju-vipa/Fast-Datafree"):
        parity.import_reference(tmp_path / "nowhere")


def test_reference_view_calls_like_the_reference_models():
    from mosaic.models import create_model
    net = create_model("cnn_tiny", num_classes=3).eval()
    view = parity.ReferenceView(net)
    x = torch.randn(2, 3, 16, 16)
    logits, feat = view(x, return_features=True)
    assert torch.allclose(logits, net(x)) and torch.allclose(view(x), net(x))
    assert feat.shape[0] == 2 and feat.ndim == 2


def row(method, recipe, impl, seed, top1, zero=""):
    return {"method": method, "recipe": recipe, "implementation": impl, "seed": seed, "student_top1": top1,
            "teacher_top1": 0.64, "wall_s": 1.0, "student_updates": 1000, "generator_steps": 200, "zero_terms": zero}


def test_markdown_verdicts_use_the_larger_spread_and_flag_chance(tmp_path):
    rows = [row("dafl", "benchmark", "toolkit", 0, 0.30), row("dafl", "benchmark", "toolkit", 1, 0.32),
            row("dafl", "benchmark", "reference", 0, 0.33), row("dafl", "benchmark", "reference", 1, 0.30),
            row("zskt", "benchmark", "toolkit", 0, 0.20), row("zskt", "benchmark", "reference", 0, 0.10),
            row("zskt", "benchmark", "reference-shipped", 0, 0.10, "adv"),
            row("dfad", "benchmark", "toolkit", 0, 0.20), row("dfad", "benchmark", "reference", 0, 0.25)]
    parity.write_results(rows, tmp_path / "p")
    md = (tmp_path / "p.md").read_text()
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in md.splitlines() if line.startswith("| d")
             or line.startswith("| z")}
    # toolkit 31.00 +- 1.41, reference 31.50 +- 2.12: gap -0.50 within max(1, 2.12)
    assert "31.00 ± 1.41 (2)" in lines[("dafl", "benchmark")] and "-0.50" in lines[("dafl", "benchmark")]
    assert lines[("dafl", "benchmark")].rstrip().endswith("| met |")
    assert "reference at chance" in lines[("zskt", "benchmark")]
    assert "missed (tolerance 1.00)" in lines[("dfad", "benchmark")]  # one seed each: tolerance 1.0, gap -5
    assert "zskt benchmark reference-shipped s0: adv" in md
    # a re-run replaces its CSV line instead of adding one
    parity.write_results([row("dfad", "benchmark", "toolkit", 0, 0.26)], tmp_path / "p")
    text = (tmp_path / "p.csv").read_text().splitlines()
    assert len(text) == 1 + len(rows) and "missed" not in (tmp_path / "p.md").read_text().split("| dfad")[1]
    assert math.isclose(float([x for x in text if x.startswith("dfad,benchmark,toolkit")][0].split(",")[4]), 0.26)


def test_pool_methods_take_cpu_smalls_synthesis_rate_and_one_recipe():
    assert parity.toolkit_steps("fast", "benchmark", 1000) == 1020  # 20 synthesis-only warm-up steps first
    assert parity.toolkit_steps("cmi", "benchmark", 1000) == 1000
    assert parity.reference_settings("cmi", "benchmark") == {} and parity.reference_settings("fast", "paper") is None
    # DeepInversion: the benchmark recipe (the reference has no two-phase run), no generator, every step a KD step
    assert parity.toolkit_steps("deepinversion", "benchmark", 1000) == 1000
    assert parity.reference_settings("deepinversion", "paper") is None
    items = parity.toolkit_items("deepinversion", "benchmark", 1, spec={}, teacher_dir=Path("t"), out=Path("o"))
    assert items["deepinversion.recipe"] == "benchmark" and "deepinversion.ngf" not in items
    assert items["deepinversion.synth_every"] == 250 and items["deepinversion.di_iters"] == 200
    assert items["deepinversion.pool_size"] == 1000 // 250 * parity.BATCH  # the pool keeps every batch


def test_cpu_only_shim_is_undone():
    before = torch.Tensor.cuda, torch.nn.Module.cuda
    x = torch.zeros(2)
    with parity.cpu_only():
        if not torch.cuda.is_available():
            assert x.cuda() is x and torch.nn.Linear(2, 2).cuda().weight.device.type == "cpu"
    assert (torch.Tensor.cuda, torch.nn.Module.cuda) == before


def test_planned_runs_skip_what_has_no_counterpart():
    runs = list(parity.planned(parity.METHODS, ["benchmark", "paper"], [0], parity.IMPLEMENTATIONS))
    assert ("dfad", "paper", 0, "toolkit") not in runs and ("dfq", "paper", 0, "reference") not in runs
    assert ("cmi", "benchmark", 0, "reference-shipped") not in runs and ("fast", "paper", 0, "toolkit") not in runs
    assert ("zskt", "paper", 0, "reference-shipped") in runs and ("fast", "benchmark", 0, "reference") in runs
    assert ("deepinversion", "paper", 0, "toolkit") not in runs
    assert ("deepinversion", "benchmark", 0, "reference-shipped") not in runs
    assert len(runs) == 4 * 3 + 2 * 3 + 3 * 2  # generator methods at benchmark, DAFL/ZSKT at paper, DI/CMI/Fast


def test_reference_terms_leave_the_students_batchnorm_statistics_alone():
    """The zero-term check runs after training: it must not move the student that is scored next."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                  torch.nn.LazyLinear(5)).train()
    student(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    before = {k: v.clone() for k, v in student.state_dict().items()}
    generator = torch.nn.Sequential(torch.nn.Linear(8, 3 * 8 * 8), torch.nn.Unflatten(1, (3, 8, 8)))

    def teacher(x, return_features=False):
        logits = x.flatten(1)[:, :5]
        return (logits, x.flatten(1)) if return_features else logits

    kl = lambda s, t: torch.nn.functional.kl_div(s.log_softmax(1), t.softmax(1), reduction="batchmean")  # noqa: E731
    synth = SimpleNamespace(normalizer=lambda x: x, generator=generator, student=student, criterion=kl, hooks=[])
    terms = parity.reference_terms(None, synth, teacher, {"nz": 8})
    assert set(terms) == set(parity.TERMS) and terms["adv"] < 0
    assert student.training and all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_reference_generator_weights_load_into_the_toolkits_generator():
    """--lockstep starts both sides from one generator: the reference's names map onto mosaic's Generator(width=2)."""
    from mosaic.players import Generator

    torch.manual_seed(0)
    source = Generator(nz=16, ngf=8, image_size=32, width=2)
    as_reference = {k.replace("project.", "l1.0.", 1).replace("body.", "conv_blocks.", 1): v
                    for k, v in source.state_dict().items()}
    target = Generator(nz=16, ngf=8, image_size=32, width=2)
    target.load_state_dict(parity.toolkit_generator_keys(as_reference))  # strict: every name must match
    z = torch.randn(3, 16)
    assert torch.equal(source.eval()(z), target.eval()(z))
