"""Machine unlearning for served models (issue 18), first slice: SISA training.

- ``records``: stable record ids and training-set digests.
- ``trainers``: the model families (logistic regression, MLP) as deterministic numpy
  trainers whose state is a few arrays, exported to ONNX through skl2onnx.
- ``sisa``: sharding and slicing, training a shard step by step with checkpoints, and
  retraining a shard from its last unaffected checkpoint.
- ``manifest``: the versioned JSON manifest of an ensemble.
- ``store``: the ensemble's directory, ``forget`` (with its receipt) and ``verify``.
- ``aggregate``: majority vote / mean of the shards, vote margin, certification bound.
- ``data``: records from arrays, and the malware and image scenarios as data sources.

Serving the ensemble, a deletion API on the server and ERASER's serving-aware policies
are later slices.
"""
