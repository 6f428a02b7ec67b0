"""CMI (Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Distillation", IJCAI 2021).

Each synthesis re-initialises a generator G and optimises it with its noise z (Adam, `g_steps`
iterations) so that the frozen teacher T finds its images x = G(z) natural, class-specific,
hard for the student S, and distinguishable from each other and from every image made before:

    L = bn * sum_l R_l(x_g) + oh * CE(T(x_g), y) + adv * L_adv(x_g) + cr * L_cr
    L_adv = -mean_i [argmax S(x_g)_i == argmax T(x_g)_i] KL(T(x_g)_i || S(x_g)_i)
    L_cr  = InfoNCE(h(f(x_l)), h(f(x_g)).detach()) over the batch and `n_neg` memory-bank rows

x_g is a global view (random crop with 4 px padding + flip), x_l a local view (random
resized crop, scale 0.25-1, + flip) of the same images; R_l is layer l's BN-statistics
distance (DeepInversion); f(x) concatenates, over the teacher's BatchNorm layers, the
per-channel spatial means of each layer's input (CMI's instance features); h is a
Linear-ReLU-Linear projection head with L2-normalised output, trained with G. The InfoNCE
logits are h(f(x_l)) h(f(x_g))^T / cr_T with the matching row as positive; the memory bank
(FIFO, `bank_size` rows) stores [f(x_l), f(x_g)] of every batch put in the pool. The lowest-loss
iterate of each synthesis goes to the image pool (baselines.datafree.pool) and the bank; the
student learns KD at temperature T on augmented pool batches (see InterleavedSynthesis for
the step schedule). Generator, head, its optimizer, bank and pool are in the state_dict.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from baselines.datafree.common import BNStatHooks, check_positive, require
from baselines.datafree.pool import InterleavedSynthesis
from mosaic.augment import Augment
from mosaic.losses import cross_entropy, instance_contrastive_loss, masked_adversarial_kl
from mosaic.methods import Context, register_method


class InstanceMeans:
    """Forward hooks recording, per BatchNorm2d layer of a model, the per-sample channel means of its input."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.means: dict[int, Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.means[index] = inputs[0].float().mean(dim=(2, 3))
        return hook

    def __enter__(self) -> "InstanceMeans":
        self.means.clear()
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def features(self) -> Tensor:
        """(B, sum of channels): the recorded means of every layer, concatenated in layer order."""
        return torch.cat([self.means[i] for i in sorted(self.means)], dim=1)


class ProjectionHead(nn.Module):
    """Linear -> ReLU -> Linear, then L2 normalisation (CMI's MLPHead)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1)


class FeatureBank:
    """FIFO memory of `size` feature rows (half precision), sampled without replacement."""

    def __init__(self, size: int, dim: int, *, device: torch.device | str = "cpu") -> None:
        self.data = torch.zeros(size, dim, dtype=torch.float16, device=device)
        self.size, self.filled, self.next = size, 0, 0

    def add(self, rows: Tensor) -> None:
        """Store rows, overwriting the oldest once full (keeps the last `size` when given more)."""
        rows = rows.detach()[-self.size:].to(self.data.device, torch.float16)
        first = min(len(rows), self.size - self.next)
        self.data[self.next:self.next + first] = rows[:first]
        self.data[:len(rows) - first] = rows[first:]
        self.next = (self.next + len(rows)) % self.size
        self.filled = min(self.size, self.filled + len(rows))

    def sample(self, k: int) -> Tensor:
        """Up to k stored rows, drawn without replacement (float32)."""
        idx = torch.randperm(self.filled)[:k].to(self.data.device)
        return self.data.index_select(0, idx).float()

    def state_dict(self) -> dict:
        return {"rows": self.data[:self.filled].cpu(), "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        rows = state["rows"]
        self.data[:len(rows)] = rows.to(self.data.device)
        self.filled, self.next = len(rows), int(state["next"])


def reset_generator(generator: nn.Module) -> None:
    """CMI's re-initialisation: conv / linear weights N(0, 0.02), biases 0, BN weights N(1, 0.02)."""
    for m in generator.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


