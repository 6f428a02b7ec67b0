"""Build any timm or mosaic CIFAR model by name, with one-line errors instead of deep stack traces."""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

import timm
import torch
from timm.models import is_model, is_model_pretrained, model_entrypoint
from torch import nn

from ._base import CIFAR_MODELS
from .errors import ModelError

__all__ = ["check_forward", "create_model", "list_cifar_models", "close_matches"]


def list_cifar_models() -> List[str]:
    """Names of the CIFAR-style networks that mosaic registers in timm (sorted)."""
    return sorted(CIFAR_MODELS)


def close_matches(word: str, candidates: Iterable[str], *, n: int = 3) -> List[str]:
    """Up to `n` candidates that look like `word` (difflib ratio >= 0.6), best first."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{name} must be a positive integer, got {value!r}")


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    image_size: Optional[int] = None,
    where: str = "",
    **kwargs: Any,
) -> nn.Module:
    """Build model `name` (a CIFAR net from list_cifar_models() or any timm.list_models() name) via timm.create_model.

    Extra keyword options go to the model's constructor (e.g. drop_rate=0.3 for the WRNs, patch_size=4 for a ViT).
    `image_size` (default None: the network's own) is the side of the square input images: it is passed as
    `img_size` to constructors that take one (ViT, DeiT, Swin, EVA, ...) and dropped for those that do not
    (convnets, the CIFAR nets); an explicit img_size=... option is passed as given. `where` names the config
    key the options came from (e.g. 'student.kwargs') in errors. The options actually given to the constructor
    (img_size included when taken) are kept as `model.create_kwargs`, which save_model records for load_model.
    Raises ModelError for an unknown name (with close matches), a bad option, a bad class or channel
    count, or pretrained weights that do not exist or cannot be downloaded.
    """
    _check_count("num_classes", num_classes)
    _check_count("in_chans", in_chans)
    if image_size is not None:
        _check_count("image_size", image_size)
    source_prefixed = ":" in name  # 'hf-hub:org/repo' and 'local-dir:/path' are resolved by timm itself
    if not source_prefixed and not is_model(name):
        arch = name.split(".", 1)[0]
        guesses = close_matches(arch, dict.fromkeys(list_cifar_models() + timm.list_models()))
        hint = f"did you mean {', '.join(guesses)}? " if guesses else ""
        raise ModelError(f"unknown model '{name}'; {hint}(any name in timm.list_models() works)")
    if pretrained and not source_prefixed and name not in CIFAR_MODELS and not is_model_pretrained(name):
        raise ModelError(f"timm has no pretrained weights for '{name}'; use pretrained=False or load a checkpoint")
    build = functools.partial(timm.create_model, name, pretrained=pretrained, num_classes=num_classes,
                              in_chans=in_chans)
    options = dict(kwargs)
    if image_size is not None and "img_size" not in options:
        options["img_size"] = image_size  # offered to every network; those without the option refuse it
    try:
        try:
            model = build(**options)
        except TypeError as e:
            if "img_size" in kwargs or _unexpected_option(e) != "img_size":
                raise
            options.pop("img_size")  # a network without an input size (a convnet, a CIFAR net): build it as is
            model = build(**options)
    except ModelError:
        raise
    except Exception as e:
        err = _explain(e, name, pretrained, kwargs, where)
        if err is e:
            raise
        raise err from e
    model.create_kwargs = options
    if "img_size" in options and isinstance(options["img_size"], int):
        # timm keeps the pretrained 224px input_size; describe the network as built, as the CIFAR nets do
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        if "input_size" in cfg:
            cfg["input_size"] = (cfg["input_size"][0], options["img_size"], options["img_size"])
            model.pretrained_cfg = model.default_cfg = cfg
    return model


def _unexpected_option(e: TypeError) -> Optional[str]:
    """The keyword named by a constructor's 'unexpected keyword argument' TypeError, or None for other errors."""
    # Python: "X.__init__() got an unexpected keyword argument 'foo'"; timm: "... argument(s): ['foo']"
    found = re.search(r"unexpected keyword argument(?:\(s\))?:? \[?'([^']+)'", str(e))
    return found.group(1) if found else None


def _constructor_options(name: str, e: TypeError) -> Tuple[str, List[str]]:
    """The class named in a constructor TypeError and its keyword options (looked up in the model's module)."""
    found = re.match(r"(\w+)\.__init__\(\)", str(e))
    if found is None:
        return "", []
    try:
        module = sys.modules[model_entrypoint(name).__module__]
        params = inspect.signature(getattr(module, found.group(1)).__init__).parameters.values()
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
        return found.group(1), []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return found.group(1), [p.name for p in params if p.kind in kinds and p.name not in ("self", "num_classes",
                                                                                           "in_chans")]


def _explain(e: Exception, name: str, pretrained: bool, kwargs: Dict[str, Any], where: str) -> Exception:
    """Turn a known failure of timm.create_model into a one-line ModelError; return others unchanged."""
    text = str(e)
    bad = _unexpected_option(e) if isinstance(e, TypeError) else None
    if bad is not None:
        key = f"{where}.{bad}" if where else repr(bad)
        owner, options = _constructor_options(name, e)
        if not options:
            return ModelError(f"{key} is not an option of {name}; remove it (options given: {sorted(kwargs)})")
        guesses = close_matches(bad, options)
        hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        return ModelError(f"{key} is not an option of {name}{hint}: its {owner} takes {', '.join(options)}")
    if isinstance(e, RuntimeError) and "pretrained tag" in text:
        arch = name.split(".", 1)[0]
        return ModelError(f"{text} Drop the '.tag' part or pick one from timm.list_pretrained('{arch}*')")
    if name.startswith("hf-hub:"):  # timm reads a hub model's config (and weights) from the Hub, pretrained or not
        first_line = (text.strip().splitlines() or [""])[0][:200]
        return ModelError(
            f"'{name}' is read from the Hugging Face Hub, which could not be reached ({type(e).__name__}: "
            f"{first_line}); connect to the internet once (timm caches it), or use a timm model name and a checkpoint"
        )
    if pretrained:  # a failed weight download surfaces as many different exception types
        first_line = (text.strip().splitlines() or [""])[0][:200]
        return ModelError(
            f"pretrained weights for '{name}' could not be downloaded ({type(e).__name__}: {first_line}); "
            "use pretrained=false, or build the model and load a checkpoint with load_state()"
        )
    return e


def check_forward(
    model: nn.Module, *, image_size: int, channels: int, num_classes: int, role: str = "student"
) -> None:
    """Check that `model` maps a batch of two channels x image_size x image_size images to (2, num_classes) logits.

    Runs one no-grad forward in eval mode on the model's device and dtype; every module's train/eval mode is
    restored after and BatchNorm running statistics are untouched. The global random state is not used.
    Raises a one-line ModelError naming the network (as `role`), the image shape and the fix.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or type(model).__name__
    shape = f"{channels}x{image_size}x{image_size}"
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    noise = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, image_size, image_size, generator=noise).to(device=device, dtype=dtype)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200].rstrip(".")
        raise ModelError(
            f"{role} {arch} cannot take {shape} images: {first}; pick a network for this size or pass "
            f"{role}.kwargs.img_size/patch_size"
        ) from e
    finally:
        for m, training in modes:
            m.training = training
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise ModelError(
            f"{role} {arch} gives outputs shaped {got} for two {shape} images, not (2, {num_classes}) class logits; "
            "pick a classification network"
        )
