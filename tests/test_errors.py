"""What a new user sees when something is wrong: one line on stderr and exit status 2, naming what they wrote.
Nothing here runs a kernel: a run too large for the machine is refused before anything is allocated."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bspfuse import execute
from bspfuse.cli import USER_ERROR, main
from bspfuse.grammar import parse_file

ROOT = Path(__file__).parent.parent
GiB = 1 << 30


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # messages name paths as the user wrote them


def _one_line_error(capsys, *argv) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == USER_ERROR and out == "" and "Traceback" not in err, (code, out, err)
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def _argparse_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == USER_ERROR
    return capsys.readouterr().err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------- memory


def test_a_size_too_large_names_the_size_and_the_bytes(capsys):
    # x alone is 2**27 rows of 128 bf16 on each rank: 64 GiB of inputs, and its float64 reference far more
    err = _one_line_error(capsys, "run", "examples/sp_mlp.bsp", "--world", "2", "--size", "T=268435456",
                          "--backend", "sim")
    assert err.startswith("error: --size T=268435456: too large to run on 2 ranks: it needs "), err
    assert "TiB of host memory (inputs of every rank 64.0 GiB, the float64 reference " in err
    assert err.endswith(" is available")


def test_one_rank_is_one_rank(capsys):
    err = _one_line_error(capsys, "run", "examples/sp_mlp.bsp", "--world", "1", "--size", "T=268435456",
                          "--backend", "sim")
    assert err.startswith("error: --size T=268435456: too large to run on 1 rank: it needs "), err


def test_the_default_sizes_of_a_python_target_name_its_largest_tensors(capsys, monkeypatch):
    monkeypatch.setattr(execute.memory, "available_memory", lambda: 4 * GiB)  # a small machine
    err = _one_line_error(capsys, "run", "examples/sp_mlp.py:build", "--world", "2", "--backend", "sim")
    assert err.startswith("examples/sp_mlp.py:build: too large to run on 2 ranks: it needs "), err
    assert "of host memory (" in err and "; 4.0 GiB is available; its largest tensors, per rank: " in err
    assert "bf16[8192, 14336] (224.0 MiB)" in err


def test_a_long_flash_decode_that_does_not_fit_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(execute.memory, "available_memory", lambda: GiB)
    err = _one_line_error(capsys, "run", "examples/flash_decode.bsp", "--world", "2", "--size", "S=16777216",
                          "--backend", "sim")
    assert err.startswith("error: --size S=16777216: too large to run on 2 ranks: it needs "), err
    assert err.endswith("; 1.0 GiB is available")


def test_a_bsp_program_too_large_by_its_own_sizes_names_them(capsys, monkeypatch):
    monkeypatch.setattr(execute.memory, "available_memory", lambda: 1 << 20)
    err = _one_line_error(capsys, "run", "examples/sp_mlp.bsp", "--world", "2", "--backend", "sim")
    assert err.startswith("examples/sp_mlp.bsp (sizes T=256, H=128, F=256): too large to run on 2 ranks: "), err


def test_the_bytes_counted_are_those_of_the_programs_tensors():
    # sp_mlp at its own sizes on 2 ranks, per rank: x [128, 128], w1 [128, 128], w2 [128, 128] in bf16; the
    # reference keeps every value in float64 except the views (the waits): inputs, the gathered [256, 128],
    # both matmuls and gelu [256, 128] each, the reduce-scatter's [128, 128].
    program = parse_file(str(ROOT / "examples" / "sp_mlp.bsp"), world_size=2)
    host, shared = execute.memory_needs(program, 2, backend="sim")[:2]
    elements = 3 * 128 * 128 + 4 * 256 * 128 + 128 * 128
    reference = {"inputs of every rank": 2 * 3 * 128 * 128 * 2, "the float64 reference": 2 * 8 * elements}
    assert host.memory == "host memory" and host.parts == reference
    # unfused, the heap holds a copy of a collective's input at a time: the largest, y's [256, 128] partial sum
    assert shared.parts == {"2 heaps": 2 * 256 * 128 * 2} and shared.memory.startswith("shared memory")
    assert all(n.needed <= n.available for n in (host, shared))


def test_check_refuses_before_drawing_inputs(monkeypatch):
    program = parse_file(str(ROOT / "examples" / "sp_mlp.bsp"), world_size=2, sizes={"T": 268435456})
    monkeypatch.setattr(execute.harness, "random_inputs", lambda *a, **k: pytest.fail("inputs drawn"))
    with pytest.raises(execute.NotEnoughMemory, match=r"^sp_mlp on 2 ranks needs .* of host memory .*; the largest "
                                                      r"tensors, per rank: %xg_start bf16\[268435456, 128\]"):
        execute.check(program, 2)


# ----------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("value", ["-5", "0", "many"])
def test_a_size_must_be_a_positive_integer(capsys, value):
    err = _argparse_error(capsys, "run", "examples/sp_mlp.bsp", "--size", f"T={value}")
    assert err == f"bspfuse run: error: argument --size: 'T={value}': T must be a positive integer"


@pytest.mark.parametrize("target", ["examples", "examples/"])
def test_a_directory_is_not_a_target(capsys, target):
    err = _one_line_error(capsys, "inspect", target)
    assert err == f"error: {target}: is a directory; a target is path/to/file.bsp or path/to/file.py:function"


def test_a_directory_named_like_a_program(capsys, tmp_path):
    (tmp_path / "mlp.bsp").mkdir()
    err = _one_line_error(capsys, "inspect", str(tmp_path / "mlp.bsp"))
    assert err == f"{tmp_path / 'mlp.bsp'}: is a directory; a target is path/to/file.bsp or path/to/file.py:function"


def test_a_directory_before_the_function_name(capsys):
    err = _one_line_error(capsys, "analyze", "examples:build")
    assert err == "error: examples: is a directory; a target is path/to/file.py:function"


# ----------------------------------------------------------------------------------------------- one process

TRACED = '''
import torch
from bspfuse.capture_fx import trace

def build(world_size=2):
    def f(x, w):
        return x @ w
    meta = lambda *s: torch.empty(*s, device="meta")
    return trace(f, [meta(4, 8), meta(8, 4)], world_size=world_size)
'''


def test_tracing_leaves_no_rank_prefix_on_tracebacks(tmp_path):
    # Tracing a file.py:function target starts a fake process group, and torch's init_process_group makes every
    # later traceback's lines start with "[rank0]: "; one process ran, so none may.
    (tmp_path / "traced.py").write_text(TRACED)
    script = textwrap.dedent(f"""
        import bspfuse.execute
        from bspfuse.cli import main

        def broken(*args, **kwargs):
            raise RuntimeError("a bug past the trace")

        bspfuse.execute.check = broken
        main(["run", {str(tmp_path / 'traced.py') + ':build'!r}, "--world", "2", "--backend", "sim"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1 and "RuntimeError: a bug past the trace" in done.stderr, done.stderr
    assert "[rank" not in done.stderr, done.stderr


def test_every_command_gives_back_the_excepthook_it_found(capsys, tmp_path):
    (tmp_path / "traced.py").write_text(TRACED)
    hook = sys.excepthook
    assert main(["analyze", f"{tmp_path / 'traced.py'}:build", "--world", "2"]) == 0
    assert sys.excepthook is hook


def test_an_interrupted_run_says_so(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(execute, "check", interrupted)
    assert main(["run", "examples/sp_mlp.bsp", "--world", "2", "--backend", "sim"]) == 130
    assert capsys.readouterr().err == "bspfuse: interrupted\n"
