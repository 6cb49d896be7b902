"""fanout: high-volume APNs sender on trio."""

from .client import Client
from .errors import ConfigError, FanoutError, KeyFileError, TransportError, ValidationError
from .outcome import Outcome, Result
from .payload import Alert, Aps, Notification, Payload, PushType

__version__ = "0.1.0"

__all__ = [
    "Alert", "Aps", "Client", "ConfigError", "FanoutError", "KeyFileError", "Notification",
    "Outcome", "Payload", "PushType", "Result", "TransportError", "ValidationError",
]
