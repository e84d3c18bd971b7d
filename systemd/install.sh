#!/usr/bin/env bash
# Install (or upgrade) the one-touch call gateway as a systemd service on
# Raspberry Pi OS or Debian.  Run as root from the project folder:
#
#     sudo bash systemd/install.sh
#
# Safe to run again: it never overwrites configuration you have edited.
#
# The ONETOUCH_* variables below move it elsewhere (the tests install into a
# scratch folder that way); IT staff need none of them.
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX="${ONETOUCH_PREFIX:-/opt/onetouch-gateway}"
CONF="${ONETOUCH_CONF:-/etc/onetouch-gateway}"
STATE="${ONETOUCH_STATE:-/var/lib/onetouch-gateway}"
USER_NAME="${ONETOUCH_USER:-onetouch}"
UNIT="${ONETOUCH_UNIT:-/etc/systemd/system/onetouch-gateway.service}"
BIN_LINK="${ONETOUCH_BIN_LINK:-/usr/local/bin/onetouch-gateway}"
MOSQUITTO_CONF_D="${ONETOUCH_MOSQUITTO_CONF_D:-/etc/mosquitto/conf.d}"
START="${ONETOUCH_START:-yes}"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
fail() { printf '\n\033[1;31mSTOPPED: %s\033[0m\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run me as root: sudo bash systemd/install.sh"
# The system's Python, not one in a user's home: the service user must run it.
PY=/usr/bin/python3
[ -x "$PY" ] || PY="$(command -v python3)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || fail "Python 3.11 or newer is needed (Raspberry Pi OS bookworm / Debian 12)"

step "1/6 Debian packages: python3-venv, mosquitto"
missing=()
"$PY" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "already installed"
fi
if [ -d "$MOSQUITTO_CONF_D" ] && [ ! -e "$MOSQUITTO_CONF_D/onetouch.conf" ]; then
    install -m 0644 "$SRC/config/mosquitto.conf" "$MOSQUITTO_CONF_D/onetouch.conf"
    echo "broker settings: $MOSQUITTO_CONF_D/onetouch.conf"
fi

step "2/6 the service user '$USER_NAME' (may use serial ports: group dialout)"
if ! id "$USER_NAME" >/dev/null 2>&1; then
    adduser --system --group --home "$STATE" --no-create-home "$USER_NAME"
fi
usermod -a -G dialout "$USER_NAME"
id "$USER_NAME"

step "3/6 the program, in its own Python environment: $PREFIX/venv"
install -d -m 0755 "$PREFIX"
[ -x "$PREFIX/venv/bin/python" ] || "$PY" -m venv "$PREFIX/venv"
runuser -u "$USER_NAME" -- "$PREFIX/venv/bin/python" -c 'pass' \
    || fail "user $USER_NAME cannot run $PREFIX/venv/bin/python; remove $PREFIX/venv and retry"
"$PREFIX/venv/bin/python" -m pip install -q --upgrade pip
"$PREFIX/venv/bin/python" -m pip install -q --upgrade "$SRC"
install -m 0644 "$SRC/README.md" "$PREFIX/README.md"
ln -sf "$PREFIX/venv/bin/onetouch-gateway" "$BIN_LINK"
"$PREFIX/venv/bin/onetouch-gateway" --help >/dev/null
echo "installed: $("$PREFIX/venv/bin/python" -c 'import gateway; print(gateway.__version__)')"

step "4/6 configuration in $CONF (existing files are kept)"
install -d -m 0750 -o root -g "$USER_NAME" "$CONF"
for f in gateway.toml residents.toml people.toml roster.toml; do
    if [ -e "$CONF/$f" ]; then
        echo "kept      $CONF/$f"
    else
        install -m 0640 -o root -g "$USER_NAME" "$SRC/config/$f" "$CONF/$f"
        sed -i "s#/var/lib/onetouch-gateway#$STATE#g" "$CONF/$f"
        echo "example   $CONF/$f   <- edit this for your village"
    fi
done
install -d -m 0750 -o "$USER_NAME" -g "$USER_NAME" "$STATE"

step "5/6 the systemd unit"
sed -e "s#/opt/onetouch-gateway#$PREFIX#g" -e "s#/etc/onetouch-gateway#$CONF#g" \
    -e "s#^User=onetouch\$#User=$USER_NAME#" -e "s#^Group=onetouch\$#Group=$USER_NAME#" \
    "$SRC/systemd/onetouch-gateway.service" >"$UNIT.tmp"
chmod 0644 "$UNIT.tmp"
mv "$UNIT.tmp" "$UNIT"
echo "$UNIT"

step "6/6 check the configuration and start"
if ! runuser -u "$USER_NAME" -- "$PREFIX/venv/bin/onetouch-gateway" check-config \
        --config "$CONF/gateway.toml"; then
    fail "the configuration has problems (above). Edit the files in $CONF, then run:
    sudo onetouch-gateway check-config --config $CONF/gateway.toml
    sudo systemctl enable --now onetouch-gateway"
fi
if [ "$START" != yes ] || ! command -v systemctl >/dev/null \
        || [ "$(systemctl is-system-running 2>/dev/null || true)" = "offline" ]; then
    echo "systemd is not running here (a container?): start it by hand with"
    echo "    sudo -u $USER_NAME $PREFIX/venv/bin/onetouch-gateway run --config $CONF/gateway.toml"
    exit 0
fi
systemctl daemon-reload
systemctl enable --now mosquitto
systemctl enable onetouch-gateway
systemctl restart onetouch-gateway
sleep 3
systemctl --no-pager status onetouch-gateway || true
echo
echo "Done. Follow the log with:  journalctl -u onetouch-gateway -f"
