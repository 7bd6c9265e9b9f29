"""The FELRec model and its tensor maths: pure, no IO, no state outside nn.Modules.

`felrec` holds the shared Transformer encoder and the FELRec-Q/-P heads, `losses` the InfoNCE,
BYOL and spread functions, `metrics` the evaluation maths (normalized rank, sampled hit rate,
cosine and nearest-neighbour scores). These modules may import only torch, numpy, the standard
library, `felrec_stream.config` and `felrec_stream.errors` (tests/test_architecture.py), so the
model can be read, tested and swapped without Kafka, FAISS or files in the way.
"""
