"""guard: who may call what, how often, what was done, and the crypto behind it.

Tenants and API keys (``keystore``), rate limits and quotas (``limits``), the
tamper-evident audit log (``audit``), TLS (``tls``), sealed model bundles
(``bundles``) and the facade the data plane calls (``gate``).
"""
