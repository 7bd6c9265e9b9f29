"""One base exception; one-line subclasses per subsystem.

Callers catch `FelrecError` at process boundaries (the CLI turns it into a clean message and a
non-zero exit). Poison *messages* are not exceptions: they travel as data (see `messages.py`).
"""


class FelrecError(Exception):
    """Base of every error raised on purpose by felrec-stream."""


class ConfigError(FelrecError):
    """A configuration value, file or environment override is invalid."""


class DatasetError(FelrecError):
    """An input dataset file is missing, empty or malformed."""


class ModelError(FelrecError):
    """A model or checkpoint is inconsistent (wrong shapes, wrong version)."""


class TrainingError(FelrecError):
    """Training cannot proceed (e.g. representation collapse, no events)."""


class StoreError(FelrecError):
    """The representation store or one of its snapshots is unusable."""


class KafkaError(FelrecError):
    """The Kafka broker is unreachable or a Kafka operation failed."""


class BrokerError(KafkaError):
    """The embedded broker could not be started, probed or stopped."""


class ReplayError(KafkaError):
    """A replay stopped before every event was acknowledged; carries counts for a safe re-run."""


class ServiceError(FelrecError):
    """The query service cannot start or answer."""


class ParallelError(FelrecError):
    """A data-parallel job cannot go on: a rank stopped or hangs, or the replicas diverged."""
