"""Feature taps: capture the outputs of named submodules during a forward pass, keeping the autograd graph."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Union

from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import ModelError
from .factory import close_matches
from .utils import unwrap_model

__all__ = ["FeatureTaps", "feature_taps", "feature_info_of", "resolve_layer"]

LayerRef = Union[str, int]


def feature_info_of(model: nn.Module) -> List[Dict[str, Any]]:
    """The model's feature_info as a list of dicts (empty when it has none); wrappers are looked through."""
    info = getattr(unwrap_model(model), "feature_info", None)
    if info is None:
        return []
    if hasattr(info, "get_dicts"):  # timm's FeatureInfo (features_only models)
        return list(info.get_dicts())
    return [dict(d) for d in info]


def _arch(model: nn.Module) -> str:
    inner = unwrap_model(model)
    return (getattr(inner, "pretrained_cfg", None) or {}).get("architecture") or type(inner).__name__


def _index_listing(info: List[Dict[str, Any]]) -> str:
    return ", ".join(f"{i}={d.get('module')}" for i, d in enumerate(info))


def resolve_layer(model: nn.Module, layer: LayerRef) -> str:
    """Module path inside `model` for `layer`: a path like "layer3" or "layer2.0.conv1", or a feature_info index."""
    modules = dict(model.named_modules())
    inner = unwrap_model(model)
    # feature_info and user paths are relative to the unwrapped model; find where it sits inside the wrappers
    base = next((n + "." for n, m in modules.items() if m is inner and n), "")
    if isinstance(layer, bool) or not isinstance(layer, (str, int)):
        raise ModelError(f"a layer must be a module path (str) or a feature_info index (int), got {layer!r}")
    if isinstance(layer, int):
        info = feature_info_of(model)
        if not info:
            raise ModelError(
                f"{_arch(model)} has no feature_info, so layer {layer} is undefined; give a module path instead"
            )
        if not -len(info) <= layer < len(info):
            raise ModelError(
                f"feature index {layer} is out of range: {_arch(model)}.feature_info has {len(info)} entries "
                f"({_index_listing(info)})"
            )
        name = str(info[layer]["module"])
    else:
        name = layer
    for candidate in (base + name, name):
        if candidate in modules and candidate:
            return candidate
    names = [n[len(base):] for n in modules if n.startswith(base) and len(n) > len(base)]
    guesses = close_matches(name, names)
    top_level = [n for n in names if "." not in n]
    hint = f"did you mean {', '.join(guesses)}? " if guesses else f"top-level modules: {top_level}; "
    raise ModelError(
        f"unknown layer '{name}' in {_arch(model)}; {hint}"
        "(layers are paths from dict(model.named_modules()) or int indices into model.feature_info)"
    )


class FeatureTaps:
    """Context manager recording the outputs of chosen submodules on every forward pass.

    Usage: ``with FeatureTaps(model, ["layer2", -1]) as feats: logits = model(x)``; afterwards
    ``feats["layer2"]`` and ``feats[-1]`` hold the outputs (keyed exactly as requested) with their autograd
    graph intact, so they can enter a loss. A later forward overwrites them; a module run twice keeps its
    last output. Hooks are removed on exit. `detach=True` stores detached tensors (e.g. for a frozen teacher).
    For taps that live across a training loop, call `attach()` once and `remove()` at the end.
    """

    def __init__(self, model: nn.Module, layers: Union[LayerRef, Iterable[LayerRef]], *, detach: bool = False) -> None:
        if isinstance(layers, (str, int)):
            layers = [layers]
        self.model = model
        self.paths: Dict[LayerRef, str] = {layer: resolve_layer(model, layer) for layer in layers}
        if not self.paths:
            raise ModelError("FeatureTaps needs at least one layer to tap")
        self.detach = detach
        self.features: Dict[LayerRef, Any] = {}
        self._handles: List[RemovableHandle] = []

    def _hook(self, layer: LayerRef):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.features[layer] = output.detach() if self.detach and hasattr(output, "detach") else output

        return hook

    def attach(self) -> Dict[LayerRef, Any]:
        """Register the forward hooks (idempotent) and return the dict that forward passes fill."""
        if not self._handles:
            modules = dict(self.model.named_modules())
            self._handles = [
                modules[path].register_forward_hook(self._hook(layer)) for layer, path in self.paths.items()
            ]
        return self.features

    def remove(self) -> None:
        """Remove the hooks; the features captured so far stay available."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Drop the captured features (frees their graphs)."""
        self.features.clear()

    def __enter__(self) -> Dict[LayerRef, Any]:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def feature_taps(model: nn.Module, layers: Union[LayerRef, Iterable[LayerRef]], *, detach: bool = False) -> FeatureTaps:
    """Shorthand for FeatureTaps(model, layers, detach=detach); use it in a with-statement."""
    return FeatureTaps(model, layers, detach=detach)
