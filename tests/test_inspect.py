"""`mosaic inspect`: pool statistics against hand values, the advice rule against the measured cells, the command."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from mosaic.cli import main
from mosaic.pool_stats import Rule, advise, distance, load_cells, most_uncertain, pool_stats, untaught, untaught_count

from conftest import make_task


def test_pool_stats_match_a_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.05, 0.85]])
    s = pool_stats(probs, thresholds=(0.5, 0.65, 0.9))
    assert s["pool_size"] == 4 and s["num_classes"] == 3 and s["counts"] == [2, 1, 1]
    assert s["rarest_share"] == 0.25 and s["commonest_share"] == 0.5 and s["rarest_ratio"] == 0.75
    # -(0.5 ln 0.5 + 2 x 0.25 ln 0.25) / ln 3
    assert s["coverage_entropy"] == pytest.approx((0.5 * math.log(2) + 0.5 * math.log(4)) / math.log(3))
    assert s["mean_max_prob"] == pytest.approx((0.7 + 0.6 + 0.7 + 0.85) / 4)
    assert s["confident"] == {"0.5": [2, 1, 1], "0.65": [1, 1, 1], "0.9": [0, 0, 0]}


def test_a_class_never_predicted_is_a_zero_share():
    s = pool_stats(torch.tensor([[0.9, 0.1, 0.0], [0.4, 0.6, 0.0]]))
    assert s["counts"] == [1, 1, 0] and s["rarest_share"] == 0.0 and s["rarest_ratio"] == 0.0
    assert s["coverage_entropy"] == pytest.approx(math.log(2) / math.log(3))
    with pytest.raises(ValueError, match="N > 0"):
        pool_stats(torch.empty(0, 3))


def test_untaught_classes_are_those_under_a_quarter_of_a_balanced_share():
    # 1,000 images, 10 classes: a balanced share is 100 images, a quarter of it 25
    counts = [96, 19, 198, 209, 127, 132, 139, 51, 22, 7]  # the animal-only pool read by the pair's teacher
    assert untaught(counts) == [1, 8, 9]  # automobile, ship, truck
    assert untaught([126, 32, 173, 234, 52, 60, 209, 13, 76, 25]) == [7]  # 25 is not under 25
    assert untaught([10, 10, 10, 10]) == [] and untaught([40, 0, 0]) == [1, 2]
    assert untaught(counts, share=0.55) == [1, 7, 8, 9]  # horse 51 < 55
    s = pool_stats(torch.eye(4)[[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3]])  # 16 images: 4 a balanced share
    assert s["counts"] == [4, 4, 3, 5] and s["untaught"] == []
    s = pool_stats(torch.eye(4)[[0] * 8 + [1] * 7 + [3]])  # class 2 never, class 3 once (< 1 = 4 / 4)
    assert s["untaught"] == [2] and untaught_count(s) == 1
    assert untaught_count({"counts": [50, 50, 0, 0]}) == 2 and untaught_count({}) == 0


def test_a_pool_that_leaves_two_classes_out_goes_to_mosaic_whatever_the_teacher():
    """Issue 34's outside task: 10 classes, 5,000 images, two classes never predicted, a sure teacher."""
    counts = [4035, 0, 250, 130, 126, 150, 140, 0, 39, 130]  # 80.7% in one class
    stats = {**pool_stats(torch.eye(10)[sum(([i] * k for i, k in enumerate(counts)), [])]), "mean_max_prob": 0.85}
    assert sum(counts) == 5000 and untaught_count(stats) == 3  # 0, 0 and 39 < 125 (a quarter of 500)
    rule = Rule()
    method, reason = rule(stats)
    assert method == "mosaic" and "leaves 3 of the teacher's 10 classes untaught" in reason
    one = {"pool_size": 1000, "num_classes": 10, "counts": [190, 100, 100, 100, 100, 100, 100, 100, 100, 10],
           "rarest_ratio": 0.1, "mean_max_prob": 0.68, "coverage_entropy": 0.95}
    assert untaught_count(one) == 1 and rule(one)[0] == "mosaic"  # one class out: the far-pool branch says why
    assert "a far pool" in rule(one)[1] and "untaught" not in rule(one)[1].split(":")[0]
    two = rule({**one, "counts": [280, 100, 100, 100, 100, 100, 100, 100, 10, 10]})
    assert two[0] == "mosaic" and "leaves 2 of the teacher's 10 classes untaught" in two[1]
    # unlike every measured cell: still "run both", but MosaicKD first
    advice = advise(stats, cells=load_cells())
    assert advice["advice"] == "both" and advice["first"] == "mosaic"
    assert "run both, mosaic first (the pool leaves 3 of the teacher's classes untaught" in advice["text"]


