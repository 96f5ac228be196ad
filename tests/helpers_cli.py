"""Run the real console entry point in-process, as a user's shell would."""

from __future__ import annotations

import pytest

from histoshield import cli


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `histoshield ARGS` through `cli.main`."""
    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err
