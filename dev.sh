#!/usr/bin/env bash
# Set up and run the one-touch call gateway from this checkout, on Debian or
# Raspberry Pi OS.  Installs only what is missing, so running it again is quick.
#
#   bash dev.sh demo    install, then run a simulated village (Ctrl-C stops it)
#   bash dev.sh test    install, then run the lint and the whole test suite
#   bash dev.sh bench   install, then run the benchmarks (over an hour; --quick: minutes)
#   bash dev.sh install install only
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

install() {
    local sudo="" packages=() tool
    local tools=(mosquitto socat "$@")
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "Python 3.11 or newer is needed (Debian 12 / Raspberry Pi OS bookworm have it)." >&2
        exit 1
    fi
    python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
    for tool in "${tools[@]}"; do
        if [ "$tool" = postgresql ]; then
            # Debian keeps initdb and pg_ctl out of PATH, in /usr/lib/postgresql/VERSION/bin.
            compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || packages+=(postgresql)
            continue
        fi
        command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || packages+=("$tool")
    done
    if [ ${#packages[@]} -gt 0 ]; then
        say "installing Debian packages: ${packages[*]}"
        $sudo apt-get update -q
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${packages[@]}"
    fi
    if [ ! -x .venv/bin/python ]; then
        say "creating the virtual environment .venv"
        python3 -m venv .venv
    fi
    local stamp
    stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -e "$stamp" ]; then
        say "installing Python packages into .venv"
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q -e ".[test]"
        rm -f .venv/.installed-*
        touch "$stamp"
    fi
}

case "${1:-}" in
    install)
        install
        ;;
    demo)
        install
        shift
        say "starting a simulated village: broker, serial bus, gateway and 36 callers"
        exec .venv/bin/python -m simulators.village "$@"
        ;;
    bench)
        install
        shift
        say "benchmarks: figures in bench/results/, see bench/README.md"
        # With --quick each one is small (a few minutes in all); without it,
        # the README's figures, the memory soak's hour included.
        for bench in press_latency press_notify intake startup sync_drain memory; do
            say "bench.$bench"
            .venv/bin/python -m "bench.$bench" "$@"
        done
        ;;
    test)
        install gcc postgresql  # gcc: the C reference code in SPEC.md; postgresql: sync tests
        shift
        say "ruff"
        .venv/bin/ruff check --output-format concise .
        say "pytest"
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
