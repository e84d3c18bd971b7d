from __future__ import annotations

from collections.abc import Callable
from typing import Any

from firmware_protocol import Frame, Rejected

# intake.submit: takes one decoded item and the link it came from; never raises.
Submit = Callable[[Frame | Rejected, Any], None]
