"""A wire tap on the bench broker: when each press, ACK and notification passed.

    python -m bench._tap --port PORT --prefix onetouch/bench --out FILE

Runs in its own process and timestamps every message on the caller and app
topics with the system-wide monotonic clock, so the gateway's own share of a
latency (press seen at the broker to ACK seen at the broker) can be told from
the share of the load generator that shares its cores.  Writes one JSON line
per message to FILE when it gets SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    seen: list[tuple[float, str, bytes]] = []

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        # The clock first: everything else here is the tap's own cost.
        seen.append((time.monotonic(), msg.topic, msg.payload))

    def on_subscribe(*_a: Any) -> None:
        print("subscribed", flush=True)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect("127.0.0.1", args.port)
    client.subscribe([(f"{args.prefix}/caller/+/up", 0), (f"{args.prefix}/caller/+/down", 0),
                      (f"{args.prefix}/app/+/notify", 0)])  # fmt: skip

    def stop(*_a: Any) -> None:
        client.disconnect()

    signal.signal(signal.SIGTERM, stop)
    client.loop_forever()
    with Path(args.out).open("w") as f:
        for at, topic, payload in seen:
            f.write(json.dumps({"t": at, "topic": topic, "payload": payload.hex()}) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
