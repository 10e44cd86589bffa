"""Load a program named on the command line: `path/to/file.py:function`.

The function returns one of
    a torch.fx.GraphModule                 captured with `bspfuse.capture_fx.capture`
    (model, example_inputs)                traced with make_fx under FakeTensorMode, then captured
    a bspfuse Program                      used as it is
and gets `world_size=` when it accepts that keyword and a world size was given. Every problem the user
can cause is a one-line TargetError; this module prints nothing (the CLI does).

Example::

    program = load_program("examples/sp_mlp.py:build", world_size=8)
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import traceback
from typing import Any

from bspfuse.ir import Program


class TargetError(Exception):
    """A target that cannot be loaded: names the file, the function and what is wrong."""


def load_program(target: str, world_size: int | None = None) -> Program:
    """Run `file.py:function` and turn what it returns into a Program (see the module docstring)."""
    fn = load_function(target)
    path, func_name = _split(target)
    where = f"{path}:{func_name}"
    result = _call(fn, where, path, world_size)
    return _to_program(result, where, path, func_name, world_size)


def load_function(target: str):
    """The function `path/to/file.py:function` names (TargetError if there is none)."""
    path, func_name = _split(target)
    module = _load_module(path)
    fn = getattr(module, func_name, None)
    if fn is None or not callable(fn):
        known = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__)
        what = "is not a function" if fn is not None else "is not defined"
        raise TargetError(f"{path}: '{func_name}' {what} (functions there: {', '.join(known) or 'none'})")
    return fn


def _split(target: str) -> tuple[str, str]:
    path, sep, func = target.rpartition(":")
    if not sep or not path or not func:
        raise TargetError(f"target '{target}' should be path/to/file.py:function")
    if not func.isidentifier():
        raise TargetError(f"target '{target}': '{func}' is not a Python function name")
    if os.path.isdir(path):
        raise TargetError(f"{path}: is a directory; a target is path/to/file.py:function")
    if not os.path.isfile(path):
        raise TargetError(f"{path}: no such file")
    return path, func


def _load_module(path: str):
    name = "bspfuse_target_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"{path}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise TargetError(f"{e.filename or path}:{e.lineno}:{e.offset}: syntax error: {e.msg}") from None
    except Exception as e:
        sys.modules.pop(name, None)
        raise TargetError(f"{_user_line(e, path)}: loading failed: {type(e).__name__}: {e}") from e
    return module


def _call(fn, where: str, path: str, world_size: int | None) -> Any:
    kwargs = {}
    if world_size is not None:
        params = inspect.signature(fn).parameters
        if "world_size" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kwargs["world_size"] = world_size
    try:
        return fn(**kwargs)
    except TargetError:
        raise
    except Exception as e:
        raise TargetError(f"{_user_line(e, path)}: {where} raised {type(e).__name__}: {_first_line(e)}") from e


def _to_program(result, where: str, path: str, func_name: str, world_size: int | None) -> Program:
    import torch

    from bspfuse.capture_fx import CaptureError, capture, trace

    if isinstance(result, Program):
        if world_size is not None and result.world_size is not None and result.world_size != world_size:
            raise TargetError(f"{where} returned a program for world size {result.world_size}, "
                              f"but world size {world_size} was asked for")
        return result
    if (isinstance(result, tuple) and len(result) == 2 and callable(result[0])
            and isinstance(result[1], (list, tuple))):
        model, example_inputs = result
        try:
            result = trace(model, example_inputs, world_size=world_size)
        except Exception as e:
            raise TargetError(f"{where}: tracing the returned model failed: {type(e).__name__}: {_first_line(e)}"
                              ) from e
    if isinstance(result, torch.fx.GraphModule):
        try:
            return capture(result, world_size=world_size, name=_program_name(path, func_name))
        except CaptureError as e:
            raise TargetError(f"{where}: {e}") from None
    raise TargetError(f"{where} returned {type(result).__name__}; expected a torch.fx.GraphModule, "
                      "a (model, example_inputs) pair or a bspfuse Program")


def _program_name(path: str, func_name: str) -> str:
    """`build` functions name the program after their file (sp_mlp.py:build -> sp_mlp)."""
    if func_name != "build":
        return func_name
    stem = "".join(c if c.isalnum() or c == "_" else "_" for c in os.path.splitext(os.path.basename(path))[0])
    return stem if stem and not stem[0].isdigit() else f"p{stem}"


def _user_line(e: BaseException, path: str) -> str:
    """file:line of the deepest frame of the user's file in the traceback, else the file."""
    here = os.path.abspath(path)
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if os.path.abspath(frame.filename) == here:
            line = frame.lineno
    return f"{path}:{line}" if line is not None else path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"
