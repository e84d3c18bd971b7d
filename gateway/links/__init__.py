"""Device links: where bytes from callers become frames, and frames go back out."""

from .mqtt import MqttLink
from .serial import SerialLink

__all__ = ["MqttLink", "SerialLink"]
