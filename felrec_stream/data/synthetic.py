"""A seeded synthetic interaction stream with planted clusters and cold-start entities.

Why: tests and demos need data with a *known* answer (which items a user should like) that also
exercises cold start, without downloading anything. Pure: no file IO; the same config and seed
always give the same table.

The world: every user and item belongs to one of `n_clusters` clusters (balanced). Items have a
Zipf popularity. Each interaction picks, with probability `affinity`, an item of the user's own
cluster, otherwise an item from the whole catalogue; both choices are popularity-weighted over the
items released so far, plus a novelty bonus (additive, so an unpopular new item still gets noticed)
that decays after release: new items collect several interactions soon after they appear. Some
users join late and some items are released late (their arrival times are spread evenly over
5%..95% of the timeline), so a chronological 80/10/10 split has
new users and new items in validation and test. A user's events are spread uniformly between its
arrival and the end of the timeline, so late users are dense: cold start is a real share of test.

Drift (`drift`, for online-learning benchmarks): "none" (default) is the world above, bit for bit
(no extra random draws). "abrupt": at `drift_at` (a fraction of the timeline) every user's taste
cluster is reassigned (seeded, always to another cluster); "gradual": users switch one by one, their
switch times spread evenly (in a seeded order) over [drift_at, drift_at + drift_span]. An event at
or after its user's switch time draws its own-cluster item from the new cluster. The draws of the
drift come from a generator of their own, so everything else (users, times, global choices) is the
same as without drift. Late items keep being released until 95% of the timeline, so items released
after the drift exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from felrec_stream.config import check, from_dict, to_dict
from felrec_stream.errors import ConfigError
from felrec_stream.stream.events import make_events

ARRIVALS = (0.05, 0.95)  # late users/items arrive evenly spread over this part of the timeline
N_BINS = 200  # item weights are recomputed per time bin; releases happen at bin starts


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of the synthetic world. Defaults: small enough for a tiny model in a test."""

    n_users: int = 300
    n_items: int = 200
    n_events: int = 20_000
    n_clusters: int = 8
    affinity: float = 0.85  # probability that an interaction stays in the user's own cluster
    popularity_exponent: float = 1.0  # Zipf exponent of item popularity (0 = uniform)
    late_item_fraction: float = 0.25  # items released during the timeline instead of at its start
    late_user_fraction: float = 0.2  # users joining during the timeline
    novelty_boost: float = 15.0  # a just-released item gets this many mean popularities extra ...
    novelty_decay: float = 0.04  # ... decaying with this time constant (fraction of the timeline)
    activity_sigma: float = 0.75  # log-normal spread of user activity
    start_timestamp: int = 1_600_000_000  # unix seconds of the first event
    seconds_per_event: int = 60  # the timeline spans n_events * seconds_per_event seconds
    seed: int = 0
    drift: Literal["none", "abrupt", "gradual"] = "none"  # users' taste clusters change (module docstring)
    drift_at: float = 0.5  # fraction of the timeline where the drift starts
    drift_span: float = 0.2  # "gradual": fraction of the timeline over which users switch one by one

    def __post_init__(self) -> None:
        check(1 <= self.n_clusters <= min(self.n_users, self.n_items),
              "synthetic.n_clusters must be in [1, min(n_users, n_items)]")
        check(self.n_events >= self.n_users, "synthetic.n_events must be >= n_users (every user acts once)")
        check(0.0 <= self.affinity <= 1.0, "synthetic.affinity must be in [0, 1]")
        check(self.popularity_exponent >= 0, "synthetic.popularity_exponent must be >= 0")
        check(0.0 <= self.late_item_fraction < 1.0 and 0.0 <= self.late_user_fraction < 1.0,
               "synthetic late fractions must be in [0, 1)")
        check(self.novelty_boost >= 0 and self.novelty_decay > 0, "synthetic.novelty_boost >= 0 and novelty_decay > 0")
        check(self.activity_sigma >= 0 and self.seconds_per_event >= 1,
              "synthetic.activity_sigma >= 0, seconds_per_event >= 1")
        check(self.drift in ("none", "abrupt", "gradual"), "synthetic.drift must be none, abrupt or gradual")
        check(0.0 <= self.drift_at <= 1.0 and 0.0 <= self.drift_span and self.drift_at + self.drift_span <= 1.0,
              "synthetic.drift_at and drift_span must be >= 0 with drift_at + drift_span <= 1")
        check(self.drift == "none" or self.n_clusters >= 2, "synthetic.drift needs n_clusters >= 2")


