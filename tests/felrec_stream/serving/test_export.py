"""Exports are readable with plain pyarrow + faiss (no felrec_stream) and equal the store."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from felrec_stream.cli import cli
from felrec_stream.config import CacheConfig
from felrec_stream.serving.snapshots import snapshot_state
from felrec_stream.serving.export import export_snapshot, export_store
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.snapshot import SnapshotManager
from felrec_stream.state.store import Kind, RepresentationStore
from tests.felrec_stream.serving.test_app import D, filled_store, synthetic_batches, tiny_model


@pytest.fixture(scope="module")
def store() -> RepresentationStore:
    return filled_store(tiny_model(), synthetic_batches(n_events=800), cache=CacheConfig(history_len=8, shards=3))


def _read_faiss_kind(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """What an offline job does: every shard's flat index + norms + ids -> raw vector per external id."""
    meta = json.loads((directory / "index.json").read_text())
    vectors: dict[str, np.ndarray] = {}
    for s in range(meta["shards"]):
        base = directory / f"shard-{s:04d}"
        index = faiss.read_index(f"{base}.faiss")
        unit = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, meta["dim"]), np.float32)
        norms = np.load(f"{base}.norms.npy")
        ids = json.loads(Path(f"{base}.ids.json").read_text())
        assert len(ids) == index.ntotal == len(norms) == len(np.load(f"{base}.row_slot.npy"))
        vectors.update(zip(ids, unit * norms[:, None]))
    return meta, vectors


def _check_export(out: Path, store: RepresentationStore) -> dict:
    layout = json.loads((out / "layout.json").read_text())
    assert layout["dim"] == D and layout["format"] == "felrec-export/1"
    for kind, name in ((Kind.USER, "users"), (Kind.ITEM, "items")):
        table = pq.read_table(out / layout["tables"][name]["path"])
        assert table.schema.field("vector").type == pa.list_(pa.float32(), D)
        assert table.column_names == ["id", "vector", "last_update_time", "interaction_count", "history_length"]
        entity = store.tables[kind]
        assert table.column("id").to_pylist() == entity.ids.ids()
        vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(vectors, entity.vectors.all().numpy(), rtol=1e-6, atol=1e-7)
        n = len(entity)
        assert table.column("interaction_count").to_pylist() == entity.history.counts[:n].tolist()
        assert table.column("history_length").to_pylist() == entity.history.lengths[:n].tolist()
        assert table.column("last_update_time").to_pylist() == entity.history.last_time[:n].tolist()
        meta, by_id = _read_faiss_kind(out / layout["faiss"][name]["dir"])
        assert meta["size"] == n and set(by_id) == set(entity.ids.ids())
        for row, external in enumerate(entity.ids.ids()):
            np.testing.assert_allclose(by_id[external], vectors[row], rtol=1e-5, atol=1e-6)
    return layout


