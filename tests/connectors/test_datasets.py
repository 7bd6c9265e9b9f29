import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from connectors.datasets import dataset_label, dataset_names, load_dataset, read_events_file, write_events_file
from felrec_stream.errors import ConfigError, DatasetError
from felrec_stream.stream.events import EVENT_SCHEMA, is_time_ordered, make_events

ML100K = Path(__file__).resolve().parents[2].parent / "shared/data/ml-100k"


def _write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _rows(table):
    return list(zip(*(table.column(n).to_pylist() for n in EVENT_SCHEMA.names)))


def test_dataset_names():
    assert dataset_names() == sorted(["ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-latest",
                                      "twitch", "csv", "parquet", "synthetic"])


def test_dataset_label_names_generic_files_after_the_file():
    assert dataset_label("csv", "data/my-clicks.csv") == "my-clicks.csv"
    assert dataset_label("parquet", Path("/x/events.parquet")) == "events.parquet"
    assert dataset_label("ml-100k", "../shared/data/ml-100k") == "ml-100k"
    assert dataset_label("synthetic", None) == "synthetic"
    assert dataset_label("csv", None) == "csv"  # nothing better to say; load_dataset rejects it anyway


# ------------------------------------------------------------------------- formats


def test_ml100k_folder_or_file_sorted_with_ties_in_line_order(tmp_path):
    _write(tmp_path, "u.data", "196\t242\t3\t300\n186\t302\t3\t100\n\n22\t377\t1\t300\n244\t51\t2\t100\n")
    expected = [("186", "302", 100, 1), ("244", "51", 100, 3), ("196", "242", 300, 0), ("22", "377", 300, 2)]
    assert _rows(load_dataset("ml-100k", tmp_path)) == expected  # blank line: not a data row
    table = load_dataset("ml-100k", tmp_path / "u.data")
    assert _rows(table) == expected
    assert table.schema.equals(EVENT_SCHEMA)


def test_ml1m_dat(tmp_path):
    _write(tmp_path, "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\r\n2::1193::1::978300760\n")
    assert _rows(load_dataset("ml-1m", tmp_path)) == [
        ("1", "1193", 978300760, 0), ("2", "1193", 978300760, 2), ("1", "661", 978302109, 1)]
    assert len(load_dataset("ml-10m", tmp_path / "ratings.dat")) == 3


def test_ml25m_csv_keeps_every_rating(tmp_path):
    _write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n1,306,0.5,1147868817\n")
    for name in ("ml-20m", "ml-25m", "ml-latest"):
        assert _rows(load_dataset(name, tmp_path)) == [("1", "306", 1147868817, 1), ("1", "296", 1147880044, 0)]


def test_twitch_item_is_the_streamer(tmp_path):
    _write(tmp_path, "100k_a.csv",
           "1,33842865744,mithrain,154,156\n1,33846768288,alptv,166,169\n2,33886469056,mithrain,45,46\n")
    assert _rows(load_dataset("twitch", tmp_path)) == [
        ("2", "mithrain", 45, 2), ("1", "mithrain", 154, 0), ("1", "alptv", 166, 1)]


def test_generic_csv_with_header_and_event_id(tmp_path):
    path = _write(tmp_path, "log.csv", 'ts;who;what;seq\n5;"ann";"x;y";20\n5;bob;007;10\n')
    table = load_dataset("csv", path, user="who", item="what", timestamp="ts", event_id="seq", delimiter=";")
    assert _rows(table) == [("bob", "007", 5, 10), ("ann", "x;y", 5, 20)]  # ids verbatim, sorted by event_id


def test_generic_csv_without_header_by_position(tmp_path):
    path = _write(tmp_path, "log.tsv", "a\t9\tz\nb\t3\ty\n")
    table = load_dataset("csv", path, user=2, item="0", timestamp=1, delimiter="\t", header="no")
    assert _rows(table) == [("y", "b", 3, 1), ("z", "a", 9, 0)]
    with pytest.raises(DatasetError, match="by 0-based position"):
        load_dataset("csv", path, user="user", item=0, timestamp=1, delimiter="\t", header=False)
    with pytest.raises(DatasetError, match="position 5 out of range"):
        load_dataset("csv", path, user=5, item=0, timestamp=1, delimiter="\t", header=False)


