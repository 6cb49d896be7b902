"""``fanout serve``: an authenticated HTTP API on the engine (hypercorn on trio)."""
