#!/usr/bin/env bash
# The main job: the failover demo on an all-in-one cluster.
#
# `blockyard up` starts a master and three volume servers; a 2-replica sync_all volume is created
# through the master and attached on this node through blockyard's userspace multipath initiator
# (every copy's portal, the primary's first); ext4 is made and mounted and files are written with
# their checksums. Then the primary's volume server is killed with SIGKILL while the filesystem
# stays mounted: reads and writes go on through the same mount once the master has promoted the
# replica (after the old primary's lease has certainly expired), and `blockyard status` shows
# the new primary and epoch. The killed server is restarted on its old data directory, rebuilds
# from what it missed until it is back in sync, every file is verified (after dropping the page
# cache, and again after a fresh attach), and both copies' checksums are compared. Ends with
# PASS, or FAIL and a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BY=.venv/bin/blockyard
PY=.venv/bin/python
DATA=${BLOCKYARD_DEMO_DIR:-/var/tmp/blockyard-demo}
CLUSTER="$DATA/cluster"
MNT="$DATA/mnt"
STATE="$DATA/attach-state"
VOL=demo
WAIT_S=${BLOCKYARD_DEMO_WAIT_S:-120}
UP=""
RESULT=FAIL

step() { echo; echo "== $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

finish() {
  rc=$?
  set +e
  if [ -d "$STATE" ]; then
    $BY detach "$MNT" --state-dir "$STATE" --force >/dev/null 2>&1
    $BY detach "$VOL" --state-dir "$STATE" --force >/dev/null 2>&1
  fi
  if [ -n "$UP" ]; then
    $BY down --dir "$CLUSTER" >/dev/null 2>&1 || kill -TERM "$UP" 2>/dev/null
    wait "$UP" 2>/dev/null
  fi
  echo
  if [ "$rc" = 0 ] && [ "$RESULT" = PASS ]; then
    echo "PASS: failover demo (logs in $DATA)"
  else
    echo "FAIL: failover demo (exit $rc; logs in $DATA: up.log, cluster/logs/)" >&2
    [ -f "$DATA/up.log" ] && tail -n 20 "$DATA/up.log" >&2
    [ "$rc" = 0 ] && rc=1
  fi
  exit "$rc"
}
trap finish EXIT

# json FIELD-EXPRESSION: evaluate a Python expression over `volume get -o json` as `d`.
vol() { $BY volume get "$VOL" --master "$MASTER" -o json | $PY -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# wait_for SECONDS WHAT COMMAND...: run COMMAND every half second until it succeeds.
wait_for() {
  local limit=$1 what=$2; shift 2
  local start=$SECONDS
  until "$@"; do
    [ $((SECONDS - start)) -lt "$limit" ] || fail "timed out after ${limit}s waiting for $what"
    sleep 0.5
  done
}
in_sync() { [ "$(vol 'd["status"] == "active" and all(r["state"] == "in_sync" for r in d["replicas"])')" = True ]; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

rm -rf "$DATA"
mkdir -p "$DATA"

step "blockyard up --servers 3: a master (SQLite) and three volume servers on this machine"
$BY up --servers 3 --dir "$CLUSTER" >"$DATA/up.log" 2>&1 &
UP=$!
cluster_ready() { [ -f "$CLUSTER/cluster.env" ] || { kill -0 "$UP" 2>/dev/null || fail "blockyard up exited"; false; }; }
wait_for "$WAIT_S" "the cluster" cluster_ready
cat "$DATA/up.log"
# shellcheck disable=SC1091
. "$CLUSTER/cluster.env"

step "create a 2-replica sync_all volume through the master"
$BY volume create "$VOL" --size 512MiB --replicas 2 --durability sync_all --master "$MASTER"
wait_for "$WAIT_S" "the replica in sync" in_sync
$BY volume get "$VOL" --master "$MASTER"

step "attach it here through the userspace multipath initiator (every copy's portal), mkfs, mount"
$BY attach "$VOL" --master "$MASTER" --fs ext4 "$MNT" --state-dir "$STATE"
$BY attachments --state-dir "$STATE"

step "write files and record their checksums"
write_file() { # NAME
  dd if=/dev/urandom of="$MNT/$1" bs=1M count=4 conv=fsync status=none
  (cd "$MNT" && sha256sum "$1") >>"$DATA/sums"
}
for i in $(seq 1 8); do write_file "before-$i.bin"; done
sync -f "$MNT"
cat "$DATA/sums"

step "kill -9 the primary's volume server"
OLD_EPOCH=$(vol 'd["epoch"]')
OLD_PRIMARY=$(vol 'd["primary"]["server_id"]')
INDEX=""
for i in $(seq 1 "$SERVERS"); do
  id_var="SERVER_${i}_ID"
  [ "${!id_var}" = "$OLD_PRIMARY" ] && INDEX=$i
done
[ -n "$INDEX" ] || fail "the primary $OLD_PRIMARY is none of the cluster's servers"
pid_var="SERVER_${INDEX}_PID"
echo "primary is server $INDEX (id $OLD_PRIMARY, pid ${!pid_var}), epoch $OLD_EPOCH"
KILLED_AT=$(date +%s.%N)
kill -KILL "${!pid_var}"

step "keep writing and reading through the same mount"
write_file "after-1.bin"
RESUMED_AT=$(date +%s.%N)
echo "first write + fsync after the kill completed $($PY -c "print(f'{$RESUMED_AT - $KILLED_AT:.2f}')") s after it"
for i in $(seq 2 8); do write_file "after-$i.bin"; done
drop_caches
(cd "$MNT" && sha256sum -c --quiet "$DATA/sums") || fail "a file read back wrong after the failover"
echo "all $(wc -l <"$DATA/sums") files read back intact through the same mount"

step "blockyard status: the failover"
$BY status --master "$MASTER"
NEW_EPOCH=$(vol 'd["epoch"]')
NEW_PRIMARY=$(vol 'd["primary"]["server_id"]')
[ "$NEW_PRIMARY" != "$OLD_PRIMARY" ] || fail "the primary did not move off the killed server"
[ "$NEW_EPOCH" -gt "$OLD_EPOCH" ] || fail "the epoch did not go up ($OLD_EPOCH -> $NEW_EPOCH)"
echo "primary moved: $OLD_PRIMARY -> $NEW_PRIMARY, epoch $OLD_EPOCH -> $NEW_EPOCH"

step "restart the killed server (same data directory and ports) and watch it rebuild"
$BY up --dir "$CLUSTER" --restart-server "$INDEX"
start=$SECONDS
until in_sync; do
  [ $((SECONDS - start)) -lt "$WAIT_S" ] || fail "server $INDEX was not back in sync after ${WAIT_S}s"
  echo "  $(vol '[(r["server_id"][:8], r["state"], r["resync_done_bytes"], r["resync_total_bytes"]) for r in d["replicas"]]')"
  sleep 1
done
$BY status --master "$MASTER"

step "verify every file (page cache dropped), then again after detaching and attaching anew"
drop_caches
(cd "$MNT" && sha256sum -c --quiet "$DATA/sums") || fail "a file read back wrong after the rebuild"
$BY detach "$MNT" --state-dir "$STATE"
$BY attach "$VOL" --master "$MASTER" --fs ext4 "$MNT" --state-dir "$STATE"
(cd "$MNT" && sha256sum -c --quiet "$DATA/sums") || fail "a file read back wrong after re-attaching"
echo "all $(wc -l <"$DATA/sums") files verified"
$BY detach "$MNT" --state-dir "$STATE"

step "both copies hold the same bytes"
api_of() { # SERVER_ID
  for i in $(seq 1 "$SERVERS"); do
    id_var="SERVER_${i}_ID"; api_var="SERVER_${i}_API"
    [ "${!id_var}" = "$1" ] && echo "${!api_var}"
  done
}
SUMS=""
for id in $(vol '" ".join([d["primary"]["server_id"]] + [r["server_id"] for r in d["replicas"]])'); do
  sum=$($BY volume checksum "$VOL" --server "$(api_of "$id")")
  echo "$id: $sum"
  SUMS="$SUMS ${sum%% *}"
done
[ "$(echo "$SUMS" | tr ' ' '\n' | sed '/^$/d' | sort -u | wc -l)" = 1 ] || fail "the copies differ"

step "clean up"
$BY down --dir "$CLUSTER"
wait "$UP" || fail "blockyard up exited non-zero"
UP=""
RESULT=PASS
