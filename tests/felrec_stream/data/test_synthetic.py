import numpy as np
import pyarrow.compute as pc
import pytest

from felrec_stream.data.split import chronological_split, label_partitions
from felrec_stream.data.synthetic import PRESETS, SyntheticConfig, config_from_options, generate
from felrec_stream.errors import ConfigError
from felrec_stream.stream.events import EVENT_SCHEMA, is_time_ordered


@pytest.fixture(scope="module")
def data():
    return generate(SyntheticConfig())


@pytest.fixture(scope="module")
def split(data):
    return chronological_split(data.events)


def test_default_is_small():
    config = SyntheticConfig()
    assert (config.n_users, config.n_items, config.n_events, config.n_clusters) == (300, 200, 20_000, 8)
    assert PRESETS["small"] == config


def test_sizes_schema_and_order(data):
    events = data.events
    assert events.schema.equals(EVENT_SCHEMA)
    assert len(events) == 20_000
    assert is_time_ordered(events)
    assert events.column("event_id").to_pylist() == list(range(20_000))
    assert pc.count_distinct(events.column("user")).as_py() == 300  # every user acts at least once
    assert pc.count_distinct(events.column("item")).as_py() <= 200
    assert all(u.startswith("u") for u in data.user_ids) and all(i.startswith("i") for i in data.item_ids)
    assert data.user_ids[12] == "u12" and data.item_ids[7] == "i7"
    assert data.user_clusters()["u12"] == data.user_cluster[12]
    assert data.item_clusters()["i7"] == data.item_cluster[7]
    # balanced clusters: every cluster has users and items
    assert np.bincount(data.user_cluster, minlength=8).min() >= 300 // 8
    assert np.bincount(data.item_cluster, minlength=8).min() >= 200 // 8


def test_deterministic_for_a_seed(data):
    again = generate(SyntheticConfig())
    assert again.events.equals(data.events)
    assert np.array_equal(again.item_release, data.item_release)
    assert np.array_equal(again.user_cluster, data.user_cluster)
    other = generate(SyntheticConfig(seed=1))
    assert not other.events.equals(data.events)


def test_cluster_structure_is_planted(data):
    users = data.events.column("user").to_pylist()
    items = data.events.column("item").to_pylist()
    same = np.mean(data.cluster_of_users(users) == data.cluster_of_items(items))
    # affinity 0.85 plus chance hits of the global choice; chance alone would be 1/8
    assert same > 0.8
    # per user too: the most frequent cluster among a user's items is the user's own cluster
    u_cluster = data.cluster_of_users(users)
    i_cluster = data.cluster_of_items(items)
    user_index = np.fromiter((int(u[1:]) for u in users), dtype=np.int64)
    counts = np.zeros((300, 8), dtype=np.int64)
    np.add.at(counts, (user_index, i_cluster), 1)
    assert np.mean(counts.argmax(axis=1) == data.user_cluster) > 0.95
    assert np.array_equal(u_cluster, data.user_cluster[user_index])


def test_popularity_is_skewed(data):
    counts = np.sort(np.unique(data.events.column("item").to_numpy(zero_copy_only=False), return_counts=True)[1])[::-1]
    top_decile = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_decile > 0.25  # uniform would give ~0.1


def test_nobody_acts_before_arrival(data):
    ts = data.events.column("timestamp").to_numpy()
    items = np.fromiter((int(i[1:]) for i in data.events.column("item").to_pylist()), dtype=np.int64)
    users = np.fromiter((int(u[1:]) for u in data.events.column("user").to_pylist()), dtype=np.int64)
    assert np.all(ts >= data.item_release[items])
    assert np.all(ts >= data.user_join[users])
    assert np.sum(data.item_release > data.item_release.min()) == 50  # 25% of items arrive late
    assert np.sum(data.user_join > data.user_join.min()) == 60  # 20% of users arrive late


def test_split_has_cold_start_partitions(split):
    for part, minimum in ((split.val, 0.01), (split.test, 0.05)):
        labels = label_partitions(split.train, part)
        for name in ("new_user", "new_item"):
            assert np.mean(labels == name) >= minimum, (name, np.mean(labels == name))
        assert np.mean(labels == "observed") > 0.5


def test_new_items_arrive_late_and_get_several_interactions(data, split):
    boundary = split.train.column("timestamp").to_numpy()[-1]
    assert np.sum(data.item_release > boundary) >= 3  # some items are released after the 80% point
    labels = label_partitions(split.train, split.test)
    test_items = np.asarray(split.test.column("item").to_pylist(), dtype=object)
    new_items, counts = np.unique(test_items[labels == "new_item"], return_counts=True)
    assert np.all(data.item_release[[int(i[1:]) for i in new_items]] > data.item_release.min())  # late arrivals
    assert np.sum(counts >= 5) >= 3  # several new items, each with several interactions


def test_bigger_world_with_many_clusters():
    data = generate(SyntheticConfig(n_users=2000, n_items=1500, n_events=60_000, n_clusters=40, seed=3))
    assert len(data.events) == 60_000 and is_time_ordered(data.events)
    users = data.events.column("user").to_pylist()
    items = data.events.column("item").to_pylist()
    assert np.mean(data.cluster_of_users(users) == data.cluster_of_items(items)) > 0.8


def test_degenerate_but_valid_configs():
    one = generate(SyntheticConfig(n_users=1, n_items=1, n_events=5, n_clusters=1, late_item_fraction=0.9,
                                   late_user_fraction=0.9))
    assert one.events.column("item").to_pylist() == ["i0"] * 5
    flat = generate(SyntheticConfig(affinity=0.0, popularity_exponent=0.0, late_item_fraction=0.0,
                                    late_user_fraction=0.0, n_events=3000))
    assert len(flat.events) == 3000


