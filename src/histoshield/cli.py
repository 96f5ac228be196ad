"""The `histoshield` command line: thin Typer commands that parse, call one function, print."""

from __future__ import annotations

import sys

import typer

from histoshield.errors import HistoshieldError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Attack, defend and honestly measure breast-cancer histopathology classifiers.",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect, split and synthesise image data.")
app.add_typer(data_app, name="data")


# ---- data commands ------------------------------------------------------------------------


# ---- train / evaluate / predict -----------------------------------------------------------


# ---- attack -------------------------------------------------------------------------------


# ---- certify ------------------------------------------------------------------------------


# ---- study --------------------------------------------------------------------------------


def main() -> None:
    """Console entry point: bad input prints one line and exits 2, never a traceback."""
    try:
        app()
    except HistoshieldError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
