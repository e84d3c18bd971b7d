"""Configuration files: pydantic models at the boundary, clear errors for staff.

``gateway.toml`` names the village, the store, the device links and the
residents file.  Relative paths inside it are taken from the file's own folder,
so a copied config directory keeps working wherever it is put.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from firmware_protocol import KEY_LEN

if TYPE_CHECKING:
    from .desk import Village

__all__ = [
    "Caller",
    "ConfigError",
    "GatewayConfig",
    "Loaded",
    "ModemConfig",
    "MqttLinkConfig",
    "ResidentsFile",
    "SerialLinkConfig",
    "SyncConfig",
    "load",
    "load_gateway_file",
    "load_residents",
]


class ConfigError(Exception):
    """One or more problems in configuration files, each naming file, field and value."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class VillageConfig(_Model):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
    name: str = ""
    # The time zone belongs to the roster (roster.toml): one place only.


class StoreConfig(_Model):
    path: Path = Path("/var/lib/onetouch-gateway/gateway.db")
    # FULL makes every acknowledged press survive a power cut, which is the
    # promise; NORMAL is offered only for benchmarks on throw-away data.
    synchronous: Literal["FULL", "NORMAL"] = "FULL"


class SerialLinkConfig(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
    port: str
    baudrate: Annotated[int, Field(gt=0, le=4_000_000)] = 9600
    rs485: bool = False  # drive RTS for a transceiver's direction pin
    reopen_min_s: Annotated[float, Field(gt=0)] = 0.5
    reopen_max_s: Annotated[float, Field(gt=0)] = 30.0


class MqttLinkConfig(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(gt=0, lt=65536)] = 1883
    username: str | None = None
    password: str | None = None
    client_id: str | None = None  # default: onetouch-gateway-{village id}
    topic_prefix: str | None = None  # default: onetouch/{village id}
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    reconnect_min_s: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max_s: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("topic_prefix")
    @classmethod
    def _plain_prefix(cls, value: str | None) -> str | None:
        if value is not None and (
            not value or any(c in value for c in "+#") or value.endswith("/")
        ):
            raise ValueError(f"topic prefix {value!r} must be non-empty, without + # or a final /")
        return value


class LinksConfig(_Model):
    serial: list[SerialLinkConfig] = []
    mqtt: MqttLinkConfig | None = None

    @model_validator(mode="after")
    def _some_link(self) -> Self:
        if not self.serial and self.mqtt is None:
            raise ValueError("no device link: configure [[links.serial]] or [links.mqtt]")
        names = [s.name for s in self.serial]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"serial link names repeat: {sorted(dup)}")
        return self


