"""How a model's keywords travel through a function that has keywords of its own (``fit``,
``infer``): those the function does not take go to the model, ``model_kwargs`` carries
the ones that collide, and a keyword neither takes is an error naming it."""

from __future__ import annotations

import difflib
import inspect

__all__ = ["model_keywords"]


def model_keywords(caller, model, kwargs: dict, model_kwargs: dict | None) -> dict:
    """The model's keywords: ``kwargs`` (what ``caller`` did not take) and ``model_kwargs``.

    A keyword that is neither ``caller``'s nor the model's is refused here, where a
    misspelling of one of the caller's (``num_step=``) would otherwise reach the model or be
    lost.

    Example:
        >>> def fit(model, num_steps=10, **kwargs): ...
        >>> def model(y, scale=1.0): ...
        >>> model_keywords(fit, model, {"scale": 2.0}, {"num_steps": 3})
        {'scale': 2.0, 'num_steps': 3}
        >>> model_keywords(fit, model, {"num_step": 5}, None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: fit: keyword 'num_step' is neither fit's nor ...; did you mean 'num_steps'?
    """
    who = caller.__name__
    unknown = [k for k in kwargs if not _takes_keyword(model, k)]
    if unknown:
        known = [*inspect.signature(caller).parameters, *_keywords(model)]
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{who}: keyword {unknown[0]!r} is neither {who}'s nor the model's{hint}")
    if not model_kwargs:
        return kwargs
    clash = set(model_kwargs) & set(kwargs)
    if clash:
        raise TypeError(f"model keywords given twice: {sorted(clash)}")
    return {**kwargs, **model_kwargs}


def _keywords(model) -> list[str]:
    try:
        params = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): accept every keyword
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _takes_keyword(model, name: str) -> bool:
    try:
        params = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        return True
    return name in _keywords(model) or any(p.kind is p.VAR_KEYWORD for p in params)
