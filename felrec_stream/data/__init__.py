"""Offline datasets as event tables: the chronological train/validation/test split (`split`) and
the seeded synthetic generator with planted cold-start structure (`synthetic`). File readers for
public datasets live in `connectors.datasets`. Never imports `state`, `serving` or `cli`.
"""
