"""inspect.png: what the teacher makes of a pool, at a glance (PIL only: no plotting dependency).

Top left, the teacher's class histogram over the pool (blue) beside the in-domain test set's (grey); top right,
the histogram of each image's top probability; below, per class, the pool images the teacher is surest of.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.functional import to_pil_image

from mosaic.data import ImageSet

POOL, TEST, INK, GRID = (52, 101, 164), (170, 170, 170), (20, 20, 20), (225, 225, 225)
ROW, THUMB, PAD, NAME_W = 16, 40, 12, 110


def surest(probs: Tensor, cls: int, n: int) -> Tensor:
    """Indices of up to n images predicted as `cls`, the teacher's surest first."""
    top, pred = probs.max(dim=1)
    idx = (pred == cls).nonzero().flatten()
    return idx[torch.argsort(top[idx], descending=True)[:n]]


def class_panel(draw: ImageDraw.ImageDraw, font, x: int, y: int, w: int, report: dict) -> int:
    """Horizontal bars: share of the teacher's predictions per class, pool and test; returns the panel's bottom."""
    c = report["num_classes"]
    pool = [n / report["pool_size"] for n in report["counts"]]
    test = [n / report["test"]["pool_size"] for n in report["test"]["counts"]] if "test" in report else None
    top = max(pool + (test or []) + [1e-9])
    bar_w = w - NAME_W - (95 if test else 50)
    draw.text((x, y), "teacher's predicted class, share of images: pool (blue)" +
              (" / in-domain test (grey)" if test else ""), fill=INK, font=font)
    y += ROW + 4
    for i in range(c):
        draw.text((x, y + 2), report["classes"][i][:16], fill=INK, font=font)
        draw.rectangle([x + NAME_W, y + 2, x + NAME_W + max(1, int(bar_w * pool[i] / top)), y + ROW - 6], fill=POOL)
        if test:
            draw.rectangle([x + NAME_W, y + ROW - 5, x + NAME_W + max(1, int(bar_w * test[i] / top)), y + ROW - 2],
                           fill=TEST)
        share = f"{100 * pool[i]:.1f}%" + (f" / {100 * test[i]:.1f}%" if test else "")
        draw.text((x + NAME_W + bar_w + 4, y + 2), share, fill=INK, font=font)
        y += ROW
    balanced = x + NAME_W + int(bar_w / (c * top))
    draw.line([balanced, y - c * ROW, balanced, y], fill=(200, 60, 60))
    draw.text((balanced + 2, y + 2), "balanced", fill=(200, 60, 60), font=font)
    return y + ROW


def confidence_panel(draw: ImageDraw.ImageDraw, font, x: int, y: int, w: int, h: int, probs: Tensor,
                     test_probs: Tensor | None) -> None:
    """Vertical bars: fraction of images per bin of top probability (10 bins over [0, 1])."""
    draw.text((x, y), "top probability per image (fraction of images" + (", blue pool, grey test)"
              if test_probs is not None else ")"), fill=INK, font=font)
    y0, y1 = y + ROW + 4, y + h - ROW
    hists = [(torch.histc(p.max(1).values.float(), bins=10, min=0, max=1) / len(p), colour)
             for p, colour in ((probs, POOL), (test_probs, TEST)) if p is not None]
    peak = max(float(hh.max()) for hh, _ in hists) or 1.0
    step = w // 10
    for b in range(10):
        for k, (hh, colour) in enumerate(hists):
            height = int((y1 - y0) * float(hh[b]) / peak)
            left = x + b * step + 2 + k * (step - 4) // len(hists)
            draw.rectangle([left, y1 - height, left + (step - 4) // len(hists) - 1, y1], fill=colour)
        draw.text((x + b * step + 2, y1 + 2), f"{b / 10:.1f}", fill=INK, font=font)
    draw.line([x, y1, x + w, y1], fill=INK)


def inspect_figure(report: dict, pool: ImageSet, probs: Tensor, test_probs: Tensor | None, path: Path, *,
                   per_class: int = 8) -> None:
    """Draw inspect.png from inspect.json's report and the teacher's softmax outputs over the pool."""
    font = ImageFont.load_default()
    c = report["num_classes"]
    left_w = NAME_W + 330
    width = max(left_w + 360 + 3 * PAD, NAME_W + per_class * (THUMB + 2) + 2 * PAD)
    top_h = max((c + 3) * ROW + 8, 170)  # the class bars or the confidence histogram, whichever is taller
    height = PAD + ROW + top_h + ROW + c * (THUMB + 4) + PAD
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    title = f"{report['pool_size']} images, teacher {report['teacher']}: {report['pool']}"
    while draw.textlength(title, font=font) > width - 2 * PAD:
        title = title[:-4] + "..."
    draw.text((PAD, PAD), title, fill=INK, font=font)
    y = PAD + ROW + 4
    class_panel(draw, font, PAD, y, left_w, report)
    confidence_panel(draw, font, left_w + 2 * PAD, y, width - left_w - 3 * PAD, top_h - ROW, probs, test_probs)
    y += top_h
    draw.text((PAD, y), f"per class, the pool images the teacher is surest of (up to {per_class}; "
              "number predicted as the class, top probability of the first)", fill=INK, font=font)
    y += ROW + 2
    for cls in range(c):
        idx = surest(probs, cls, per_class)
        label = f"{report['classes'][cls][:12]} {report['counts'][cls]}"
        draw.text((PAD, y + 4), label, fill=INK, font=font)
        if len(idx):
            draw.text((PAD, y + 4 + ROW), f"p={float(probs[idx[0], cls]):.2f}", fill=INK, font=font)
        else:
            draw.text((NAME_W + PAD, y + THUMB // 2 - 6), "none: the pool cannot teach this class", fill=(200, 60, 60),
                      font=font)
        for k, i in enumerate(idx.tolist()):
            thumb = to_pil_image(pool.images[i]).resize((THUMB, THUMB), Image.NEAREST)
            img.paste(thumb, (NAME_W + PAD + k * (THUMB + 2), y))
        for k in range(len(idx), per_class):
            x0 = NAME_W + PAD + k * (THUMB + 2)
            draw.rectangle([x0, y, x0 + THUMB - 1, y + THUMB - 1], outline=GRID)
        y += THUMB + 4
    img.save(path)
