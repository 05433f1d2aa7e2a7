"""ddlm.command: the one line a user's mistake gets from every command line (its flag parser is exercised
through the command lines: tests/test_eval_frontier.py, test_eval_plots.py, test_convert.py)."""

import pytest

from ddlm import command


def one_line(capsys, error):
    with pytest.raises(SystemExit) as e, command.one_line_errors():
        raise error
    return e.value.code, capsys.readouterr().err


def test_a_flag_mistake_exits_2_and_any_other_1_with_its_type_on_one_line(capsys, monkeypatch):
    monkeypatch.delenv("DDLM_TRACEBACK", raising=False)
    assert one_line(capsys, command.FlagError("--steps=0: expected >= 1")) == (
        2, "ddlm: error: --steps=0: expected >= 1\n"
    )  # fmt: skip
    assert one_line(capsys, ValueError("config.json: bad\n  second line")) == (
        1, "ddlm: error: ValueError: config.json: bad second line\n"
    )  # fmt: skip
    assert one_line(capsys, PermissionError(13, "Permission denied", "/x/out.png")) == (
        1, "ddlm: error: PermissionError: [Errno 13] Permission denied: '/x/out.png'\n"
    )  # fmt: skip
    with pytest.raises(KeyError), command.one_line_errors():  # a bug, not a mistake: its traceback
        raise KeyError("x")
    monkeypatch.setenv("DDLM_TRACEBACK", "1")
    with pytest.raises(command.FlagError), command.one_line_errors():
        raise command.FlagError("--steps=0")
