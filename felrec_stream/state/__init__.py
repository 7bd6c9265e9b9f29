"""Representation state: the cache FELRec reads and writes, and how it survives a restart.

`store` is the in-memory representation store (id maps, vectors, histories), `engine` the batch
rules every job applies to it (read the pre-batch cache, encode, write the latest vector),
`faiss_store` the sharded FAISS backend, `snapshot` durable, checksummed snapshots of a store, and
`checkpoint` training checkpoints with the LR schedule. It may use `model`, `stream` and `data`,
never `serving` or `cli`.
"""
