"""The one error type users see: a single line saying what, which file, and what to do."""


class HistoshieldError(Exception):
    """Bad input or an impossible request; the CLI prints it on one line and exits 2."""

    exit_code = 2
