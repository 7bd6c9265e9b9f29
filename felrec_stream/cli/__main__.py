"""`python -m felrec_stream.cli ...`; what `felrec-stream --nproc N` has torchrun run on each rank,
with the command line in FELREC_LAUNCH_ARGV (see `group.launch`)."""

import json
import os

from felrec_stream.cli.group import LAUNCH_ARGV, main

main(json.loads(os.environ[LAUNCH_ARGV]) if LAUNCH_ARGV in os.environ else None)
