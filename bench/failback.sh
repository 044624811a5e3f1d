#!/usr/bin/env bash
# Benchmark: the way back for a realistic 2 GiB ext4 image with 1 % and 10 % of its 4 KiB
# pages changed at the recovery site. In the same run:
#   delta sync   reprotect to the original disk (the master target hashes it, the agent
#                sends only differing pages) and fail back (drain + apply + verify)
#   full download reprotect to an alternate disk with --sync during, then fail back
#   rsync        --inplace --no-whole-file over loopback (daemon)
#   pipeline     zstd -1 -T2 | nc | zstd -d over loopback, the full-copy peer
# Needs: mkfs.ext4 rsync zstd nc ss python3 (Debian: e2fsprogs rsync zstd netcat-openbsd iproute2).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
need_tools mkfs.ext4 rsync zstd nc ss python3
SIZE_MIB=${SIZE_MIB:-2048}
cargo build --quiet --release --workspace --bins --locked
B="$PWD/target/release"
W=$(mktemp -d /tmp/tern-failback-bench.XXXXXX)
PIDS=()
# way_back runs in a subshell, so its daemons are found by their data directories.
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; pkill -f -- "$W/" 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$W"; }
trap cleanup EXIT

# IMAGE=PATH reuses an image instead of building one; PCTS="1" runs only some percentages.
if [ -n "${IMAGE:-}" ]; then
  cp --sparse=always "$IMAGE" "$W/base.img"
else
  echo "== preparing a ${SIZE_MIB} MiB ext4 image with real files"
  make_image "$W/base.img" "$SIZE_MIB"
fi
IMG_BYTES=$(stat -c %s "$W/base.img")
mkdir -p "$W/rsync-dst"
start_rsyncd "$W/rsync-dst"
PIDS+=("$RSYNCD")

status_field() { "$B/drctl" status "$1" --json | python3 -c "import json,sys; v=json.load(sys.stdin)['$2']; print(v if v is not None else '')"; }

# way_back PCT MODE: MODE delta (original, sync before) or full (alternate, sync during).
# Prints "seconds wire_bytes".
way_back() {
  local pct=$1 mode=$2 d="$W/$1-$2${3:-}"
  mkdir -p "$d"
  cp --sparse=always "$W/base.img" "$d/onprem.img"
  "$B/process-server" init --data-dir "$d/ps" >/dev/null
  "$B/process-server" serve --data-dir "$d/ps" --listen 127.0.0.1:0 >"$d/ps.out" 2>"$d/ps.log" &
  local ps=$!
  PIDS+=($ps)
  for _ in $(seq 100); do grep -q listening "$d/ps.out" 2>/dev/null && break; sleep 0.05; done
  export TERN_SERVER="https://$(sed -n 's/^listening on //p' "$d/ps.out")" TERN_ADMIN_IDENTITY="$d/ps/pki/admin.bundle"
  "$B/drctl" enroll agent --vm vm --out "$d/agent.bundle" >/dev/null
  "$B/drctl" enroll master-target --name mt --out "$d/mt.bundle" >/dev/null
  "$B/master-target" serve --data-dir "$d/mt" --listen 127.0.0.1:0 --identity "$d/mt.bundle" >"$d/mt.out" 2>"$d/mt.log" &
  local mtp=$!
  PIDS+=($mtp)
  "$B/mobility-agent" run --server "$TERN_SERVER" --identity "$d/agent.bundle" --vm vm \
    --disk "sda=$d/onprem.img" --state-dir "$d/st1" 2>"$d/a1.log" &
  local a1=$!
  until [ -n "$(status_field vm last_point 2>/dev/null)" ]; do sleep 0.1; done
  kill -9 $a1; wait $a1 2>/dev/null || true
  "$B/drctl" failover vm --kind unplanned --output "$d/out" --json >/dev/null
  "$B/drctl" commit vm >/dev/null
  scatter "$d/out/sda.raw" "$pct" 7 >/dev/null
  local mt="https://$(sed -n 's/^listening on //p' "$d/mt.out")"
  local target="$d/onprem.img" location=original sync=before
  if [ "$mode" = full ]; then target="$d/new.img"; location=alternate; sync=during; fi
  "$B/drctl" reprotect vm --master-target "$mt" --location $location --sync $sync \
    --target-disk "sda=$target" --identity-out "$d/rec.bundle" >/dev/null
  local w0; w0=$(status_field vm bytes_received)
  local t0; t0=$(now)
  local ps0 mt0; ps0=$(cpu $ps); mt0=$(cpu $mtp)
  rusage "$d/a2.usage" "$B/mobility-agent" run --server "$TERN_SERVER" --identity "$d/rec.bundle" --vm vm \
    --disk "sda=$d/out/sda.raw" --state-dir "$d/st2" --shutdown true 2>"$d/a2.log" &
  local a2=$!
  PIDS+=($a2)
  if [ "$mode" = delta ]; then
    # The delta sync is done when the master target holds everything of the first point
    # (one poller process, so that the measurement adds little).
    python3 - "$B/drctl" "$d" <<'PY'
import json, subprocess, sys, time
deadline = time.time() + 600  # argv names the run's folder, so the bench's cleanup finds it
while time.time() < deadline:
    r = subprocess.run([sys.argv[1], "status", "vm", "--json"], capture_output=True, text=True)
    if r.returncode == 0:
        s = json.loads(r.stdout)
        if s["last_point"] is not None and all(d["master_target_seq"] >= d["durable_seq"] for d in s["disks"]):
            break
    time.sleep(0.01)
else:
    sys.exit("the delta sync did not finish within 600 s")
PY
  else
    until "$B/drctl" status vm --json | grep -q '"agent_connected": true'; do sleep 0.02; done
  fi
  local tm; tm=$(now)
  "$B/drctl" failback vm --json >"$d/failback.json"
  local t1; t1=$(now)
  local ps1 mt1 psm mtm; ps1=$(cpu $ps); mt1=$(cpu $mtp); psm=$(hwm $ps); mtm=$(hwm $mtp)
  wait $a2 2>/dev/null || true  # the agent stands down once failed back
  local usage; read -r ac am <"$d/a2.usage" 2>/dev/null || { ac=?; am=?; }
  usage="$ac/$(calc "$ps1-$ps0")/$(calc "$mt1-$mt0") $am/$psm/$mtm"
  local w1; w1=$(status_field vm bytes_received)
  local hashes; hashes=$(sed -n 's/.*hashes sent for a delta sync.*bytes=\([0-9]*\).*/\1/p' "$d/ps.log" | paste -sd+ | sed 's/^$/0/' | bc)
  if ! cmp -s "$d/out/sda.raw" "$target"; then echo "MISMATCH: $target differs from the recovered disk" >&2; exit 1; fi
  echo "$(calc "$t1-$t0") $((w1 - w0 + hashes)) $(calc "$tm-$t0") $(calc "$t1-$tm") $usage"
  "$B/drctl" commit vm >/dev/null
}

