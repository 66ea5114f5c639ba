"""Partitioned inference: run the first layers of a model in the trusted worker, the rest outside.

- ``graph``: model surgery on ONNX graphs: the candidate cut points of a model (single
  tensors every input-to-output path passes through) with their shapes and FLOP shares,
  the split into a head (inputs -> cut tensor) and a tail (cut tensor -> outputs), and the
  check that tail(head(x)) equals the model on sample inputs. ``bastion partition list``
  and ``bastion partition split`` are its command line.
- ``advise`` (``bastion partition advise``) scores each candidate cut by how well an
  attacker who sees the cut tensor can rebuild the input (``reconstruct``) or attack the
  model (``shielding``), and recommends one; ``advice_report`` writes its report.
- ``package``: a partitioned model version (sealed head for the worker, plain tail).
"""
