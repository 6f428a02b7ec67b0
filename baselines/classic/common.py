"""What the classic KD baselines share: the data stream option, inputs, test-set top-1."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mosaic.config import ConfigError
from mosaic.methods import Context, Method

STREAMS = ("train", "ood")


def check_stream(method: str, stream: str) -> str:
    """The `<method>.stream` option: "train" (labelled in-domain) or "ood" (unlabelled pool, label-free)."""
    if stream not in STREAMS:
        raise ConfigError(f"{method}.stream must be one of {', '.join(STREAMS)}, got {stream!r}")
    return stream


def check_fraction(method: str, key: str, value: float) -> None:
    """Reject a weight that must lie in [0, 1], naming the option."""
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{method}.{key} must lie in [0, 1], got {value!r}")


class StreamMethod(Method):
    """Base of the baselines that train on one image stream: labelled in-domain by default, OOD on request."""
    needs = {"train": 1}

    @classmethod
    def resolved(cls, opts: dict) -> dict:
        """The options the method runs with (a registered configuration maps its own names onto them)."""
        return opts

    @classmethod
    def stream_needs(cls, opts: dict) -> dict[str, int]:
        """`batches` x `update_batches` (default 1 each) batches per step from the chosen `stream` (train | ood)."""
        o = cls.resolved(opts)
        return {check_stream(cls.name, o.get("stream", "train")): o.get("batches", 1) * o.get("update_batches", 1)}

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.opts = self.resolved(ctx.opts)
        self.stream = check_stream(self.name, self.opts.get("stream", "train"))

    def inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Normalised images of the chosen stream and their labels (None for the unlabelled OOD pool)."""
        return self.ctx.normalize(batch[self.stream]), batch.get(f"{self.stream}_labels")



@torch.no_grad()
def test_top1(ctx: Context, models: dict[str, nn.Module], *, ensemble: str | None = "ensemble_top1") -> dict:
    """Top-1 of each model on the test set, plus that of their softmax-averaged ensemble under `ensemble`.

    The test set is sharded over processes like the engine's evaluator; {} when data.test is unset.
    """
    test = ctx.test_set()
    if test is None or not models:
        return {}
    acc = ctx.accelerator
    images = test.images[acc.process_index::acc.num_processes].to(ctx.device)
    labels = test.labels[acc.process_index::acc.num_processes].to(ctx.device)
    batch_size = ctx.cfg["eval_batch_size"]

    def fraction(pred: Tensor) -> float:
        count = (pred == labels).sum().float()
        return float(acc.reduce(count, reduction="sum").item()) / len(test)

    out, mean_probs = {}, None
    for name, model in models.items():
        logits = ctx.predict(model, images, batch_size=batch_size)
        out[name] = fraction(logits.argmax(1))
        probs = logits.softmax(1) / len(models)
        mean_probs = probs if mean_probs is None else mean_probs + probs
    if ensemble is not None and len(models) > 1:
        out[ensemble] = fraction(mean_probs.argmax(1))
    return out
