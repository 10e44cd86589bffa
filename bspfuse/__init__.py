"""bspfuse: compile bulk-synchronous distributed LLM code into fused multi-GPU Triton kernels.

    import bspfuse
    program = bspfuse.capture(graph_module)              # or bspfuse.parse(source text)
    report = bspfuse.analyze(program, device="H200")      # the three taxes of the BSP form
    log = bspfuse.run_passes(program)                     # fusion decisions, stage by stage
    reports = bspfuse.explain(build, inputs, world_size=2)  # what torch.compile(backend="bspfuse") would fuse
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

# The top-level folders grammar/ and passes/ are the subpackages bspfuse.grammar and bspfuse.passes
# (pyproject maps them when installed). Running from a checkout, map them here, ahead of any installed
# copy: an editable install of another checkout would otherwise give this checkout's bspfuse its passes/.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_IN_CHECKOUT = os.path.isfile(os.path.join(_ROOT, "pyproject.toml"))


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    FOLDERS = ("passes", "grammar")

    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != "bspfuse" or parts[1] not in self.FOLDERS:
            return None
        folder = os.path.join(_ROOT, *parts[1:])
        if os.path.isfile(os.path.join(folder, "__init__.py")):
            return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])
        if os.path.isfile(folder + ".py"):
            return importlib.util.spec_from_file_location(fullname, folder + ".py")
        return None


if _IN_CHECKOUT and not any(isinstance(f, _CheckoutFolders) for f in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutFolders())


def capture(gm, world_size=None, name=None):
    from bspfuse.capture_fx import capture as _capture

    return _capture(gm, world_size=world_size, name=name)


def parse(text, filename="<string>", world_size=None, sizes=None):
    from bspfuse.grammar import parse as _parse

    return _parse(text, filename=filename, world_size=world_size, sizes=sizes)


def analyze(program, device="H200", **kw):
    from bspfuse.analysis import analyze as _analyze

    return _analyze(program, device=device, **kw)


def run_passes(program, passes=None, options=None):
    from bspfuse.passes import run_passes as _run

    return _run(program, passes, options)


def explain(build, inputs, world_size, **kw):
    from bspfuse.backend import explain as _explain

    return _explain(build, inputs, world_size, **kw)
