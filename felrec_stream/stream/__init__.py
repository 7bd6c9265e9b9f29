"""Events and the seams of a stream job, with no state and no model.

`events` is the canonical event table and its micro-batches, `messages` the wire format (decode,
validate, poison messages as data), `batcher` the pure micro-batching state machine, and `source`
the `Source` / `DeadLetterSink` protocols every job reads through, with an in-memory source for
tests and offline runs. Kafka implementations live in `connectors.kafka`. Never imports
`state`, `serving` or `cli`.
"""
