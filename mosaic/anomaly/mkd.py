"""The MKD pair: a frozen source network, a trainable cloner, their critical layers and optional 1x1 adapters.

`MKD(x)` maps float images in [0, 1] to one loss per image (the anomaly score); gradients reach both the
cloner (training) and the input (localisation). `build_mkd` assembles a pair from a source checkpoint
(`pair_with_layers` from two built networks, as the `mkd` engine method does), `score_images` scores
images with it, `save_mkd` / `load_mkd` write and read it as a folder (a `mosaic anomaly fit` run folder
holds the same files):

    model.safetensors + model.json   the cloner (mosaic.models.save_model)
    adapters.safetensors             the 1x1 adapters, when adapter=True
    mkd.json                         source path, layers, lambda_dir and the options the cloner was fitted with

Critical layers are module paths (or feature_info indices). By default the source's are the outputs of its
last `num_layers` down-sampling stages (feature_info levels with reduction > 1), and each is paired with the
cloner's last feature_info level of the same spatial size. When the channel counts of a pair differ, a
1x1 conv adapter on the cloner side is needed (adapter=True); the paper instead picks a cloner whose
widths match at the critical layers, which is the adapter-free default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from mosaic.augment import normalize, to_float
from mosaic.losses import mkd_loss
from mosaic.precision import autocast_like, to_fp32
from mosaic.models import (CheckpointError, FeatureTaps, ModelError, create_model, feature_info_of, freeze,
                           load_model, resolve_layer, save_model)

__all__ = ["MKD", "build_mkd", "default_layers", "load_mkd", "pair_with_layers", "save_mkd", "save_pair_record",
           "score_images", "source_targets", "OPTIONS_NAME"]

OPTIONS_NAME = "mkd.json"
ADAPTERS_NAME = "adapters.safetensors"
Layer = Union[str, int]


def default_layers(model: nn.Module, *, count: int = 3) -> List[str]:
    """Module paths of the last `count` down-sampling stages of `model` (feature_info levels with reduction > 1)."""
    levels = [d for d in feature_info_of(model) if d.get("reduction", 1) > 1]
    if not levels:
        raise ModelError(f"{type(model).__name__} has no feature_info with down-sampling stages; "
                         "name its critical layers with layers=<module path>,...")
    return [str(d["module"]) for d in levels[-count:]]


@torch.no_grad()
def _probe(model: nn.Module, layers: Sequence[Layer], *, image_size: int, in_chans: int) -> List[torch.Size]:
    """Output shapes (without batch) of `layers` for one zero image, the model left in its mode."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    with FeatureTaps(model, list(layers)) as feats:
        model(torch.zeros(1, in_chans, image_size, image_size, device=param.device, dtype=param.dtype))
    model.train(was_training)
    return [feats[layer].shape[1:] for layer in layers]


def _match_cloner_layers(cloner: nn.Module, source_shapes: Sequence[torch.Size], *, image_size: int,
                         in_chans: int) -> List[str]:
    """For each source shape, the cloner's last feature_info level with the same spatial size."""
    levels = [str(d["module"]) for d in feature_info_of(cloner)]
    if not levels:
        raise ModelError(f"cloner {type(cloner).__name__} has no feature_info; name its layers with cloner_layers=...")
    shapes = _probe(cloner, levels, image_size=image_size, in_chans=in_chans)
    chosen = []
    for want in source_shapes:
        same = [name for name, shape in zip(levels, shapes) if shape[1:] == want[1:]]
        if not same:
            have = ", ".join(f"{n}={tuple(s[1:])}" for n, s in zip(levels, shapes))
            raise ModelError(f"the cloner has no layer with the spatial size {tuple(want[1:])} of a source critical "
                             f"layer (its levels: {have}); pick a deeper cloner or fewer/other source layers")
        chosen.append(same[-1])
    return chosen


