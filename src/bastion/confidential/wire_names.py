"""The names a sealed request uses on the V2 wire, in one place.

Apart from the HPKE code so the data plane can recognise a sealed request without
importing it: plain models never load the crypto.
"""

from __future__ import annotations

__all__ = [
    "PARAMETER", "PARTITIONED_PARAMETER", "ROWS_PARAMETER", "SEALED_TENSOR", "STATUS_PARAMETER", "SUITE_NAME",
]

SUITE_NAME = "hpke-x25519-hkdfsha256-aes256gcm-v1"
SEALED_TENSOR = "bastion_sealed"  # the one BYTES tensor (shape [1]) that carries an envelope on the V2 wire
PARAMETER = "bastion_confidential"  # request parameter whose value is SUITE_NAME
ROWS_PARAMETER = "bastion_rows"  # the rows sealed inside, declared by the client, checked by the worker
STATUS_PARAMETER = "bastion_status"  # response: the worker's status for the sealed request
PARTITIONED_PARAMETER = "bastion_partitioned"  # response: a partitioned model's tail outputs, in the clear
