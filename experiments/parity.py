"""Side by side with the public reference: DAFL, ZSKT, DFAD, DFQ, DeepInversion, CMI and Fast in Fast-Datafree and here.

Both sides get the same teacher, student architecture, generator width, normalisation, student optimiser and
schedule, student budget and evaluation (the full test set through `mosaic evaluate`'s code), at `cpu-small`'s
scale: the cnn_small teacher (trained by the cpu-small suite if its folder is missing), a cnn_tiny student,
1,000 student updates of 64 images. The reference's own classes do the generator's work (its `Generator`,
`GenerativeSynthesizer`, `DeepInvSyntheiszer`, `CMISynthesizer`, `FastMetaSynthesizer`, `Normalizer` and
`KLDiv`) and the KD loop mirrors its `datafree_kd.train`; nothing of it is copied here: it is imported from the
folder you fetched. DeepInversion (`recipe=benchmark`), CMI and Fast run at cpu-small's synthesis rate
(CMI one batch of 64 every 125 KD steps, Fast 20 warm-up syntheses then one every 25, DeepInversion one every 250
with 200 Adam steps on the pixels instead of the script's 1,000, for time), their pools written as PNGs and
read back through the reference's CIFAR train transform, as its driver does; its CUDA-only calls
(`Generator.clone`, the FOMAML gradient) are made no-ops on a CPU.

    git clone https://github.com/zju-vipa/Fast-Datafree ../Fast-Datafree
    python experiments/parity.py --reference ../Fast-Datafree --check          # the harness checks, ~1 min
      (the first call trains cpu-small's teacher into runs/demo-teacher, ~8 min on 2 cores; the reference needs
      `pip install termcolor`)
    python experiments/parity.py --reference ../Fast-Datafree --methods dafl zskt --seeds 0 1
    python experiments/parity.py --reference ../Fast-Datafree --methods zskt --seeds 0 --lockstep   # trace a gap

Up to three implementations per (method, recipe, seed), one CSV line each in experiments/results/parity-cpu-small.csv:
`toolkit` (`mosaic distill`), `reference` (the reference's classes with the real student in the adversarial
term and the KD loss at the recipe's temperature: what its scripts say) and `reference-shipped` (wired as its
datafree_kd.py wires these four methods: the synthesiser's "student" is the teacher, which zeroes the
adversarial term, and KD runs at T=1, or L1 for DFAD). Recipes: `benchmark` (the scripts' ratio, weights and
temperature, all four methods) and `paper` where the reference's options can express the original code's
ratio, weights and temperature (DAFL, ZSKT; DFAD's paper settings are the benchmark's on the reference side;
DFQ, CMI and Fast have one recipe, `benchmark`; DeepInversion's `paper` recipe is the official code's two
phases, which the reference does not run; the pool methods have no `reference-shipped`: the driver wires them
as their scripts say). What the reference cannot express stays as the reference does it: its sigmoid generator,
fresh images for every KD step, an SGD student without ZSKT's attention term.

Checks, run first every time: the teacher's top-1 through the reference's calling convention and Normalizer
equals the toolkit's; after each run every generator term with a non-zero weight is non-zero (a zero term is
recorded in `zero_terms`, and aborts a `reference` or `toolkit` run: it would be no evidence; checked for the
generator-loop methods).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from suite import as_overrides, ensure_teacher, load_spec, mean_std, suite_data  # noqa: E402

GENERATIVE = ("dafl", "zskt", "dfad", "dfq")  # the reference's GenerativeSynthesizer loop
POOL = ("deepinversion", "cmi", "fast")        # synthesised pools (DeepInvSyntheiszer, CMISynthesizer, FastMeta...)
ONE_RECIPE = ("dfq", "cmi", "fast")            # methods whose defaults are the benchmark scripts'
METHODS = (*GENERATIVE, *POOL)
IMPLEMENTATIONS = ("toolkit", "reference", "reference-shipped")
COLUMNS = ["method", "recipe", "implementation", "seed", "student_top1", "teacher_top1", "wall_s",
           "student_updates", "generator_steps", "zero_terms"]
UPDATES, BATCH, NGF = 1000, 64, 32  # cpu-small's student budget and generator width
ZERO = 1e-6  # a term below this is zero (KL of two identical fp32 softmaxes rounds to about 1e-8)
TERMS = {"bn": "lambda_bn", "oh": "lambda_onehot", "act": "lambda_act", "balance": "lambda_balance",
         "adv": "lambda_adv"}  # the reference's weights and the toolkit options they come from


class ParityError(RuntimeError):
    """The harness cannot run as asked (reference folder missing, a check failed)."""


# ----------------------------------------------------------------------------- the recipes

def toolkit_recipe(method: str, recipe: str) -> dict:
    """The toolkit's resolved options of `method` at `recipe` (DFQ: its one recipe)."""
    from mosaic.methods import method_defaults
    return method_defaults(method) if method in ONE_RECIPE else method_defaults(method, recipe)


