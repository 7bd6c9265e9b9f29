"""The read side for downstream services: the FastAPI query app with its engine and snapshot
follower (`app`), the light HTTP client (`client`), the response shapes both share (`schema`,
dependency-free so the client does not pull in FastAPI or torch), and the Parquet/FAISS export of
a snapshot (`export`). It reads `state`; nothing below it imports this package.
"""
