"""The speed bench's reference: MosaicKD written out in plain eager fp32 torch, as the paper's Algorithm 1.

Used by experiments/bench_speed.py, which builds it from the same initial networks as the project's step.
"""
from __future__ import annotations

import copy
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mosaic.norms import KNOWN_STATS

MEAN, STD = KNOWN_STATS["cifar10"]  # what data.py normalises CIFAR-10 with


class Reference:
    """MosaicKD written out in plain eager fp32 torch, step for step as the paper's Algorithm 1."""

    def __init__(self, initial: dict[str, nn.Module], cfg: dict, device: torch.device, pool: Tensor) -> None:
        """From the networks as the method built them (`initial`: teacher, generator, discriminator, student;
        copied here) and the run's resolved config."""
        o = cfg["mosaic"]
        contiguous = {k: copy.deepcopy(m).to(memory_format=torch.contiguous_format) for k, m in initial.items()}
        self.teacher, self.student = contiguous["teacher"], contiguous["student"]
        self.generator, self.discriminator = contiguous["generator"], contiguous["discriminator"]
        self.o, self.device, self.pool = o, device, pool
        self.batch, self.synthetic = cfg["batch_size"], o["synthetic_batch"] or cfg["batch_size"]
        self.mean, self.std = list(MEAN), list(STD)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=o["lr_g"], betas=tuple(o["betas"]))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=o["lr_g"], betas=tuple(o["betas"]))
        s = cfg["student"]
        self.opt_s = torch.optim.SGD(self.student.parameters(), lr=s["lr"], momentum=s["momentum"],
                                     weight_decay=s["weight_decay"], nesterov=s["nesterov"])
        self.padding, self.flip = cfg["data"]["crop_padding"], cfg["data"]["flip"]

    def ood_batch(self) -> Tensor:
        """A batch of OOD images in [0, 1]: per-image pad + random crop + flip on the host, then to the device."""
        size, pad = self.pool.shape[-1], self.padding
        index = torch.randint(len(self.pool), (self.batch,))
        padded = F.pad(self.pool[index], (pad, pad, pad, pad))
        images = []
        for img in padded:  # what a DataLoader's per-sample transforms do
            top, left = torch.randint(2 * pad + 1, (2,)).tolist()
            img = img[:, top:top + size, left:left + size]
            if self.flip and torch.rand(()) < 0.5:
                img = img.flip(-1)
            images.append(img)
        return (torch.stack(images).float() / 255).to(self.device)

    def normalize(self, x: Tensor) -> Tensor:
        """torchvision.transforms.functional.normalize on a batch."""
        from torchvision.transforms.functional import normalize
        return normalize(x, self.mean, self.std)

    def patches(self, images: Tensor) -> Tensor:
        """`patches` random crops of every image, one slice each."""
        p, n = self.o["patch_size"], self.o["patches"]
        h, w = images.shape[-2:]
        crops = []
        for img in images.repeat(n, 1, 1, 1):
            top, left = int(torch.randint(h - p + 1, ())), int(torch.randint(w - p + 1, ()))
            crops.append(img[:, top:top + p, left:left + p])
        return torch.stack(crops)

    def local(self, logits: Tensor, real: bool) -> Tensor:
        """BCE of a patch logit map against all-real / all-fake, summed over each map (or averaged)."""
        target = torch.full_like(logits, 1.0 if real else 0.0)
        if self.o["local_reduction"] == "mean":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(logits)

    def iteration(self) -> None:
        """1 D step, 1 G step, `student_steps` student steps."""
        o, G, D, T, S = self.o, self.generator, self.discriminator, self.teacher, self.student
        real = self.ood_batch()
        fake = G(torch.randn(self.synthetic, o["nz"], device=self.device))
        loss_d = o["lambda_local"] * 0.5 * (self.local(D(self.patches(real)), True)
                                            + self.local(D(self.patches(fake.detach())), False))
        self.opt_d.zero_grad()
        loss_d.backward()
        self.opt_d.step()

        x = self.normalize(fake)
        t_logits, s_logits = T(x), S(x)
        p_t, log_p_t = F.softmax(t_logits, 1), F.log_softmax(t_logits, 1)
        align = -(p_t * log_p_t).sum(1).mean()
        p_bar = p_t.mean(0)
        balance = (p_bar * torch.log2(p_bar)).sum()
        adv = -(p_t * (log_p_t - F.log_softmax(s_logits, 1))).sum(1).mean()
        loss_g = (o["lambda_local"] * self.local(D(self.patches(fake)), True) + o["lambda_align"] * align
                  + o["lambda_balance"] * balance + o["lambda_adv"] * adv)
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()

        temp = o["temperature"]
        for _ in range(o["student_steps"]):
            real = self.ood_batch()
            with torch.no_grad():
                gen = G(torch.randn(self.synthetic, o["nz"], device=self.device))
                x = self.normalize(torch.cat([gen, real]))
                t_logits = T(x)
            log_p_s = F.log_softmax(S(x) / temp, 1)
            loss_s = F.kl_div(log_p_s, F.log_softmax(t_logits / temp, 1), reduction="batchmean",
                              log_target=True) * temp * temp
            self.opt_s.zero_grad()
            loss_s.backward()
            self.opt_s.step()
