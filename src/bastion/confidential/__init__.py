"""Confidential serving: the trusted worker and everything that lets a client trust it.

The serving host is untrusted (docs/CONFIDENTIAL.md). A model marked ``confidential``
is never loaded by the front process: a separate *trusted worker* (a TEE in
production, an ordinary process here) holds it and its keys, proves what it runs with
attestation evidence (``attestation``, ``nitro``, ``dev_evidence``), talks to the
front over an encrypted channel bound to its attested key (``channel``), opens inputs
that clients sealed to that key with HPKE and seals the outputs back (``sealing``),
and gets bundle keys from a key-release service only when its evidence matches the
service's policy (``kms``).
"""
