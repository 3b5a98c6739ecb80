#!/usr/bin/env bash
# The main job: create a volume, benchmark the engine beside raw file I/O, serve the volume over
# iSCSI, use it from real initiators (libiscsi's tools and qemu-io), then attach it on this node
# with blockyard's userspace initiator, make a filesystem, mount it and write to it, run the CSI
# lifecycle (create → publish → stage → publish → write → verify → tear down), and finally
# replicate a volume to a second server, kill the replica with SIGKILL during writes, restart
# it, let it catch up, and compare both copies' checksums.
set -euo pipefail
cd "$(dirname "$0")/.."
BY=.venv/bin/blockyard
DATA=${BLOCKYARD_DEMO_DIR:-/var/tmp/blockyard-demo}

free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

rm -rf "$DATA"
mkdir -p "$DATA"
echo "== create a volume"
$BY volume create demo --size 1GiB --data-dir "$DATA"
$BY volume list --data-dir "$DATA"

echo "== engine benchmark (engine vs raw pwrite/pread, same run)"
$BY bench engine --dir "$DATA/bench"
rm -rf "$DATA/bench"

ISCSI_PORT=$(free_port)
API_PORT=$(free_port)
echo "== serve it over iSCSI on 127.0.0.1:$ISCSI_PORT"
$BY serve --data-dir "$DATA" --iscsi-listen "127.0.0.1:$ISCSI_PORT" \
  --api-listen "127.0.0.1:$API_PORT" >"$DATA/serve.log" 2>&1 &
SERVER=$!
stop_server() {
  if [ -n "${STATE:-}" ]; then
    $BY detach "${MNT}" --state-dir "$STATE" --force >/dev/null 2>&1 || true
  fi
  kill -TERM "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
}
trap stop_server EXIT
for _ in $(seq 1 100); do
  grep -q '^READY' "$DATA/serve.log" && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$DATA/serve.log"; exit 1; }
  sleep 0.1
done
grep -q '^READY' "$DATA/serve.log" || { echo "server did not start"; cat "$DATA/serve.log"; exit 1; }

# The target name carries the volume instance's UUID: ask the server for it.
IQN=$($BY volume info demo --server "127.0.0.1:$API_PORT" --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)[0]["iqn"])')
URL="iscsi://127.0.0.1:$ISCSI_PORT/$IQN/0"
echo "== discovery (iscsi-ls)"
iscsi-ls -s "iscsi://127.0.0.1:$ISCSI_PORT"
echo "== inquiry (iscsi-inq)"
iscsi-inq "$URL"
echo "== capacity (iscsi-readcapacity16)"
iscsi-readcapacity16 "$URL"
echo "== write a pattern with qemu-io, read it back and verify"
qemu-io -f raw -c "write -P 0xab 1M 4M" -c "flush" "$URL"
qemu-io -f raw -c "read -P 0xab 1M 4M" "$URL"
echo "== attach it on this node through the userspace initiator (FUSE + loop), mkfs, mount, write"
MNT="$DATA/mnt"
STATE="$DATA/attach-state"
$BY attach demo --server "127.0.0.1:$API_PORT" --fs ext4 "$MNT" --state-dir "$STATE"
dd if=/dev/urandom of="$MNT/hello.bin" bs=1M count=8 conv=fsync status=none
SUM=$(sha256sum "$MNT/hello.bin" | cut -d' ' -f1)
$BY attachments --state-dir "$STATE"
$BY detach "$MNT" --state-dir "$STATE"
echo "== attach again: the file comes back over iSCSI, byte for byte"
$BY attach demo --server "127.0.0.1:$API_PORT" --fs ext4 "$MNT" --state-dir "$STATE"
echo "$SUM  $MNT/hello.bin" | sha256sum -c -
df -h "$MNT"
$BY detach "$MNT" --state-dir "$STATE"
echo "== the CSI lifecycle Kubernetes drives, against the same server (blockyard csi --mode all)"
.venv/bin/python scripts/csi_lifecycle.py --backend "127.0.0.1:$API_PORT" --dir "$DATA/csi"

echo "== replication: a primary and a replica volume server"
start_serve() { # NAME DATA ISCSI API REPLICATION
  $BY serve --data-dir "$2" --iscsi-listen "127.0.0.1:$3" --api-listen "127.0.0.1:$4" \
    --replication-listen "127.0.0.1:$5" >"$DATA/$1.log" 2>&1 &
  echo $!
}
wait_ready() { # LOG PID
  for _ in $(seq 1 100); do
    grep -q '^READY' "$1" && return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  echo "server did not start:"; cat "$1"; exit 1
}
P_ISCSI=$(free_port); P_API=$(free_port); P_REP=$(free_port)
R_ISCSI=$(free_port); R_API=$(free_port); R_REP=$(free_port)
PRIMARY=$(start_serve primary "$DATA/primary" "$P_ISCSI" "$P_API" "$P_REP")
REPLICA=$(start_serve replica "$DATA/replica" "$R_ISCSI" "$R_API" "$R_REP")
stop_replication() {
  kill -TERM "$PRIMARY" "$REPLICA" 2>/dev/null || true
  wait "$PRIMARY" "$REPLICA" 2>/dev/null || true
  stop_server
}
trap stop_replication EXIT
wait_ready "$DATA/primary.log" "$PRIMARY"
wait_ready "$DATA/replica.log" "$REPLICA"
$BY volume create rdemo --size 256MiB --server "127.0.0.1:$P_API"
$BY volume replicate rdemo --server "127.0.0.1:$P_API" --replica "127.0.0.1:$R_API" \
  --durability sync_all --wait-in-sync 60
RIQN=$($BY volume info rdemo --server "127.0.0.1:$P_API" --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)[0]["iqn"])')
RURL="iscsi://127.0.0.1:$P_ISCSI/$RIQN/0"
echo "== write 4 MiB chunks with a flush after each; kill -9 the replica in the middle"
for i in $(seq 0 23); do
  qemu-io -f raw -c "write -P $((i + 1)) $((i * 4))M 4M" -c "flush" "$RURL" >/dev/null
  if [ "$i" = 8 ]; then
    kill -KILL "$REPLICA"; wait "$REPLICA" 2>/dev/null || true
    echo "   replica killed after chunk $i; writes go on (sync_all marks it out of sync first)"
  fi
done
$BY volume replication rdemo --server "127.0.0.1:$P_API"
echo "== restart the replica on the same addresses: it catches up from what it missed"
REPLICA=$(start_serve replica2 "$DATA/replica" "$R_ISCSI" "$R_API" "$R_REP")
wait_ready "$DATA/replica2.log" "$REPLICA"
$BY volume replication rdemo --server "127.0.0.1:$P_API" --wait-in-sync 60
echo "== every flushed chunk reads back from the primary"
for i in $(seq 0 23); do
  qemu-io -f raw -c "read -P $((i + 1)) $((i * 4))M 4M" "$RURL" | grep -q "^read" \
    || { echo "chunk $i did not read back"; exit 1; }
done
echo "== both copies hold the same bytes"
P_SUM=$($BY volume checksum rdemo --server "127.0.0.1:$P_API")
R_SUM=$($BY volume checksum rdemo --server "127.0.0.1:$R_API")
echo "primary: $P_SUM"
echo "replica: $R_SUM"
[ "${P_SUM%% *}" = "${R_SUM%% *}" ] || { echo "the copies differ"; exit 1; }
echo "== demo finished"