class ModemConfig(_Model):
    """The 4G module that texts and rings people (SMS and voice channels)."""

    port: str
    baudrate: Annotated[int, Field(gt=0, le=4_000_000)] = 115200
    pin: str | None = None
    ring_s: Annotated[float, Field(ge=5, le=120)] = 30.0
    # The key a person presses during the call to accept it; "" when the
    # module cannot hear keys (then an answered call only counts as reached).
    accept_digit: Annotated[str, Field(pattern=r"^[0-9*#]?$")] = "1"
    # Whether picking up the call accepts the case.  Off: only the key accepts;
    # a call picked up without it counts as "reached" and acceptance comes by
    # SMS or app.  On, for a village whose module cannot hear keys and who
    # agreed that whoever picks up is coming.
    answered_call_accepts: bool = False
    sms_template: str | None = None  # {text} {case} {resident} {address} {how_to_answer}
    how_to_answer: str | None = None
    # When the module stops answering and reopening the port does not wake it,
    # these ways to reset it are tried in turn: "at" sends AT+CFUN=1,1 (the
    # module restarts itself), "command" runs reset_command (a script that
    # toggles the module's reset pin or power).  [] only reopens the port.
    reset: list[Literal["at", "command"]] = ["at"]
    reset_command: Annotated[list[str] | None, Field(validate_default=True)] = None
    reset_command_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    # How long the module needs to boot after a reset before it is opened again.
    reset_boot_s: Annotated[float, Field(ge=0, le=600)] = 20.0

    @field_validator("reset")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        twice = sorted({w for w in value if value.count(w) > 1})
        if twice:
            raise ValueError(f"lists {twice} more than once; each way is tried in turn anyway")
        return value

    @field_validator("reset_command")
    @classmethod
    def _program(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        # Checked here, not after the model, so that the error names this field.
        ways = info.data.get("reset", [])
        if value is None:
            if "command" in ways:
                raise ValueError(
                    'reset includes "command" but no program is given; '
                    'e.g. reset_command = ["/usr/local/bin/modem-reset"]'
                )
            return value
        if not value or not value[0]:
            raise ValueError('must name a program, e.g. ["/usr/local/bin/modem-reset"]')
        if not value[0].startswith("/"):
            raise ValueError(
                f"the program {value[0]!r} must be an absolute path "
                "(the service runs with a minimal PATH)"
            )
        if "reset" in info.data and "command" not in ways:
            raise ValueError(
                f'is set but reset = {ways!r} does not include "command", so it would never run; '
                'e.g. reset = ["at", "command"]'
            )
        return value

    @field_validator("sms_template")
    @classmethod
    def _known_fields(cls, value: str | None) -> str | None:
        if value is None:
            return value
        import string

        allowed = {"text", "case", "resident", "address", "how_to_answer"}
        used = {f for _, f, _, _ in string.Formatter().parse(value) if f}
        if used - allowed:
            raise ValueError(f"unknown fields {sorted(used - allowed)}; use {sorted(allowed)}")
        return value


class MetricsConfig(_Model):
    """The Prometheus endpoint.  Loopback by default: the figures name callers."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, lt=65536)] = 9464


class IntakeConfig(_Model):
    # Presses that arrive together are committed together; an upper bound
    # keeps one transaction short.
    max_batch: Annotated[int, Field(ge=1, le=10_000)] = 256


class ClockConfig(_Model):
    # "auto" asks the kernel whether the clock is synchronised (a Pi has no
    # RTC, so its time is wrong after a power cut until NTP fixes it).
    trust: Literal["auto", "always", "never"] = "auto"


class LogConfig(_Model):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class FilesConfig(_Model):
    residents: Path = Path("residents.toml")
    people: Path = Path("people.toml")
    roster: Path = Path("roster.toml")


class SyncConfig(_Model):
    """The link to the district's case store (docs/sync.md)."""

    host: str
    port: Annotated[int, Field(gt=0, lt=65536)] = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None  # default with tls: the system's CA certificates
    client_id: str | None = None  # default: onetouch-sync-{village id}
    topic_prefix: str | None = None  # default: district/{village id}
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    # How long the district's broker keeps this gateway's session (and the
    # acknowledgements and pushes addressed to it) while the link is down.
    session_expiry_s: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 7 * 86400
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 500
    # Many hosted brokers refuse messages above 128 KiB..1 MiB; a batch is cut
    # before it grows past this (a single larger record still goes alone).
    batch_max_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = 512 * 1024
    ack_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    retry_min_s: Annotated[float, Field(gt=0)] = 1.0
    retry_max_s: Annotated[float, Field(gt=0)] = 300.0
    poll_interval_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    retention_days: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("topic_prefix")
    @classmethod
    def _plain_prefix(cls, value: str | None) -> str | None:
        if value is not None and (
            not value or any(c in value for c in "+#$") or value.endswith("/")
        ):
            raise ValueError(
                f"topic prefix {value!r} must be non-empty, without + # $ or a final /"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.ca_file is not None and not self.tls:
            raise ValueError("ca_file is set but tls = false; set tls = true to use it")
        if self.retry_max_s < self.retry_min_s:
            raise ValueError(
                f"retry_max_s ({self.retry_max_s}) is less than retry_min_s ({self.retry_min_s})"
            )
        return self

    def prefix(self, village_id: str) -> str:
        return self.topic_prefix or f"district/{village_id}"

    def client(self, village_id: str) -> str:
        return self.client_id or f"onetouch-sync-{village_id}"


class GatewayFile(_Model):
    village: VillageConfig
    store: StoreConfig = StoreConfig()
    files: FilesConfig = FilesConfig()
    links: LinksConfig
    modem: ModemConfig | None = None
    metrics: MetricsConfig | None = None
    intake: IntakeConfig = IntakeConfig()
    clock: ClockConfig = ClockConfig()
    log: LogConfig = LogConfig()
    sync: SyncConfig | None = None


class Caller(_Model):
    id: Annotated[int, Field(ge=1, le=0xFFFFFFFF)]
    key: str  # 32 hex digits, the caller's 16-byte secret
    resident: str
    address: str = ""
    grid: str = ""
    phone: str = ""
    lives_alone: bool = False
    notes: str = ""

    @field_validator("key")
    @classmethod
    def _hex_key(cls, value: str) -> str:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise ValueError("key must be hexadecimal digits") from None
        if len(raw) != KEY_LEN:
            raise ValueError(f"key must be {KEY_LEN * 2} hex digits, got {len(value)}")
        return value.lower()

    @property
    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.key)


class ResidentsFile(_Model):
    caller: list[Caller] = []

    @model_validator(mode="after")
    def _unique(self) -> Self:
        seen: set[int] = set()
        for c in self.caller:
            if c.id in seen:
                raise ValueError(f"caller id {c.id} appears more than once")
            seen.add(c.id)
        return self

    def by_id(self) -> dict[int, Caller]:
        return {c.id: c for c in self.caller}


class GatewayConfig(_Model):
    """The gateway file with its paths resolved."""

    source: Path
    village: VillageConfig
    store: StoreConfig
    residents_path: Path
    people_path: Path
    roster_path: Path
    links: LinksConfig
    modem: ModemConfig | None
    metrics: MetricsConfig | None
    intake: IntakeConfig
    clock: ClockConfig
    log: LogConfig
    sync: SyncConfig | None = None

    @property
    def topic_prefix(self) -> str:
        mqtt = self.links.mqtt
        if mqtt is not None and mqtt.topic_prefix:
            return mqtt.topic_prefix
        return f"onetouch/{self.village.id}"

    @property
    def mqtt_client_id(self) -> str:
        mqtt = self.links.mqtt
        if mqtt is not None and mqtt.client_id:
            return mqtt.client_id
        return f"onetouch-gateway-{self.village.id}"


@dataclass(frozen=True)
class Loaded:
    gateway: GatewayConfig
    residents: ResidentsFile
    village: Village  # people, roster and callers as the desk sees them


def _describe(exc: ValidationError, file: Path, data: Any) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        parts: list[str] = []
        node = data
        for item in loc:
            if isinstance(item, int):
                label = f"[{item}]"
                if isinstance(node, list) and item < len(node):
                    node = node[item]
                    # Name list entries by their id where they have one; staff
                    # search the file for "id = 1017", not for an index.
                    if isinstance(node, dict) and "id" in node:
                        label = f"[id={node['id']}]"
                else:
                    node = None
                parts.append(label)
            else:
                parts.append(("." if parts else "") + str(item))
                node = node.get(item) if isinstance(node, dict) else None
        where = "".join(parts) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("missing",):
            problems.append(f"{file}: {where}: required field is missing")
        elif err["type"] == "extra_forbidden":
            problems.append(f"{file}: {where}: unknown field (misspelt?)")
        else:
            problems.append(f"{file}: {where}: {msg} (value: {err.get('input')!r})")
    return problems


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"]) from None
    except OSError as exc:  # a directory, a name too long, an I/O error
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc}"]) from None


