"""Kernel attach path (open-iscsi + dm-multipath).

This machine's kernel has no iSCSI initiator, so ``iscsiadm`` cannot run here: these tests
drive :class:`KernelAttacher` through a recorded-command fake :class:`CommandRunner` that
logs every argv (with its timeout) and answers from a script, and resolve devices in a fake
``/dev/disk/by-id`` tree under a temporary directory. They check the command sequences, the
CHAP and timeout settings, the multipath configuration, NAA-based device resolution and,
above all, that an IQN outside the managed prefix is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from blockyard.attach.initiator import IscsiVolumeSpec, ManagedPrefixError, UserspaceAttacher
from blockyard.attach.initiator.errors import DeviceNotFoundError, KernelCommandError
from blockyard.attach.initiator.kernel import (
    ISCSI_ERR_NO_OBJS_FOUND,
    ISCSI_ERR_SESS_EXISTS,
    KernelAttachConfig,
    KernelAttacher,
    multipath_config,
    redact,
)
from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.discovery import Portal

PREFIX = "iqn.2026-11.io.blockyard"
OURS = f"{PREFIX}:pvc-1"
FOREIGN = "iqn.2001-05.com.example:boot-disk"
NAA = "65ab10cff74dc06756fe8cc2a2a7392d"
PORTALS = (Portal("10.0.0.1", 3260), Portal("10.0.0.2", 3260))


class RecordingRunner:
    """Records ``(argv, timeout_s)``; answers with the first scripted reply whose key's
    elements all appear in argv, else success with empty output."""

    def __init__(self, replies: dict[tuple[str, ...], tuple[int, str, str]] | None = None):
        self.calls: list[tuple[list[str], float]] = []
        self.replies = replies or {}

    def run(self, argv: Sequence[str], timeout_s: float) -> tuple[int, str, str]:
        self.calls.append((list(argv), timeout_s))
        for key, reply in self.replies.items():
            if all(part in argv for part in key):
                return reply
        return 0, "", ""

    def argvs(self) -> list[list[str]]:
        return [argv for argv, _ in self.calls]

    def touched(self, iqn: str) -> bool:
        return any(iqn in argv for argv in self.argvs())


def attacher(tmp_path: Path, runner: RecordingRunner, **config: object) -> KernelAttacher:
    values: dict[str, object] = {
        "managed_prefix": PREFIX,
        "dev_root": tmp_path / "dev",
        "multipath_conf": tmp_path / "etc" / "blockyard.conf",
        "device_wait_s": 0.5,
        "command_timeout_s": 7.0,
    }
    values.update(config)
    return KernelAttacher(
        KernelAttachConfig(**values),  # type: ignore[arg-type]
        runner,
        sleep=lambda _s: None,
    )


def spec(**overrides: object) -> IscsiVolumeSpec:
    values: dict[str, object] = {
        "portals": PORTALS,
        "target_name": OURS,
        "initiator_name": "iqn.2026-11.io.blockyard.node:n1",
        "replacement_timeout_s": 90.0,
        "expected_naa": NAA,
    }
    values.update(overrides)
    return IscsiVolumeSpec(**values)  # type: ignore[arg-type]


def fake_by_id(tmp_path: Path, name: str, target: str) -> Path:
    by_id = tmp_path / "dev" / "disk" / "by-id"
    by_id.mkdir(parents=True, exist_ok=True)
    device = tmp_path / "dev" / target
    device.touch()
    (by_id / name).symlink_to(f"../../{target}")
    return device


def test_attach_sequence_with_mutual_chap(tmp_path: Path) -> None:
    runner = RecordingRunner({("--login",): (ISCSI_ERR_SESS_EXISTS, "", "already present")})
    kernel = attacher(tmp_path, runner)
    dm = fake_by_id(tmp_path, f"dm-uuid-mpath-3{NAA}", "dm-3")
    fake_by_id(tmp_path, f"wwn-0x{NAA}", "sdq")
    chap = ChapCredentials("node-1", b"initiator-secret-1")
    target_chap = ChapCredentials("target-1", b"target-secret-222")
    lun = kernel.attach(spec(chap=chap, target_chap=target_chap))
    assert lun.device == dm.resolve()  # the multipath map, not a bare path
    assert lun.naa == NAA
    argvs = runner.argvs()
    per_portal = len(argvs) // 2
    for index, portal in enumerate(PORTALS):
        calls = argvs[index * per_portal : (index + 1) * per_portal]
        node = ["iscsiadm", "-m", "node", "-T", OURS, "-p", f"{portal.host}:3260", "-I", "default"]
        assert calls[0] == [*node, "-o", "new"]
        updates = {c[-3]: c[-1] for c in calls if "update" in c}
        assert updates == {
            "node.startup": "manual",
            "node.session.timeo.replacement_timeout": "90",
            "node.session.auth.authmethod": "CHAP",
            "node.session.auth.username": "node-1",
            "node.session.auth.password": "initiator-secret-1",
            "node.session.auth.username_in": "target-1",
            "node.session.auth.password_in": "target-secret-222",
        }
        assert calls[-1] == [*node, "--login"]
    assert all(timeout == 7.0 for _, timeout in runner.calls)
    assert not any("discovery" in argv for argv in argvs)


def test_attach_without_chap_and_single_path_device(tmp_path: Path) -> None:
    runner = RecordingRunner()
    kernel = attacher(tmp_path, runner)
    sd = fake_by_id(tmp_path, f"wwn-0x{NAA}", "sdc")
    lun = kernel.attach(spec(portals=PORTALS[:1]))
    assert lun.device == sd.resolve()
    updates = {c[-3]: c[-1] for c in runner.argvs() if "update" in c}
    assert updates["node.session.auth.authmethod"] == "None"
    assert not any("password" in " ".join(argv) for argv in runner.argvs())


def test_multipath_ignores_bare_path_devices_and_times_out(tmp_path: Path) -> None:
    runner = RecordingRunner()
    kernel = attacher(tmp_path, runner)
    fake_by_id(tmp_path, f"wwn-0x{NAA}", "sdd")
    with pytest.raises(DeviceNotFoundError, match="dm-uuid-mpath-3"):
        kernel.attach(spec())


def test_attach_needs_the_naa(tmp_path: Path) -> None:
    runner = RecordingRunner()
    with pytest.raises(DeviceNotFoundError):
        attacher(tmp_path, runner).attach(spec(expected_naa=None))
    assert runner.calls == []


def test_failed_login_raises_with_redacted_secret(tmp_path: Path) -> None:
    runner = RecordingRunner(
        {("node.session.auth.password",): (1, "", "iscsiadm: bad password value")}
    )
    chap = ChapCredentials("node-1", b"super-secret-value")
    with pytest.raises(KernelCommandError) as info:
        attacher(tmp_path, runner).attach(spec(chap=chap))
    assert "super-secret-value" not in str(info.value)
    assert "super-secret-value" not in " ".join(info.value.argv)
    assert redact(["-n", "node.session.auth.password", "-v", "x"])[-1] == "<redacted>"


def test_detach_is_idempotent(tmp_path: Path) -> None:
    runner = RecordingRunner({("--logout",): (ISCSI_ERR_NO_OBJS_FOUND, "", "no session")})
    kernel = attacher(tmp_path, runner)
    kernel.detach(OURS)
    assert runner.argvs() == [
        ["iscsiadm", "-m", "node", "-T", OURS, "--logout"],
        ["iscsiadm", "-m", "node", "-T", OURS, "-o", "delete"],
    ]


SESSIONS = (
    f"tcp: [1] 10.0.0.9:3260,1 {FOREIGN} (non-flash)\n"
    f"tcp: [2] 10.0.0.1:3260,1 {OURS} (non-flash)\n"
    f"tcp: [3] 10.0.0.2:3260,2 {OURS} (non-flash)\n"
    f"tcp: [4] 10.0.0.1:3260,1 {PREFIX}:pvc-2 (non-flash)\n"
    f"tcp: [5] 10.0.0.1:3260,1 {PREFIX}.evil:pvc-1 (non-flash)\n"
)


def test_cleanup_only_considers_managed_iqns(tmp_path: Path) -> None:
    runner = RecordingRunner({("-m", "session"): (0, SESSIONS, "")})
    kernel = attacher(tmp_path, runner)
    assert kernel.attached() == [OURS, f"{PREFIX}:pvc-2"]
    assert kernel.cleanup_orphans(keep={OURS}) == [f"{PREFIX}:pvc-2"]
    assert not runner.touched(FOREIGN)
    assert not runner.touched(f"{PREFIX}.evil:pvc-1")
    logged_out = [argv[4] for argv in runner.argvs() if "--logout" in argv]
    assert logged_out == [f"{PREFIX}:pvc-2"]


def test_no_sessions_at_all(tmp_path: Path) -> None:
    runner = RecordingRunner({("-m", "session"): (ISCSI_ERR_NO_OBJS_FOUND, "", "No session")})
    assert attacher(tmp_path, runner).cleanup_orphans(keep=()) == []


@pytest.mark.parametrize("iqn", [FOREIGN, f"{PREFIX}.evil:pvc-1", PREFIX, f"{PREFIX}:"])
def test_foreign_iqns_are_refused_before_any_command(tmp_path: Path, iqn: str) -> None:
    runner = RecordingRunner()
    kernel = attacher(tmp_path, runner)
    with pytest.raises(ManagedPrefixError):
        kernel.login(
            spec(target_name=iqn)
            if iqn.startswith("iqn.2") and ":" in iqn[4:]
            else spec(target_name=FOREIGN)
        )
    with pytest.raises(ManagedPrefixError):
        kernel.detach(iqn)
    assert runner.calls == []


@pytest.mark.parametrize("prefix", ["", "iqn", "not-an-iqn", "iqn.2026-11.io.blockyard:x:"])
def test_invalid_managed_prefix_refuses_to_start(tmp_path: Path, prefix: str) -> None:
    with pytest.raises(ManagedPrefixError):
        attacher(tmp_path, RecordingRunner(), managed_prefix=prefix)


def test_discovery_is_nonpersistent_and_filtered(tmp_path: Path) -> None:
    out = f"10.0.0.1:3260,1 {OURS}\n10.0.0.2:3260,2 {OURS}\n10.0.0.1:3260,1 {FOREIGN}\n"
    runner = RecordingRunner({("discovery",): (0, out, "")})
    found = attacher(tmp_path, runner).discover(PORTALS[0])
    assert [(t.name, [(p.host, p.portal_group_tag) for p in t.portals]) for t in found] == [
        (OURS, [("10.0.0.1", 1), ("10.0.0.2", 2)])
    ]
    assert runner.argvs()[0][-2:] == ["-o", "nonpersistent"]


def test_multipath_config_is_alua_aware_and_installed_once(tmp_path: Path) -> None:
    text = multipath_config(120, 5)
    for line in (
        "prio alua",
        "path_grouping_policy group_by_prio",
        "failback immediate",
        "no_path_retry 24",
        'hardware_handler "1 alua"',
        'vendor "BLOCKYRD"',
    ):
        assert line in text
    assert "no_path_retry 1\n" in multipath_config(3, 5)
    runner = RecordingRunner()
    kernel = attacher(tmp_path, runner, replacement_timeout_s=30.0)
    assert kernel.install_multipath_config() is True
    assert "no_path_retry 6" in (tmp_path / "etc" / "blockyard.conf").read_text()
    assert kernel.install_multipath_config() is False
    assert runner.argvs() == [["multipathd", "reconfigure"]]


def test_userspace_attacher_refuses_foreign_iqns() -> None:
    """The userspace path enforces the same managed prefix, before any connection."""
    attacher_ = UserspaceAttacher(PREFIX)
    with pytest.raises(ManagedPrefixError):
        attacher_.attach(spec(target_name=FOREIGN, portals=(Portal("127.0.0.1", 1),)))
    with pytest.raises(ManagedPrefixError):
        attacher_.detach(FOREIGN)
    assert attacher_.attached() == []
    assert attacher_.cleanup_orphans(keep=()) == []
    with pytest.raises(ManagedPrefixError):
        UserspaceAttacher("")