def reference_settings(method: str, recipe: str) -> dict | None:
    """What the reference's GenerativeSynthesizer and KD loop get for `method` at `recipe`; None: not expressible.

    Benchmark: the toolkit's benchmark options, term by term. Paper: the original code's ratio, weights and
    temperature on the reference's own generator (DAFL's log10 entropy weight becomes its natural-log
    equivalent, 5 / ln 10; ZSKT's adversary alone at 10 student steps).
    """
    if method in POOL:
        return {} if recipe == "benchmark" else None  # run from the toolkit's resolved options (run_reference_pool)
    if recipe == "benchmark" or method == "dfq":
        o = toolkit_recipe(method, "benchmark")
        return {"nz": o["nz"], "lr_g": o["lr_g"], "kd_steps": o["student_steps"], "T": o["temperature"],
                "l1": o["adversary"] == "l1", **{k: o[v] for k, v in TERMS.items()}}
    o = toolkit_recipe(method, "paper")
    zero = dict.fromkeys(TERMS, 0.0)
    if method == "dafl":
        return {"nz": o["nz"], "lr_g": 1e-3, "kd_steps": 1, "T": o["temperature"], "l1": False,
                **zero, "oh": o["lambda_onehot"], "act": o["lambda_act"], "balance": o["lambda_ie"] / math.log(10)}
    if method == "zskt":
        return {"nz": o["nz"], "lr_g": o["lr_g"], "kd_steps": o["student_steps"], "T": o["temperature"],
                "l1": False, **zero, "adv": 1.0}
    return None  # dfad: the reference's paper settings are its benchmark ones


def synthesis_iterations(method: str, o: dict) -> int:
    """Optimiser steps per synthesis of a pool method: DeepInversion's pixel steps, CMI's and Fast's g_steps."""
    return o["di_iters"] if method == "deepinversion" else o["g_steps"]


def toolkit_steps(method: str, recipe: str, updates: int) -> int:
    """Engine steps giving `updates` student updates (DAFL's paper recipe: one per step; pools: plus warm-up)."""
    o = toolkit_recipe(method, recipe)
    if method in POOL:
        return updates + POOL_RATES[method].get("warmup", o.get("warmup", 0))
    return updates // o.get("student_steps", 1)


POOL_RATES = {"cmi": {"synth_every": 125}, "fast": {"synth_every": 25, "warmup": 20},  # cpu-small's rows
              # DeepInversion: 4 batches of 200 pixel steps (1,000 would take ~40 min a run on 2 cores), pool keeps all
              "deepinversion": {"synth_every": 250, "pool_size": 256, "di_iters": 200}}


# ----------------------------------------------------------------------------- the reference

