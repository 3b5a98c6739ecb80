"""Kernel attach path: open-iscsi (``iscsiadm``) sessions plus dm-multipath with ALUA.

For real nodes with a kernel iSCSI initiator. Every external command goes through one
:class:`CommandRunner` with a timeout, so tests replay command sequences against a recording
fake and production runs :class:`SubprocessRunner`.

Sequence of :meth:`KernelAttacher.attach`, per portal (each step idempotent), after making
sure the interface record exists and carries the spec's initiator name (unless it is open-iscsi's
``default`` record, whose name is the host's ``/etc/iscsi/initiatorname.iscsi``, which is never
changed):

1. ``iscsiadm -m node -T IQN -p PORTAL -o new`` (a node record; no discovery, which would
   create records for every target the portal reports, foreign ones included);
2. ``-o update`` for ``node.startup=manual`` (the CSI node decides, not boot scripts),
   ``node.session.timeo.replacement_timeout`` and, with CHAP, the ``node.session.auth.*``
   keys (``*_in`` for mutual CHAP);
3. ``--login`` (exit 15, session exists, counts as success);

then the device is resolved by its NAA id, never by a guessed ``/dev/sdX`` name:
``/dev/disk/by-id/dm-uuid-mpath-3<naa>`` (the multipath map) when it appears, else
``/dev/disk/by-id/wwn-0x<naa>`` for a single path.

Every login, logout and cleanup first checks the IQN against the managed prefix
(:class:`~blockyard.attach.initiator.api.ManagedPrefix`); orphan cleanup lists sessions and
only ever considers managed IQNs, so a host's own iSCSI boot or data disks are never touched.
CHAP secrets travel on iscsiadm's command line (it has no other input), so they are redacted
from every log line and error message.
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from blockyard.attach.initiator.api import AttachedLun, ManagedPrefix
from blockyard.attach.initiator.blockdev import IscsiVolumeSpec
from blockyard.attach.initiator.connection import parse_target_address
from blockyard.attach.initiator.errors import DeviceNotFoundError, KernelCommandError
from blockyard.fileutil import atomic_write
from blockyard.iscsi.discovery import DiscoveryTarget, Portal

log = logging.getLogger("blockyard.attach.kernel")

#: open-iscsi exit codes (iscsi_err.h).
ISCSI_ERR_SESS_EXISTS = 15
ISCSI_ERR_NO_OBJS_FOUND = 21
#: open-iscsi's built-in interface record: the host's initiator name, never modified by us.
DEFAULT_IFACE = "default"
_IFACE_NAME_RE = re.compile(r"^iface\.initiatorname\s*=\s*(\S*)\s*$", re.MULTILINE)
#: multipathd's default path checker interval (multipath.conf(5) polling_interval).
DEFAULT_POLLING_INTERVAL_S = 5
DEFAULT_COMMAND_TIMEOUT_S = 30.0
DEFAULT_DEVICE_WAIT_S = 30.0
DEVICE_POLL_S = 0.2
#: What our target reports in standard INQUIRY (blockyard.scsi.identity).
TARGET_VENDOR = "BLOCKYRD"
TARGET_PRODUCT = "blockyard volume"
_SECRET_KEYS = frozenset({"node.session.auth.password", "node.session.auth.password_in"})
_NAA_RE = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
# iscsiadm -m session: "tcp: [3] 10.0.0.1:3260,1 iqn.2026-11.io.blockyard:vol (non-flash)"
_SESSION_RE = re.compile(r"^\S+:\s+\[(\d+)\]\s+(\S+)\s+(\S+)")


class CommandRunner(Protocol):
    """Runs one external command. Must return within ``timeout_s`` (raising
    :class:`KernelCommandError` when it cannot); returns ``(rc, stdout, stderr)``."""

    def run(self, argv: Sequence[str], timeout_s: float) -> tuple[int, str, str]: ...


def redact(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value following a CHAP secret key replaced, for logs and errors."""
    out = list(argv)
    for i in range(len(out) - 3):
        if out[i] == "-n" and out[i + 1] in _SECRET_KEYS and out[i + 2] == "-v":
            out[i + 3] = "<redacted>"
    return out