@register_method("cmi")
class CMI(InterleavedSynthesis):
    """Data-free: contrastive model inversion into a pool (generator re-initialised per batch), KD on the pool."""
    defaults = {
        "pool_size": 51200,      # images kept (FIFO); CMI's CIFAR-10 run makes 200 batches of 256 = 51,200
        "synth_batch": None,     # images per synthesis (null: batch_size; CMI: synthesis_batch_size = batch 256)
        "synth_every": 400,      # KD steps per synthesis (CMI scripts/cmi_cifar10.sh: kd_steps = ep_steps 400)
        "warmup": 0,             # synthesis-only steps before KD (CMI: none)
        "g_steps": 200,          # generator iterations per synthesis (cmi_cifar10.sh: --g_steps 200)
        "nz": 256,               # noise dimension (CMI datafree_kd.py: nz 256)
        "ngf": 64,               # generator width (CMI: Generator ngf 64)
        "lr_g": 1e-3,            # Adam lr of generator, noise and head (cmi_cifar10.sh: --lr_g 1e-3)
        "betas": [0.5, 0.999],   # generator / noise Adam betas (CMI synthesizer; the head uses torch defaults)
        "lambda_bn": 1.0,        # BN-statistics weight (cmi_cifar10.sh: --bn 1.0)
        "lambda_oh": 1.0,        # CE to the targets (cmi_cifar10.sh: --oh 1.0)
        "lambda_adv": 0.5,       # adversarial weight (cmi_cifar10.sh: --adv 0.5)
        "lambda_cr": 0.8,        # contrastive weight (cmi_cifar10.sh: --cr 0.8)
        "cr_temperature": 0.2,   # InfoNCE temperature (cmi_cifar10.sh: --cr_T 0.2)
        "bank_size": 40960,      # memory-bank rows (CMI datafree_kd.py: bank_size 40960)
        "n_neg": 4096,           # bank rows drawn as negatives per iteration (CMI: n_neg 4096)
        "head_dim": 256,         # projection-head output size (CMI datafree_kd.py: head_dim 256)
        "temperature": 20.0,     # KD temperature on the pool (cmi_cifar10.sh: --T 20)
    }

    def __init__(self, ctx: Context) -> None:
        import kornia.augmentation as K

        check_positive("cmi", ctx.opts, "bank_size", "n_neg", "head_dim")
        super().__init__(ctx)
        o = self.opts
        require(o["cr_temperature"] > 0, f"cmi.cr_temperature must be positive, got {o['cr_temperature']!r}")
        self.bn_hooks = BNStatHooks(ctx.teacher)
        self.instance = InstanceMeans(self.bn_hooks.layers)
        dim = sum(m.num_features for m in self.bn_hooks.layers)
        self.head = ProjectionHead(dim, o["head_dim"]).to(ctx.device)
        self.head_opt = torch.optim.Adam(self.head.parameters(), lr=o["lr_g"])
        self.bank = FeatureBank(o["bank_size"], 2 * dim, device=ctx.device)
        self.global_view = Augment(image_size=ctx.image_size, padding=4, flip=True)
        self.local_view = nn.Sequential(K.RandomResizedCrop((ctx.image_size, ctx.image_size), scale=(0.25, 1.0)),
                                        K.RandomHorizontalFlip())

    def contrastive(self, local_feat: Tensor, global_feat: Tensor) -> Tensor:
        """InfoNCE of the projected local views against the projected global views, with bank negatives."""
        n = len(local_feat)
        bank_local, bank_global = self.bank.sample(self.opts["n_neg"]).chunk(2, dim=1)
        proj = self.head(torch.cat([local_feat, bank_local, global_feat, bank_global]))
        proj_local, proj_global = proj.chunk(2, dim=0)
        return instance_contrastive_loss(proj_local, proj_global, temperature=self.opts["cr_temperature"], batch=n)

    def synthesis_terms(self, x: Tensor, targets: Tensor, *, adversarial: bool) -> dict[str, Tensor]:
        """The unweighted terms for generated images x in [0, 1], and the instance features [f(x_l), f(x_g)]."""
        norm = self.ctx.normalize
        x_global, x_local = norm(self.global_view(x)), norm(self.local_view(x))
        with self.bn_hooks, self.instance:
            t_logits = self.teacher(x_global)
        terms = {"bn": self.bn_hooks.loss(), "oh": cross_entropy(t_logits, targets)}
        global_feat = self.instance.features()
        with self.instance:
            self.teacher(x_local)
        local_feat = self.instance.features()
        if adversarial and self.opts["lambda_adv"] > 0:
            with self.student_for_synthesis() as student:
                terms["adv"] = masked_adversarial_kl(student(x_global), t_logits)
        else:
            terms["adv"] = t_logits.new_zeros(())
        terms["cr"] = (self.contrastive(local_feat, global_feat) if self.opts["lambda_cr"] > 0
                       else t_logits.new_zeros(()))
        terms["features"] = torch.cat([local_feat, global_feat], dim=1)
        return terms

    def weighted(self, terms: dict[str, Tensor]) -> Tensor:
        """The synthesis objective: the terms times their weights."""
        o = self.opts
        return (o["lambda_bn"] * terms["bn"] + o["lambda_oh"] * terms["oh"] + o["lambda_adv"] * terms["adv"]
                + o["lambda_cr"] * terms["cr"])

    def synthesize(self, *, adversarial: bool = True) -> dict[str, Tensor]:
        """Re-initialise G, optimise G, z and the head for `g_steps`; the lowest-loss images go to the pool."""
        o, dev, n = self.opts, self.ctx.device, self.synth_batch
        reset_generator(self.generator)
        z = torch.randn(n, o["nz"], device=dev).requires_grad_(True)
        targets = torch.randint(0, self.ctx.num_classes, (n,), device=dev).sort().values
        opt = torch.optim.Adam([*self.generator.parameters(), z], lr=o["lr_g"], betas=tuple(o["betas"]))
        best_loss = torch.full((), float("inf"), device=dev)
        best_x = best_feat = None
        for _ in range(o["g_steps"]):
            x = self.generator(z)
            terms = self.synthesis_terms(x, targets, adversarial=adversarial)
            loss = self.weighted(terms)
            with torch.no_grad():  # keep the lowest-loss iterate without a host sync
                better = loss < best_loss
                best_x = x.detach() if best_x is None else torch.where(better, x.detach(), best_x)
                feat = terms["features"].detach()
                best_feat = feat if best_feat is None else torch.where(better, feat, best_feat)
                best_loss = torch.minimum(loss.detach(), best_loss)
            opt.zero_grad(set_to_none=True)
            self.head_opt.zero_grad(set_to_none=True)
            loss.backward()  # generator, noise and head are no players: a backward without gradient scaling
            opt.step()
            self.head_opt.step()
        self.pool.add(best_x)
        self.bank.add(best_feat)
        return {"g_loss": loss.detach(), **{f"g_{k}": v.detach() for k, v in terms.items() if k != "features"}}

    def state_dict(self) -> dict:
        """Pool, generator and syntheses (InterleavedSynthesis), the head, its optimizer and the memory bank."""
        return {**super().state_dict(), "head": self.head.state_dict(), "head_opt": self.head_opt.state_dict(),
                "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.head.load_state_dict(state["head"])
        self.head_opt.load_state_dict(state["head_opt"])
        self.bank.load_state_dict(state["bank"])

