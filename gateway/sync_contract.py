"""The sync contract between a village gateway and the district's case store.

These models are the code form of ``docs/sync.md``: both ends import them, so
the gateway and the reference central store cannot drift apart silently.
Every payload carries ``v`` (the schema version); a receiver rejects a
version it does not know instead of guessing at its fields.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "CONFIG_FILES",
    "SCHEMA_VERSION",
    "Ack",
    "Batch",
    "ConfigPush",
    "ConfigReport",
    "Record",
    "SyncTopics",
]

SCHEMA_VERSION = 1
# The only files the district may replace; gateway.toml (links, store path)
# stays under the control of whoever installed the gateway.
CONFIG_FILES = frozenset({"people.toml", "roster.toml", "residents.toml"})
MAX_CONFIG_FILE_BYTES = 1_000_000

VillageId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
StoreId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
# Both ends keep these numbers in 64-bit database columns (SQLite INTEGER,
# PostgreSQL BIGINT): a larger one would pass validation and then fail the
# insert, taking the consumer down instead of being rejected as bad input.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
RecordId = Annotated[int, Field(ge=1, le=2**63 - 1)]
Version = Annotated[int, Field(ge=1, le=2**63 - 1)]
# A time that is not finite cannot be ordered or stored (SQLite turns NaN into
# NULL, which a NOT NULL column refuses).
Instant = Annotated[float, Field(allow_inf_nan=False)]


class _Msg(BaseModel):
    # Unknown fields are ignored (not forbidden) so that a newer sender can add
    # optional fields within one schema version without breaking older readers.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Record(_Msg):
    """One outbox row.  ``(village, store, id)`` identifies it for ever."""

    id: RecordId
    kind: str
    case_id: str | None = None
    created_at: Instant
    wall_trusted: bool
    payload: dict[str, Any]

    @field_validator("payload")
    @classmethod
    def _strict_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Python's JSON reader takes NaN and Infinity, which no JSON column
        # (PostgreSQL JSONB) accepts: refuse the record, not the database write.
        try:
            json.dumps(value, allow_nan=False)
        except ValueError as exc:
            raise ValueError(f"payload is not strict JSON: {exc}") from None
        return value


class Batch(_Msg):
    v: Literal[1] = 1
    village: VillageId
    store: StoreId  # the gateway database's identity; see docs/sync.md "idempotency"
    batch: str
    sent_at: Instant
    records: Annotated[list[Record], Field(min_length=1)]


class Ack(_Msg):
    """The central store committed these records (new or already known)."""

    v: Literal[1] = 1
    village: VillageId
    store: StoreId
    batch: str
    ids: list[RecordId]
    committed_at: Instant


class ConfigPush(_Msg):
    v: Literal[1] = 1
    village: VillageId
    version: Version
    push_id: Annotated[str, Field(min_length=1, max_length=64)]
    files: dict[str, str]
    sent_at: Instant = 0.0

    @field_validator("files")
    @classmethod
    def _known_files(cls, files: dict[str, str]) -> dict[str, str]:
        if not files:
            raise ValueError("a configuration push names no files")
        unknown = sorted(set(files) - CONFIG_FILES)
        if unknown:
            raise ValueError(f"files {unknown} cannot be pushed; only {sorted(CONFIG_FILES)} can")
        big = sorted(n for n, t in files.items() if len(t.encode()) > MAX_CONFIG_FILE_BYTES)
        if big:
            raise ValueError(f"files {big} are larger than {MAX_CONFIG_FILE_BYTES} bytes")
        return files


class ConfigReport(_Msg):
    v: Literal[1] = 1
    village: VillageId
    version: Int64  # as the push said it, even when the push was refused
    push_id: str
    applied: bool
    problems: list[str] = []
    applied_version: Int64 | None = None  # the version in force after this push
    at: Instant


class SyncTopics:
    """Topic names under one village's prefix (default ``district/{village}``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.batch = f"{prefix}/sync/batch"
        self.ack = f"{prefix}/sync/ack"
        self.config_push = f"{prefix}/config/push"
        self.config_report = f"{prefix}/config/report"

    @staticmethod
    def shared(group: str, root: str) -> tuple[str, str]:
        """The central side's shared subscriptions for every village under ``root``."""
        return (f"$share/{group}/{root}/+/sync/batch", f"$share/{group}/{root}/+/config/report")
