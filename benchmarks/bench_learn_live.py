"""Online learning at a live rate: does `felrec-stream learn` keep up while `consume` runs on the same cores?

Run: OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_learn_live.py [--rate 300] [--seconds 120]
     [--publish-every 2000] [--preset small] [--bootstrap-servers HOST:PORT]

A private embedded broker (unless --bootstrap-servers); a synthetic stream written by `replay --rate`
(the producer paces to RATE events/s); `learn --from earliest` (the `small` preset's encoder at its
initial weights: throughput does not depend on what the weights are) and `consume --models-dir`
following the topic, all three on this machine. Every 5 s it samples how many events the topic
holds, how far the learner has decided (`<models>/PROGRESS`) and how far the worker has applied (its
log), and prints the lags. At the end (SIGTERM to both) it prints the worker's swap pauses (p50/p99
of `model_swapped` pause_ms), CPU-seconds of each process, and one verdict line next to the target:
the learner keeps up when its lag at the end is below 2 publish intervals and not growing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from connectors.kafka.admin import TopicAdmin, end_offsets  # noqa: E402
from connectors.kafka.broker import ensure_broker  # noqa: E402
from felrec_stream.config import Configs, KafkaConfig, preset_sections  # noqa: E402
from felrec_stream.data.synthetic import SyntheticConfig, generate  # noqa: E402
from felrec_stream.model.felrec import FELRec  # noqa: E402
from felrec_stream.state.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from felrec_stream.state.versions import VersionStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from felrec_stream.cli import main; main()", "--log-json"]


def _checkpoint(preset: str, path: Path) -> Path:
    configs = Configs.from_dict(preset_sections(preset))
    torch.manual_seed(0)
    return save_checkpoint(Checkpoint(FELRec(configs.encoder, configs.model).state_dict(), configs, epoch=0), path)


class LogTail:
    """Reads a process's JSON log lines in a thread; keeps the last applied count and every swap."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.applied, self.swaps, self.errors = 0, [], []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "batch_applied":
                self.applied = int(record["applied"])
            elif record.get("event") == "model_swapped":
                self.swaps.append(float(record["pause_ms"]))
            elif record.get("level") == "error":
                self.errors.append(record)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a live process and its reaped children (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(f) for f in fields[11:15]) / ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--publish-every", type=int, default=2000)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--bootstrap-servers", default="")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="felrec-learn-live-"))
    n_events = int(args.rate * args.seconds)
    events = generate(SyntheticConfig(n_users=max(300, n_events // 40), n_items=max(200, n_events // 80),
                                      n_events=n_events, seed=1)).events
    pq.write_table(events, work / "events.parquet")
    checkpoint = _checkpoint(args.preset, work / "init.pt")
    topic = f"live-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FELREC_HOME": str(work / "home")}
    with ensure_broker(KafkaConfig(bootstrap_servers=args.bootstrap_servers)) as servers:
        kafka = KafkaConfig(bootstrap_servers=servers)
        with TopicAdmin(kafka) as admin:
            admin.create_topic(topic, 1)
        common = ["--topic", topic, "--checkpoint", str(checkpoint), "--bootstrap-servers", servers,
                  "--device", "cpu"]
        learner = subprocess.Popen(CLI + ["learn", *common, "--models-dir", str(work / "models"), "--from",
                                          "earliest", "--publish-every", str(args.publish_every)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        worker = subprocess.Popen(CLI + ["consume", *common, "--models-dir", str(work / "models"),
                                         "--snapshot-dir", str(work / "snap")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        worker_log = LogTail(worker)
        threading.Thread(target=lambda: [None for _ in learner.stderr], daemon=True).start()
        replay = subprocess.Popen(CLI + ["replay", "--dataset", "parquet", "--path", str(work / "events.parquet"),
                                         "--topic", topic, "--bootstrap-servers", servers, "--rate", str(args.rate),
                                         "--no-progress"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        versions = VersionStore(work / "models")
        rows, started = [], time.monotonic()
        print(f"{'t_s':>6} {'produced':>9} {'learned':>8} {'learner_lag':>11} {'applied':>8} {'worker_lag':>10} "
              f"{'versions':>8}", flush=True)
        while True:
            time.sleep(5.0)
            produced = end_offsets(kafka, topic, [0])[0]
            learned = versions.progress()[0].events
            row = (time.monotonic() - started, produced, learned, produced - learned, worker_log.applied,
                   produced - worker_log.applied, len(versions.names()))
            rows.append(row)
            print(f"{row[0]:6.0f} {row[1]:9d} {row[2]:8d} {row[3]:11d} {row[4]:8d} {row[5]:10d} {row[6]:8d}",
                  flush=True)
            if replay.poll() is not None and (row[3] <= 0 and row[5] <= 0 or time.monotonic() - started
                                              > args.seconds + 120):
                break
        cpu = {"learner": _cpu_seconds(learner.pid), "worker": _cpu_seconds(worker.pid)}
        for proc in (learner, worker):
            proc.send_signal(signal.SIGTERM)
        for proc in (learner, worker):
            proc.wait(timeout=120)
    wall = rows[-1][0]
    pauses = np.asarray(worker_log.swaps) if worker_log.swaps else np.zeros(1)
    lags = [r[3] for r in rows]
    during = [r[3] for r in rows if r[1] < n_events] or lags
    keeps_up = max(during[-3:]) < 2 * args.publish_every
    print(f"cpu-seconds over {wall:.0f} s wall on {os.cpu_count()} cores: learner {cpu['learner']:.0f}, "
          f"worker {cpu['worker']:.0f} (share of the machine: "
          f"{(cpu['learner'] + cpu['worker']) / (wall * (os.cpu_count() or 1)):.0%})")
    print(f"swaps {len(worker_log.swaps)}: pause p50 {np.percentile(pauses, 50):.1f} ms, "
          f"p99 {np.percentile(pauses, 99):.1f} ms; worker errors {len(worker_log.errors)}")
    print(f"learner lag while the stream ran: max {max(during)} events, last {during[-1]} "
          f"(target: below 2 publish intervals = {2 * args.publish_every} and not growing) -> "
          f"{'keeps up' if keeps_up else 'falls behind'} at {args.rate:g} events/s")


if __name__ == "__main__":
    main()
