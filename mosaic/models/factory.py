"""Build any timm or mosaic CIFAR model by name, with one-line errors instead of deep stack traces."""

from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable, List

import timm
from timm.models import is_model, is_model_pretrained
from torch import nn

from ._base import CIFAR_MODELS
from .errors import ModelError

__all__ = ["create_model", "list_cifar_models", "close_matches"]


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
    **kwargs: Any,
) -> nn.Module:
    """Build model `name` (a CIFAR net from list_cifar_models() or any timm.list_models() name) via timm.create_model.

    Extra keyword options go to the model's constructor (e.g. drop_rate=0.3 for the WRNs).
    Raises ModelError for an unknown name (with close matches), a bad option, a bad class or channel
    count, or pretrained weights that do not exist or cannot be downloaded.
    """
    _check_count("num_classes", num_classes)
    _check_count("in_chans", in_chans)
    source_prefixed = ":" in name  # 'hf-hub:org/repo' and 'local-dir:/path' are resolved by timm itself
    if not source_prefixed and not is_model(name):
        arch = name.split(".", 1)[0]
        guesses = close_matches(arch, dict.fromkeys(list_cifar_models() + timm.list_models()))
        hint = f"did you mean {', '.join(guesses)}? " if guesses else ""
        raise ModelError(f"unknown model '{name}'; {hint}(any name in timm.list_models() works)")
    if pretrained and not source_prefixed and name not in CIFAR_MODELS and not is_model_pretrained(name):
        raise ModelError(f"timm has no pretrained weights for '{name}'; use pretrained=False or load a checkpoint")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except ModelError:
        raise
    except Exception as e:
        err = _explain(e, name, pretrained, kwargs)
        if err is e:
            raise
        raise err from e


def _explain(e: Exception, name: str, pretrained: bool, kwargs: Dict[str, Any]) -> Exception:
    """Turn a known failure of timm.create_model into a one-line ModelError; return others unchanged."""
    text = str(e)
    if isinstance(e, TypeError) and "unexpected keyword argument" in text:
        bad = text.rsplit("argument", 1)[-1].strip()
        return ModelError(f"model '{name}' has no option {bad}; remove it (options given: {sorted(kwargs)})")
    if isinstance(e, RuntimeError) and "pretrained tag" in text:
        arch = name.split(".", 1)[0]
        return ModelError(f"{text} Drop the '.tag' part or pick one from timm.list_pretrained('{arch}*')")
    if pretrained:  # a failed weight download surfaces as many different exception types
        first_line = (text.strip().splitlines() or [""])[0][:200]
        return ModelError(
            f"pretrained weights for '{name}' could not be downloaded ({type(e).__name__}: {first_line}); "
            "use pretrained=false, or build the model and load a checkpoint with load_state()"
        )
    return e
