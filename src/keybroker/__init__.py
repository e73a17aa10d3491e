"""Keybroker: a Key Broker Service that releases secrets only to attested confidential guests."""

__version__ = "0.1.0"
