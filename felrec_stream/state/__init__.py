"""Representation state: the cache FELRec reads and writes, and how it survives a restart.

`store` is the in-memory representation store, made of `tables` (id maps, histories, one table per
kind) and `vectors` (the `VectorBackend` seam and its torch backends); `spill` bounds its memory
(`cache.max_entities`), `engine` holds the batch rules every job applies to it (read the pre-batch
cache, encode, write the latest vector), `faiss_store` the sharded FAISS backend, `snapshot`
durable, checksummed snapshots of a store, and `checkpoint` training checkpoints (the LR schedule
they save is `training/schedule.py`). It may use `model`, `stream` and `data`, never `serving` or
`cli`.
"""