PRESETS: dict[str, SyntheticConfig] = {
    "small": SyntheticConfig(),
    "medium": SyntheticConfig(n_users=3_000, n_items=2_000, n_events=200_000, n_clusters=16),
    "large": SyntheticConfig(n_users=30_000, n_items=20_000, n_events=1_000_000, n_clusters=32),
}


def config_from_options(size: str = "small", **overrides: Any) -> SyntheticConfig:
    """A preset (`small`, `medium`, `large`) with field overrides; strings are coerced (CLI values)."""
    if size not in PRESETS:
        raise ConfigError(f"unknown synthetic size {size!r}; known: {', '.join(PRESETS)}")
    return from_dict(SyntheticConfig, {**to_dict(PRESETS[size]), **overrides}, "synthetic")


@dataclass(frozen=True, eq=False)
class SyntheticData:
    """The events plus the ground truth that generated them; entity k has id f"u{k}" / f"i{k}"."""

    config: SyntheticConfig
    events: pa.Table  # canonical EVENT_SCHEMA table, time-ordered
    user_ids: np.ndarray  # (U,) object[str]
    user_cluster: np.ndarray  # (U,) int64
    user_join: np.ndarray  # (U,) int64 timestamp from which the user may act
    item_ids: np.ndarray  # (I,) object[str]
    item_cluster: np.ndarray  # (I,) int64
    item_release: np.ndarray  # (I,) int64 timestamp from which the item may be chosen
    # drift: the cluster each user switches to and the timestamp from which it holds (no drift: the
    # same cluster, and a switch time after every event)
    user_cluster_after: np.ndarray | None = None  # (U,) int64
    user_switch: np.ndarray | None = None  # (U,) int64 timestamp

    def cluster_of_users_at(self, ids: Any, timestamps: Any) -> np.ndarray:
        """Taste cluster of each user at the matching timestamp (drift included; exact to the second)."""
        index = _indices(ids)
        if self.user_cluster_after is None or self.user_switch is None:
            return self.user_cluster[index]
        switched = np.asarray(timestamps, dtype=np.int64) >= self.user_switch[index]
        return np.where(switched, self.user_cluster_after[index], self.user_cluster[index])

    def user_clusters(self) -> dict[str, int]:
        return dict(zip(self.user_ids.tolist(), self.user_cluster.tolist()))

    def item_clusters(self) -> dict[str, int]:
        return dict(zip(self.item_ids.tolist(), self.item_cluster.tolist()))

    def item_releases(self) -> dict[str, int]:
        return dict(zip(self.item_ids.tolist(), self.item_release.tolist()))

    def cluster_of_users(self, ids: Any) -> np.ndarray:
        """Clusters of user ids (vectorised over an array/sequence of "u<k>" strings)."""
        return self.user_cluster[_indices(ids)]

    def cluster_of_items(self, ids: Any) -> np.ndarray:
        return self.item_cluster[_indices(ids)]


def _indices(ids: Any) -> np.ndarray:
    return np.fromiter((int(s[1:]) for s in ids), dtype=np.int64)


def generate(config: SyntheticConfig = SyntheticConfig()) -> SyntheticData:
    """Draw the world and its time-ordered interactions (vectorised; 1M events in about a second)."""
    rng = np.random.default_rng(config.seed)
    user_cluster = _balanced_clusters(config.n_users, config.n_clusters, rng)
    item_cluster = _balanced_clusters(config.n_items, config.n_clusters, rng)
    user_join = _arrivals(config.n_users, config.late_user_fraction, rng)
    item_release = np.ceil(_arrivals(config.n_items, config.late_item_fraction, rng) * N_BINS) / N_BINS
    popularity = _zipf_popularity(config.n_items, config.popularity_exponent, rng)
    users, times = _user_events(config, user_join, rng)
    cluster_after, switch = _drift(config, user_cluster)
    taste = np.where(times >= switch[users], cluster_after[users], user_cluster[users])
    items = _choose_items(config, taste, times, item_cluster, item_release, popularity, rng)
    span = config.n_events * config.seconds_per_event

    def stamp(t: np.ndarray) -> np.ndarray:
        return config.start_timestamp + np.floor(t * span).astype(np.int64)

    user_ids = np.array([f"u{k}" for k in range(config.n_users)], dtype=object)
    item_ids = np.array([f"i{k}" for k in range(config.n_items)], dtype=object)
    events = make_events(pa.array(user_ids, pa.string()).take(pa.array(users)),
                         pa.array(item_ids, pa.string()).take(pa.array(items)),
                         stamp(times), np.arange(config.n_events, dtype=np.int64))
    drifted = config.drift != "none"
    return SyntheticData(config, events, user_ids, user_cluster, stamp(user_join),
                         item_ids, item_cluster, stamp(item_release),
                         cluster_after if drifted else None,
                         stamp(switch) if drifted else None)