def test_most_uncertain_keeps_the_highest_entropy_images_in_index_order():
    probs = torch.tensor([[0.98, 0.01, 0.01], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 1e-12], [0.9, 0.05, 0.05]])
    # entropies: ~0.11, ln 3 = 1.10, ln 2 = 0.69, ~0.39 -> the two highest are images 1 and 2
    assert most_uncertain(probs.log(), 2).tolist() == [1, 2]
    assert most_uncertain(probs.log() + 5.0, 3).tolist() == [1, 2, 3]  # logits: any shift gives the same softmax


def test_the_rule_picks_the_measured_winner_of_every_committed_cell():
    cells = load_cells()
    assert len(cells) >= 7  # the regime map's cells (one- and three-epoch teacher x 10k near, 1k near, 1k far) + WRN
    for cell in cells:
        margins = cell["margins"]
        mean = sum(margins) / len(margins)
        agree = all(m > 0 for m in margins) if mean > 0 else all(m < 0 for m in margins)
        assert cell["winner"] == ("mosaic" if mean >= 0.5 and agree else "kd_ood" if mean <= -0.5 and agree
                                  else "tie"), cell["name"]
        # the same pool measured at several budgets: the advice follows the longest one
        ref = max((c for c in cells if distance(c["stats"], cell["stats"]) == 0), key=lambda c: c["steps"])
        best = "kd_ood" if ref["winner"] == "tie" else ref["winner"]  # a tie: the cheaper method ...
        if ref["winner"] == "tie" and cell["stats"]["rarest_ratio"] < Rule().far_ratio:
            best = "mosaic"  # ... but far pools go to MosaicKD: every decisive far cell went to it
        method, _ = Rule()(cell["stats"])
        assert method == best, cell["name"]
        advice = advise(cell["stats"], cells=cells)
        assert advice["advice"] == best and advice["evidence"]["nearest_cells"][0]["distance"] == 0
        assert advice["evidence"]["nearest_cells"][0]["cell"] == ref["name"]
    assert {"mosaic", "kd_ood"} <= {c["winner"] for c in cells}  # both outcomes are in the evidence


def test_a_pool_measured_at_two_budgets_names_both():
    stats = {"pool_size": 1000, "num_classes": 10, "rarest_ratio": 0.45, "mean_max_prob": 0.6, "coverage_entropy": 0.96}
    short = {"name": "short", "steps": 400, "winner": "tie", "mosaic_minus_kd": -1.22, "margins": [0.97, -0.57, -4.05],
             "source": "a.csv", "stats": stats}
    long_ = {**short, "name": "long", "steps": 1000, "winner": "mosaic", "mosaic_minus_kd": 2.97,
             "margins": [2.28, 3.65]}
    advice = advise(stats, cells=[short, long_])
    assert [c["cell"] for c in advice["evidence"]["nearest_cells"]] == ["long", "short"]  # longest budget first
    assert "nearest measured cell long (distance 0.0, 1,000 steps, 2 seed pairs, mosaic: MosaicKD - KD +2.97" in advice[
        "text"]
    assert "the same pool statistics at 400 steps, 3 seed pairs, tie: MosaicKD - KD -1.22 points" in advice["text"]
    agreeing = advise(stats, cells=[{**short, "winner": "mosaic"}, long_])
    assert "the same pool statistics" not in agreeing["text"]  # nothing to add when the budgets agree


def test_a_pool_unlike_every_cell_gets_run_both_kd_first():
    cells = load_cells()
    stats = {**cells[0]["stats"], "pool_size": 2_000_000}  # 10^6.3 images: far beyond every measured pool
    assert min(distance(stats, c["stats"]) for c in cells) > 2
    advice = advise(stats, cells=cells)
    assert advice["advice"] == "both" and "kd_ood first" in advice["text"] and "unlike every measured cell" in advice[
        "text"]
    assert advice["first"] == "kd_ood"  # the pool covers the teacher's classes


def test_rule_thresholds_on_hand_made_pools():
    base = {"pool_size": 10_000, "num_classes": 10, "rarest_ratio": 0.45, "mean_max_prob": 0.6,
            "coverage_entropy": 0.98}
    rule = Rule()
    assert rule(base)[0] == "kd_ood"  # large, covered
    assert rule({**base, "rarest_ratio": 0.1, "mean_max_prob": 0.5})[0] == "mosaic"  # far pool, unsure teacher
    assert rule({**base, "rarest_ratio": 0.1})[0] == "mosaic"  # far pool, sure teacher: the pair's far cell
    assert rule({**base, "rarest_ratio": 0.1, "pool_size": 1000, "mean_max_prob": 0.5})[0] == "mosaic"
    assert rule({**base, "pool_size": 1000})[0] == "mosaic"  # small, teacher sure
    assert rule({**base, "pool_size": 1000, "mean_max_prob": 0.5})[0] == "kd_ood"  # small, teacher unsure


