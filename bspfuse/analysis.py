"""The three taxes of a bulk-synchronous program, per op, from a roofline cost model.

The model (all times in microseconds, on one rank; `dev` is a `bspfuse.devices.Device`):

Kernels. matmul, pointwise, opaque, cat, decode_partial, merge_states and collectives are one kernel
launch each; fused ops are one launch; wait, reshape, transpose and split are none (a wait is a sync
point; the others are views).

Bytes. A kernel's operand is *inter-kernel* when it was written by another kernel (looking through views
and waits), and *boundary* when it is a program input or a result no kernel reads (program outputs).
Boundary bytes must cross HBM whatever the schedule; inter-kernel bytes are the ones fusion removes.

Op times (no taxes in them):
    matmul            max(2*M*N*K / matmul rate, boundary bytes / HBM)   (M = all rows of a[..., M, K])
    other kernels     boundary bytes / HBM                               (memory-bound)
    all_gather        alpha + S*(W-1)/W / link        S = bytes of the gathered tensor (ring)
    reduce_scatter    alpha + S*(W-1)/W / link        S = bytes of the unreduced input (ring)
    all_reduce        alpha + 2*S*(W-1)/W / link      ring = reduce_scatter + all_gather
    fused op          max(its matmul time, its collective time)
    wait, views       0
alpha is the device's collective latency, `link` its per-direction interconnect bandwidth.

Taxes:
    launch tax              launches * launch latency
    bulk-synchronous tax    at each wait, the faster ranks idle until the slowest arrives. The slowest
                            is `skew` late: `skew_us` if given, else `skew_fraction` (5%) of the compute
                            time (op times of non-collective kernels) since the previous wait.
    data-locality tax       for each value a kernel writes and other kernels read: its bytes written once
                            plus read once per reading kernel, over HBM bandwidth. The write is charged
                            to the producer's row, each read to the reader's row.

Totals: BSP time = sum of op times + the three taxes; overlap bound = max(total compute time, total
communication time), with no taxes (a perfectly overlapped, fused program).

Example::

    report = analyze(capture(gm), device="H200")
    print(report.table())
    report.to_json()["totals"]["launch_tax_us"]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import sympy

from bspfuse.devices import Device, device as lookup_device
from bspfuse.ir import COLLECTIVES, DTYPE_BYTES, FUSED_OPCODES, WORLD, Op, Program, TensorType, Value, concrete

VIEW_OPS = ("reshape", "transpose", "split")
SYNC_OPS = ("wait",)
DEFAULT_SKEW_FRACTION = 0.05


class AnalysisError(ValueError):
    """The program cannot be costed as given (a symbolic dim without a size, an unknown device)."""


@dataclass
class OpCost:
    """One op's row: what it costs and which taxes it pays. `measured_us` is filled in by a benchmark."""

    index: int
    opcode: str
    values: str  # the op's result names, e.g. "%mm"
    origin: str | None
    kind: str  # compute | comm | fused | sync | view
    launches: int
    flops: float = 0.0
    comm_bytes: float = 0.0  # the collective's tensor size S
    boundary_bytes: float = 0.0
    locality_bytes: float = 0.0
    compute_us: float = 0.0
    comm_us: float = 0.0
    op_time_us: float = 0.0
    launch_tax_us: float = 0.0
    bulk_synchronous_tax_us: float = 0.0
    data_locality_tax_us: float = 0.0
    measured_us: float | None = None
    note: str = ""


