"""The command line: ``pyroflows demo`` and ``pyroflows infer MODEL.py:function --data D``.

Also ``python -m pyroflows``. Bad input (a missing file, an unknown function, data that do
not match the function's arguments, a model that fails) ends with exit status 2 or 1 and a
one-line message; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
import traceback
from pathlib import Path

__all__ = ["load_data", "load_model", "main"]


class UsageError(Exception):
    """Input the command cannot use; the message is the whole story (exit status 2)."""


def load_model(spec: str):
    """``"path/to/model.py:function"`` -> the function, loaded from that file.

    Example:
        >>> load_model("no_such_file.py:model")
        Traceback (most recent call last):
        ...
        pyroflows.cli.UsageError: model file not found: no_such_file.py
    """
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"expected MODEL.py:function, got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"model file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.resolve().parent))  # the model may import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise UsageError(f"{path} failed to import: {type(error).__name__}: {error}") from error
    finally:
        sys.path.pop(0)
    function = getattr(module, name, None)
    if not callable(function):
        known = [k for k, v in vars(module).items() if inspect.isfunction(v) and not k[0] == "_"]
        raise UsageError(f"{path} has no function {name!r} (it defines: {', '.join(known)})")
    return function


def load_data(path: str | None, function) -> dict:
    """JSON data named as ``function``'s arguments: lists become float tensors (write
    ``idx.long()`` in the model for an index array), numbers stay numbers.

    Example:
        >>> def model(y, scale=1.0): ...
        >>> load_data(None, model)
        Traceback (most recent call last):
        ...
        pyroflows.cli.UsageError: model(y, scale=1.0) needs --data with 'y'
    """
    import torch

    params = inspect.signature(function).parameters
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    required = [n for n, p in params.items() if p.default is p.empty and p.kind in named]
    signature = f"{function.__name__}{inspect.signature(function)}"
    if path is None:
        if required:
            raise UsageError(f"{signature} needs --data with {', '.join(map(repr, required))}")
        return {}
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"data file not found: {path}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise UsageError(f"{path} must hold a JSON object of the model's arguments")
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in raw if k not in params and not takes_any]
    missing = [k for k in required if k not in raw]
    if unknown or missing:
        parts = [f"unknown {', '.join(map(repr, unknown))}" if unknown else ""]
        parts.append(f"missing {', '.join(map(repr, missing))}" if missing else "")
        detail = "; ".join(p for p in parts if p)
        raise UsageError(f"{path} does not match {signature}: {detail}")
    data = {}
    for key, value in raw.items():
        if isinstance(value, list):
            try:
                value = torch.tensor(value, dtype=torch.get_default_dtype())
            except (TypeError, ValueError) as error:
                raise UsageError(f"{path}: {key!r} is not a numeric array ({error})") from error
        data[key] = value
    return data


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="pyroflows", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="AutoNormal, AutoFlowGuide and infer on eight schools")
    demo.add_argument("--out", default="pyroflows_demo.png", help="PNG of the marginals")
    demo.add_argument("--seed", type=int, default=0)
    run = commands.add_parser("infer", help="a posterior for MODEL.py:function")
    run.add_argument("model", metavar="MODEL.py:function")
    run.add_argument("--data", help="JSON object of the function's arguments")
    run.add_argument("--out", help="write the draws as ArviZ netCDF (e.g. posterior.nc)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--num-samples", type=int, default=1000)
    run.add_argument("--time-budget", type=float, default=None, help="seconds")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(out=args.out, seed=args.seed)
        else:
            run_infer(args)
    except UsageError as error:
        return _fail(args, f"pyroflows {args.command}: {error}", 2)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return _fail(args, f"pyroflows {args.command}: {type(error).__name__}: {first}", 1)
    return 0


def run_infer(args) -> None:
    model = load_model(args.model)
    data = load_data(args.data, model)
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be positive, got {args.num_samples}")
    from .inference import infer

    posterior = infer(
        model,
        num_samples=args.num_samples,
        seed=args.seed,
        time_budget=args.time_budget,
        model_kwargs=data,
    )
    import pandas as pd

    with pd.option_context("display.width", 120, "display.max_rows", 60):
        print(posterior.summary())
    print(posterior.route)
    if args.out:
        posterior.to_inference_data().to_netcdf(args.out)
        print(f"wrote {args.out}")


def _fail(args, message: str, status: int) -> int:
    if args.debug:
        traceback.print_exc()
    else:
        print(message, file=sys.stderr)
        if status == 1:
            print("(run with --debug for the traceback)", file=sys.stderr)
    return status