# ----------------------------------------------------------------------------- the command

def inspect_args(tiny_task, tiny_teacher, out: Path, *extra: str) -> list[str]:
    return ["inspect", f"teacher={tiny_teacher}", f"ood={tiny_task['ood']}", "data.image_size=16", "cpu=true",
            "data.cache=false", "progress=false", f"out={out}", *extra]


def test_inspect_writes_json_png_and_ends_with_advice(tiny_task, tiny_teacher, tmp_path, capsys):
    out = tmp_path / "insp"
    assert main(inspect_args(tiny_task, tiny_teacher, out, f"test={tiny_task['task']}", "data.ood_select=20")) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("advice: ")
    report = json.loads((out / "inspect.json").read_text())
    for key in ("pool_size", "classes", "counts", "rarest_share", "commonest_share", "coverage_entropy",
                "mean_max_prob", "confident", "advice", "evidence"):
        assert key in report, key
    assert report["pool_size"] == 48 and sum(report["counts"]) == 48 and len(report["classes"]) == 3
    assert report["advice"] in ("mosaic", "kd_ood", "both")
    assert report["ood_select"]["keep"] == 20 and sum(report["ood_select"]["counts"]) == 20

    # the counts are the teacher's argmax, worked out here without the command's code
    from mosaic.data import load_image_set
    from mosaic.models import load_model
    model, meta = load_model(tiny_teacher)
    pool = load_image_set(str(tiny_task["ood"]), split="train", image_size=16, channels=3, labelled=False,
                          cache=False)
    x = (pool.images.float() / 255 - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    assert torch.bincount(pred, minlength=3).tolist() == report["counts"]
    # the in-domain test set beside it: colour classes the teacher knows well
    assert report["test"]["pool_size"] == 36 and report["test"]["teacher_top1"] > 0.6
    png = Image.open(out / "inspect.png").convert("RGB")
    assert png.size[0] >= 400 and png.size[1] >= 300
    from mosaic.inspect_figure import POOL, TEST
    colours = {c for _, c in png.getcolors(maxcolors=1 << 20)}
    assert POOL in colours and TEST in colours  # the pool's bars and the test set's beside them

    assert main(inspect_args(tiny_task, tiny_teacher, out)) == 2  # an existing report is not overwritten silently
    assert "overwrite=true" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no_teacher", "missing_teacher", "missing_pool", "class_mismatch"])
def test_inspect_errors_are_one_line_and_leave_no_folder(case, tiny_task, tiny_teacher, tmp_path, capsys):
    out = tmp_path / "insp"
    args = inspect_args(tiny_task, tiny_teacher, out)
    if case == "no_teacher":
        args = [a for a in args if not a.startswith("teacher=")]
    elif case == "missing_teacher":
        args = [a if not a.startswith("teacher=") else f"teacher={tmp_path / 'none.safetensors'}" for a in args]
    elif case == "missing_pool":
        args = [a if not a.startswith("ood=") else f"ood={tmp_path / 'no-pool'}" for a in args]
    else:  # a 2-class test set beside a 3-class teacher
        other = make_task(tmp_path / "two", classes=2, train=2, test=2, ood=1)
        args.append(f"test={other['task']}")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()


def test_inspect_takes_a_bare_state_dict_with_its_normalisation(tiny_task, tiny_teacher, tmp_path):
    from safetensors.torch import load_file
    meta = json.loads(tiny_teacher.with_suffix(".json").read_text())
    bare = tmp_path / "teacher.pt"
    torch.save(load_file(tiny_teacher), bare)
    args = inspect_args(tiny_task, bare, tmp_path / "bare", f"teacher.arch={meta['arch']}",
                        f"teacher.num_classes={meta['num_classes']}", f"teacher.mean={json.dumps(meta['mean'])}",
                        f"teacher.std={json.dumps(meta['std'])}")
    assert main(args) == 0
    assert main(inspect_args(tiny_task, tiny_teacher, tmp_path / "pair")) == 0
    a, b = (json.loads((tmp_path / d / "inspect.json").read_text()) for d in ("bare", "pair"))
    assert a["counts"] == b["counts"] and a["mean_max_prob"] == pytest.approx(b["mean_max_prob"], abs=1e-6)
    assert a["normalisation"]["source"] == "teacher.mean/std"
