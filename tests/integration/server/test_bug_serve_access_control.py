"""Regression: `blockyard serve` let every login in, with or without credentials, under any
initiator name.

The protocol library had CHAP, mutual CHAP and initiator ACLs, but the volume manager never
configured them and the management API had no way to. Now each volume has its own CHAP
(optionally mutual) and initiator ACL, set through the API (SetVolumeAuth, SetVolumeAccess,
AllowInitiator, RevokeInitiator), kept in the volume directory (0600) across restarts, never
logged; revoking an initiator ends that initiator's sessions and no other's. Checked here
with a real server and real initiators (iscsi-inq, qemu-io).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from interactive_qemu import InteractiveQemuIo, qemu_io_session
from serve_helpers import Serve, need_tools, run_tool

from blockyard.errors import InvalidArgumentError
from blockyard.iscsi.chap import ChapCredentials

MIB = 1 << 20
USER = "node-user"
SECRET = b"initiator-secret-0123"
TARGET_USER = "target-user"
TARGET_SECRET = b"target-secret-456789"
ALLOWED_A = "iqn.2024-01.io.example:node-a"
ALLOWED_C = "iqn.2024-01.io.example:node-c"
STRANGER = "iqn.2024-01.io.example:node-b"
#: How long an initiator whose session was ended gets to (wrongly) complete another write.
FENCED_WAIT_S = 5.0
OUTPUT_WAIT_S = 30.0


def inq(url: str, *, initiator: str | None = None, env: dict[str, str] | None = None) -> int:
    args = ["iscsi-inq"] + (["-i", initiator] if initiator else []) + [url]
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=30, check=False,
        env=dict(os.environ, **(env or {})),
    )  # fmt: skip
    return done.returncode


def with_chap(url: str, user: str, secret: bytes) -> str:
    return url.replace("iscsi://", f"iscsi://{user}%{secret.decode()}@", 1)


def test_chap_and_mutual_chap_are_enforced_persisted_and_never_logged(
    start_serve: Callable[..., Serve],
) -> None:
    need_tools("iscsi-inq")
    serve = start_serve()
    serve.call(lambda c: c.create_volume("chap", 4 * MIB))
    url = serve.url("chap")
    assert inq(url) == 0  # open until configured

    desc = serve.call(lambda c: c.set_volume_auth("chap", ChapCredentials(USER, SECRET)))
    assert desc.access.chap_user == USER and desc.access.mutual_chap_user == ""
    assert inq(url) != 0, "a login without CHAP got in"
    assert inq(with_chap(url, USER, b"wrong-secret-0000")) != 0, "a wrong secret got in"
    assert inq(with_chap(url, "someone-else", SECRET)) != 0, "a wrong user got in"
    assert inq(with_chap(url, USER, SECRET)) == 0

    target = ChapCredentials(TARGET_USER, TARGET_SECRET)
    desc = serve.call(lambda c: c.set_volume_auth("chap", ChapCredentials(USER, SECRET), target))
    assert desc.access.mutual_chap_user == TARGET_USER
    mutual = {
        "LIBISCSI_CHAP_TARGET_USERNAME": TARGET_USER,
        "LIBISCSI_CHAP_TARGET_PASSWORD": TARGET_SECRET.decode(),
    }
    assert inq(with_chap(url, USER, SECRET), env=mutual) == 0
    # The initiator checks the target: a target that cannot prove this secret is refused.
    impostor = dict(mutual, LIBISCSI_CHAP_TARGET_PASSWORD="not-the-target-1")
    assert inq(with_chap(url, USER, SECRET), env=impostor) != 0

    auth_file = serve.data_dir / "chap" / "auth.json"
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    assert serve.stop() == 0, serve.stderr()
    again = start_serve(data_dir=serve.data_dir)
    assert again.call(lambda c: c.get_volume("chap")).access.chap_user == USER
    assert inq(again.url("chap")) != 0, "CHAP was lost by a restart"
    assert inq(with_chap(again.url("chap"), USER, SECRET), env=mutual) == 0

    logs = serve.stderr() + again.stderr()
    assert "rpc SetVolumeAuth chap OK" in logs
    for secret in (SECRET, TARGET_SECRET):
        assert secret.decode() not in logs

    desc = again.call(lambda c: c.set_volume_auth("chap", None))
    assert desc.access.chap_user == "" and not auth_file.exists()
    assert inq(again.url("chap")) == 0


@contextmanager
def client(serve: Serve, volume: str, initiator: str) -> Iterator[InteractiveQemuIo]:
    """qemu-io logged in to ``volume`` as ``initiator``, its session open until the block ends."""
    iqn = serve.call(lambda c: c.get_volume(volume)).export.iqn
    opts = (
        f"driver=iscsi,transport=tcp,portal={serve.iscsi[0]},target={iqn},lun=0,"
        f"initiator-name={initiator}"
    )
    with qemu_io_session("--image-opts", opts) as tool:
        yield tool


def test_revoking_an_initiator_ends_its_sessions_only_and_it_cannot_write_again(
    start_serve: Callable[..., Serve],
) -> None:
    need_tools("iscsi-inq", "qemu-io")
    serve = start_serve()
    serve.call(lambda c: c.create_volume("acl", 8 * MIB))
    desc = serve.call(lambda c: c.set_volume_access("acl", [ALLOWED_A, ALLOWED_C]))
    assert desc.access.restricted and desc.access.allowed_initiators == (ALLOWED_A, ALLOWED_C)
    url = serve.url("acl")
    assert inq(url, initiator=STRANGER) != 0, "an initiator outside the ACL got in"
    assert inq(url, initiator=ALLOWED_A) == 0

    with client(serve, "acl", ALLOWED_A) as a, client(serve, "acl", ALLOWED_C) as c:
        a.send("write -P 0xa1 0 64k", "flush")
        c.send("write -P 0xc1 1M 64k", "flush")
        assert a.count("wrote 65536/65536", OUTPUT_WAIT_S, until=1) == 1
        assert c.count("wrote 65536/65536", OUTPUT_WAIT_S, until=1) == 1

        desc = serve.call(lambda cl: cl.revoke_initiator("acl", ALLOWED_A))
        assert desc.access.allowed_initiators == (ALLOWED_C,)
        # Idempotent: a retry changes nothing and succeeds.
        assert serve.call(lambda cl: cl.revoke_initiator("acl", ALLOWED_A)) == desc

        a.send("write -P 0xa2 2M 64k", "flush")
        c.send("write -P 0xc2 3M 64k", "flush")
        assert c.count("wrote 65536/65536", OUTPUT_WAIT_S, until=1) == 1, "the other was cut off"
        assert a.count("wrote", FENCED_WAIT_S) == 0, "a revoked initiator wrote"

    stderr = serve.stderr()
    assert stderr.count(f"initiator {ALLOWED_A} is no longer allowed") == 1, stderr
    assert f"initiator {ALLOWED_C} is no longer allowed" not in stderr
    assert inq(url, initiator=ALLOWED_A) != 0
    read = run_tool(
        "qemu-io", "--image-opts",
        f"driver=iscsi,transport=tcp,portal={serve.iscsi[0]},target={desc.export.iqn},lun=0,"
        f"initiator-name={ALLOWED_C}",
        "-c", "read -P 0 2M 64k", "-c", "read -P 0xc2 3M 64k", "-c", "read -P 0xa1 0 64k",
    )  # fmt: skip
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read.stdout
    assert read.stdout.count("read 65536/65536") == 3, read.stdout

    # The ACL survives a restart, and opening the volume admits everyone again.
    assert serve.stop() == 0, serve.stderr()
    again = start_serve(data_dir=serve.data_dir)
    assert inq(again.url("acl"), initiator=ALLOWED_A) != 0
    assert inq(again.url("acl"), initiator=ALLOWED_C) == 0
    again.call(lambda cl: cl.set_volume_access("acl", None))
    assert inq(again.url("acl"), initiator=STRANGER) == 0


def test_bad_access_requests_are_invalid_argument_and_name_no_secret(
    start_serve: Callable[..., Serve], tmp_path: Path
) -> None:
    serve = start_serve()
    serve.call(lambda c: c.create_volume("bad", 4 * MIB))
    short = ChapCredentials.__new__(ChapCredentials)  # bypass the local check: the server's
    object.__setattr__(short, "name", "u")  # own validation must refuse it
    object.__setattr__(short, "secret", b"tiny-secret")
    same = ChapCredentials("u", b"same-secret-00")
    for call, words in (
        (lambda c: c.set_volume_auth("bad", short), "12 bytes"),
        (lambda c: c.set_volume_auth("bad", same, ChapCredentials("t", same.secret)), "identical"),
        (lambda c: c.allow_initiator("bad", "Not An IQN"), "not a valid iSCSI name"),
        (lambda c: c.revoke_initiator("bad", ""), "initiator_name is required"),
    ):
        with pytest.raises(InvalidArgumentError) as info:
            serve.call(call)  # type: ignore[arg-type]
        assert words in str(info.value), str(info.value)
        assert "tiny-secret" not in str(info.value) and "same-secret-00" not in str(info.value)
    assert "tiny-secret" not in serve.stderr() and "same-secret-00" not in serve.stderr()


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockyard.cli.main", "volume", *args],
        capture_output=True, text=True, timeout=60, check=False, input=stdin,
    )  # fmt: skip


def test_cli_sets_the_rules_with_secrets_from_files_only(
    start_serve: Callable[..., Serve], tmp_path: Path
) -> None:
    need_tools("iscsi-inq")
    serve = start_serve()
    serve.call(lambda c: c.create_volume("byhand", 4 * MIB))
    secret_file = tmp_path / "chap.secret"
    secret_file.write_bytes(SECRET + b"\n")  # as `echo` writes it: the newline is not part of it
    done = cli("auth", "byhand", "--server", serve.api, "--chap-user", USER,
               "--chap-secret-file", str(secret_file))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"volume byhand: CHAP user {USER}; admits every initiator"
    url = serve.url("byhand")
    assert inq(url) != 0 and inq(with_chap(url, USER, SECRET)) == 0
    missing = str(tmp_path / "missing")
    done = cli("auth", "byhand", "--server", serve.api, "--chap-user", USER,
               "--chap-secret-file", "-", "--mutual-user", TARGET_USER,
               "--mutual-secret-file", missing, stdin=SECRET.decode())  # fmt: skip
    assert done.returncode != 0 and "cannot read it" in done.stderr, done.stderr

    for args in (("--allow", ALLOWED_A, "--allow", ALLOWED_C), ("--revoke", ALLOWED_A)):
        done = cli("access", "byhand", "--server", serve.api, *args)
        assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"admits {ALLOWED_C}"), done.stdout
    assert inq(with_chap(url, USER, SECRET), initiator=ALLOWED_A) != 0
    assert inq(with_chap(url, USER, SECRET), initiator=ALLOWED_C) == 0
    # While the server holds the volume, the data directory is not the place to change it.
    busy = cli("access", "byhand", "--data-dir", str(serve.data_dir), "--open")
    assert busy.returncode != 0 and "management API" in busy.stderr, busy.stderr

    assert serve.stop() == 0, serve.stderr()
    done = cli("access", "byhand", "--data-dir", str(serve.data_dir), "--only",
               "--allow", ALLOWED_A)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"volume byhand: CHAP user {USER}; admits {ALLOWED_A}"
    again = start_serve(data_dir=serve.data_dir)
    assert inq(with_chap(again.url("byhand"), USER, SECRET), initiator=ALLOWED_A) == 0
    assert inq(with_chap(again.url("byhand"), USER, SECRET), initiator=ALLOWED_C) != 0
    info = cli("info", "byhand", "--server", again.api, "--json")
    assert '"allowed_initiators": [\n      "' + ALLOWED_A in info.stdout, info.stdout
    for text in (serve.stderr(), again.stderr(), info.stdout):
        assert SECRET.decode() not in text
