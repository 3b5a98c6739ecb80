"""Interop with qemu's libiscsi-based block driver: what our initiator writes, qemu-io reads
back byte for byte over iscsi://, and the other way round."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from initiator_targets import TargetProcess, iqn, open_device

QEMU_TIMEOUT_S = 60


def _qemu_io(url: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "raw", "-c", command, url],
        capture_output=True,
        text=True,
        timeout=QEMU_TIMEOUT_S,
        check=False,
    )


@pytest.fixture
def url(target: TargetProcess) -> str:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed: apt-get install qemu-utils qemu-block-extra")
    portal = target.portals[0]
    return f"iscsi://{portal.host}:{portal.port}/{iqn('vol1')}/0"


def test_our_writes_read_by_qemu(target: TargetProcess, url: str) -> None:
    with open_device(target.portals, "vol1") as device:
        device.write(2048, bytes([0xA5]) * (256 << 10))
        device.write(8192, bytes([0x3C]) * 4096, fua=True)
        device.flush()
    done = _qemu_io(url, "read -P 0xa5 1048576 262144")
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done
    done = _qemu_io(url, "read -P 0x3c 4194304 4096")
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done
    # A wrong pattern must fail, or the checks above prove nothing.
    done = _qemu_io(url, "read -P 0x3d 4194304 4096")
    assert "Pattern verification failed" in done.stdout + done.stderr


def test_qemu_writes_read_by_us(target: TargetProcess, url: str) -> None:
    done = _qemu_io(url, "write -P 0x5a 3145728 524288")
    assert done.returncode == 0, done
    done = _qemu_io(url, "write -z 3276800 4096")
    assert done.returncode == 0, done
    with open_device(target.portals, "vol1") as device:
        data = device.read(6144, 1024)
    expected = bytearray(b"\x5a" * (512 << 10))
    expected[131072 : 131072 + 4096] = bytes(4096)
    assert data == bytes(expected)