def import_reference(folder: Path):
    """The reference's `datafree` package, imported from `folder` (never copied here)."""
    if not (folder / "datafree" / "synthesis" / "generative.py").is_file():
        raise ParityError(f"no Fast-Datafree checkout at {folder}: run `git clone "
                          f"https://github.com/zju-vipa/Fast-Datafree {folder}` (or pass --reference PATH)")
    sys.path.insert(0, str(folder.resolve()))
    try:
        import datafree
    except ImportError as err:
        raise ParityError(f"the reference at {folder} needs a package this environment lacks ({err}); "
                          f"`pip install` it into this environment (termcolor is the one mosaic-kd lacks)") from None
    # its models package imports classifiers written for an old torchvision; the generator needs torch alone
    spec = importlib.util.spec_from_file_location("datafree_generator", folder / "datafree" / "models" / "generator.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    datafree.reference_generator = generator
    return datafree


class ReferenceView(nn.Module):
    """A timm-style classifier called as the reference calls its models: net(x) or net(x, return_features=True)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, return_features: bool = False):
        fmap = self.net.forward_features(x)
        logits = self.net.forward_head(fmap)
        return (logits, self.net.forward_head(fmap, pre_logits=True)) if return_features else logits


def reference_teacher(ref, teacher_dir: Path) -> tuple[nn.Module, object, dict]:
    """The frozen teacher as the reference calls it, the reference's Normalizer at its statistics, and its meta."""
    from mosaic.models import freeze, load_classifier
    net, meta = load_classifier(teacher_dir / "model.safetensors")
    return ReferenceView(freeze(net)), ref.utils.Normalizer(mean=meta["mean"], std=meta["std"]), meta


def save_and_score(student: nn.Module, folder: Path, cfg: dict, meta: dict) -> dict:
    """Save the reference-trained student as a toolkit model and score it with the toolkit's evaluation."""
    from mosaic.models import save_model
    folder.mkdir(parents=True, exist_ok=True)
    save_model(student.eval(), folder, meta={"arch": cfg["student"]["arch"], "num_classes": meta["num_classes"],
                                             "in_chans": 3, "image_size": meta["image_size"],
                                             "mean": meta["mean"], "std": meta["std"]})
    return evaluate_folder(folder, cfg)


def top1_through(model: nn.Module, normalizer, test) -> float:
    """A classifier's top-1 on a uint8 test split scaled to [0, 1] (as ToTensor) and normalised by the reference's
    Normalizer, in eval mode (its mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pred = torch.cat([model(normalizer(test.images[i:i + 500].float() / 255)).argmax(1)
                              for i in range(0, len(test), 500)])
    finally:
        model.train(was_training)
    return (pred == test.labels).float().mean().item()


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def kd_update(student: nn.Module, teacher: nn.Module, images: torch.Tensor, kd: nn.Module,
              opt: torch.optim.Optimizer) -> None:
    """One student update as the reference's datafree_kd.train makes it."""
    with torch.no_grad():
        t_out = teacher(images)
    loss = kd(student(images.detach()), t_out.detach())
    opt.zero_grad()
    loss.backward()
    opt.step()


def reference_terms(ref, synth, teacher, settings: dict) -> dict[str, float]:
    """Each weighted generator term of the reference's objective on a fresh batch, as its synthesize() computes it.

    The student runs in eval mode, as in synthesize(): a train-mode forward would move the BatchNorm statistics
    of the student about to be scored (by up to a point of top-1 at cpu-small).
    """
    was_training = synth.student.training
    synth.student.eval()
    try:
        with torch.no_grad():
            z = torch.randn(BATCH, settings["nz"])
            x = synth.normalizer(synth.generator(z))
            t_out, t_feat = teacher(x, return_features=True)
            p = F.softmax(t_out, dim=1).mean(0)
            s_out = synth.student(x)
            adv = -(synth.criterion(s_out, t_out))
    finally:
        synth.student.train(was_training)
    return {"bn": float(sum(h.r_feature for h in synth.hooks)), "oh": F.cross_entropy(t_out, t_out.argmax(1)).item(),
            "act": -t_feat.abs().mean().item(), "balance": (p * p.log()).sum().item(), "adv": float(adv)}


def reference_synthesizer(ref, settings: dict, *, teacher: nn.Module, student: nn.Module, normalizer,
                          image_size: int, shipped: bool = False) -> tuple[object, nn.Module]:
    """The reference's GenerativeSynthesizer (its own Generator at ngf NGF) and KD criterion for `settings`."""
    generator = ref.reference_generator.Generator(nz=settings["nz"], ngf=NGF, img_size=image_size, nc=3)
    adversary = torch.nn.L1Loss() if settings["l1"] else ref.criterions.KLDiv()
    synth = ref.synthesis.GenerativeSynthesizer(
        teacher=teacher, student=teacher if shipped else student, generator=generator, nz=settings["nz"],
        img_size=(3, image_size, image_size), iterations=1, lr_g=settings["lr_g"],
        synthesis_batch_size=BATCH, sample_batch_size=BATCH, adv=settings["adv"], bn=settings["bn"],
        oh=settings["oh"], act=settings["act"], balance=settings["balance"], criterion=adversary,
        normalizer=normalizer, device="cpu")
    if settings["l1"]:
        return synth, torch.nn.L1Loss()
    return synth, ref.criterions.KLDiv(T=1.0 if shipped else settings["T"])


def toolkit_generator_keys(reference_state: dict) -> dict:
    """The reference Generator's state dict under `mosaic.players.Generator`'s names (l1.0 -> project,
    conv_blocks -> body: the same layers at the same indices)."""
    return {k.replace("l1.0.", "project.", 1).replace("conv_blocks.", "body.", 1): v
            for k, v in reference_state.items()}


def lockstep(ref, *, method: str, seed: int, teacher_dir: Path, cfg: dict, every: int = 50) -> list[dict]:
    """Both implementations of a benchmark-loop method from the same generator and student weights and the same
    noise each round (the RNG re-seeded per round on both sides); per round the largest parameter differences,
    every `every` rounds both students' top-1. Where the two stay equal up to float rounding, a gap between whole
    runs is seed noise, not an implementation difference."""
    import copy

    from accelerate import Accelerator

    from mosaic.data import load_split
    from mosaic.engine.schedule import lr_factor
    from mosaic.methods import Context, get_method, sgd
    from mosaic.models import create_model

    settings, o = reference_settings(method, "benchmark"), cfg[method]
    teacher_ref, normalizer, meta = reference_teacher(ref, teacher_dir)  # its frozen net is the toolkit's teacher too
    # (the reference's BN hooks then also fire on the toolkit's forwards: extra statistics, no effect on either)
    torch.manual_seed(seed)
    student = create_model(cfg["student"]["arch"], num_classes=meta["num_classes"])
    student_ref = copy.deepcopy(student)
    rounds = cfg["steps"]
    ctx = Context(cfg=cfg, opts=o, teacher=teacher_ref.net, student=student, num_classes=meta["num_classes"],
                  image_size=meta["image_size"], channels=3, mean=torch.tensor(meta["mean"]),
                  std=torch.tensor(meta["std"]), device=torch.device("cpu"), accelerator=Accelerator(cpu=True),
                  steps=rounds, batch_size=BATCH)
    method_obj = get_method(method)(ctx)
    synth, kd = reference_synthesizer(ref, settings, teacher=teacher_ref, student=student_ref, normalizer=normalizer,
                                      image_size=meta["image_size"])
    method_obj.generator.load_state_dict(toolkit_generator_keys(synth.generator.state_dict()))
    opt_ref = sgd(student_ref.parameters(), cfg["student"])
    factor = lambda i: lr_factor(i, rounds, kind=cfg["schedule"], warmup=float(cfg["warmup"]))  # noqa: E731
    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in (method_obj.student_opt, opt_ref)]
    test = load_split(cfg, "test", image_size=meta["image_size"], channels=3)

    def largest_difference(a: dict, b: dict) -> float:
        return max((x - b[k]).abs().max().item() for k, x in a.items() if x.dtype.is_floating_point)

    method_obj.generator.train()
    student.train()
    trace = []
    for r in range(rounds):
        torch.manual_seed(1000 * seed + r)
        method_obj.generative_step()
        torch.manual_seed(1000 * seed + r)
        synth.synthesize()
        student_ref.train()
        for _ in range(settings["kd_steps"]):
            kd_update(student_ref, teacher_ref, synth.sample()[0], kd, opt_ref)
        for sched in scheds:
            sched.step()
        row = {"round": r + 1,
               "generator": largest_difference(method_obj.generator.state_dict(),
                                               toolkit_generator_keys(synth.generator.state_dict())),
               "student": largest_difference(student.state_dict(), student_ref.state_dict())}
        if (r + 1) % every == 0 or r + 1 == rounds:
            row.update(toolkit_top1=top1_through(student, normalizer, test),
                       reference_top1=top1_through(student_ref, normalizer, test))
        print(f"[lockstep] {row}", flush=True)
        trace.append(row)
    return trace


