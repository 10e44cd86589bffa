"""What a new user sees when something is wrong: one line on stderr and exit status 2, naming what they wrote."""
from pathlib import Path

import pytest

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