def test_cli_export_of_a_worker_snapshot_reads_back_with_plain_pyarrow_and_faiss(tmp_path, store):
    cache = CacheConfig(history_len=8, shards=3)
    SnapshotManager(tmp_path / "snaps").write_state(*snapshot_state(store, cache))
    args = ["export", "--snapshot-dir", str(tmp_path / "snaps"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["users"] == len(store.users) and summary["source"]["snapshot_seq"] == 1
    layout = _check_export(tmp_path / "out", store)
    assert layout["cache"]["shards"] == 3


def test_exported_flat_shards_answer_cosine_queries_like_the_store(tmp_path, store):
    """An offline job searching the exported shards itself finds the store's nearest item."""
    export_store(store, tmp_path)
    _, by_id = _read_faiss_kind(tmp_path / "faiss" / "items")
    item_ids = list(by_id)
    unit = np.stack([by_id[i] / np.linalg.norm(by_id[i]) for i in item_ids]).astype(np.float32)
    index = faiss.IndexFlatIP(D)
    index.add(unit)
    query = unit[:5]
    _, found = index.search(query, 1)
    assert [item_ids[j] for j in found[:, 0]] == item_ids[:5]  # each item is its own nearest neighbour


def test_export_of_a_tensor_store_and_hnsw_side_index(tmp_path):
    """Non-FAISS stores (training/eval) export too; an ANN side index is written when asked."""
    store = filled_store(tiny_model(), synthetic_batches(n_events=400), RepresentationStore(D, history_len=8))
    layout = export_store(store, tmp_path, CacheConfig(history_len=8, index_type="hnsw"))
    _check_export(tmp_path, store)
    hnsw = faiss.read_index(str(tmp_path / "faiss" / "items" / "shard-0000.hnsw.faiss"))
    assert hnsw.ntotal >= 1
    assert "faiss/items/shard-0000.hnsw.faiss" in layout["faiss"]["items"]["files"]


def test_export_without_snapshot_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    args = ["export", "--snapshot-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0 and "no valid snapshot" in str(result.exception)


def test_export_skips_a_newest_snapshot_that_does_not_load(tmp_path, store):
    manager, cache = SnapshotManager(tmp_path / "snaps"), CacheConfig(history_len=8)
    manager.write_state(*snapshot_state(store, cache))
    state, meta = snapshot_state(store, cache)
    state["store"]["users"]["history"]["rows"] = state["store"]["users"]["history"]["rows"][:, :3]  # wrong shape
    manager.write_state(state, meta)
    layout = export_snapshot(tmp_path / "snaps", tmp_path / "out")
    assert layout["source"]["snapshot_seq"] == 1
    _check_export(tmp_path / "out", store)


def test_export_of_a_capped_snapshot_holds_every_entity_and_indexes_the_resident_ones(tmp_path, store):
    cache = CacheConfig(history_len=8, shards=3, max_entities=15)
    root = tmp_path / "snaps"
    capped = filled_store(tiny_model(), synthetic_batches(n_events=800), make_store(D, cache, spill_dir=root / "spill"))
    state, meta = snapshot_state(capped, cache)
    SnapshotManager(root).write_state(state, meta, refs={f"spill/{n}": i for n, i in capped.spill_refs().items()})
    result = CliRunner().invoke(cli, ["export", "--snapshot-dir", str(root), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    layout = json.loads((tmp_path / "out" / "layout.json").read_text())
    for kind, name in ((Kind.USER, "users"), (Kind.ITEM, "items")):
        table = pq.read_table(tmp_path / "out" / layout["tables"][name]["path"])
        entity = store.tables[kind]  # the same batches without a cap
        assert table.column("id").to_pylist() == entity.ids.ids()
        vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(vectors, entity.vectors.all().numpy())  # spilled ones included, exactly
        assert table.column("interaction_count").to_pylist() == entity.history.counts[: len(entity)].tolist()
        _, by_id = _read_faiss_kind(tmp_path / "out" / layout["faiss"][name]["dir"])
        resident = capped.tables[kind].resident_slots()
        assert set(by_id) - {""} == set(capped.tables[kind].ids.names(resident)) != set(entity.ids.ids())


def test_an_export_reads_the_spill_files_of_its_snapshot_even_when_the_writer_prunes_them(tmp_path, store,
                                                                                           monkeypatch):
    from felrec_stream.serving import export as export_module

    cache = CacheConfig(history_len=8, shards=3, max_entities=15)
    root = tmp_path / "snaps"
    capped = filled_store(tiny_model(), synthetic_batches(n_events=800), make_store(D, cache, spill_dir=root / "spill"))
    state, meta = snapshot_state(capped, cache)
    SnapshotManager(root).write_state(state, meta, refs={f"spill/{n}": i for n, i in capped.spill_refs().items()})
    real_export = export_module.export_store

    def pruned_meanwhile(*args, **kwargs):
        for path in (root / "spill").iterdir():
            path.unlink()
        return real_export(*args, **kwargs)

    monkeypatch.setattr(export_module, "export_store", pruned_meanwhile)
    export_module.export_snapshot(root, tmp_path / "out")
    table = pq.read_table(tmp_path / "out" / "users.parquet")
    np.testing.assert_array_equal(np.stack(table.column("vector").to_numpy(zero_copy_only=False)),
                                  store.users.vectors.all().numpy())