def run_reference(ref, *, method: str, recipe: str, seed: int, shipped: bool, teacher_dir: Path, cfg: dict,
                  out: Path, updates: int = UPDATES) -> dict:
    """Train a student with the reference's generator loop; its top-1 by the toolkit's evaluation."""
    from mosaic.engine.schedule import lr_factor
    from mosaic.methods import sgd
    from mosaic.models import create_model

    settings = reference_settings(method, recipe)
    seed_all(seed)
    teacher, normalizer, meta = reference_teacher(ref, teacher_dir)
    student = create_model(cfg["student"]["arch"], num_classes=meta["num_classes"])
    synth, kd = reference_synthesizer(ref, settings, teacher=teacher, student=student, normalizer=normalizer,
                                      image_size=meta["image_size"], shipped=shipped)
    opt = sgd(student.parameters(), cfg["student"])  # the toolkit's student optimizer, as its runs get
    rounds = updates // settings["kd_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda r: lr_factor(r, rounds, kind=cfg["schedule"],
                                                                      warmup=float(cfg["warmup"])))
    start = time.time()
    for _ in range(rounds):  # datafree_kd.py: synthesize (g_steps), then train (kd_steps)
        synth.synthesize()
        student.train()
        for _ in range(settings["kd_steps"]):
            kd_update(student, teacher, synth.sample()[0], kd, opt)
        sched.step()  # the toolkit steps its schedule once per engine step (one generator step and its KD)
    wall = time.time() - start
    terms = reference_terms(ref, synth, teacher, settings)
    zero = [k for k in TERMS if settings[k] and abs(terms[k]) < ZERO]
    scores = save_and_score(student, out / f"parity-{method}-{recipe}-{'shipped' if shipped else 'reference'}-s{seed}",
                            cfg, meta)
    return {"student_top1": scores["student_top1"], "teacher_top1": scores["teacher_top1"], "wall_s": round(wall, 1),
            "student_updates": rounds * settings["kd_steps"], "generator_steps": rounds, "zero_terms": " ".join(zero)}


