"""The root click group and the error boundary of every command."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

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
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run train, evaluate, consume or learn as N data-parallel ranks on this machine, through torchrun: "
                   "the same as `torchrun --standalone --nproc-per-node N --no-python felrec-stream ...` "
                   "(README \"Scaling out\"). Rank 0 reads the input and writes every output.")
@click.pass_context
def cli(ctx: click.Context, log_level: str, log_json: bool | None, nproc: int) -> None:
    """felrec-stream: FELRec cold-start recommender on streams of interactions.

    Every option can also be set by an environment variable FELREC_<COMMAND>_<OPTION>
    (e.g. FELREC_TRAIN_EPOCHS=5); config files set whole sections (see --config).
    """
    configure_logging(level=log_level, json=log_json)
    under_launcher = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if (under_launcher or nproc > 1) and ctx.invoked_subcommand not in PARALLEL_COMMANDS:
        raise click.UsageError(f"`felrec-stream {ctx.invoked_subcommand}` runs as one process; only "
                               f"{', '.join(PARALLEL_COMMANDS)} run as several ranks (--nproc, torchrun)")
    if under_launcher:
        die_with_parent()  # a rank never outlives torchrun (which never outlives `--nproc`'s launcher)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # under torchrun (the ranks themselves) nothing to launch
        ctx.exit(launch(nproc, ctx.invoked_subcommand))


PARALLEL_COMMANDS = ("train", "evaluate", "consume", "learn")
LAUNCH_ARGV = "FELREC_LAUNCH_ARGV"  # the command line of `python -m felrec_stream.cli` on each rank of --nproc


def launch(nproc: int, command: str) -> int:
    """This same command line as `nproc` ranks under torchrun (`cli/torchrun.py`, in a session of its
    own: SIGTERM/SIGINT sent here reach every rank once, directly, so a graceful stop exits 0; this
    process's death kills torchrun and the ranks, `die_with_parent`); returns torchrun's exit code."""
    argv = [sys.executable, "-m", "felrec_stream.cli.torchrun", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "felrec_stream.cli"]
    # The command line travels in the environment: torchrun's argparse would read options of ours
    # that abbreviate its own (--nproc, -h). The ranks see WORLD_SIZE and launch nothing.
    env = {**os.environ, LAUNCH_ARGV: json.dumps(sys.argv[1:])}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # torchrun would say 1
    proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=die_with_parent)

    def forward(signum: int, _frame: Any) -> None:
        # to the ranks themselves: they stop gracefully and exit 0, and so does torchrun (a signal
        # to torchrun would make it kill them and fail with a traceback)
        ranks = _children(proc.pid)
        for pid in ranks or [proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code:
        click.echo(f"error: the {nproc} ranks of `felrec-stream {command}` stopped with exit code {code} "
                   "(each failed rank's line and the ranks' log lines, field dist_rank, above)", err=True)
    return code


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc; [] elsewhere or when unreadable)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`; elsewhere nothing).

    torchrun and its ranks run in a session of their own, so a `kill -9` of the `--nproc` launcher
    reached none of them: they went on consuming and held the writer lock. With this in torchrun
    (set between fork and exec: it survives exec) and in every rank, the launcher's death takes the
    whole tree with it, each killed as a crash drill kills (the restart restores the last snapshot).
    A parent that died before the call is caught by its pid having changed."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # best effort: the lock message still names an orphaned holder
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def start_ranks(config_sections: dict[str, Any] | None = None) -> Any:
    """This process's `felrec_stream.parallel.Ranks` under torchrun, or None in a single process.
    The `parallel` config section (timeout_s, backend): config file < FELREC_PARALLEL__<FIELD>."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from felrec_stream import parallel
    from felrec_stream.config import ParallelConfig, load_section

    return parallel.init(load_section(ParallelConfig, "parallel", config_sections))


def parse_key_values(pairs: tuple[str, ...], option: str = "--dataset-option") -> dict[str, str]:
    """Repeated KEY=VALUE options (dataset loader options) as a dict; a malformed pair is a usage error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=option)
        out[key.strip()] = value
    return out


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: FelrecError -> one clear line on stderr, exit code 2. A rank of
    a data-parallel job ends through `leave_job` (no interpreter teardown), whatever the outcome."""
    try:
        code = _run(args)
    except Exception:
        if not _joined_job():
            raise
        traceback.print_exc()  # what the interpreter would print, before leaving without its teardown
        code = 1
    if _joined_job():
        leave_job(code)
    if code:
        sys.exit(code)


def _run(args: list[str] | None) -> int:
    """The command's exit code (errors reported on stderr as one line)."""
    try:
        code = cli.main(args=args, standalone_mode=False)
        # standalone_mode=False returns ctx.exit()'s code instead of exiting with it
        return code if isinstance(code, int) else 0
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except FelrecError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130


def _joined_job() -> bool:
    """This process joined a torch.distributed job (a rank under torchrun; never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def leave_job(code: int) -> NoReturn:
    """End this rank now, with `code`, without the interpreter's teardown (`os._exit`).

    Why: a ProcessGroupGloo worker thread drops its last collective's work (tensors that hold
    Python objects, e.g. `all_gather_object`'s) a moment after the collective returns; when the
    interpreter is already finalizing, that decref's GIL acquire ends the thread mid-C++ and
    libstdc++ aborts the process ("terminate called without an active exception", SIGABRT; core:
    AsyncAllgatherWork::~AsyncAllgatherWork <- ProcessGroupGloo::runLoop -> take_gil ->
    PyThread_exit_thread). destroy_process_group at exit does not prevent it. A follower of
    `consume --nproc 2` exits right after rank 0's last message, so it was the one that died, at
    random: torchrun then reported the rank failed and the completed job exited 1. Everything a
    rank leaves behind is durable or closed when its command returns; the process group ends with
    the process, as when a rank is killed. Logs, stdout and stderr are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
