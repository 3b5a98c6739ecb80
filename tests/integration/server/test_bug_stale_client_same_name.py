"""Regression: a client of a deleted volume reached a later volume of the same name.

A qemu-io session wrote to volume ``live``; the volume was deleted (its sessions dropped) and
created again under the same name. The target name was derived from the volume name alone, so
qemu logged straight back in to the same IQN and its writes landed in the new volume. The IQN
now carries a short form of the volume's UUID: the new volume is another target, the old
client's re-login finds nothing, and nothing of it lands in the new volume.
"""

from __future__ import annotations

from collections.abc import Callable

from interactive_qemu import qemu_io_session
from serve_helpers import Serve, need_tools, qemu_io

MIB = 1 << 20
OUTPUT_WAIT_S = 30.0
#: How long the old client gets to (wrongly) reach the new volume.
STALE_WAIT_S = 8.0


def test_old_client_never_writes_into_a_new_volume_of_the_same_name(
    start_serve: Callable[..., Serve],
) -> None:
    need_tools("qemu-io")
    serve = start_serve()
    old = serve.call(lambda c: c.create_volume("live", 64 * MIB))
    with qemu_io_session("-f", "raw", serve.url("live")) as client:
        client.send("write -P 0xaa 0 1M", "flush")
        assert client.count("wrote", OUTPUT_WAIT_S, until=1) == 1, "the first write failed"

        result = serve.call(lambda c: c.delete_volume("live"))
        assert result.existed and result.sessions_dropped == 1
        new = serve.call(lambda c: c.create_volume("live", 64 * MIB))
        assert new.uuid != old.uuid
        assert new.export.iqn != old.export.iqn, "the new volume reuses the old target name"
        assert new.export.iqn.startswith("iqn.2026-11.io.blockyard:live.")

        # The old client keeps writing as a confused VM would; it must reach nothing.
        client.send(*(f"write -P 0xbb {i}M 1M\nflush" for i in range(8)))
        assert client.count("wrote", STALE_WAIT_S) == 0, "the old client's writes landed"

    logins = [line for line in serve.stderr().splitlines() if "iSCSI login:" in line]
    assert not any(new.export.iqn in line for line in logins), logins
    read = qemu_io(serve.url("live"), "read -P 0 0 8M")
    assert read.returncode == 0, read.stderr
    assert "Pattern verification failed" not in read.stdout, "old data in the new volume"
    assert "read 8388608/8388608" in read.stdout, read.stdout