@contextlib.contextmanager
def cpu_only():
    """The reference's CUDA-only calls (`.cuda()` in Generator.clone and the FOMAML gradient) as no-ops without CUDA."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.cuda, nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved


def run_reference_pool(ref, *, method: str, seed: int, teacher_dir: Path, cfg: dict, out: Path,
                       updates: int = UPDATES) -> dict:
    """DeepInversion, CMI or Fast through the reference's synthesiser and pool, at the toolkit run's options."""
    import shutil

    from torchvision import transforms as T

    from mosaic.engine.schedule import lr_factor
    from mosaic.methods import sgd
    from mosaic.models import create_model

    o = cfg[method]
    seed_all(seed)
    teacher, normalizer, meta = reference_teacher(ref, teacher_dir)
    size, classes = meta["image_size"], meta["num_classes"]
    student = create_model(cfg["student"]["arch"], num_classes=classes)
    transform = T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(meta["mean"], meta["std"])])  # registry.py's CIFAR train transform
    folder = out / f"parity-{method}-benchmark-reference-s{seed}"
    pool_dir = folder / "pool"
    shutil.rmtree(pool_dir, ignore_errors=True)  # the reference reads every image in its folder
    iterations = synthesis_iterations(method, o)
    if method == "deepinversion":  # datafree_kd.py's call: no TV or L2 prior
        synth = ref.synthesis.DeepInvSyntheiszer(
            teacher, student, classes, (3, size, size), iterations=iterations, lr_g=o["lr"],
            synthesis_batch_size=BATCH, sample_batch_size=BATCH, adv=o["competition"], bn=o["lambda_bn"],
            oh=o["lambda_ce"], tv=0.0, l2=0.0, save_dir=str(pool_dir), transform=transform, normalizer=normalizer,
            device="cpu")
    else:
        generator = ref.reference_generator.Generator(nz=o["nz"], ngf=o["ngf"], img_size=size, nc=3)
        common = dict(nz=o["nz"], num_classes=classes, img_size=(3, size, size), init_dataset=None,
                      iterations=iterations, lr_g=o["lr_g"], synthesis_batch_size=BATCH, sample_batch_size=BATCH,
                      adv=o["lambda_adv"], bn=o["lambda_bn"], oh=o["lambda_oh"], save_dir=str(pool_dir),
                      transform=transform, normalizer=normalizer, device="cpu")
    if method == "cmi":
        synth = ref.synthesis.CMISynthesizer(teacher, student, generator, feature_reuse=False, feature_layers=None,
                                             bank_size=o["bank_size"], n_neg=o["n_neg"], head_dim=o["head_dim"],
                                             progressive_scale=False, cr=o["lambda_cr"], cr_T=o["cr_temperature"],
                                             **common)
    elif method == "fast":
        synth = ref.synthesis.FastMetaSynthesizer(teacher, student, generator, lr_z=o["lr_z"], warmup=o["warmup"],
                                                  reset_l0=1, reset_bn=0, bn_mmt=o["bn_momentum"],
                                                  is_maml=int(o["meta"] == "fomaml"), **common)
    kd = ref.criterions.KLDiv(T=o["temperature"])
    opt = sgd(student.parameters(), cfg["student"])  # the toolkit's student optimizer, as its runs get
    warm, every = o.get("warmup", 0), o["synth_every"]
    total = warm + updates  # the toolkit's engine steps: warm-up syntheses, then one KD update each
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, total, kind=cfg["schedule"],
                                                                      warmup=float(cfg["warmup"])))
    start, done, syntheses = time.time(), 0, 0
    with cpu_only():
        for _ in range(warm):
            synth.synthesize()
            syntheses += 1
            sched.step()
        while done < updates:
            synth.synthesize()
            syntheses += 1
            student.train()
            for _ in range(min(every, updates - done)):
                kd_update(student, teacher, synth.sample(), kd, opt)
                sched.step()
                done += 1
    wall = time.time() - start
    scores = save_and_score(student, folder, cfg, meta)
    return {"student_top1": scores["student_top1"], "teacher_top1": scores["teacher_top1"], "wall_s": round(wall, 1),
            "student_updates": done, "generator_steps": syntheses * iterations, "zero_terms": ""}


# ----------------------------------------------------------------------------- the toolkit

def toolkit_items(method: str, recipe: str, seed: int, *, spec: dict, teacher_dir: Path, out: Path,
                  updates: int = UPDATES) -> dict:
    """The `mosaic distill` overrides of a toolkit run: cpu-small's common section, the method at `recipe`."""
    items = {**suite_data(spec), **spec.get("common", {}), "method": method, "seed": seed,
             "steps": toolkit_steps(method, recipe, updates),
             "teacher": str(teacher_dir / "model.safetensors"), "out_dir": str(out),
             "name": f"parity-{method}-{recipe}-toolkit-s{seed}", "overwrite": True, "ckpt_every": 0,
             "eval_every": 0}  # one evaluation at the end, as the reference side
    if "ngf" in toolkit_recipe(method, recipe):  # DeepInversion optimises pixels: no generator
        items[f"{method}.ngf"] = NGF
    if method not in ONE_RECIPE:
        items[f"{method}.recipe"] = recipe
    items.update({f"{method}.{k}": v for k, v in POOL_RATES.get(method, {}).items()})
    return items


