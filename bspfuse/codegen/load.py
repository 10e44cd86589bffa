"""Turn generated source into importable kernels: Triton reads a kernel's source from its file, so the
module is written to a cache folder (named by a hash of the text) and imported from there."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from bspfuse.codegen.triton import KernelSource


def cache_dir() -> Path:
    root = os.environ.get("BSPFUSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bspfuse")
    path = Path(root) / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_kernel(ks: KernelSource):
    """The @triton.jit function that `ks` defines (same text, same module: compiled once per process)."""
    digest = hashlib.sha256(ks.source.encode()).hexdigest()[:16]
    mod_name = f"bspfuse_generated_{ks.name}_{digest}"
    if mod_name not in sys.modules:
        path = cache_dir() / f"{mod_name}.py"
        if not path.exists() or path.read_text() != ks.source:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(ks.source)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    return getattr(sys.modules[mod_name], ks.name)
