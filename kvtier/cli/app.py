"""The `kvtier` click group: logging handlers and the one-line error for a KVTierError.

The CLI package is the only code that prints or configures logging handlers. A KVTierError
becomes one line on stderr and exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from kvtier._version import __version__
from kvtier.errors import KVTierError

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _KVTierGroup(click.Group):
    """A click group that turns a KVTierError from any subcommand into one line and exit 2."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KVTierError as exc:
            click.echo(f"kvtier: error: {one_line(exc)}", err=True)
            ctx.exit(2)


class CliHandler(logging.StreamHandler):
    """The handler main() installs on the `kvtier` logger for one invocation (removed, and the
    logger's level restored, when it ends: a caller running several in one process, such as
    click's test runner, keeps no trace of one in the next)."""


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _configure_logging(level: str, ctx: click.Context) -> None:
    logger = logging.getLogger("kvtier")
    for handler in [h for h in logger.handlers if isinstance(h, CliHandler)]:
        logger.removeHandler(handler)
    handler = CliHandler(sys.stderr)  # looked up now: click's test runner swaps sys.stderr
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    ctx.call_on_close(restore)


@click.group(cls=_KVTierGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="kvtier")
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    envvar="KVTIER_LOG_LEVEL",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    help="Level of kvtier's log messages on stderr (env KVTIER_LOG_LEVEL).",
)
def main(log_level: str) -> None:
    """Tiered KV-cache offload for Hugging Face models: GPU -> pinned host RAM -> disk."""
    _configure_logging(log_level.upper(), click.get_current_context())
