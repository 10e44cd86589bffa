"""Where a benchmark's rows go: one JSON file with what ran them, and a copy under $OUT when the device
machine collects results from there."""
from __future__ import annotations

import json
import os
import sys
import time


def save(path: str, rows: list, **meta) -> None:
    """Write {"meta", "rows"} to `path` (and $OUT/<its name>); meta gets device, versions, date, command."""
    import torch
    import triton

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), **meta)
    out = os.environ.get("OUT")
    for p in filter(None, (path, out and os.path.join(out, os.path.basename(path)))):
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        with open(p, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