@dataclass
class TaxReport:
    program: str
    device: Device
    world_size: int
    sizes: dict[str, int]
    skew: str  # how the skew was chosen, in words
    rows: list[OpCost] = field(default_factory=list)

    def total(self, key: str) -> float:
        return sum(getattr(r, key) for r in self.rows)

    def totals(self) -> dict[str, float | None]:
        compute, comm = self.total("compute_us"), self.total("comm_us")
        launch, sync, locality = (self.total("launch_tax_us"), self.total("bulk_synchronous_tax_us"),
                                  self.total("data_locality_tax_us"))
        measured = [r.measured_us for r in self.rows if r.measured_us is not None]
        return {
            "launches": self.total("launches"),
            "op_time_us": self.total("op_time_us"),
            "compute_us": compute,
            "comm_us": comm,
            "launch_tax_us": launch,
            "bulk_synchronous_tax_us": sync,
            "data_locality_tax_us": locality,
            "bsp_time_us": self.total("op_time_us") + launch + sync + locality,
            "overlap_bound_us": max(compute, comm),
            "measured_us": sum(measured) if measured else None,
        }

    def to_json(self) -> dict:
        """A JSON-ready dict: program, device (with the source of every number), model, totals, ops."""
        return {
            "program": self.program,
            "world_size": self.world_size,
            "sizes": dict(self.sizes),
            "device": {"name": self.device.name, **self.device.sources()},
            "model": {"skew": self.skew, "description": __doc__.split("Example::")[0].strip()},
            "totals": self.totals(),
            "ops": [asdict(r) for r in self.rows],
        }

    def table(self) -> str:
        """A text table for people: one line per op that costs anything, then the totals."""
        head = ("op", "opcode", "from", "launch", "time us", "launch tax", "sync tax", "locality tax")
        lines = [head]
        for r in self.rows:
            if r.kind == "view":
                continue
            lines.append((r.values, r.opcode, r.origin or "", str(r.launches), _us(r.op_time_us),
                          _us(r.launch_tax_us), _us(r.bulk_synchronous_tax_us), _us(r.data_locality_tax_us)))
        t = self.totals()
        lines.append(("total", "", "", str(t["launches"]), _us(t["op_time_us"]), _us(t["launch_tax_us"]),
                      _us(t["bulk_synchronous_tax_us"]), _us(t["data_locality_tax_us"])))
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        right = {3, 4, 5, 6, 7}

        def fmt(row):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

        out = [f"{self.program} on {self.device.name}, world size {self.world_size}",
               fmt(head), "  ".join("-" * w for w in widths)]
        out += [fmt(row) for row in lines[1:-1]]
        out += ["  ".join("-" * w for w in widths), fmt(lines[-1]), ""]
        taxes = t["launch_tax_us"] + t["bulk_synchronous_tax_us"] + t["data_locality_tax_us"]
        out.append(f"BSP time        {_us(t['bsp_time_us'])} us  (ops {_us(t['op_time_us'])} + taxes {_us(taxes)})")
        out.append(f"overlap bound   {_us(t['overlap_bound_us'])} us  (max of compute {_us(t['compute_us'])}, "
                   f"communication {_us(t['comm_us'])})")
        if t["bsp_time_us"] > 0:
            out.append(f"BSP / bound     {t['bsp_time_us'] / max(t['overlap_bound_us'], 1e-12):.2f}x")
        out.append(f"skew            {self.skew}")
        return "\n".join(out)


def _us(x: float) -> str:
    return f"{x:.1f}"


# ------------------------------------------------------------------------------------------ analyze


def analyze(program: Program, device: str | Device = "H200", skew_us: float | None = None,
            sizes: dict[str, int] | None = None, skew_fraction: float = DEFAULT_SKEW_FRACTION) -> TaxReport:
    """Cost every op of `program` on `device` and split the overheads into the three taxes.

    `sizes` gives symbolic dims (overriding `program.sizes`); `skew_us` fixes the rank skew at each wait,
    otherwise it is `skew_fraction` of the compute time since the previous wait.

    Example::

        analyze(program, "H200", sizes={"M": 8192}).totals()["bsp_time_us"]
    """
    try:
        dev = lookup_device(device)
    except ValueError as e:
        raise AnalysisError(str(e)) from None
    env = {**program.sizes, **(sizes or {})}
    world = program.world_size if program.world_size is not None else env.get("world")
    _check_sizes(program, env, world)
    world = int(world) if world is not None else 1
    skew_text = (f"{skew_us:g} us at every wait (given)" if skew_us is not None else
                 f"{skew_fraction:.0%} of the compute time since the previous wait")
    report = TaxReport(program.name, dev, world, {k: v for k, v in env.items() if k != "world"}, skew_text)
    _Costing(program, dev, env, world, skew_us, skew_fraction, report).run()
    return report


def _check_sizes(program: Program, env: dict, world) -> None:
    missing: set[str] = set()
    for v in program.values():
        for d in v.type.shape:
            if isinstance(d, int):
                continue
            for s in sympy.sympify(d).free_symbols:
                if s == WORLD and world is None:
                    missing.add("world")
                elif s != WORLD and str(s) not in env:
                    missing.add(str(s))
    if world is None and any(op.opcode in COLLECTIVES or op.opcode in FUSED_OPCODES for op in program.ops):
        missing.add("world")
    if missing:
        names = sorted(missing)
        example = ", ".join(f"'{n}': ..." for n in names)
        raise AnalysisError(f"program {program.name}: no size for symbolic dim{'s' if len(names) > 1 else ''} "
                            f"{', '.join(names)}; pass sizes={{{example}}}")