M = TypeVar("M", bound=BaseModel)


def load_model(path: Path, model: type[M]) -> M:
    """One TOML file as one pydantic model; every problem names file, field and value."""
    data = _read_toml(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, data)) from None


def load_residents(path: Path) -> ResidentsFile:
    return load_model(path, ResidentsFile)


DISTRICT_DIR = "district-config"  # beside the database: the files the district pushed


def district_overrides(gateway: GatewayConfig) -> dict[str, Path]:
    """Files the district pushed that are newer than the local copy.

    Pushed files live in the state directory (the configuration directory is
    read-only for the service).  A local edit made after the push wins: IT
    staff who change roster.toml and reload must see their change in force.
    """
    current = gateway.store.path.parent / DISTRICT_DIR / "current.json"
    try:
        record = json.loads(current.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    folder = current.parent / f"v{int(record['version'])}"
    local = {
        "residents.toml": gateway.residents_path,
        "people.toml": gateway.people_path,
        "roster.toml": gateway.roster_path,
    }
    out = {}
    for name in record.get("files", []):
        pushed = folder / name
        mine = local.get(name)
        if mine is None or not pushed.exists():
            continue
        try:
            newer_locally = mine.stat().st_mtime > float(record["applied_at"])
        except FileNotFoundError:
            newer_locally = False
        if not newer_locally:
            out[name] = pushed
    return out


def load(path: Path | str, *, overrides: dict[str, Path] | None = None) -> Loaded:
    """Read and validate the gateway file and every file it names.

    ``overrides`` replaces residents.toml, people.toml or roster.toml by other
    files (a district push); by default the pushes in force are used.
    """
    gateway = load_gateway_file(path)
    if overrides is None:
        overrides = district_overrides(gateway)
    if overrides:
        gateway = gateway.model_copy(
            update={
                "residents_path": overrides.get("residents.toml", gateway.residents_path),
                "people_path": overrides.get("people.toml", gateway.people_path),
                "roster_path": overrides.get("roster.toml", gateway.roster_path),
            }
        )
    try:
        residents = load_residents(gateway.residents_path)
    except ConfigError as exc:
        raise ConfigError(_named_by(exc.problems, gateway)) from None
    from .village import load_village  # it imports this module's helpers

    try:
        village = load_village(
            gateway.people_path,
            gateway.roster_path,
            residents,
            name=gateway.village.name or gateway.village.id,
            residents_source=str(gateway.residents_path),
        )
    except ConfigError as exc:
        raise ConfigError(_named_by(exc.problems, gateway)) from None
    return Loaded(gateway=gateway, residents=residents, village=village)


_UNREADABLE = (
    ": file not found",
    ": permission denied",
    ": cannot read",
    ": not valid TOML",
    ": not UTF-8",
)


def _named_by(problems: list[str], gateway: GatewayConfig) -> list[str]:
    """Point a file that cannot be read back to the gateway.toml field naming it."""
    fields = {
        str(gateway.residents_path): "files.residents",
        str(gateway.people_path): "files.people",
        str(gateway.roster_path): "files.roster",
    }
    out = []
    for problem in problems:
        field = next((f for path, f in fields.items() if problem.startswith(path)), None)
        if field is not None and any(u in problem for u in _UNREADABLE):
            problem += f" (named by {field} in {gateway.source})"
        out.append(problem)
    return out


def load_gateway_file(path: Path | str) -> GatewayConfig:
    """Only gateway.toml, with its paths resolved (for tools that need no roster)."""
    path = Path(path).resolve()
    data = _read_toml(path)
    try:
        raw = GatewayFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, data)) from None
    base = path.parent
    store = raw.store
    if not store.path.is_absolute():
        store = store.model_copy(update={"path": base / store.path})
    # An absolute path stays as it is.
    residents_path = base / raw.files.residents
    people_path = base / raw.files.people
    roster_path = base / raw.files.roster
    sync = raw.sync
    if sync is not None and sync.ca_file is not None and not sync.ca_file.is_absolute():
        sync = sync.model_copy(update={"ca_file": base / sync.ca_file})
    gateway = GatewayConfig(
        source=path,
        village=raw.village,
        store=store,
        residents_path=residents_path,
        people_path=people_path,
        roster_path=roster_path,
        links=raw.links,
        modem=raw.modem,
        metrics=raw.metrics,
        intake=raw.intake,
        clock=raw.clock,
        log=raw.log,
        sync=sync,
    )
    return gateway
