"""How a node logs in: CHAP credentials from CSI secrets (open-iscsi key names), one initiator
name per node id that the controller can derive too, and the kernel path's command sequence
(a dedicated open-iscsi interface record carrying that name, CHAP in the node records).

The kernel path cannot run here (no kernel initiator): a recorded-command fake stands in for
iscsiadm, as in the attach layer's own kernel tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from blockyard.attach.initiator.kernel import KernelAttachConfig, KernelAttacher
from blockyard.csi.initiators import node_initiator_name
from blockyard.csi.node_attach import KERNEL_IFACE, KernelVolumeAttacher, Target
from blockyard.csi.params import parse_chap_secrets
from blockyard.errors import InvalidArgumentError
from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.discovery import is_valid_iscsi_name

PREFIX = "iqn.2026-11.io.blockyard"
IQN = f"{PREFIX}:pvc-1.0123456789ab"
NAA = "65ab10cff74dc06756fe8cc2a2a7392d"
SECRETS = {
    "node.session.auth.username": "node-user",
    "node.session.auth.password": "node-secret-123",
    "node.session.auth.username_in": "target-user",
    "node.session.auth.password_in": "target-secret-45",
    "discovery.sendtargets.auth.username": "ignored",
}


def test_secrets_use_open_iscsi_key_names() -> None:
    parsed = parse_chap_secrets("secrets", SECRETS)
    assert parsed.chap == ChapCredentials("node-user", b"node-secret-123")
    assert parsed.mutual == ChapCredentials("target-user", b"target-secret-45")
    one_way = {k: v for k, v in SECRETS.items() if not k.endswith("_in")}
    assert parse_chap_secrets("secrets", one_way).mutual is None
    assert parse_chap_secrets("secrets", {}).chap is None


@pytest.mark.parametrize(
    ("secrets", "words"),
    [
        ({"node.session.auth.username": "u"}, "node.session.auth.password is missing"),
        ({"node.session.auth.username": "u", "node.session.auth.password": "tiny"}, "12 bytes"),
        (
            {"node.session.auth.username_in": "t", "node.session.auth.password_in": "x" * 12},
            "needs initiator CHAP",
        ),
        (
            dict(SECRETS, **{"node.session.auth.password_in": "node-secret-123"}),
            "two different secrets",
        ),
    ],
)
def test_bad_secrets_are_refused_without_showing_them(secrets: dict[str, str], words: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_chap_secrets("secrets", secrets)
    assert words in str(info.value)
    for value in secrets.values():
        if len(value) > 2:
            assert value not in str(info.value).replace("node.session.auth", "")


def test_node_initiator_names_are_valid_and_distinct() -> None:
    names = [node_initiator_name(n) for n in ("node-a", "Node_A", "node-a.example", "x" * 300)]
    assert all(is_valid_iscsi_name(n) for n in names)
    assert len(set(names)) == len(names)
    assert names[0] == "iqn.2024-01.io.blockyard:node.node-a"


def test_target_repr_hides_secrets() -> None:
    target = Target(
        "v", IQN, ("10.0.0.1:3260",), 0, NAA,
        chap=ChapCredentials("u", b"node-secret-123"),
        target_chap=ChapCredentials("t", b"target-secret-45"),
    )  # fmt: skip
    assert "node-secret-123" not in repr(target) and "target-secret-45" not in repr(target)


class RecordingRunner:
    def __init__(self, replies: dict[tuple[str, ...], tuple[int, str, str]]) -> None:
        self.replies = replies
        self.calls: list[list[str]] = []

    def run(self, argv: Sequence[str], timeout_s: float) -> tuple[int, str, str]:
        self.calls.append(list(argv))
        for key, reply in self.replies.items():
            if all(part in argv for part in key):
                return reply
        return 0, "", ""


def kernel(tmp_path: Path, runner: RecordingRunner) -> KernelVolumeAttacher:
    by_id = tmp_path / "dev" / "disk" / "by-id"
    by_id.mkdir(parents=True)
    (tmp_path / "dev" / "sdx").touch()
    (by_id / f"wwn-0x{NAA}").symlink_to("../../sdx")
    config = KernelAttachConfig(
        managed_prefix=PREFIX, iface=KERNEL_IFACE, dev_root=tmp_path / "dev", device_wait_s=0.5
    )
    return KernelVolumeAttacher(
        PREFIX, "node-k", KernelAttacher(config, runner, sleep=lambda _s: None)
    )


def test_kernel_path_logs_in_as_the_node_with_chap(tmp_path: Path) -> None:
    runner = RecordingRunner({("iface", "show"): (21, "", "iscsiadm: Could not read iface")})
    chap, mutual = ChapCredentials("u", b"node-secret-123"), ChapCredentials("t", b"tsecret-45678")
    target = Target("v", IQN, ("10.0.0.1:3260",), 0, NAA, chap=chap, target_chap=mutual)
    kernel(tmp_path, runner).attach(target)
    iface = ["iscsiadm", "-m", "iface", "-I", KERNEL_IFACE]
    name = node_initiator_name("node-k")
    assert runner.calls[:3] == [
        [*iface, "-o", "show"],
        [*iface, "-o", "new"],
        [*iface, "-o", "update", "-n", "iface.initiatorname", "-v", name],
    ]
    node = ["iscsiadm", "-m", "node", "-T", IQN, "-p", "10.0.0.1:3260", "-I", KERNEL_IFACE]
    updates = {c[-3]: c[-1] for c in runner.calls if c[:9] == node and "update" in c}
    assert updates["node.session.auth.authmethod"] == "CHAP"
    assert updates["node.session.auth.username"] == "u"
    assert updates["node.session.auth.password"] == "node-secret-123"
    assert updates["node.session.auth.username_in"] == "t"
    assert runner.calls[-1] == [*node, "--login"]
    # The host's own interface record (and so /etc/iscsi/initiatorname.iscsi) is never used.
    assert not any("default" in call for call in runner.calls)


def test_kernel_iface_already_right_is_left_alone(tmp_path: Path) -> None:
    name = node_initiator_name("node-k")
    shown = (
        f"# BEGIN RECORD 2.1.8\niface.iscsi_ifacename = blockyard\niface.initiatorname = {name}\n"
    )
    runner = RecordingRunner({("iface", "show"): (0, shown, "")})
    kernel(tmp_path, runner).attach(Target("v", IQN, ("10.0.0.1:3260",), 0, NAA))
    assert not any("iface" in c and ("new" in c or "update" in c) for c in runner.calls)
    updates = {c[-3]: c[-1] for c in runner.calls if "update" in c}
    assert updates["node.session.auth.authmethod"] == "None"