def test_generic_csv_same_column_twice(tmp_path):
    path = _write(tmp_path, "log.csv", "user,item,timestamp\na,b,1\n")
    with pytest.raises(DatasetError, match="different columns"):
        load_dataset("csv", path, item="user")


def test_parquet(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table({"uid": [7, 3], "iid": ["p", "q"], "when": [20, 10], "extra": [0.1, 0.2]}), path)
    assert _rows(load_dataset("parquet", path, user="uid", item="iid", timestamp="when")) == [
        ("3", "q", 10, 1), ("7", "p", 20, 0)]
    stamps = pa.array([2_000, 1_000], pa.timestamp("ms"))
    pq.write_table(pa.table({"user": ["a", "b"], "item": ["x", "y"], "timestamp": stamps}), path)
    assert _rows(load_dataset("parquet", path)) == [("b", "y", 1, 1), ("a", "x", 2, 0)]  # seconds


def test_parquet_errors(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user": ["a", None], "item": ["x", "y"], "timestamp": [1, 2]}), path)
    with pytest.raises(DatasetError, match=r"row 1 \(0-based\): empty 'user'"):
        load_dataset("parquet", path)
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['when'\]"):
        load_dataset("parquet", path, timestamp="when")
    pq.write_table(pa.table({"user": ["a"], "item": ["x"], "timestamp": [1.5]}), path)
    with pytest.raises(DatasetError, match="must be integer"):
        load_dataset("parquet", path)
    _write(tmp_path, "junk.parquet", b"not parquet at all")
    with pytest.raises(DatasetError, match="cannot read Parquet file .*junk.parquet"):
        load_dataset("parquet", tmp_path / "junk.parquet")


def test_synthetic_through_the_registry():
    table = load_dataset("synthetic", n_events=500, n_users=50, n_items=40, seed="3")
    assert len(table) == 500 and is_time_ordered(table)
    assert table.equals(load_dataset("synthetic", n_events=500, n_users=50, n_items=40, seed=3))
    with pytest.raises(DatasetError, match="takes no path"):
        load_dataset("synthetic", "somewhere")
    with pytest.raises(ConfigError, match="unknown"):
        load_dataset("synthetic", n_userz=5)


# ------------------------------------------------------------------------- malformed input


def test_bad_integer_names_file_line_and_text(tmp_path):
    path = _write(tmp_path, "u.data", "1\t10\t5\t100\n2\t11\t3\t50\n\n3\tx\t1\t200\n4\t12\t1\t1.5\n")
    with pytest.raises(DatasetError) as err:
        load_dataset("ml-100k", path)
    message = str(err.value)
    assert str(path) in message
    assert r"line 4: '3\tx\t1\t200': item is not an integer ('x')" in message
    assert r"line 5: '4\t12\t1\t1.5': timestamp is not an integer ('1.5')" in message


def test_wrong_column_count_lists_the_first_lines(tmp_path):
    path = _write(tmp_path, "u.data", "1\t10\t5\t100\n2\t11\t3\n3\t12\t1\t200\t9\n4\t13\t1\t7\n")
    with pytest.raises(DatasetError) as err:
        load_dataset("ml-100k", path)
    message = str(err.value)
    assert r"line 2: expected 4 fields separated by '\t', got 3: '2\t11\t3'" in message
    assert r"line 3: expected 4 fields separated by '\t', got 5" in message
    assert "line 4" not in message


# (dataset, file name, content, what the one-line error must say)
MALFORMED_FILES = [
    pytest.param("ml-1m", "ratings.dat", "1::10::5::100\n2:x:11::3::50\n", r"line 2: '2:x:11::3::50'.*'::'",
                 id="ml-dat-single-colons"),
    pytest.param("ml-1m", "ratings.dat", "1::10::5::100\n2::11::3\n",
                 r"line 2: expected 4 fields separated by '::', got 3", id="ml-dat-field-count"),
    pytest.param("ml-25m", "ratings.csv", "userId,movieId,rating,time\n1,296,5.0,1147880044\n",
                 r"missing column\(s\) \['timestamp'\].*userId", id="ml-csv-missing-header-column"),
    pytest.param("ml-100k", "u.data", "1\t10\t5\n", "line 1: expected 4 fields", id="field-count-in-first-row"),
    pytest.param("ml-100k", "u.data", "1\t10\t5\t100\n2\t\t3\t50\n", r"line 2: '2\\t\\t3\\t50': empty 'item'",
                 id="empty-value-is-not-dropped"),
    pytest.param("csv", "log.csv", "user,item,timestamp\na,,1\n", r"line 2: 'a,,1': empty 'item'",
                 id="empty-value-is-not-dropped-csv"),
    pytest.param("csv", "log.csv", b"user,item,timestamp\na,b,1\nc,\xff\xfe,2\n",
                 r"line 3: 'c,\\\\xff\\\\xfe,2': item is not valid UTF-8", id="non-utf8-value"),
    pytest.param("csv", "head.csv", b"us\xe9r,item,timestamp\na,b,1\n", "line 1 is not valid UTF-8",
                 id="non-utf8-header"),
    pytest.param("csv", "log.csv", "user,item,timestamp\na,b,1\na,c,2021-01-01\n",
                 r"line 3: 'a,c,2021-01-01': timestamp is not an integer", id="bad-timestamp-csv"),
    pytest.param("csv", "log.csv", b"", "is empty", id="empty-file"),
    pytest.param("csv", "log.csv", b"\n\r\n\n", "blank lines only", id="blank-lines-only"),
    pytest.param("csv", "log.csv", b"user,item,timestamp\n", "has no data rows", id="header-only"),
]


@pytest.mark.parametrize("dataset, name, content, message", MALFORMED_FILES)
def test_malformed_file_is_one_clear_dataset_error(tmp_path, dataset, name, content, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(dataset, path)


def test_missing_paths_and_bad_arguments(tmp_path):
    with pytest.raises(DatasetError, match="dataset file not found: .*u.data"):
        load_dataset("ml-100k", tmp_path)
    with pytest.raises(DatasetError, match="dataset file not found"):
        load_dataset("csv", tmp_path / "nope.csv")
    with pytest.raises(DatasetError, match="needs a file"):
        load_dataset("csv", tmp_path)
    with pytest.raises(DatasetError, match="needs a path"):
        load_dataset("ml-1m")
    with pytest.raises(DatasetError, match="unknown dataset 'ml-7m'"):
        load_dataset("ml-7m", tmp_path)
    _write(tmp_path, "u.data", "1\t2\t3\t4\n")
    with pytest.raises(DatasetError, match="takes no option"):
        load_dataset("ml-100k", tmp_path, delimiter=",")
    with pytest.raises(DatasetError, match="known: user, item"):
        load_dataset("csv", tmp_path / "u.data", colour="red")
    with pytest.raises(DatasetError, match="one character"):
        load_dataset("csv", tmp_path / "u.data", delimiter="::")


# ------------------------------------------------------------------------- event files and cache


def test_events_file_round_trip(tmp_path):
    table = make_events(["a", "b", "c"], ["x", "y", "z"], [3, 1, 2])
    path = write_events_file(table, tmp_path / "sub" / "events.parquet")
    assert read_events_file(path).equals(table)
    unsorted = table.take(pa.array([2, 0, 1]))
    write_events_file(unsorted, path)
    assert read_events_file(path).equals(table)
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary files left behind


def test_events_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="event file not found"):
        read_events_file(tmp_path / "none.parquet")
    pq.write_table(pa.table({"user": ["a"], "item": ["b"]}), tmp_path / "partial.parquet")
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['timestamp', 'event_id'\]"):
        read_events_file(tmp_path / "partial.parquet")
    _write(tmp_path, "junk.parquet", b"PAR1 garbage")
    with pytest.raises(DatasetError, match="cannot read event file"):
        read_events_file(tmp_path / "junk.parquet")
    with pytest.raises(DatasetError):
        write_events_file(pa.table({"user": ["a"]}), tmp_path / "bad.parquet")


def test_cache_is_reused_invalidated_and_rebuilt(tmp_path):
    source = _write(tmp_path, "u.data", "1\t10\t5\t100\n2\t11\t3\t50\n")
    cache = tmp_path / "cache"
    first = load_dataset("ml-100k", tmp_path, cache_dir=cache)
    (cache_file,) = cache.iterdir()
    # Reused: plant a different valid table in the cache file and get it back (path as file or folder).
    planted = make_events(["p"], ["q"], [1])
    write_events_file(planted, cache_file)
    assert load_dataset("ml-100k", source, cache_dir=cache).equals(planted)
    # Corrupt cache file: rebuilt from the source.
    cache_file.write_bytes(b"garbage")
    assert load_dataset("ml-100k", tmp_path, cache_dir=cache).equals(first)
    assert read_events_file(cache_file).equals(first)
    # Source changed (size and mtime): a new key.
    source.write_text("1\t10\t5\t100\n2\t11\t3\t50\n3\t12\t1\t70\n")
    os.utime(source, ns=(1, 1))
    assert len(load_dataset("ml-100k", tmp_path, cache_dir=cache)) == 3
    assert len(list(cache.iterdir())) == 2


def test_cache_key_includes_options(tmp_path):
    cache = tmp_path / "cache"
    a = load_dataset("synthetic", cache_dir=cache, n_events=400, n_users=40, n_items=30, seed=1)
    b = load_dataset("synthetic", cache_dir=cache, n_events=400, n_users=40, n_items=30, seed=2)
    assert not a.equals(b)
    assert len(list(cache.iterdir())) == 2
    assert load_dataset("synthetic", cache_dir=cache, n_events=400, n_users=40, n_items=30, seed=1).equals(a)


# ------------------------------------------------------------------------- the real MovieLens 100K


# Skip justified: the GroupLens licence forbids redistributing MovieLens, so the file is never in the
# repository; every format is also tested on small files above.
@pytest.mark.ml100k
@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason=f"{ML100K} not present")
def test_real_movielens_100k():
    table = load_dataset("ml-100k", ML100K)
    assert table.schema.equals(EVENT_SCHEMA)
    assert len(table) == 100_000
    assert pc.count_distinct(table.column("user")).as_py() == 943
    assert pc.count_distinct(table.column("item")).as_py() == 1682
    assert is_time_ordered(table)  # (timestamp, event_id): ties broken by line order
    assert sorted(table.column("event_id").to_pylist()) == list(range(100_000))
    # event_id is the 0-based line: every row matches its line of u.data
    raw = np.loadtxt(ML100K / "u.data", dtype=np.int64, delimiter="\t")
    ids = table.column("event_id").to_numpy()
    assert np.array_equal(table.column("timestamp").to_numpy(), raw[ids, 3])
    assert table.column("user").to_pylist() == [str(u) for u in raw[ids, 0]]
    assert table.column("item").to_pylist() == [str(i) for i in raw[ids, 1]]
    ts = table.column("timestamp").to_numpy()
    tied = np.flatnonzero(np.diff(ts) == 0)
    assert len(tied) > 0 and np.all(np.diff(ids)[tied] > 0)


@pytest.mark.parametrize("row, why", [
    ("a,b,-5", "field 'ts' is negative (-5)"),
    ("a\x01b,c,7", "field 'user' has control character '\\x01' at 1"),
    ("a, ,7", "field 'item' is empty or whitespace-only"),
    ("a," + "i" * 300 + ",7", "field 'item' has 300 characters > 256"),
])
def test_events_a_topic_would_reject_fail_here_with_file_and_line(tmp_path, row, why):
    path = _write(tmp_path, "log.csv", f"user,item,timestamp\nu,i,1\n{row}\n")
    with pytest.raises(DatasetError) as err:
        load_dataset("csv", path)
    message = str(err.value)
    assert message.startswith(f"{path}: invalid event(s): line 3: ") and why in message