class SubprocessRunner:
    """The real :class:`CommandRunner`: ``subprocess.run`` with a timeout, no shell."""

    def run(self, argv: Sequence[str], timeout_s: float) -> tuple[int, str, str]:
        try:
            done = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise KernelCommandError(
                f"{' '.join(redact(argv))} did not finish within {timeout_s} s",
                argv=tuple(redact(argv)),
                rc=-1,
                stderr="",
            ) from exc
        except OSError as exc:
            raise KernelCommandError(
                f"cannot run {argv[0]}: {exc}; is open-iscsi/multipath-tools installed?",
                argv=tuple(redact(argv)),
                rc=-1,
                stderr=str(exc),
            ) from exc
        return done.returncode, done.stdout, done.stderr


@dataclass(frozen=True, slots=True)
class KernelAttachConfig:
    """``managed_prefix``: the IQN prefix this node owns (required). ``dev_root`` is ``/dev``
    (tests point it at a temporary tree). ``multipath_conf`` is where the ALUA device section
    is written."""

    managed_prefix: str
    iscsiadm: str = "iscsiadm"
    multipathd: str = "multipathd"
    iface: str = "default"
    command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S
    replacement_timeout_s: float = 120.0
    polling_interval_s: int = DEFAULT_POLLING_INTERVAL_S
    device_wait_s: float = DEFAULT_DEVICE_WAIT_S
    dev_root: Path = Path("/dev")
    multipath_conf: Path = Path("/etc/multipath/conf.d/blockyard.conf")


def multipath_config(replacement_timeout_s: float, polling_interval_s: int) -> str:
    """The dm-multipath device section for blockyard LUNs (multipath.conf(5)).

    ALUA decides the path groups (``prio alua`` + ``group_by_prio``) so I/O goes to the
    primary's active/optimized port, ``failback immediate`` returns to it as soon as it is
    back, and ``no_path_retry`` queues I/O for about the replacement timeout (it counts path
    checker intervals) before failing it, matching the userspace initiator.
    """
    retries = max(1, math.ceil(replacement_timeout_s / polling_interval_s))
    return (
        "# Written by blockyard: ALUA-aware multipath for blockyard volumes.\n"
        "devices {\n"
        "    device {\n"
        f'        vendor "{TARGET_VENDOR}"\n'
        f'        product "{TARGET_PRODUCT}"\n'
        '        hardware_handler "1 alua"\n'
        "        prio alua\n"
        "        path_grouping_policy group_by_prio\n"
        '        path_selector "service-time 0"\n'
        "        path_checker tur\n"
        "        failback immediate\n"
        f"        no_path_retry {retries}\n"
        "        detect_prio yes\n"
        "    }\n"
        "}\n"
        f"defaults {{\n    polling_interval {polling_interval_s}\n}}\n"
    )


