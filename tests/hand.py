"""Plain-Python reference computations for the loss tests (no torch in the arithmetic)."""
from __future__ import annotations

import math

import pytest
import torch


def softmax(row: list[float], T: float = 1.0) -> list[float]:
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ce(row: list[float], label: int) -> float:
    return -math.log(softmax(row)[label])


def huber(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def approx(x: float):
    """The data-free tests' tolerance."""
    return pytest.approx(x, rel=1e-5, abs=1e-6)


# two samples, three classes: student and teacher logits and labels shared by the response tests
S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T_ = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
Y = [1, 2]
