#!/usr/bin/env bash
# The main job: create a volume, benchmark the engine beside raw file I/O, serve the volume over
# iSCSI, use it from real initiators (libiscsi's tools and qemu-io), then attach it on this node
# with blockyard's userspace initiator, make a filesystem, mount it and write to it, and finally
# run the CSI lifecycle (create → publish → stage → publish → write → verify → tear down).
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
echo "== demo finished"
