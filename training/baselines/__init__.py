"""The paper's baselines: pure models (`models`), configs (`configs`), OnlineModel adapters (`online`).

`build_baseline(name, config, train)` makes an untrained adapter; `fit(adapter, train, validate)`
trains it and keeps the best validation checkpoint; the shared evaluator then replays it.
"""

from __future__ import annotations

import pyarrow as pa

from felrec_stream.errors import ConfigError
from training.baselines.configs import CONFIG_CLASSES, SIZES, BaselineConfig, make_config
from training.baselines.online import (BaselineOnline, BPRMFOnline, FitResult, GRU4RecBPTTOnline, GRU4RecOnline,
                                       JodieOnline, SASRecOnline, fit)

ADAPTERS: dict[str, type[BaselineOnline]] = {
    "bpr-mf": BPRMFOnline,
    "gru4rec": GRU4RecOnline,
    "gru4rec-bptt": GRU4RecBPTTOnline,
    "sasrec": SASRecOnline,
    "jodie": JodieOnline,
}
BASELINES = tuple(ADAPTERS)


def build_baseline(name: str, config: BaselineConfig, train: pa.Table) -> BaselineOnline:
    """Untrained adapter of baseline `name` with its vocabulary taken from `train`."""
    if name not in ADAPTERS:
        raise ConfigError(f"unknown baseline {name!r}; known: {', '.join(ADAPTERS)}")
    if not isinstance(config, CONFIG_CLASSES[name]):
        raise ConfigError(f"baseline {name!r} needs a {CONFIG_CLASSES[name].__name__}, got {type(config).__name__}")
    return ADAPTERS[name](config, train)


__all__ = ["ADAPTERS", "BASELINES", "SIZES", "BaselineConfig", "BaselineOnline", "FitResult", "build_baseline",
           "fit", "make_config"]
