"""`mosaic inspect`: one teacher pass over an OOD pool (and the in-domain test set) before any distillation.

Writes DIR/inspect.json (mosaic/pool_stats.py's statistics, the advice and its evidence) and DIR/inspect.png
(class histograms, the top-probability histogram, and per class the pool images the teacher is surest of),
and returns the short report the command prints, ending in the `advice:` line.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from mosaic.augment import normalize, to_float
from mosaic.data import ImageSet, load_split
from mosaic.engine.folder import RunError
from mosaic.engine.task import check_checkpoints, check_task, load_teacher, teacher_normalization
from mosaic.pool_stats import UNTAUGHT_SHARE, advise, most_uncertain, pool_stats
from mosaic.precision import full_precision

PER_CLASS = 8  # pool images shown per class in inspect.png


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, images: ImageSet, *, mean: tuple, std: tuple, batch_size: int,
                   progress: bool, device: torch.device) -> Tensor:
    """fp32 logits (N, C) of the frozen teacher over a set's uint8 images, in batches, with a progress bar."""
    from tqdm.auto import tqdm

    teacher = teacher.to(device).eval()
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=f"teacher on {images.name}", disable=not progress,
                  leave=False):
        x = normalize(to_float(images.images[i:i + batch_size].to(device)), mean, std)
        with full_precision():
            out.append(teacher(x).float().cpu())
    return torch.cat(out)


def class_names(meta: dict, test: ImageSet | None, num_classes: int) -> list[str]:
    """The teacher's class names: its model.json, else the test set's, else the indices."""
    for names in (meta.get("classes"), test.classes if test is not None else None):
        if names and len(names) == num_classes:
            return list(names)
    return [str(i) for i in range(num_classes)]


def inspect_pool(cfg: dict, out: Path) -> dict:
    """Run the teacher over cfg's pool (and test set when set), write out/inspect.{json,png}; returns inspect.json."""
    d = cfg["data"]
    if not cfg["teacher"]["checkpoint"]:
        raise RunError("inspect needs a teacher: pass teacher=<model.safetensors, run folder or state_dict file>")
    if not d["ood"]:
        raise RunError("inspect needs a pool of images: pass ood=<folder or data set>")
    check_checkpoints(cfg)
    sets = {"ood": load_split(cfg, "ood")}
    if d["test"]:
        sets["test"] = load_split(cfg, "test")
    if len(sets["ood"]) == 0:
        raise RunError(f"the pool '{sets['ood'].name}' holds no images")
    teacher, meta = load_teacher(cfg, sets, required=True)
    num_classes = check_task(cfg, sets, meta)
    mean, std, norm_source = teacher_normalization(cfg, sets, teacher, meta)
    device = torch.device("cpu") if cfg["cpu"] or not torch.cuda.is_available() else torch.device("cuda")
    run = dict(mean=mean, std=std, batch_size=cfg["eval_batch_size"], progress=cfg["progress"], device=device)
    logits = teacher_logits(teacher, sets["ood"], **run)
    probs = torch.softmax(logits, dim=1)
    if probs.shape[1] != num_classes:
        raise RunError(f"the teacher gives {probs.shape[1]} outputs but the task has {num_classes} classes")
    names = class_names(meta, sets.get("test"), num_classes)
    report = {"teacher": str(cfg["teacher"]["checkpoint"]), "pool": sets["ood"].name, "classes": names,
              "normalisation": {"mean": list(mean), "std": list(std), "source": norm_source},
              **pool_stats(probs)}
    test_probs = None
    if "test" in sets:
        test_probs = torch.softmax(teacher_logits(teacher, sets["test"], **run), dim=1)
        ref = pool_stats(test_probs)
        if sets["test"].labels is not None:
            ref["teacher_top1"] = float((test_probs.argmax(1) == sets["test"].labels).double().mean())
        report["test"] = {"name": sets["test"].name, **ref}
    keep = d.get("ood_select")
    if keep:
        kept = most_uncertain(logits, min(int(keep), len(probs)))  # what select_ood keeps
        report["ood_select"] = {"keep": len(kept), **pool_stats(probs[kept])}
    report.update(advise(report))
    out.mkdir(parents=True, exist_ok=True)  # only once everything above has worked: an error leaves no folder
    (out / "inspect.json").write_text(json.dumps(report, indent=2) + "\n")
    from mosaic.inspect_figure import inspect_figure
    inspect_figure(report, sets["ood"], probs, test_probs, out / "inspect.png", per_class=PER_CLASS)
    return report


def text_report(report: dict) -> str:
    """The few lines `mosaic inspect` prints, ending in `advice: ...`."""
    def line(stats: dict, what: str) -> str:
        return (f"{what}: {stats['pool_size']} images; teacher's classes rarest {100 * stats['rarest_share']:.1f}% "
                f"commonest {100 * stats['commonest_share']:.1f}% (balanced {100 / stats['num_classes']:.1f}%), "
                f"coverage entropy {stats['coverage_entropy']:.3f}, mean top probability {stats['mean_max_prob']:.3f}")
    lines = [line(report, f"pool {report['pool']}")]
    if "test" in report:
        t = report["test"]
        top1 = f", teacher top-1 {100 * t['teacher_top1']:.2f}%" if "teacher_top1" in t else ""
        lines.append(line(t, f"in-domain {t['name']}") + top1)
    rare = sorted(range(len(report["counts"])), key=lambda i: report["counts"][i])[:3]
    lines.append("rarest classes in the pool: " + ", ".join(
        f"{report['classes'][i]} {report['counts'][i]} ({report['confident']['0.9'][i]} above 0.9)" for i in rare))
    missing = report.get("untaught", [])
    if missing:
        lines.append(f"classes the pool cannot teach (each under {UNTAUGHT_SHARE} of a balanced share): " + ", ".join(
            f"{report['classes'][i]} {report['counts'][i]}" for i in missing))
    if "ood_select" in report:
        k = report["ood_select"]
        lines.append(f"data.ood_select={k['keep']} keeps the most uncertain images: rarest class "
                     f"{100 * k['rarest_share']:.1f}%, commonest {100 * k['commonest_share']:.1f}%, counts {k['counts']}")
    near = report["evidence"]["nearest_cells"]
    if near:
        lines.append("nearest measured cells: " + "; ".join(
            f"{c['cell']} (distance {c['distance']}, " + ("a tie" if c["winner"] == "tie" else f"{c['winner']} won")
            + ")" for c in near))
    lines.append(f"advice: {report['text']}")
    return "\n".join(lines)
