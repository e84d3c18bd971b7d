"""Command line: ``python -m gateway run|check-config|status|roster|cases|test-call``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from .config import ConfigError, load
from .log import configure
from .malloc import limit_arenas

__all__ = ["main"]

DEFAULT_CONFIG = Path(os.environ.get("ONETOUCH_CONFIG", "/etc/onetouch-gateway/gateway.toml"))
EX_CONFIG = 78  # sysexits.h; the systemd unit does not restart on it


def _cmd_run(args: argparse.Namespace) -> int:
    limit_arenas()
    try:
        loaded = load(args.config)
    except ConfigError as exc:
        configure("console" if sys.stderr.isatty() else "json")
        print("configuration is not valid:", *exc.problems, sep="\n  ", file=sys.stderr)
        return EX_CONFIG
    configure(loaded.gateway.log.format, loaded.gateway.log.level)
    from .runtime import Gateway

    gateway = Gateway(loaded)
    # The loaded files are not needed once the gateway has taken what it uses;
    # holding them here would keep every resident's model alive for the run.
    del loaded

    async def main() -> None:
        gateway.install_signal_handlers()
        await gateway.run()

    asyncio.run(main())
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from .village import check_coverage

    try:
        loaded = load(args.config)
    except ConfigError as exc:
        print(f"{len(exc.problems)} problem(s) found:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    problems = check_coverage(loaded.village, datetime.now(UTC))
    if problems:
        print(f"{len(problems)} problem(s) found:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    gw, village = loaded.gateway, loaded.village
    links = [f"serial {s.name} ({s.port})" for s in gw.links.serial]
    if gw.links.mqtt is not None:
        links.append(f"mqtt {gw.links.mqtt.host}:{gw.links.mqtt.port} ({gw.topic_prefix})")
    now = time.time()
    on_duty = ", ".join(
        f"{village.people[d.person].name} ({d.person})"
        for d in village.roster.on_duty(now)
        if d.person in village.people
    )
    print(f"OK: {gw.source}")
    print(f"  village: {gw.village.id} {gw.village.name}")
    print(f"  callers: {len(loaded.residents.caller)} in {gw.residents_path}")
    print(f"  people: {len(village.people)} in {gw.people_path}")
    print(
        f"  roster: {gw.roster_path} ({village.roster.timezone}); "
        "somebody is on duty every minute of the week"
    )
    print(f"  on duty now: {on_duty or 'nobody'}")
    print(f"  links: {', '.join(links)}")
    print(f"  store: {gw.store.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onetouch-gateway", description="The village gateway for one-touch callers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("run", _cmd_run, "run the gateway (as systemd does)"),
        ("check-config", _cmd_check_config, "validate the configuration files and exit"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=f"gateway.toml (default {DEFAULT_CONFIG})",
        )
        p.set_defaults(func=func)

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=f"gateway.toml (default {DEFAULT_CONFIG})",
        )

    from .staff import add_commands

    add_commands(sub, config_arg)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
