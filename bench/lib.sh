# Shared by the benchmark scripts: tools, a realistic image, timing, scattered writes.
now() { date +%s.%N; }
calc() { python3 -c "print(f'{$1:.2f}')"; }
cpu() { awk '{print ($14+$15)/100}' "/proc/$1/stat"; }
hwm() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

need_tools() {
  for t in "$@"; do command -v "$t" >/dev/null || { echo "the benchmark needs $t"; exit 1; }; done
}

# make_image PATH SIZE_MIB: an ext4 image holding several hundred MB of real files.
make_image() {
  local src="$1.src"
  mkdir -p "$src"
  for d in /usr/bin /usr/lib/gcc /usr/share/locale /usr/share/man /usr/lib/python3.11; do
    [ -d "$d" ] && cp -a "$d" "$src/" 2>/dev/null || true
  done
  truncate -s "$2M" "$1"
  mkfs.ext4 -q -F -d "$src" "$1"
  rm -rf "$src"
}

# scatter PATH PERCENT SEED: rewrite PERCENT % of the 4 KiB pages with random data.
scatter() {
  python3 - "$1" "$2" "$3" <<'PY'
import os, random, sys
random.seed(int(sys.argv[3]))
fd = os.open(sys.argv[1], os.O_WRONLY)
pages = os.fstat(fd).st_size // 4096
n = pages * int(sys.argv[2]) // 100
for p in random.sample(range(pages), n):
    os.pwrite(fd, os.urandom(4096), p * 4096)
os.fsync(fd)
print(n * 4096)
PY
}

# start_rsyncd DIR: an rsync daemon on loopback serving DIR as module "dst"; sets RPORT, RSYNCD.
start_rsyncd() {
  cat >"$1.conf" <<CONF
use chroot = no
uid = $(id -u)
gid = $(id -g)
[dst]
path = $1
read only = no
CONF
  RPORT=$((20000 + RANDOM % 20000))
  rsync --daemon --no-detach --config="$1.conf" --port=$RPORT --address=127.0.0.1 &
  RSYNCD=$!
  sleep 0.5
}

# rsync_sent SRC DEST_NAME [rsync options...]: prints the bytes rsync sent.
rsync_sent() {
  local src=$1 dst=$2
  shift 2
  rsync "$@" --stats "$src" "rsync://127.0.0.1:$RPORT/dst/$dst" | awk '/Total bytes sent/ {gsub(",","",$4); print $4}'
}

# rusage OUT CMD...: runs CMD, then writes "cpu_seconds peak_rss_mib" of it to OUT
# (for processes that exit on their own, whose /proc entry is gone when read).
rusage() {
  python3 - "$@" <<'PY'
import resource, signal, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
signal.signal(signal.SIGTERM, lambda *_: p.terminate())
p.wait()
r = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    f.write(f"{r.ru_utime + r.ru_stime:.2f} {r.ru_maxrss / 1024:.1f}\n")
PY
}
