"""The wire protocol shared by the gateway and the callers' firmware.

Pure: encodes and decodes bytes, checks MACs and counters, nothing else.
SPEC.md in this folder is the byte-level contract.
"""

from ._crc import crc16
from ._decoder import FrameDecoder, Reason, Rejected, decode_frame
from ._frames import (
    KEY_LEN,
    MAX_COUNTER,
    MAX_FRAME,
    MAX_PAYLOAD,
    SYNC,
    VERSION,
    Ack,
    AckStatus,
    Buzzer,
    CallerAck,
    CallerState,
    Feedback,
    Frame,
    Heartbeat,
    Key,
    KeyPress,
    LedColor,
    LedPattern,
    Message,
    MsgType,
    PayloadError,
    compute_mac,
    encode,
    parse_payload,
    verify_mac,
)
from ._security import ReplayGuard, Verdict

__all__ = [
    "KEY_LEN",
    "MAX_COUNTER",
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "SYNC",
    "VERSION",
    "Ack",
    "AckStatus",
    "Buzzer",
    "CallerAck",
    "CallerState",
    "Feedback",
    "Frame",
    "FrameDecoder",
    "Heartbeat",
    "Key",
    "KeyPress",
    "LedColor",
    "LedPattern",
    "Message",
    "MsgType",
    "PayloadError",
    "Reason",
    "Rejected",
    "ReplayGuard",
    "Verdict",
    "compute_mac",
    "crc16",
    "decode_frame",
    "encode",
    "parse_payload",
    "verify_mac",
]