class MKD(nn.Module):
    """Frozen source + cloner (+ adapters); forward(x in [0, 1]) -> per-image MKD loss (N,)."""

    def __init__(self, source: nn.Module, cloner: nn.Module, *, source_layers: Sequence[Layer],
                 cloner_layers: Sequence[Layer], adapter: bool = False, lambda_dir: float = 0.01,
                 mean: Sequence[float], std: Sequence[float], image_size: int, in_chans: int = 3,
                 source_path: str = "", cloner_arch: str = "") -> None:
        super().__init__()
        self.source_path, self.cloner_arch = source_path, cloner_arch
        if len(source_layers) != len(cloner_layers) or not source_layers:
            raise ModelError(f"give as many cloner layers as source layers, got {list(source_layers)} and "
                             f"{list(cloner_layers)}")
        self.source, self.cloner = freeze(source), cloner
        self.lambda_dir, self.image_size, self.in_chans = float(lambda_dir), int(image_size), int(in_chans)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.source_layers = [resolve_layer(source, layer) for layer in source_layers]
        self.cloner_layers = [resolve_layer(cloner, layer) for layer in cloner_layers]
        s_shapes = _probe(source, self.source_layers, image_size=image_size, in_chans=in_chans)
        c_shapes = _probe(cloner, self.cloner_layers, image_size=image_size, in_chans=in_chans)
        adapters = []
        for s_name, c_name, s, c in zip(self.source_layers, self.cloner_layers, s_shapes, c_shapes):
            if len(s) != 3 or len(c) != 3 or s[1:] != c[1:]:
                raise ModelError(f"source layer {s_name} gives {tuple(s)} but cloner layer {c_name} gives {tuple(c)}; "
                                 "critical layers must be (C, H, W) maps of the same spatial size")
            if s[0] != c[0] and not adapter:
                raise ModelError(f"source layer {s_name} has {s[0]} channels but cloner layer {c_name} has {c[0]}; "
                                 "pass adapter=true (1x1 conv) or pick a cloner with matching widths")
            adapters.append(nn.Conv2d(c[0], s[0], 1) if adapter else nn.Identity())
        self.adapter = bool(adapter)
        self.adapters = nn.ModuleList(adapters)
        self._source_taps = FeatureTaps(self.source, self.source_layers)
        self._cloner_taps = FeatureTaps(self.cloner, self.cloner_layers)
        self._source_taps.attach()
        self._cloner_taps.attach()

    def _run(self, model: nn.Module, taps: FeatureTaps, x: Tensor) -> List[Tensor]:
        """Forward `model` on normalised x and return its tapped features in layer order."""
        forward = getattr(model, "forward_features", model)  # the classifier head is never needed
        with autocast_like(model):  # the run's per-forward autocast, as model(x) would get
            forward(x)
        feats = [to_fp32(taps.features[layer]) for layer in taps.paths]
        taps.clear()
        return feats

    def prepare(self, x: Tensor) -> Tensor:
        """Normalise float images in [0, 1] with the source's statistics."""
        return normalize(x, self.mean, self.std)

    def source_features(self, x: Tensor) -> List[Tensor]:
        """Source activations at the critical layers for float images in [0, 1]."""
        return self._run(self.source, self._source_taps, self.prepare(x))

    def cloner_features(self, x: Tensor) -> List[Tensor]:
        """Cloner activations at the critical layers (through the adapters) for float images in [0, 1]."""
        feats = self._run(self.cloner, self._cloner_taps, self.prepare(x))
        return [adapt(f) for adapt, f in zip(self.adapters, feats)]

    def forward(self, x: Tensor, targets: Optional[Sequence[Tensor]] = None) -> Tensor:
        """Per-image MKD loss of float images in [0, 1]; `targets` are precomputed source features if given."""
        source = list(targets) if targets is not None else self.source_features(x)
        return mkd_loss(source, self.cloner_features(x), lambda_dir=self.lambda_dir)

    def describe(self) -> dict:
        """The pair's structure as JSON-ready options (what `load_mkd` needs besides the weights)."""
        return {"source_layers": self.source_layers, "cloner_layers": self.cloner_layers, "adapter": self.adapter,
                "lambda_dir": self.lambda_dir, "image_size": self.image_size, "in_chans": self.in_chans,
                "mean": list(self.mean), "std": list(self.std)}


def _load_source(path: Union[str, Path]) -> tuple[nn.Module, dict]:
    """Load the source classifier written by `mosaic train-teacher` (or save_model)."""
    from mosaic.models import load_classifier

    return load_classifier(path)


def _layer_list(layers: Union[None, str, int, Sequence[Layer]]) -> Optional[List[Layer]]:
    """Accept None, 'a,b', 2 or ['a', 2]; digit strings become feature_info indices."""
    if layers is None:
        return None
    items = layers.split(",") if isinstance(layers, str) else layers if isinstance(layers, (list, tuple)) else [layers]
    out: List[Layer] = []
    for item in items:
        item = item.strip() if isinstance(item, str) else item
        out.append(int(item) if isinstance(item, str) and item.lstrip("-").isdigit() else item)
    return out


def pair_with_layers(source: nn.Module, cloner: nn.Module, *, layers: Any = None, cloner_layers: Any = None,
                     num_layers: int = 3, adapter: bool = False, lambda_dir: float = 0.01, mean: Sequence[float],
                     std: Sequence[float], image_size: int, in_chans: int = 3, source_path: str = "",
                     cloner_arch: str = "") -> MKD:
    """An MKD pair of two built networks, its critical layers chosen as `build_mkd` documents."""
    s_layers = _layer_list(layers) or default_layers(source, count=num_layers)
    c_layers = _layer_list(cloner_layers)
    if c_layers is None:
        s_shapes = _probe(source, s_layers, image_size=image_size, in_chans=in_chans)
        c_layers = _match_cloner_layers(cloner, s_shapes, image_size=image_size, in_chans=in_chans)
    return MKD(source, cloner, source_layers=s_layers, cloner_layers=c_layers, adapter=adapter,
               lambda_dir=lambda_dir, mean=mean, std=std, image_size=image_size, in_chans=in_chans,
               source_path=source_path, cloner_arch=cloner_arch)