def _drift(config: SyntheticConfig, cluster: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U,) cluster after the switch and (U,) switch time in [0, 1] (inf: never). Its own generator:
    the world's other draws do not depend on the drift."""
    n = len(cluster)
    if config.drift == "none":
        return cluster.copy(), np.full(n, np.inf)
    rng = np.random.default_rng([config.seed, 0xD1F7])
    after = (cluster + rng.integers(1, config.n_clusters, size=n)) % config.n_clusters  # always another
    if config.drift == "abrupt":
        return after, np.full(n, config.drift_at)
    order = rng.permutation(n)
    switch = np.empty(n)
    switch[order] = config.drift_at + config.drift_span * (np.arange(n) + 0.5) / n
    return after, switch


def _balanced_clusters(n: int, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n, dtype=np.int64) % n_clusters)


def _arrivals(n: int, late_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival time in [0, 1): 0 for most; evenly spread (stratified) over ARRIVALS for the late ones."""
    arrival = np.zeros(n)
    n_late = min(int(round(n * late_fraction)), n - 1)  # someone must be there from the start
    if n_late:
        lo, hi = ARRIVALS
        spread = lo + (hi - lo) * (np.arange(n_late) + rng.random(n_late)) / n_late
        arrival[rng.choice(n, size=n_late, replace=False)] = spread
    return arrival


def _zipf_popularity(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    rank = rng.permutation(n) + 1.0
    return rank ** -exponent


def _user_events(config: SyntheticConfig, join: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Acting user and time in [0, 1) of every event, sorted by time. Each user acts at least once;
    the rest is split by log-normal activity; a user's events fall uniformly after its arrival."""
    activity = rng.lognormal(0.0, config.activity_sigma, config.n_users)
    counts = 1 + rng.multinomial(config.n_events - config.n_users, activity / activity.sum())
    users = np.repeat(np.arange(config.n_users, dtype=np.int64), counts)
    times = join[users] + rng.random(config.n_events) * (1.0 - join[users])
    order = np.argsort(times, kind="stable")
    return users[order], times[order]


def _choose_items(config: SyntheticConfig, cluster: np.ndarray, times: np.ndarray, item_cluster: np.ndarray,
                  release: np.ndarray, popularity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Item of every event, drawn per time bin from the weights of the items released by then."""
    by_cluster = np.argsort(item_cluster, kind="stable")  # items laid out cluster by cluster
    ends = np.searchsorted(item_cluster[by_cluster], np.arange(config.n_clusters), side="right")
    starts = np.concatenate([[0], ends[:-1]])
    own = rng.random(len(times)) < config.affinity
    draw = rng.random(len(times))
    items = np.empty(len(times), dtype=np.int64)
    bounds = np.searchsorted(times, np.arange(N_BINS + 1) / N_BINS)
    novelty_unit = config.novelty_boost * popularity.mean()
    for b in range(N_BINS):
        lo, hi = bounds[b], bounds[b + 1]
        if lo == hi:
            continue
        t = b / N_BINS
        novelty = novelty_unit * np.exp(-np.maximum(t - release, 0.0) / config.novelty_decay)
        weight = np.where(release <= t, popularity + novelty, 0.0)[by_cluster]
        pos = _inverse_cdf(weight, starts, ends, cluster[lo:hi], own[lo:hi], draw[lo:hi])
        items[lo:hi] = by_cluster[pos]
    return items


def _inverse_cdf(weight: np.ndarray, starts: np.ndarray, ends: np.ndarray, cluster: np.ndarray,
                 own: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """Positions drawn with probability proportional to `weight`, inside the cluster's segment
    [starts[c], ends[c]) where `own`, else over everything. `draw` holds uniforms in [0, 1)."""
    cum = np.cumsum(weight)
    base = np.where(starts > 0, cum[starts - 1], 0.0)
    total = cum[ends - 1] - base
    local = own & (total[cluster] > 0)  # a cluster with nothing released yet falls back to global
    target = np.where(local, base[cluster] + draw * total[cluster], draw * cum[-1])
    pos = np.searchsorted(cum, target, side="right")
    # float rounding can push a target onto a segment's end: clamp to its last drawable position
    last_positive = np.maximum.accumulate(np.where(weight > 0, np.arange(len(weight)), -1))
    return np.minimum(pos, np.where(local, last_positive[ends[cluster] - 1], last_positive[-1]))
