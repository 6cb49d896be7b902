"""``fanout run``: the daemon family.

``command`` parses the flags and picks the daemon; ``core`` is one daemon: a source of
lines, the engine, and a sink with its commit; ``workers`` and ``fleet`` are the
multi-process and Redis-stream variants. ``reader``, ``lines``, ``checkpoint`` and
``output`` are the pieces they share. Imports point only downward (``tests/test_layers.py``).
"""
