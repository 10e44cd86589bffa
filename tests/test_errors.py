"""What a new user sees when something is wrong: one line on stderr and exit status 2, naming what they wrote."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bspfuse import execute
from bspfuse.cli import USER_ERROR, main

ROOT = Path(__file__).parent.parent


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
