"""`felrec-stream` command line: the one composition root allowed to import every package.

Each `cmd_*.py` module in this package registers its commands on `cli` (from `group.py`).
Command modules import heavy dependencies (torch, faiss, kafka) inside the command functions so
that `--help` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil

from felrec_stream.cli.group import cli, main

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("cmd_")):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["cli", "main"]
