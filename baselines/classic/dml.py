"""Deep mutual learning: K peer students trained together, each on CE plus the mean KL to the others."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from baselines.classic.common import StreamMethod, test_top1
from mosaic.config import ConfigError
from mosaic.losses import mutual_loss
from mosaic.methods import Context, register_method
from mosaic.models import create_model


@register_method("dml")
class DeepMutualLearning(StreamMethod):
    """DML (Zhang et al. 2018): `student` and K-1 peers learn labels and each other; no teacher is used."""
    defaults = {
        "peers": 2,          # K, the number of networks trained together (the student included), >= 2
        "peer_arch": None,   # architecture of peer1..peerK-1 (null: the same as student.arch)
        "temperature": 1.0,  # softmax temperature of the mutual KL (the paper's 1)
    }
    needs = {"train": 1}
    requires_teacher = False

    @classmethod
    def stream_needs(cls, opts: dict) -> dict[str, int]:
        """DML learns from labels, so it always reads the labelled in-domain stream."""
        return {"train": 1}

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        k = self.opts["peers"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ConfigError(f"dml.peers is the number of networks K and must be an integer >= 2, got {k!r}")
        arch = self.opts["peer_arch"] or ctx.cfg["student"]["arch"]
        options = {} if self.opts["peer_arch"] else ctx.cfg["student"].get("kwargs", {})  # copies of the student
        self.peer_names = [f"peer{i}" for i in range(1, k)]
        self.players = ("student", *self.peer_names)
        self.student_opt = self.student_optimizer()
        for name in self.peer_names:
            peer = create_model(arch, num_classes=ctx.num_classes, in_chans=ctx.channels, image_size=ctx.image_size,
                                **options).to(ctx.device)
            setattr(self, name, peer)
            setattr(self, f"{name}_opt", self.student_optimizer(peer.parameters()))

    def networks(self) -> dict[str, nn.Module]:
        """The K networks by player name, the student first."""
        return {name: getattr(self, name) for name in self.players}

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x, y = self.ctx.normalize(batch["train"]), batch["train_labels"]
        nets = self.networks()
        logits = {name: net(x) for name, net in nets.items()}
        # Each loss depends on its own network only (peers enter detached), so one backward of the sum
        # gives every network the gradient of its own DML loss.
        losses = {name: mutual_loss(z, [logits[o] for o in nets if o != name], y,
                                    temperature=self.opts["temperature"]) for name, z in logits.items()}
        self.update(torch.stack(list(losses.values())).sum(), *[getattr(self, f"{n}_opt") for n in nets])
        out = {f"loss_{name}": loss.detach() for name, loss in losses.items()}
        out["loss"] = out.pop("loss_student")
        return out

    def results(self) -> dict:
        """Test top-1 of every peer (the student's is the run's student_top1) and of the K-network ensemble."""
        scores = test_top1(self.ctx, self.networks())
        return {f"{k}_top1" if k != "ensemble_top1" else k: v for k, v in scores.items() if k != "student"}