def run_toolkit(method: str, cfg: dict) -> dict:
    """Train the student with `mosaic distill`'s code on the resolved `cfg`; its top-1 and the non-zero-term check."""
    from baselines.datafree.generative import WEIGHTS
    from mosaic.engine import train

    res = train(cfg)
    o = cfg[method]
    losses = res["final_losses"]  # a term whose weight option the method lacks (ZSKT's, DFAD's g_adv) always counts
    zero = [k for k, w in {**WEIGHTS, "g_ie": "lambda_ie"}.items()
            if k in losses and o.get(w, 1.0) and abs(losses[k]) < ZERO]
    if method in POOL:  # DeepInversion's results are prefixed di_
        g_steps = res[f"{'di' if method == 'deepinversion' else method}_syntheses"] * synthesis_iterations(method, o)
    else:
        g_steps = res["steps"]
    return {"student_top1": res["student_top1"], "teacher_top1": res.get("teacher_top1"), "wall_s": res["wall_s"],
            "student_updates": res["student_updates"], "generator_steps": g_steps, "zero_terms": " ".join(zero)}


def evaluate_folder(folder: Path, cfg: dict) -> dict:
    """The toolkit's evaluation (`mosaic evaluate`) of a saved student against cfg's teacher."""
    from mosaic.engine.evaluation import evaluate
    return evaluate(str(folder), cfg)


