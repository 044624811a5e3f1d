#!/usr/bin/env bash
# Checks deploy/*.service with `systemd-analyze verify`, against the binaries just built
# (target/debug), in a scratch root so nothing is installed. Any warning fails: verify
# only warns about unknown keys and bad values, and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
R=$(mktemp -d)
trap 'rm -rf "$R"' EXIT
mkdir -p "$R/usr/local/bin" "$R/etc/systemd/system" "$R/usr/lib"
cp -a /usr/lib/systemd "$R/usr/lib/"
for b in process-server master-target mobility-agent; do cp "target/debug/$b" "$R/usr/local/bin/"; done
cp deploy/*.service "$R/etc/systemd/system/"
out=$(systemd-analyze verify --root="$R" "$R"/etc/systemd/system/*.service 2>&1) || { echo "$out"; exit 1; }
if [ -n "$out" ]; then echo "$out"; exit 1; fi
echo "systemd-analyze verify: $(ls deploy/*.service | wc -l) units, no warnings"
