"""Learning-rate schedules: functions ``step -> lr`` that also work on a traced step.

The step is the number of updates already taken (the optimizer's ``state.step``), so the first
update uses ``schedule(0)``, exactly as a PyTorch ``LambdaLR`` drives ``optimizer.step()``. The
warm-up schedules follow ``transformers``: the learning rate rises linearly from **0** at step 0
and reaches the peak at ``step == warmup_steps``, so the very first update has learning rate 0.

Every schedule is written with ``enp.where``/``enp.clip`` rather than Python ``if`` on the step,
so an optimizer that calls it inside ``ember.jit`` traces one graph for all steps. Each returns a
float64 scalar array; the optimizer casts it to each parameter's compute dtype.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import ember.numpy as enp
from ember.core.array import Array
from ember.errors import EmberValueError

__all__ = ["constant", "linear_warmup", "warmup_cosine", "warmup_linear"]

Schedule = Callable[[Any], Array]


class _Described:
    """A schedule that prints as the call that made it, so an optimizer's repr is readable."""

    def __init__(self, fn: Schedule, text: str):
        self.fn, self.text = fn, text

    def __call__(self, step: Any) -> Array:
        return self.fn(step)

    def __repr__(self) -> str:
        return self.text


def _described(factory: Callable[..., Schedule]) -> Callable[..., Schedule]:
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> Schedule:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        text = ", ".join(f"{k}={v!r}" for k, v in bound.arguments.items())
        return _Described(factory(*args, **kwargs), f"{factory.__name__}({text})")
    return make


@_described
def constant(lr: float) -> Schedule:
    """``lr`` at every step (the same as passing the number itself to the optimizer)."""
    _check_lr("constant", lr)
    return lambda step: enp.full((), lr, dtype=enp.float64)


@_described
def linear_warmup(peak_lr: float, warmup_steps: int) -> Schedule:
    """``peak_lr * step / warmup_steps`` during warm-up, then ``peak_lr``.

    Matches ``transformers.get_constant_schedule_with_warmup``.
    """
    _check_lr("linear_warmup", peak_lr)
    _check_steps("linear_warmup", warmup_steps=warmup_steps)

    def schedule(step: Any) -> Array:
        s = _as_float(step)
        return peak_lr * enp.where(s < warmup_steps, s / max(1, warmup_steps), 1.0)
    return schedule


@_described
def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  min_lr: float = 0.0) -> Schedule:
    """Linear warm-up to ``peak_lr``, then half a cosine down to ``min_lr`` at ``total_steps``.

    Matches ``transformers.get_cosine_schedule_with_warmup`` (and, with ``min_lr``,
    ``get_cosine_with_min_lr_schedule_with_warmup``) up to ``total_steps``. Past it the
    learning rate stays at ``min_lr``; transformers would follow the cosine back up.
    """
    _check_lr("warmup_cosine", peak_lr, min_lr)
    _check_steps("warmup_cosine", warmup_steps=warmup_steps, total_steps=total_steps)

    def schedule(step: Any) -> Array:
        s = _as_float(step)
        progress = enp.clip((s - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
        decay = min_lr + (peak_lr - min_lr) * (0.5 * (1.0 + enp.cos(math.pi * progress)))
        return enp.where(s < warmup_steps, peak_lr * (s / max(1, warmup_steps)), decay)
    return schedule


@_described
def warmup_linear(peak_lr: float, warmup_steps: int, total_steps: int,
                  end_lr: float = 0.0) -> Schedule:
    """Linear warm-up to ``peak_lr``, then a straight line down to ``end_lr`` at ``total_steps``.

    Matches ``transformers.get_linear_schedule_with_warmup`` (which has ``end_lr = 0``); past
    ``total_steps`` the learning rate stays at ``end_lr``.
    """
    _check_lr("warmup_linear", peak_lr, end_lr)
    _check_steps("warmup_linear", warmup_steps=warmup_steps, total_steps=total_steps)

    def schedule(step: Any) -> Array:
        s = _as_float(step)
        remaining = enp.maximum((total_steps - s) / max(1, total_steps - warmup_steps), 0.0)
        decay = end_lr + (peak_lr - end_lr) * remaining
        return enp.where(s < warmup_steps, peak_lr * (s / max(1, warmup_steps)), decay)
    return schedule


def _as_float(step: Any) -> Array:
    return enp.asarray(step).astype(enp.float64)


def _check_lr(name: str, *lrs: float) -> None:
    for lr in lrs:
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
            raise EmberValueError(f"{name}: learning rates must be numbers >= 0, got {lr!r}")


def _check_steps(name: str, **steps: int) -> None:
    for key, value in steps.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise EmberValueError(f"{name}: {key} must be an int >= 0, got {value!r}")
    if steps.get("total_steps", math.inf) < steps["warmup_steps"]:
        raise EmberValueError(f"{name}: total_steps ({steps['total_steps']}) is smaller than "
                              f"warmup_steps ({steps['warmup_steps']})")