class KernelAttacher:
    """:class:`~blockyard.attach.initiator.api.LunAttacher` over open-iscsi and dm-multipath.

    Not thread-safe: the CSI node serialises operations per volume.
    """

    def __init__(
        self,
        config: KernelAttachConfig,
        runner: CommandRunner | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._prefix = ManagedPrefix(config.managed_prefix)
        self._runner = runner or SubprocessRunner()
        self._clock = clock
        self._sleep = sleep

    # ---- commands -----------------------------------------------------------------------

    def _run(self, argv: Sequence[str], *, ok: Collection[int] = (0,)) -> str:
        rc, out, err = self._runner.run(argv, self.config.command_timeout_s)
        shown = " ".join(redact(argv))
        if rc not in ok:
            raise KernelCommandError(
                f"{shown} failed with exit code {rc}: {err.strip()[:500]}",
                argv=tuple(redact(argv)),
                rc=rc,
                stderr=err,
            )
        log.debug("ran %s (rc %d)", shown, rc)
        return out

    def _node(self, iqn: str, portal: Portal) -> list[str]:
        return [
            self.config.iscsiadm,
            "-m",
            "node",
            "-T",
            iqn,
            "-p",
            f"{portal.host}:{portal.port}",
            "-I",
            self.config.iface,
        ]

    def _update(self, iqn: str, portal: Portal, key: str, value: str) -> None:
        self._run([*self._node(iqn, portal), "-o", "update", "-n", key, "-v", value])

    def ensure_iface(self, initiator_name: str) -> None:
        """Make the configured interface record log in as ``initiator_name`` (creating the
        record when missing). The ``default`` record is left as the host configured it."""
        iface = self.config.iface
        if iface == DEFAULT_IFACE:
            return
        base = [self.config.iscsiadm, "-m", "iface", "-I", iface]
        rc, out, _err = self._runner.run([*base, "-o", "show"], self.config.command_timeout_s)
        current = ""
        if rc == 0:
            match = _IFACE_NAME_RE.search(out)
            current = match.group(1) if match else ""
        else:
            self._run([*base, "-o", "new"])
        if current != initiator_name:
            self._run([*base, "-o", "update", "-n", "iface.initiatorname", "-v", initiator_name])

    # ---- discovery ----------------------------------------------------------------------

    def discover(self, portal: Portal) -> list[DiscoveryTarget]:
        """SendTargets through iscsiadm without creating node records (``-o nonpersistent``);
        only managed IQNs are returned."""
        out = self._run(
            [
                self.config.iscsiadm,
                "-m",
                "discovery",
                "-t",
                "sendtargets",
                "-p",
                f"{portal.host}:{portal.port}",
                "-o",
                "nonpersistent",
            ]
        )
        found: dict[str, list[Portal]] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) != 2 or not self._prefix.owns(parts[1]):
                continue
            found.setdefault(parts[1], []).append(parse_target_address(parts[0]))
        return [DiscoveryTarget(name, tuple(portals)) for name, portals in found.items()]

    # ---- attach / detach ----------------------------------------------------------------

    def login(self, spec: IscsiVolumeSpec) -> None:
        """Create, configure and log in one node record per portal. Idempotent."""
        iqn = spec.target_name
        self._prefix.require(iqn, "log in to")
        self.ensure_iface(spec.initiator_name)
        for portal in spec.portals:
            self._run([*self._node(iqn, portal), "-o", "new"])
            self._update(iqn, portal, "node.startup", "manual")
            self._update(
                iqn,
                portal,
                "node.session.timeo.replacement_timeout",
                str(math.ceil(spec.replacement_timeout_s)),
            )
            if spec.chap is not None:
                self._update(iqn, portal, "node.session.auth.authmethod", "CHAP")
                self._update(iqn, portal, "node.session.auth.username", spec.chap.name)
                self._update(iqn, portal, "node.session.auth.password", spec.chap.secret.decode())
                if spec.target_chap is not None:
                    self._update(
                        iqn, portal, "node.session.auth.username_in", spec.target_chap.name
                    )
                    self._update(
                        iqn,
                        portal,
                        "node.session.auth.password_in",
                        spec.target_chap.secret.decode(),
                    )
            else:
                self._update(iqn, portal, "node.session.auth.authmethod", "None")
            self._run([*self._node(iqn, portal), "--login"], ok=(0, ISCSI_ERR_SESS_EXISTS))

    def attach(self, spec: IscsiVolumeSpec) -> AttachedLun:
        """Log in on every portal and return the multipath (or single-path) device node,
        found by NAA id. ``spec.expected_naa`` is required: it is how the device is found."""
        naa = spec.expected_naa
        if naa is None or not _NAA_RE.fullmatch(naa.lower()):
            raise DeviceNotFoundError(
                f"attaching {spec.target_name} through the kernel needs its NAA id (16 or 32 "
                f"hex digits) to find the device; got {naa!r}"
            )
        self.login(spec)
        device = self.wait_for_device(naa.lower(), multipath=len(spec.portals) > 1)
        return AttachedLun(spec.target_name, naa.lower(), device=device)

    def detach(self, target_name: str) -> None:
        """Log out every session of ``target_name`` and delete its node records.
        Idempotent: no session or no record is success."""
        self._prefix.require(target_name, "log out of")
        self._run(
            [self.config.iscsiadm, "-m", "node", "-T", target_name, "--logout"],
            ok=(0, ISCSI_ERR_NO_OBJS_FOUND),
        )
        self._run(
            [self.config.iscsiadm, "-m", "node", "-T", target_name, "-o", "delete"],
            ok=(0, ISCSI_ERR_NO_OBJS_FOUND),
        )

    def sessions(self) -> list[tuple[str, Portal]]:
        """Every iSCSI session on the host as ``(iqn, portal)``, foreign ones included."""
        out = self._run([self.config.iscsiadm, "-m", "session"], ok=(0, ISCSI_ERR_NO_OBJS_FOUND))
        result: list[tuple[str, Portal]] = []
        for line in out.splitlines():
            match = _SESSION_RE.match(line.strip())
            if match:
                result.append((match.group(3), parse_target_address(match.group(2))))
        return result

    def attached(self) -> list[str]:
        return sorted({iqn for iqn, _ in self.sessions() if self._prefix.owns(iqn)})

    def cleanup_orphans(self, keep: Collection[str]) -> list[str]:
        """Log out managed sessions whose IQN is not in ``keep``. Foreign sessions are skipped
        before anything else looks at them."""
        orphans = [iqn for iqn in self.attached() if iqn not in keep]
        for iqn in orphans:
            log.info("logging out orphaned session %s", iqn)
            self.detach(iqn)
        return orphans

    # ---- multipath ----------------------------------------------------------------------

    def install_multipath_config(self) -> bool:
        """Write the ALUA device section and reconfigure multipathd when it changed.
        Returns whether anything changed."""
        text = multipath_config(self.config.replacement_timeout_s, self.config.polling_interval_s)
        path = self.config.multipath_conf
        try:
            if path.read_text() == text:
                return False
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(str(path), text.encode(), mode=0o644)
        self._run([self.config.multipathd, "reconfigure"])
        return True

    # ---- devices ------------------------------------------------------------------------

    def device_links(self, naa: str) -> tuple[Path, Path]:
        """The by-id links of a LUN: its multipath map and its single-path SCSI disk."""
        by_id = self.config.dev_root / "disk" / "by-id"
        return by_id / f"dm-uuid-mpath-3{naa}", by_id / f"wwn-0x{naa}"

    def resolve_device(self, naa: str, *, multipath: bool) -> Path | None:
        """The device node for ``naa`` now, or None. With ``multipath`` only the dm map
        counts (a bare path device would bypass failover)."""
        mpath, wwn = self.device_links(naa)
        candidates = (mpath,) if multipath else (mpath, wwn)
        for link in candidates:
            if link.exists():
                return link.resolve()
        return None

    def wait_for_device(self, naa: str, *, multipath: bool) -> Path:
        """Poll for the device for up to ``device_wait_s``; raise DeviceNotFoundError."""
        deadline = self._clock() + self.config.device_wait_s
        while True:
            device = self.resolve_device(naa, multipath=multipath)
            if device is not None:
                return device
            if self._clock() >= deadline:
                mpath, wwn = self.device_links(naa)
                raise DeviceNotFoundError(
                    f"no device for NAA {naa} after {self.config.device_wait_s} s (looked for "
                    f"{mpath}{'' if multipath else f' and {wwn}'}); check 'multipath -ll' and "
                    "that udev created the by-id links"
                )
            self._sleep(DEVICE_POLL_S)


__all__ = [
    "CommandRunner",
    "KernelAttachConfig",
    "KernelAttacher",
    "SubprocessRunner",
    "multipath_config",
    "redact",
]
