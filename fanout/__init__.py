"""fanout: high-volume APNs sender on trio."""

__version__ = "0.1.0"
