"""Runnable examples of fanout's asyncio and sync doors (tests/test_examples.py runs them)."""
