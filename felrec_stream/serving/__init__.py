"""The read side for downstream services: the query engine over one store (`query`, with
`ranking`, the served score over ANN + popular candidates), the snapshot reader and follower of
serve replicas (`snapshots`), the FastAPI HTTP layer (`app`), the light HTTP client (`client`), the
response shapes both share (`schema`, dependency-free so the client does not pull in FastAPI or
torch), and the Parquet/FAISS export of a snapshot (`export`). It reads `state`; nothing below it
imports this package.
"""
