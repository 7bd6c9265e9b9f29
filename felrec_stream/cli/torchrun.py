"""`python -m felrec_stream.cli.torchrun ARGS`: torchrun (`torch.distributed.run`) as `--nproc` runs it
(`group.launch`), with each failed rank in one line instead of torchrun's traceback.

torchrun ends any failure with a Python traceback of its own agent (ChildFailedError, ~30 lines)
after the ranks already logged why they stopped; here each failed rank is one `error:` line and
the exit status 1. A signal that reaches torchrun itself (not forwarded to the ranks by the
launcher) ends it with 128 + the signal number, also without a traceback.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        for rank, failure in sorted(exc.failures.items()):
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            print(f"error: rank {rank} (pid {failure.pid}) stopped with {how}", file=sys.stderr, flush=True)
        return 1
    except SignalException as exc:
        print(f"error: torchrun stopped by signal {exc.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
