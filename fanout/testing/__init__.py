"""Test support, like :mod:`trio.testing`: a validating mock APNs server
(:class:`MockAPNs`, :class:`MockConfig`), throwaway TLS certificates and ES256 keys
(:func:`make_pki`, :func:`make_signing_key`), and nginx as an independent HTTP/2 peer
(:mod:`fanout.testing.nginx`)."""

from .devcerts import TestPKI, TestSigningKey, make_pki, make_signing_key
from .mock import MockAPNs, MockConfig, MockStats, open_mock

__all__ = ["MockAPNs", "MockConfig", "MockStats", "TestPKI", "TestSigningKey", "make_pki",
           "make_signing_key", "open_mock"]
