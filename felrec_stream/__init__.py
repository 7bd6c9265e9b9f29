"""felrec-stream: FELRec (embedding-layer-free cold-start recommender) on streams of interactions."""

__version__ = "0.1.0"