def build_mkd(source: Union[str, Path], *, cloner: str = "cnn_tiny", layers: Any = None, cloner_layers: Any = None,
              num_layers: int = 3, adapter: bool = False, lambda_dir: float = 0.01,
              image_size: Optional[int] = None) -> MKD:
    """A fresh MKD pair: source loaded from a checkpoint and frozen, a new randomly initialised cloner.

    Options: cloner="cnn_tiny" (any create_model name), layers=None (source critical layers; default the last
    `num_layers`=3 down-sampling stages), cloner_layers=None (default: matched by spatial size), adapter=False
    (1x1 convs when channel counts differ), lambda_dir=0.01 (weight of the direction term), image_size=None
    (default: the source's, from its model.json, else 32).
    """
    net, meta = _load_source(source)
    size = int(image_size or meta.get("image_size") or 32)
    in_chans = int(meta.get("in_chans", 3))
    clone = create_model(cloner, num_classes=1, in_chans=in_chans)
    return pair_with_layers(net, clone, layers=layers, cloner_layers=cloner_layers, num_layers=num_layers,
                            adapter=adapter, lambda_dir=lambda_dir, mean=meta.get("mean") or (0.5,) * in_chans,
                            std=meta.get("std") or (0.5,) * in_chans, image_size=size, in_chans=in_chans,
                            source_path=str(Path(source).resolve()), cloner_arch=cloner)


def save_mkd(mkd: MKD, folder: Union[str, Path], *, options: dict) -> Path:
    """Write the cloner, its adapters and mkd.json (structure + `options`) into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"arch": mkd.cloner_arch, "num_classes": 1, "in_chans": mkd.in_chans, "image_size": mkd.image_size,
            "mean": list(mkd.mean), "std": list(mkd.std), "role": "mkd cloner"}
    save_model(mkd.cloner, folder / "model.safetensors", meta=meta)
    return save_pair_record(mkd, folder, options=options)


def save_pair_record(mkd: MKD, folder: Union[str, Path], *, options: dict) -> Path:
    """Write what `load_mkd` needs besides the cloner's model.safetensors: adapters.safetensors and mkd.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if mkd.adapter:
        tensors = {k: v.detach().cpu().contiguous() for k, v in mkd.adapters.state_dict().items()}
        save_file(tensors, str(folder / ADAPTERS_NAME))
    record = {"source": mkd.source_path, "cloner": mkd.cloner_arch, **mkd.describe(), "options": options}
    (folder / OPTIONS_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def load_mkd(folder: Union[str, Path], *, source: Union[str, Path, None] = None) -> MKD:
    """Rebuild a fitted MKD pair from its folder (eval mode); `source` overrides the stored source path."""
    folder = Path(folder)
    record_file = folder / OPTIONS_NAME
    if not record_file.is_file() and (folder / "checkpoints").is_dir():
        raise CheckpointError(f"{folder} has no {OPTIONS_NAME}: its fit did not finish; continue it with "
                              f"`mosaic anomaly fit ... out={folder} resume=true`")
    if not record_file.is_file():
        raise CheckpointError(f"{folder} is not an MKD folder (no {OPTIONS_NAME}); fit one with `mosaic anomaly fit`")
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{record_file} is not valid JSON: {err}") from None
    net, _ = _load_source(source or record["source"])
    clone, _ = load_model(folder)
    mkd = MKD(net, clone, source_layers=record["source_layers"], cloner_layers=record["cloner_layers"],
              adapter=record["adapter"], lambda_dir=record["lambda_dir"], mean=record["mean"], std=record["std"],
              image_size=record["image_size"], in_chans=record["in_chans"], source_path=str(source or record["source"]),
              cloner_arch=record["cloner"])
    if mkd.adapter:
        from safetensors.torch import load_file

        mkd.adapters.load_state_dict(load_file(str(folder / ADAPTERS_NAME)))
    return mkd.eval()


@torch.no_grad()
def source_targets(mkd: MKD, images: Tensor, *, batch_size: int = 256) -> List[Tensor]:
    """Source features at the critical layers for all uint8 `images`, in batches, on the images' device."""
    parts: List[List[Tensor]] = []
    for start in range(0, len(images), batch_size):
        parts.append(mkd.source_features(to_float(images[start:start + batch_size])))
    return [torch.cat(layer) for layer in zip(*parts)]


@torch.no_grad()
def score_images(mkd: MKD, images: Tensor, *, batch_size: int = 256,
                 targets: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Anomaly score (the per-image MKD loss, eval mode) of uint8 `images`, on the CPU as float32 (N,).

    `targets` are the source features of `images` from `source_targets`, to share them between cloners.
    The pair is left in eval mode.
    """
    mkd.eval()
    device = next(mkd.cloner.parameters()).device
    scores = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size].to(device))
        batch_targets = None if targets is None else [t[start:start + batch_size].to(device) for t in targets]
        scores.append(mkd(x, batch_targets).float().cpu())
    return torch.cat(scores) if scores else torch.empty(0)
