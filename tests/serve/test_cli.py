"""`scalelm serve` refuses what it cannot serve with one line and exit code 2, before any server starts."""

import pytest

from scalelm.cli import main


@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "--port 70000"),
    (["--max-batch", "0"], "--max-batch 0"),
    (["--max-tokens", "0"], "--max-tokens 0"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, args, message):
    assert main(["serve", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_a_path_without_a_checkpoint_is_refused_before_serving(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_help_lists_the_flags(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--host", "--port", "--max-batch", "--api-key", "SCALELM_API_KEY"))


def test_an_address_in_use_is_refused_before_loading(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(tmp_path), "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot listen on 127.0.0.1:") and len(err.strip().splitlines()) == 1