# ----------------------------------------------------------------------------- checks

def check_teacher(ref, teacher_dir: Path, cfg: dict) -> float:
    """The teacher's top-1 through ReferenceView and the reference's Normalizer must equal the toolkit's."""
    from mosaic.data import load_split

    toolkit = evaluate_folder(teacher_dir, cfg)["student_top1"]
    view, norm, meta = reference_teacher(ref, teacher_dir)
    test = load_split(cfg, "test", image_size=meta["image_size"], channels=3)
    through = top1_through(view, norm, test)
    if abs(through - toolkit) > 1e-4:
        raise ParityError(f"the teacher scores {through:.4f} through the harness but {toolkit:.4f} in the toolkit: "
                          f"the harness's normalisation or calling convention is wrong")
    print(f"[parity] teacher top-1 {toolkit:.4f} in the toolkit and through the reference's convention", flush=True)
    return toolkit


# ----------------------------------------------------------------------------- results

def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def write_results(rows: list[dict], stem: Path) -> None:
    """The CSV (one line per run, re-runs replace their line) and the markdown comparison."""
    key = lambda r: (r["method"], r["recipe"], r["implementation"], int(r["seed"]))  # noqa: E731
    merged = {key(r): r for r in read_csv(stem.with_suffix(".csv"))}
    merged.update({key(r): r for r in rows})
    ordered = sorted(merged.values(), key=lambda r: (METHODS.index(r["method"]), r["recipe"],
                                                     IMPLEMENTATIONS.index(r["implementation"]), int(r["seed"])))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(ordered)
    stem.with_suffix(".md").write_text(markdown(ordered))


def cell(values: list[float]) -> str:
    m, sd = mean_std([100 * v for v in values])
    if m is None:
        return "-"
    return f"{m:.2f} ± {sd:.2f} ({len(values)})" if sd is not None else f"{m:.2f} (1)"


