"""Real initiators against a real blockyard target process: libiscsi tools and qemu."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from iscsi_proc import ServedVolume, need_tools, run, start_server, stop_server

from blockyard.engine.store import VolumeStore


def qemu_io(url: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    result = run(*args, url)
    assert result.returncode == 0, result.stderr
    # qemu-io reports pattern mismatches on stdout and still exits 0.
    assert "Pattern verification failed" not in result.stdout, result.stdout
    return result.stdout


def test_discovery_inquiry_and_capacity(served: ServedVolume) -> None:
    need_tools("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16")
    listing = run("iscsi-ls", "-s", served.portal)
    assert listing.returncode == 0, listing.stderr
    assert f"Target:{served.iqn} Portal:127.0.0.1:{served.port},1" in listing.stdout
    assert "Lun:0" in listing.stdout and "DIRECT_ACCESS" in listing.stdout
    inq = run("iscsi-inq", served.url)
    assert inq.returncode == 0, inq.stderr
    assert "Vendor:BLOCKYRD" in inq.stdout and "TPGS:1" in inq.stdout
    vpd = run("iscsi-inq", "-e", "1", "-c", "0x83", served.url)
    assert vpd.returncode == 0, vpd.stderr
    cap = run("iscsi-readcapacity16", served.url)
    assert cap.returncode == 0, cap.stderr
    assert "Total size:67108864" in cap.stdout
    assert "LBPME:1" in cap.stdout


def test_qemu_writes_what_the_engine_reads_and_vice_versa(tmp_path: Path) -> None:
    need_tools("qemu-io")
    data_dir = tmp_path / "data"
    store = VolumeStore(str(data_dir))
    volume = store.create("vol1", 64 << 20)
    volume.write(2048, b"\x5a" * (1 << 20))  # 1 MiB at byte offset 1 MiB
    volume.flush()
    volume.close()
    served = start_server(data_dir, "vol1:64M")
    try:
        # libiscsi (inside qemu) reads what the engine wrote, then writes its own pattern.
        qemu_io(served.url, "read -P 0x5a 1M 1M", "write -P 0xc3 8M 3M", "read -P 0xc3 8M 3M")
        qemu_io(served.url, "write -P 0x11 0 4k", "flush")
    finally:
        assert stop_server(served) == 0
    volume = VolumeStore(str(data_dir)).open("vol1")
    try:
        assert volume.read((8 << 20) // 512, (3 << 20) // 512) == b"\xc3" * (3 << 20)
        assert volume.read(0, 8) == b"\x11" * 4096
        assert volume.read(2048, 2048) == b"\x5a" * (1 << 20)
    finally:
        volume.close()


def test_two_concurrent_sessions_see_each_others_writes(served: ServedVolume) -> None:
    need_tools("qemu-io")
    errors: list[str] = []

    def writer(pattern: int, offset_mib: int) -> None:
        try:
            for i in range(4):
                off = f"{offset_mib + i}M"
                qemu_io(
                    served.url, f"write -P {pattern:#x} {off} 1M", f"read -P {pattern:#x} {off} 1M"
                )
        except AssertionError as exc:  # collected and re-raised on the main thread
            errors.append(str(exc))

    threads = [
        threading.Thread(target=writer, args=(0x21, 0)),
        threading.Thread(target=writer, args=(0x42, 16)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    qemu_io(served.url, "read -P 0x21 0 4M", "read -P 0x42 16M 4M")


def test_garbage_socket_does_not_disturb_another_session(served: ServedVolume) -> None:
    need_tools("qemu-io")
    stop = threading.Event()
    garbage_connections = 0

    def throw_garbage() -> None:
        nonlocal garbage_connections
        seed = 1
        while not stop.is_set():
            with socket.create_connection((served.host, served.port), timeout=5) as sock:
                garbage_connections += 1
                for _ in range(20):
                    seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
                    chunk = seed.to_bytes(4, "big") * 64
                    try:
                        sock.sendall(chunk)
                    except OSError:
                        break  # the target hung up on us, as it should
            time.sleep(0.01)

    thrower = threading.Thread(target=throw_garbage)
    thrower.start()
    try:
        for i in range(6):
            pattern = 0x30 + i
            qemu_io(served.url, f"write -P {pattern:#x} {i}M 1M", f"read -P {pattern:#x} {i}M 1M")
    finally:
        stop.set()
        thrower.join(timeout=30)
    assert garbage_connections > 0
    assert served.alive()
    qemu_io(served.url, "read -P 0x35 5M 1M")
