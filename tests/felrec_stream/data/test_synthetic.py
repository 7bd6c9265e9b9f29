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