def markdown(rows: list[dict]) -> str:
    """One line per (method, recipe): each implementation's mean ± std (runs), the gap and the goal's verdict."""
    lines = ["# Parity with zju-vipa/Fast-Datafree at cpu-small", "",
             "cnn_small teacher -> cnn_tiny student, 1,000 student updates of 64 generated images, generator ngf 32, "
             "full CIFAR-10 test set; `python experiments/parity.py`. Goal: toolkit mean >= reference mean - "
             "max(1.0, the larger seed std). `reference-shipped`: the reference as its driver wires these methods "
             "(the adversary sees the teacher, KD at T=1).", "",
             "| method | recipe | toolkit | reference | reference-shipped | toolkit - reference | goal |",
             "|---|---|---:|---:|---:|---:|---|"]
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["recipe"]), {}).setdefault(r["implementation"], []).append(
            float(r["student_top1"]))
    for (method, recipe), by in groups.items():
        tk, rf = by.get("toolkit", []), by.get("reference", [])
        gap, verdict = "-", "-"
        if tk and rf:
            (mt, st), (mr, sr) = mean_std([100 * v for v in tk]), mean_std([100 * v for v in rf])
            tol = max(1.0, st or 0.0, sr or 0.0)
            gap = f"{mt - mr:+.2f}"
            verdict = "met" if mt >= mr - tol else f"missed (tolerance {tol:.2f})"
            if mr < 11.0:
                verdict += "; reference at chance"
        lines.append(f"| {method} | {recipe} | {cell(tk)} | {cell(rf)} | {cell(by.get('reference-shipped', []))} "
                     f"| {gap} | {verdict} |")
    zeros = [f"{r['method']} {r['recipe']} {r['implementation']} s{r['seed']}: {r['zero_terms']}"
             for r in rows if r.get("zero_terms")]
    if zeros:
        lines += ["", "Generator terms with a non-zero weight that were zero: " + "; ".join(zeros) + "."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def planned(methods, recipes, seeds, implementations):
    """(method, recipe, seed, implementation) of each run asked for that has a counterpart to compare with."""
    for method in methods:
        for recipe in recipes:
            if (method in ONE_RECIPE and recipe == "paper") or reference_settings(method, recipe) is None:
                continue  # one recipe, or settings the reference cannot express
            for seed in seeds:
                for impl in implementations:
                    if not (impl == "reference-shipped" and method in POOL):  # its driver wires CMI, Fast as scripted
                        yield method, recipe, seed, impl



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, default=HERE.parent.parent / "Fast-Datafree",
                   help="a zju-vipa/Fast-Datafree checkout (default: ../Fast-Datafree beside the repository)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--recipes", nargs="+", choices=("benchmark", "paper"), default=["benchmark", "paper"])
    p.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--out", type=Path, default=HERE.parent / "runs", help="run folders (default runs/)")
    p.add_argument("--results", type=Path, default=HERE / "results" / "parity-cpu-small",
                   help="CSV / markdown stem (default experiments/results/parity-cpu-small)")
    p.add_argument("--updates", type=int, default=UPDATES,
                   help=f"student updates per run (default {UPDATES}, cpu-small's; fewer only to try the harness)")
    p.add_argument("--check", action="store_true", help="only the harness checks (teacher top-1), then stop")
    p.add_argument("--lockstep", action="store_true",
                   help="trace a benchmark-loop method instead: both sides from the same weights and noise, round by "
                        "round (one method, one seed)")
    args = p.parse_args(argv)
    from mosaic.cli import _resolve

    try:
        ref = import_reference(args.reference)
        name, spec = load_spec("cpu-small")
        teacher_dir, _ = ensure_teacher(name, spec, suite_data(spec), out_dir=args.out)
        cfg = _resolve(as_overrides(toolkit_items("dafl", "benchmark", 0, spec=spec, teacher_dir=teacher_dir,
                                                  out=args.out)))
        check_teacher(ref, teacher_dir, cfg)
        if args.check:
            return 0
        if args.lockstep:
            method, seed = args.methods[0], args.seeds[0]
            if len(args.methods) != 1 or method not in GENERATIVE:
                raise ParityError(f"--lockstep traces one of {', '.join(GENERATIVE)}: pass --methods with one of them")
            items = toolkit_items(method, "benchmark", seed, spec=spec, teacher_dir=teacher_dir, out=args.out,
                                  updates=args.updates)
            lockstep(ref, method=method, seed=seed, teacher_dir=teacher_dir, cfg=_resolve(as_overrides(items)))
            return 0
        for method, recipe, seed, impl in planned(args.methods, args.recipes, args.seeds, args.implementations):
            print(f"[parity] {method} {recipe} {impl} seed {seed}", flush=True)
            cfg_m = _resolve(as_overrides(toolkit_items(method, recipe, seed, spec=spec, teacher_dir=teacher_dir,
                                                        out=args.out, updates=args.updates)))
            if impl == "toolkit":
                res = run_toolkit(method, cfg_m)
            elif method in POOL:
                res = run_reference_pool(ref, method=method, seed=seed, teacher_dir=teacher_dir, cfg=cfg_m,
                                         out=args.out, updates=args.updates)
            else:
                res = run_reference(ref, method=method, recipe=recipe, seed=seed, shipped=impl == "reference-shipped",
                                    teacher_dir=teacher_dir, cfg=cfg_m, out=args.out, updates=args.updates)
            row = {"method": method, "recipe": recipe, "implementation": impl, "seed": seed, **res}
            print(f"[parity] -> {row}", flush=True)
            if impl != "reference-shipped" and res["zero_terms"]:
                raise ParityError(f"{method} {recipe} {impl}: generator terms {res['zero_terms']} "
                                  f"have a weight but are zero, so the run is no evidence")
            write_results([row], args.results)
    except ParityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
