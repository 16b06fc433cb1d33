"""Differentiating a model with respect to its trainable parameters only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ember.nn.module import Module
from ember.transforms.autodiff import value_and_grad as _value_and_grad

__all__ = ["value_and_grad"]


def value_and_grad(fn: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
    """``fn(model, *args) -> loss`` becomes ``(model, *args) -> (loss, grads)``.

    ``grads`` is ``{name: gradient}`` for ``model.trainable_parameters()``: frozen
    parameters (a LoRA base model, say) are constants of the differentiated function, so no
    gradient is computed for them at all. The dict is what ``ember.optim`` updates.
    """
    def wrapped(model: Module, *args: Any, **kwargs: Any) -> Any:
        def of_params(params: dict[str, Any], *a: Any, **kw: Any) -> Any:
            return fn(model.replace(params), *a, **kw)
        return _value_and_grad(of_params, has_aux=has_aux)(model.trainable_parameters(),
                                                           *args, **kwargs)
    return wrapped