class _Costing:
    def __init__(self, program, dev: Device, env, world, skew_us, skew_fraction, report: TaxReport):
        self.p, self.dev, self.env, self.world = program, dev, env, world
        self.skew_us, self.skew_fraction, self.report = skew_us, skew_fraction, report
        self.hbm = dev.hbm_gbps.value * 1e3  # bytes per us
        self.link = dev.link_gbps.value * 1e3
        self.rate = dev.matmul_tflops.value * 1e6  # flops per us

    def nbytes(self, t: TensorType) -> float:
        return float(t.numel(self.env, self.world) * DTYPE_BYTES[t.dtype])

    def dim(self, d) -> int:
        return concrete(d, self.env, self.world)

    def run(self) -> None:
        roots = self._roots()
        readers = self._readers(roots)
        rows = []
        since_sync = 0.0
        for i, op in enumerate(self.p.ops):
            r = OpCost(i, op.opcode, ", ".join(f"%{v.name}" for v in op.outputs), op.origin, _kind(op.opcode),
                       0 if _kind(op.opcode) in ("sync", "view") else 1)
            if r.launches:
                self._kernel(op, r, roots, readers)
            r.op_time_us = max(r.compute_us, r.comm_us) if r.kind == "fused" else r.compute_us + r.comm_us
            r.launch_tax_us = r.launches * self.dev.launch_us.value
            r.data_locality_tax_us = r.locality_bytes / self.hbm
            if r.kind in ("compute", "fused"):
                since_sync += r.compute_us
            if r.kind == "sync":
                skew = self.skew_us if self.skew_us is not None else self.skew_fraction * since_sync
                r.bulk_synchronous_tax_us = skew
                since_sync = 0.0
            rows.append(r)
        self.report.rows = rows

    # which kernel wrote each value (looking through views and waits); program inputs are their own root
    def _roots(self) -> dict[Value, Value]:
        roots: dict[Value, Value] = {v: v for v in self.p.inputs}
        for op in self.p.ops:
            for v in op.outputs:
                passthrough = op.opcode in VIEW_OPS or op.opcode in SYNC_OPS
                roots[v] = roots.get(op.inputs[0], op.inputs[0]) if passthrough and op.inputs else v
        return roots

    def _readers(self, roots) -> dict[Value, set[Op]]:
        """For each kernel-written value, the kernels that read it."""
        out: dict[Value, set[Op]] = {}
        for op in self.p.ops:
            if _kind(op.opcode) in ("sync", "view"):
                continue
            for v in op.inputs:
                root = roots[v]
                if root.producer is not None:
                    out.setdefault(root, set()).add(op)
        return out

    def _kernel(self, op: Op, r: OpCost, roots, readers) -> None:
        seen: dict[Value, float] = {}
        for v in op.inputs:  # reads, once per distinct written value
            root = roots[v]
            seen[root] = min(self.nbytes(root.type), seen.get(root, 0.0) + self.nbytes(v.type))
        for root, b in seen.items():
            if root.producer is None:
                r.boundary_bytes += b
            else:
                r.locality_bytes += b
        for v in op.outputs:  # writes
            if readers.get(v):
                r.locality_bytes += self.nbytes(v.type)
            else:
                r.boundary_bytes += self.nbytes(v.type)
        memory_us = r.boundary_bytes / self.hbm
        if op.opcode == "matmul":
            a, b = op.inputs[0].type, op.inputs[1].type
            r.flops = 2.0 * _prod(self.dim(d) for d in a.shape[:-1]) * self.dim(a.shape[-1]) * self.dim(b.shape[1])
            r.compute_us = max(r.flops / self.rate, memory_us)
        elif op.opcode in COLLECTIVES:
            src = op.outputs[0].type if op.opcode == "all_gather" else op.inputs[0].type
            r.comm_bytes = self.nbytes(src)
            r.comm_us = self._collective_us(op.opcode, r.comm_bytes)
        elif op.opcode in FUSED_OPCODES:
            self._fused(op, r, memory_us)
        else:
            r.compute_us = memory_us

    def _collective_us(self, opcode: str, nbytes: float) -> float:
        if self.world == 1:
            return 0.0  # a world of one moves nothing (a collective library returns at once, or is not called)
        passes = 2.0 if opcode == "all_reduce" else 1.0
        return self.dev.collective_latency_us.value + passes * nbytes * (self.world - 1) / self.world / self.link

    def _fused(self, op: Op, r: OpCost, memory_us: float) -> None:
        # A fused GEMM + collective takes A and B as its first two inputs; its matmul and its collective
        # overlap. Anything else fused (flash_decode) is costed as memory-bound.
        collective = {"fused_allgather_matmul": "all_gather", "fused_matmul_reduce_scatter": "reduce_scatter",
                      "fused_matmul_allreduce": "all_reduce"}.get(op.opcode)
        a, b = (op.inputs[0].type, op.inputs[1].type) if len(op.inputs) >= 2 else (None, None)
        if collective and a is not None and b.rank == 2 and a.rank >= 2:
            rows = _prod(self.dim(d) for d in a.shape[:-1]) * (self.world if collective == "all_gather" else 1)
            k = self.dim(a.shape[-1])
            n = sum(self.dim(w.type.shape[1]) for w in op.inputs[1:1 + op.attrs.get("weights", 1)])
            r.flops = 2.0 * rows * k * n
            r.compute_us = max(r.flops / self.rate, memory_us)
            r.comm_bytes = float(rows * (k if collective == "all_gather" else n) * DTYPE_BYTES[a.dtype])
            r.comm_us = self._collective_us(collective, r.comm_bytes)
        else:
            r.compute_us = memory_us
            r.note = "costed as memory-bound (no fused-op model)"


def _kind(opcode: str) -> str:
    if opcode in COLLECTIVES:
        return "comm"
    if opcode in SYNC_OPS:
        return "sync"
    if opcode in VIEW_OPS:
        return "view"
    if opcode in FUSED_OPCODES:
        return "fused"
    return "compute"


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