@pytest.mark.parametrize(
    "changes",
    [dict(n_clusters=0), dict(n_clusters=500), dict(n_events=10), dict(affinity=1.5),
     dict(late_item_fraction=1.0), dict(popularity_exponent=-1), dict(novelty_decay=0)],
)
def test_invalid_configs_are_rejected(changes):
    with pytest.raises(ConfigError):
        SyntheticConfig(**changes)


def test_config_from_options_coerces_and_validates():
    config = config_from_options(size="medium", seed="7", affinity="0.5")
    assert config.seed == 7 and config.affinity == 0.5 and config.n_events == PRESETS["medium"].n_events
    with pytest.raises(ConfigError, match="unknown synthetic size"):
        config_from_options(size="huge")
    with pytest.raises(ConfigError, match="unknown"):
        config_from_options(n_user=3)


# ---- drift ----------------------------------------------------------------------------------------

# sha256 of the events, clusters, releases and joins of `generate` before the drift option existed
GOLDEN = {"small": "adabce0dc926361405eae8c70ac255f16480a9a1466b4b96908f74b62bd5db93",
          "seed3": "049318c2ccf2c9162995b9d7597194dec4d32a1e69a4e86b4293a41366e077a2"}


def _digest(data) -> str:
    import hashlib

    sha = hashlib.sha256()
    for name in data.events.column_names:
        sha.update(str(data.events.column(name).to_pylist()).encode())
    for array in (data.user_cluster, data.item_cluster, data.item_release, data.user_join):
        sha.update(array.tobytes())
    return sha.hexdigest()


def test_no_drift_is_the_world_before_the_option_bit_for_bit(data):
    assert SyntheticConfig().drift == "none"
    assert _digest(data) == GOLDEN["small"]
    big = generate(SyntheticConfig(n_users=2000, n_items=1500, n_events=60_000, n_clusters=40, seed=3, drift="none"))
    assert _digest(big) == GOLDEN["seed3"]
    assert data.user_cluster_after is None and data.user_switch is None


def _own_cluster_share(data, since, until):
    users = data.events.column("user").to_pylist()
    items = data.events.column("item").to_pylist()
    ts = data.events.column("timestamp").to_numpy()
    mask = (ts >= since) & (ts < until)
    old = data.cluster_of_users(users) == data.cluster_of_items(items)
    new = data.cluster_of_users_at(users, ts) == data.cluster_of_items(items)
    return old[mask].mean(), new[mask].mean()


def test_abrupt_drift_moves_every_user_to_a_new_cluster():
    data = generate(SyntheticConfig(drift="abrupt", drift_at=0.5))
    span = data.config.n_events * data.config.seconds_per_event
    middle = data.config.start_timestamp + span // 2
    assert np.all(data.user_cluster_after != data.user_cluster)  # reassigned, always to another cluster
    assert np.all(data.user_switch == middle)
    old_before, new_before = _own_cluster_share(data, 0, middle)
    old_after, new_after = _own_cluster_share(data, middle, np.iinfo(np.int64).max)
    assert old_before == new_before and old_before > 0.8  # before: the planted clusters
    assert new_after > 0.8 and old_after < 0.1  # after: the new cluster, the old one at chance level
    # the events before the drift are the same draws as without drift (own generator for the drift)
    plain = generate(SyntheticConfig())
    before = int(np.searchsorted(data.events.column("timestamp").to_numpy(), middle))
    assert data.events.slice(0, before).equals(plain.events.slice(0, before))
    assert np.array_equal(data.events.column("user").to_numpy(zero_copy_only=False),
                          plain.events.column("user").to_numpy(zero_copy_only=False))
    # items keep arriving after the drift, and they are chosen
    late = np.flatnonzero(data.item_release > middle)
    assert len(late) >= 5
    chosen = set(data.events.column("item").to_pylist())
    assert sum(f"i{k}" in chosen for k in late) >= 5


def test_gradual_drift_switches_users_one_by_one_over_the_span():
    data = generate(SyntheticConfig(drift="gradual", drift_at=0.4, drift_span=0.4))
    cfg = data.config
    span = cfg.n_events * cfg.seconds_per_event
    lo, hi = cfg.start_timestamp + int(0.4 * span), cfg.start_timestamp + int(0.8 * span)
    assert data.user_switch.min() >= lo and data.user_switch.max() <= hi
    assert len(np.unique(data.user_switch)) == cfg.n_users  # one by one
    assert _own_cluster_share(data, hi, np.iinfo(np.int64).max)[1] > 0.8
    old_during, new_during = _own_cluster_share(data, lo, hi)
    assert 0.2 < old_during < 0.7 and new_during > 0.8  # a mix of old and new tastes while it drifts


@pytest.mark.parametrize("drift", ["abrupt", "gradual"])
def test_drift_is_seeded(drift):
    a, b = generate(SyntheticConfig(drift=drift)), generate(SyntheticConfig(drift=drift))
    assert a.events.equals(b.events) and np.array_equal(a.user_cluster_after, b.user_cluster_after)
    assert np.array_equal(a.user_switch, b.user_switch)
    other = generate(SyntheticConfig(drift=drift, seed=1))
    assert not np.array_equal(other.user_cluster_after, a.user_cluster_after)


def test_drift_options_are_checked():
    with pytest.raises(ConfigError):
        SyntheticConfig(drift="sideways")
    with pytest.raises(ConfigError):
        SyntheticConfig(drift="gradual", drift_at=0.9, drift_span=0.2)
    with pytest.raises(ConfigError):
        SyntheticConfig(n_clusters=1, drift="abrupt")
    assert config_from_options("small", drift="abrupt", drift_at="0.3").drift_at == 0.3