# pipe_copy SRC OUT: the full-copy peer, zstd -1 -T2 | nc | zstd -d over loopback, into
# OUT (removed afterwards); prints "seconds cpu_seconds" (CPU of all its processes).
pipe_copy() {
  local port=$((20000 + RANDOM % 20000)) t0 t1
  t0=$(now)
  rusage "$W/pipe.usage" bash -c "nc -l 127.0.0.1 $port | zstd -q -d -c >'$2' & for _ in \$(seq 100); do ss -ltn | grep -q ':$port ' && break; sleep 0.01; done; zstd -q -1 -T2 -c '$1' | nc -N 127.0.0.1 $port; wait"
  t1=$(now)
  read -r c _ <"$W/pipe.usage"
  echo "$(calc "$t1-$t0") $c"
  rm -f "$2"
}

printf '\n%-8s %-34s %10s %14s\n' "changed" "method" "seconds" "wire bytes"
for pct in ${PCTS:-1 10}; do
  cp --sparse=always "$W/base.img" "$W/rsync-dst/onprem.img"
  cp --sparse=always "$W/base.img" "$W/recovered.img"
  changed=$(scatter "$W/recovered.img" "$pct" 7)
  # The pipe and the full download run twice each, interleaved (both vary a lot on this
  # machine); the ratio is the faster pipe over the faster full download.
  read -r zt1 zc1 < <(pipe_copy "$W/recovered.img" "$W/nc-out-$pct-1.img")
  read -r dt dw dsync dfail dcpu drss < <(way_back "$pct" delta)
  read -r ft1 fw _ _ fcpu frss < <(way_back "$pct" full)
  t0=$(now); rb=$(rsync_sent "$W/recovered.img" onprem.img --inplace --no-whole-file --ignore-times); t1=$(now)
  rt=$(calc "$t1-$t0")
  read -r zt2 zc2 < <(pipe_copy "$W/recovered.img" "$W/nc-out-$pct-2.img")
  read -r ft2 _ _ _ fcpu2 frss2 < <(way_back "$pct" full -2)
  zt=$(python3 -c "print(min($zt1, $zt2))")
  ft=$(python3 -c "print(min($ft1, $ft2))")
  printf '%-8s %-34s %10s %14s\n' "$pct%" "tern delta sync (reprotect+failback)" "$dt" "$dw"
  printf '%-8s %-34s %10s\n' "$pct%" "  of which: delta sync to the MT" "$dsync"
  printf '%-8s %-34s %10s\n' "$pct%" "  of which: failback drain+apply+verify" "$dfail"
  printf '%-8s %-34s %10s %14s\n' "$pct%" "tern full download (failback)" "$ft1 / $ft2" "$fw"
  printf '%-8s %-34s %s s, peak RSS %s MiB\n' "$pct%" "  delta: CPU agent/PS/MT" "$dcpu" "$drss"
  printf '%-8s %-34s %s s, peak RSS %s MiB\n' "$pct%" "  full: CPU agent/PS/MT" "$fcpu | $fcpu2" "$frss | $frss2"
  printf '%-8s %-34s %s s\n' "$pct%" "  full: CPU of the three" "$(calc "${fcpu//\//+}") | $(calc "${fcpu2//\//+}")"
  printf '%-8s %-34s %10s %14s\n' "$pct%" "rsync --inplace --no-whole-file" "$rt" "$rb"
  printf '%-8s %-34s %10s %14s\n' "$pct%" "zstd -1 -T2 | nc | zstd -d" "$zt1 / $zt2" "-"
  printf '%-8s %-34s %s s\n' "$pct%" "  pipe CPU (before / after)" "$zc1 / $zc2"
  printf '%-8s %-34s %10s   (1%% target >= 3)\n' "$pct%" "rsync time / tern delta sync time" "$(calc "$rt/$dsync")"
  printf '%-8s %-34s %10s\n' "$pct%" "rsync time / tern delta + failback" "$(calc "$rt/$dt")"
  printf '%-8s %-34s %10s   (target <= 1.5)\n' "$pct%" "tern delta wire / changed bytes" "$(calc "$dw/$changed")"
  printf '%-8s %-34s %10s   (target >= 1.5)\n' "$pct%" "faster pipe / faster tern full" "$(calc "$zt/$ft")"
done
