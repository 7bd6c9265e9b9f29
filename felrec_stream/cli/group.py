"""The root click group and the error boundary of every command."""

from __future__ import annotations

import os
import sys

# faiss and torch each load an OpenMP runtime; with the default spin-waiting their threads starve
# each other (and the broker) on small machines. Must be set before either library is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from felrec_stream import __version__  # noqa: E402
from felrec_stream.errors import FelrecError  # noqa: E402
from felrec_stream.log import configure_logging  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "FELREC"})
@click.version_option(__version__, prog_name="felrec-stream")
@click.option("--log-level", default="INFO", show_default=True, envvar="FELREC_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Log level of the structured (structlog) logs on stderr.")
@click.option("--log-json/--no-log-json", default=None, envvar="FELREC_LOG_JSON",
              help="Force JSON log lines (default: JSON when stderr is not a terminal).")
def cli(log_level: str, log_json: bool | None) -> None:
    """felrec-stream: FELRec cold-start recommender on streams of interactions.

    Every option can also be set by an environment variable FELREC_<COMMAND>_<OPTION>
    (e.g. FELREC_TRAIN_EPOCHS=5); config files set whole sections (see --config).
    """
    configure_logging(level=log_level, json=log_json)


def parse_key_values(pairs: tuple[str, ...], option: str = "--dataset-option") -> dict[str, str]:
    """Repeated KEY=VALUE options (dataset loader options) as a dict; a malformed pair is a usage error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=option)
        out[key.strip()] = value
    return out


def main() -> None:
    """Console-script entry point: FelrecError -> one clear line on stderr, exit code 2."""
    try:
        code = cli.main(standalone_mode=False)
        # standalone_mode=False returns ctx.exit()'s code instead of exiting with it
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except FelrecError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
