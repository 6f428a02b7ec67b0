"""MKD fitting as an engine method (`method=mkd`): the run's teacher is the frozen source, its student the cloner.

One step: the source's features at the critical layers of a batch of normal images (`data.train`, kept to the
normal class by `data.train_classes`), the cloner's (through the adapters), and Adam on the batch mean of the
MKD loss (mosaic/losses/feature.py). The cloner and its adapters are one player, so checkpoints, resume and the
divergence guard cover both. With `data.test` set the run reports ROC-AUC (normal classes against the rest),
and the run folder ends with what `mosaic anomaly score` reads (mosaic/anomaly/mkd.py: the cloner's
model.safetensors, adapters.safetensors, mkd.json).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor, nn

from mosaic.config import ConfigError
from mosaic.data import ImageSet, class_index
from mosaic.losses import mkd_loss
from mosaic.methods import Context, Method, register_method
from mosaic.precision import full_precision

from .mkd import MKD, pair_with_layers, save_pair_record, score_images
from .roc import roc_auc

__all__ = ["MKDFit", "Cloner", "anomaly_labels", "NORMAL_NAMES"]

NORMAL_NAMES = ("good", "normal", "ok")  # class folders taken as normal when no normal class is named


def anomaly_labels(images: ImageSet, normal: Any) -> Optional[Tensor]:
    """1 for anomalous, 0 for normal images; None when the set says nothing about normality.

    `normal` is a class (name or index) or a list of them; None takes a class named good / normal / ok.
    """
    if normal is None:
        names = [c for c in (images.classes or []) if c.lower() in NORMAL_NAMES]
        if images.labels is None or not names:
            return None
        normal = names[0]
    wanted = [class_index(images, c) for c in (normal if isinstance(normal, list) else [normal])]
    return (~torch.isin(images.labels, torch.tensor(wanted, dtype=images.labels.dtype))).long()


class Cloner(nn.Module):
    """The trained half of an MKD pair (cloner + adapters) as one player; forward gives the adapted features."""

    def __init__(self, pair: MKD) -> None:
        super().__init__()
        self.cloner, self.adapters = pair.cloner, pair.adapters
        self._pair = (pair,)  # a tuple, so the frozen source stays out of this player's weights and checkpoints

    def forward(self, x: Tensor) -> List[Tensor]:
        """Cloner features at the critical layers (through the adapters) of float images in [0, 1]."""
        return self._pair[0].cloner_features(x)


def freeze_unreached(player: nn.Module, *, image_size: int, in_chans: int, device: torch.device) -> None:
    """Turn off requires_grad of parameters the features never depend on (later stages, the head).

    Adam would skip them anyway (no gradient); frozen, several processes need no unused-parameter search.
    """
    was_training = player.training
    player.eval()
    params = [p for p in player.parameters() if p.requires_grad]
    with torch.enable_grad():
        feats = player(torch.zeros(2, in_chans, image_size, image_size, device=device))
        grads = torch.autograd.grad(sum(f.float().sum() for f in feats), params, allow_unused=True)
    for p, g in zip(params, grads):
        if g is None:
            p.requires_grad_(False)
    player.train(was_training)


@register_method("mkd")
class MKDFit(Method):
    """Anomaly detection (MKD): distil the frozen teacher's critical-layer features into the student on normal images."""
    defaults = {
        "layers": None,         # source critical layers, e.g. layer2,layer3; null: last num_layers down-sampling stages
        "cloner_layers": None,  # cloner layers paired with them; null: matched by spatial size
        "num_layers": 3,        # how many default critical layers
        "adapter": False,       # 1x1 conv adapters where source and cloner channel counts differ
        "lambda_dir": 0.01,     # weight of the direction (cosine) term; the paper's 0.01
        "lr": 1e-3,             # Adam learning rate (the paper's)
        "weight_decay": 0.0,    # Adam weight decay
    }
    needs = {"train": 1}
    players = ("student",)
    same_classes = False  # the source may come from another task: only its features are used

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        o, cfg = self.opts, ctx.cfg
        for key in ("lr", "weight_decay", "lambda_dir"):
            if isinstance(o[key], bool) or not isinstance(o[key], (int, float)) or o[key] < 0:
                raise ConfigError(f"'mkd.{key}' must be a non-negative number, got {o[key]!r}")
        self.pair = pair_with_layers(
            ctx.teacher, ctx.student, layers=o["layers"], cloner_layers=o["cloner_layers"],
            num_layers=o["num_layers"], adapter=o["adapter"], lambda_dir=o["lambda_dir"], mean=ctx.mean.tolist(),
            std=ctx.std.tolist(), image_size=ctx.image_size, in_chans=ctx.channels,
            source_path=str(Path(cfg["teacher"]["checkpoint"]).resolve()), cloner_arch=cfg["student"]["arch"],
        ).to(ctx.device)
        self.student = Cloner(self.pair)
        freeze_unreached(self.student, image_size=ctx.image_size, in_chans=ctx.channels, device=ctx.device)
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.student_opt = torch.optim.Adam(trainable, lr=o["lr"], weight_decay=o["weight_decay"])

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x = batch["train"]
        with torch.no_grad():
            targets = self.pair.source_features(x)
        loss = mkd_loss(targets, self.student(x), lambda_dir=self.pair.lambda_dir).mean()
        self.update(loss, self.student_opt)
        return {"loss": loss.detach()}

    def eval_model(self) -> nn.Module:
        """The bare cloner: saved as the run's model.safetensors (what `load_mkd` reads)."""
        return self.pair.cloner

    def evaluator(self, test: ImageSet) -> Callable[[], dict[str, float]]:
        """ROC-AUC of the anomaly scores on data.test: data.train_classes (or a good/normal class) against the rest."""
        normal = self.ctx.cfg["data"]["train_classes"]
        labels = anomaly_labels(test, normal)
        if labels is None:
            raise ConfigError(f"the test set '{test.name}' does not say which images are normal: set "
                              f"data.train_classes=<normal class>, name a class folder good or normal, "
                              f"or set data.test=null")
        if int(labels.sum()) in (0, len(labels)):
            kind = "anomalous" if int(labels.sum()) else "normal"
            raise ConfigError(f"every image of the test set '{test.name}' is {kind}: ROC-AUC needs normal and "
                              f"anomalous images")
        images = test.images.to(self.ctx.device)
        batch_size = self.ctx.cfg["eval_batch_size"]

        def auroc() -> dict[str, float]:
            was_training = self.pair.cloner.training
            with full_precision():  # evaluation in fp32 whatever the run's autocast
                scores = score_images(self.pair, images, batch_size=batch_size)
            self.pair.train(was_training)
            return {"auroc": roc_auc(scores, labels)}

        return auroc

    def save(self, folder: Path) -> None:
        """adapters.safetensors and mkd.json beside the engine's model.safetensors: a folder `load_mkd` reads."""
        save_pair_record(self.pair, folder, options=self.ctx.cfg)
