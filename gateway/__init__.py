"""The one-touch call gateway: the resident calls, the secretary must come."""

__version__ = "0.1.0"
