#!/usr/bin/env bash
# A one-host Ceph cluster for the rbd driver's tests and benchmarks, in the shape of
# ceph/go-ceph's micro-osd.sh: one mon, one mgr, one OSD, pools of size 1, everything on
# 127.0.0.1 under DIR. Unlike micro-osd.sh the OSD is bluestore on a sparse file, not
# memstore: memstore keeps its objects in RAM and loses them when the OSD is killed, and
# the tests kill it to check that nothing committed is lost. Auth is cephx, so clients
# need DIR/ceph.conf and DIR/keyring (users client.admin and client.qubes).
#
#   ceph-micro.sh start DIR   -> prints "CEPH_CONF=DIR/ceph.conf" once the cluster is usable
#   ceph-micro.sh stop DIR    -> stops the daemons started from DIR (pid files), keeps DIR
#   ceph-micro.sh kill-osd DIR / start-osd DIR   (fault tests)
#
# Environment: CEPH_MICRO_PORT (mon port; default: a free one), CEPH_MICRO_OSD_SIZE
# (bluestore file size, default 4G, sparse), CEPH_MICRO_NO_MGR=1 (skip the mgr: RBD does
# not need it, it saves ~150 MiB of RAM and a second of start-up), CEPH_MICRO_WATCH_PID
# (stop the cluster once that process is gone: tests killed by a timeout leave no daemons).
set -euo pipefail

usage() { echo "usage: $0 start|stop|kill-osd|start-osd DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")

for tool in ceph-mon ceph-osd ceph ceph-authtool; do
  command -v "$tool" >/dev/null || { echo "ceph-micro: $tool not found: run scripts/install-deps.sh (packages ceph-mon ceph-osd ceph-mgr ceph-common)" >&2; exit 1; }
done

export CEPH_CONF=$dir/ceph.conf

# Starts a daemon that forks into the background and records its pid in DIR/run.
start_osd() {
  ceph-osd -c "$CEPH_CONF" --id 0 --pid-file "$dir/run/osd.0.pid"
}

stop_pidfile() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

wait_for() {
  local what=$1 tries=$2; shift 2
  for _ in $(seq "$tries"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "ceph-micro: timed out waiting for $what; logs in $dir/log" >&2
  tail -n 20 "$dir"/log/*.log >&2 || true
  return 1
}

osd_up() { ceph --connect-timeout 5 osd dump 2>/dev/null | grep -q '^osd\.0 up'; }

case "$cmd" in
start)
  if [ -f "$dir/run/mon.a.pid" ] && kill -0 "$(cat "$dir/run/mon.a.pid")" 2>/dev/null; then
    echo "ceph-micro: a cluster already runs from $dir; stop it first" >&2; exit 1
  fi
  rm -rf "$dir"
  mkdir -p "$dir"/{log,run,osd,mgr}
  port=${CEPH_MICRO_PORT:-}
  if [ -z "$port" ]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  fi
  fsid=$(cat /proc/sys/kernel/random/uuid)
  cat > "$CEPH_CONF" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public addr = 127.0.0.1
cluster addr = 127.0.0.1
keyring = $dir/keyring
run dir = $dir/run
admin socket = $dir/run/\$cluster-\$name.asok
log file = $dir/log/\$name.log
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 2
mon data avail crit = 1
# Clone v2 (no snapshot protection) is what the rbd driver uses.
rbd default clone format = 2

[mon.a]
mon data = $dir/mon
keyring = $dir/mon.keyring

[mgr.x]
mgr data = $dir/mgr
keyring = $dir/mgr/keyring

[osd.0]
osd data = $dir/osd
keyring = $dir/osd/keyring
osd objectstore = bluestore
bluestore block path = $dir/osd.block
bluestore block create = true
bluestore block size = ${CEPH_MICRO_OSD_SIZE:-4294967296}
bluestore block db create = false
bluestore block wal create = false
# A 2-core test machine: small caches, few threads.
osd memory target = 939524096
bluestore cache autotune = false
bluestore cache size = 134217728
osd op num shards = 1
osd op num threads per shard = 2
osd class load list = *
osd class default list = *
EOF
  ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$dir/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  ceph-authtool "$dir/keyring" --gen-key -n client.qubes \
    --cap mon 'profile rbd' --cap osd 'profile rbd' --cap mgr 'profile rbd' >/dev/null
  ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/keyring" >/dev/null
  # An explicit monmap: from `mon host` alone the mon does not find itself in the map
  # and probes forever.
  monmaptool --create --addv a "[v2:127.0.0.1:$port]" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon -c "$CEPH_CONF" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring" >/dev/null
  ceph-mon -c "$CEPH_CONF" -i a --pid-file "$dir/run/mon.a.pid"
  wait_for "the mon" 100 ceph --connect-timeout 5 mon stat

  ceph osd set-require-min-compat-client mimic >/dev/null 2>&1 || true
  ceph auth get-or-create osd.0 mon 'allow profile osd' osd 'allow *' mgr 'allow profile osd' \
    -o "$dir/osd/keyring" >/dev/null
  id=$(ceph osd create)
  [ "$id" = 0 ] || { echo "ceph-micro: expected osd.0, the mon gave osd.$id" >&2; exit 1; }
  ceph osd crush add osd.0 1 root=default host=localhost >/dev/null 2>&1
  ceph-osd -c "$CEPH_CONF" --id 0 --mkfs >"$dir/log/osd-mkfs.out" 2>&1 \
    || { cat "$dir/log/osd-mkfs.out" >&2; exit 1; }
  start_osd
  if [ "${CEPH_MICRO_NO_MGR:-0}" != 1 ]; then
    ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
      -o "$dir/mgr/keyring" >/dev/null
    ceph-mgr -c "$CEPH_CONF" -i x --pid-file "$dir/run/mgr.x.pid"
  fi
  wait_for "osd.0 to come up" 300 osd_up
  if [ -n "${CEPH_MICRO_WATCH_PID:-}" ]; then
    watched=$CEPH_MICRO_WATCH_PID
    (
      exec </dev/null >/dev/null 2>&1
      while kill -0 "$watched" 2>/dev/null; do sleep 1; done
      "$0" stop "$dir"
    ) &
    echo $! > "$dir/run/watch.pid"
  fi
  echo "CEPH_CONF=$CEPH_CONF"
  ;;
stop)
  if [ -f "$dir/run/watch.pid" ] && [ "$(cat "$dir/run/watch.pid")" != "$BASHPID" ]; then
    kill "$(cat "$dir/run/watch.pid")" 2>/dev/null || true
  fi
  rm -f "$dir/run/watch.pid"
  stop_pidfile "$dir/run/mgr.x.pid"
  stop_pidfile "$dir/run/osd.0.pid"
  stop_pidfile "$dir/run/mon.a.pid"
  ;;
kill-osd)
  # SIGKILL, as a crashed host would: no clean unmount of bluestore.
  f=$dir/run/osd.0.pid
  [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$(cat "$f")" 2>/dev/null || break; sleep 0.1; done
  rm -f "$f"
  # The mon only marks it down after its grace period; tell it now.
  ceph --connect-timeout 5 osd down 0 >/dev/null 2>&1 || true
  ;;
start-osd)
  start_osd
  wait_for "osd.0 to come up" 300 osd_up
  ;;
*) usage ;;
esac
