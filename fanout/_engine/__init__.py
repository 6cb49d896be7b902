"""The HTTP/2 engine: framer, TLS, connection, pool, proxy and backoff.

Nothing here imports from above it (the library, the features, the daemon); a test in
``tests/test_layers.py`` checks that. The client drives it through ``Pool``.
"""
