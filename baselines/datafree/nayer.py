"""NAYER (Tran et al., "NAYER: Noisy Layer Data Generation for Efficient and Effective Data-free Knowledge
Distillation", CVPR 2024; code: tmtuan1307/NAYER, datafree/synthesis/nayer.py and models/generator.py).

The generator's input is not noise but a fixed embedding e_y of each image's class y. Before each synthesis
round a "noisy layer" (a Linear from the embedding size to the decoder's input size nz, its weights redrawn
from N(0, 1), bias 0) is put per group of `num_classes` samples in front of the decoder, so one class
embedding gives a different image in every group and every round:

    x = D(noisy_g(BN1d(e_y)))     D: the CMI / Fast decoder (Linear to 2 ngf x s/4 x s/4, two upsampling convs)
    L = bn * sum_l R_l^mmt(aug(x)) + oh * CE(T(aug(x)), y) + adv * L_adv(aug(x))   (Fast's terms, adv after warm-up)

Targets cycle through the classes, [0 .. C-1] repeated, the remainder of the batch drawn at random at the end,
so each noisy layer's group holds one image of every class. Each round re-makes Adam (lr_g, betas 0.5 / 0.999)
over the whole generator, takes `g_steps` steps, folds the last BN statistics into the momentum average and
puts its lowest-loss iterate into the pool (baselines.datafree.pool). A synthesis is `loops` rounds
(`warmup_loops` during the synthesis-only warm-up) and the whole generator is re-built with fresh weights every
`g_life` syntheses (the reference: when epoch % g_life == 0 or (epoch - warmup) % g_life == 0). The student
learns KD at temperature T on augmented pool batches (see InterleavedSynthesis for the step schedule).

The published embedding is CLIP's text encoding of "a image of {class}", which needs weights this toolkit cannot
fetch. `embedding` picks another: `onehot` (the identity, C-dimensional), `teacher` (the rows of the teacher's
linear classifier, one per class: this toolkit's idea, not a published result), or the path of a .npy of shape
(C, d) made elsewhere (the README says how, e.g. with open_clip).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from baselines.datafree.common import check_positive
from baselines.datafree.fast import MomentumSynthesis
from mosaic.config import ConfigError
from mosaic.methods import Context, register_method
from mosaic.models import unwrap_model
from mosaic.players import Generator

EMBEDDINGS = ("onehot", "teacher")  # or a path to a .npy of shape (classes, d)


def balanced_targets(n: int, num_classes: int) -> Tensor:
    """n class indices: [0 .. C-1] repeated n // C times, then n % C random classes (NAYER's generate_ys)."""
    cycle = torch.arange(num_classes).repeat(n // num_classes)
    return torch.cat([cycle, torch.randint(num_classes, (n % num_classes,))])


class NoisyLayers(nn.Module):
    """One Linear(d -> nz) per group of `group` consecutive samples, redrawn from N(0, 1) by `reset` (NAYER's le1)."""

    def __init__(self, d: int, nz: int, *, batch: int, group: int) -> None:
        super().__init__()
        self.group = group
        self.layers = nn.ModuleList(nn.Linear(d, nz) for _ in range(math.ceil(batch / group)))

    @torch.no_grad()
    def reset(self) -> None:
        """Fresh noisy layers: weights from N(0, 1), biases 0 (the reference's re_init_le, once per round)."""
        for layer in self.layers:
            nn.init.normal_(layer.weight, mean=0.0, std=1.0)
            nn.init.zeros_(layer.bias)

    def forward(self, e: Tensor) -> Tensor:
        chunks = e.split(self.group)
        if len(chunks) > len(self.layers):
            raise ValueError(f"{len(e)} samples need {len(chunks)} noisy layers, this generator has "
                             f"{len(self.layers)}: make it for a batch of {len(e)}")
        return torch.cat([layer(chunk) for layer, chunk in zip(self.layers, chunks)])


class NoisyLayerGenerator(nn.Module):
    """Class embedding -> BatchNorm1d -> a noisy layer per group -> the CMI / Fast decoder (sigmoid images)."""

    def __init__(self, embedding: Tensor, *, nz: int, ngf: int, image_size: int, channels: int, batch: int) -> None:
        super().__init__()
        num_classes, d = embedding.shape
        self.register_buffer("embedding", embedding.detach().float().clone())
        self.norm = nn.BatchNorm1d(d)
        self.noisy = NoisyLayers(d, nz, batch=batch, group=num_classes)
        self.decoder = Generator(nz=nz, ngf=ngf, image_size=image_size, channels=channels, head="sigmoid", width=2)

    def forward(self, targets: Tensor) -> Tensor:
        return self.decoder(self.noisy(self.norm(self.embedding[targets])))


def class_embedding(spec: str, teacher: nn.Module, num_classes: int, *, section: str = "nayer") -> Tensor:
    """The (classes, d) embedding `spec` names: onehot, the teacher's classifier rows, or a .npy file's rows."""
    if spec == "onehot":
        return torch.eye(num_classes)
    if spec == "teacher":
        head = unwrap_model(teacher)
        head = head.get_classifier() if hasattr(head, "get_classifier") else None
        if not isinstance(head, nn.Linear) or head.weight.shape[0] != num_classes:
            raise ConfigError(f"{section}.embedding=teacher takes the rows of the teacher's linear classifier "
                              f"(get_classifier(), one row per class), and this teacher has none of {num_classes} "
                              f"rows: use {section}.embedding=onehot or a .npy file of shape ({num_classes}, d)")
        return head.weight.detach().float().cpu().clone()
    path = Path(spec)
    if path.suffix != ".npy":
        raise ConfigError(f"{section}.embedding must be {' or '.join(EMBEDDINGS)} or the path of a .npy file "
                          f"(classes x d), got {spec!r}")
    if not path.is_file():
        raise ConfigError(f"{section}.embedding: no file {path}; make it as the README's NAYER section says, "
                          f"or use {section}.embedding=onehot")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{section}.embedding: {path} is not a readable .npy array ({err})") from None
    if array.ndim != 2 or array.shape[0] != num_classes or not np.issubdtype(array.dtype, np.number):
        raise ConfigError(f"{section}.embedding: {path} holds an array of shape {array.shape}, but the teacher has "
                          f"{num_classes} classes: it must be ({num_classes}, d), one row per class in class order")
    emb = torch.from_numpy(array.astype(np.float32))
    if not torch.isfinite(emb).all():
        raise ConfigError(f"{section}.embedding: {path} holds NaN or infinite values")
    return emb


@register_method("nayer")
class Nayer(MomentumSynthesis):
    """Data-free (NAYER, Tran et al. 2024): class embeddings through fresh noisy layers and a decoder, KD on a pool."""
    defaults = {
        "embedding": "onehot",   # onehot | teacher | PATH.npy (the paper: CLIP text embeddings, not offline)
        "pool_size": 160000,     # images kept (FIFO); the reference keeps all: 20 x 10 + 100 x 2 rounds of 400
        "synth_batch": None,     # images per round (null: batch_size; nayer_100.sh: --synthesis_batch_size 400)
        "synth_every": 400,      # KD steps per synthesis (datafree_kd.py: kd_steps 400 per epoch)
        "warmup": 20,            # synthesis-only steps, adversarial term off (nayer_100.sh: --warmup 20)
        "loops": 2,              # rounds per synthesis after the warm-up (nayer_100.sh: --g_loops 2)
        "warmup_loops": 10,      # rounds per warm-up synthesis (nayer_100.sh: --gwp_loops 10)
        "g_steps": 40,           # generator steps per round (nayer_*.sh: --g_steps 40, CIFAR-10 and -100 alike)
        "g_life": 10,            # syntheses between re-builds of the generator (nayer_100.sh: --g_life 10)
        "nz": 1000,              # noisy layer output = decoder input (datafree_kd.py: --le_emb_size 1000)
        "ngf": 64,               # decoder width (NLGenerator ngf 64)
        "lr_g": 4e-3,            # Adam lr over the whole generator (nayer_100.sh: --lr_g 4e-3)
        "betas": [0.5, 0.999],   # Adam betas (NAYER synthesizer)
        "bn_momentum": 0.9,      # average of past BN statistics blended into R_l (datafree_kd.py: --bn_mmt 0.9)
        "lambda_bn": 10.0,       # BN-statistics weight (nayer_100.sh: --bn 10)
        "lambda_oh": 0.5,        # CE to the cycled targets (nayer_100.sh: --oh 0.5)
        "lambda_adv": 1.33,      # adversarial weight, after the warm-up (nayer_100.sh: --adv 1.33)
        "temperature": 20.0,     # KD temperature on the pool (datafree_kd.py: --T 20)
    }

    def __init__(self, ctx: Context) -> None:
        o = ctx.opts
        check_positive("nayer", o, "loops", "warmup_loops", "g_life")
        self.embedding = class_embedding(str(o["embedding"]), ctx.teacher, ctx.num_classes)
        super().__init__(ctx)

    def make_generator(self) -> nn.Module:
        """Embedding, BatchNorm1d, noisy layers for synth_batch samples, and the 2 ngf wide decoder."""
        o = self.opts
        return NoisyLayerGenerator(self.embedding, nz=o["nz"], ngf=o["ngf"], image_size=self.ctx.image_size,
                                   channels=self.ctx.channels, batch=self.synth_batch)

    def rounds(self) -> int:
        """Rounds of the next synthesis: warmup_loops during the warm-up, loops after."""
        return self.opts["warmup_loops"] if self.syntheses < self.opts["warmup"] else self.opts["loops"]

    def rebuild_due(self) -> bool:
        """Whether the next synthesis starts from a re-built generator (every g_life, counted from 0 and warm-up)."""
        k, o = self.syntheses, self.opts
        return k % o["g_life"] == 0 or (k - o["warmup"]) % o["g_life"] == 0

    def synthesis_round(self, *, adversarial: bool) -> dict[str, Tensor]:
        """Fresh noisy layers and Adam, g_steps steps on the cycled targets; the lowest-loss images go to the pool."""
        o, dev = self.opts, self.ctx.device
        self.generator.noisy.reset()
        targets = balanced_targets(self.synth_batch, self.ctx.num_classes).to(dev)
        opt = torch.optim.Adam(self.generator.parameters(), lr=o["lr_g"], betas=tuple(o["betas"]))
        best = (torch.full((), float("inf"), device=dev), None)
        for _ in range(o["g_steps"]):
            x = self.generator(targets)
            terms = self.synthesis_terms(x, targets, adversarial=adversarial)
            loss = self.weighted(terms)
            best = self.keep_lowest(best, x, loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # the generator is no player: a backward without gradient scaling
            opt.step()
        self.bn_hooks.update_average()
        self.pool.add(best[1])
        return {"g_loss": loss.detach(), **{f"g_{k}": v.detach() for k, v in terms.items()}}

    def synthesize(self, *, adversarial: bool = True) -> dict[str, Tensor]:
        """One synthesis: re-build the generator when due, then `rounds()` rounds into the pool."""
        if self.rebuild_due():
            self.generator = self.new_generator()
        for _ in range(self.rounds()):
            terms = self.synthesis_round(adversarial=adversarial)
        return terms
