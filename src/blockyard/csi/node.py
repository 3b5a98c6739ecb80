"""The CSI Node service: stage, publish, stats and expansion of blockyard volumes on a node.

Contract of every handler (CSI spec, "Node Service RPC" and "Error Scheme"):

- REQUIRED fields that are empty answer INVALID_ARGUMENT naming the field.
- One operation at a time per volume (:mod:`blockyard.csi.locks`): a concurrent second one
  answers ABORTED at once and the CO retries.
- Every handler is idempotent and safe to retry after a crash at any step: it looks at what is
  on disk and in the kernel (records, attachments, the mount table) before acting.
- Nothing is torn down except by NodeUnpublishVolume/NodeUnstageVolume: not on SIGTERM, not at
  start. At start the plugin adopts the attachments a previous plugin made (their daemons are
  separate processes) and finds its staged volumes in ``--node-state-dir``.

Stage: the volume is attached (userspace daemon or open-iscsi, see
:mod:`blockyard.csi.node_attach`) under the node's initiator name and, when the request carries
CHAP secrets (:func:`blockyard.csi.params.parse_chap_secrets`), with CHAP; a ``mount`` volume
gets its file system created only if the device is blank, else checked with fsck, then
mounted at the staging directory; a ``block`` volume is recorded in
``<staging>/blockyard-block.json``. Publish: a bind mount of the staging
directory, or for ``block`` a device node made with mknod at the target file. Safety: the
mount table is read with a timeout and checked for mount storms before any mount is added;
NodeStageVolume runs behind a per-volume circuit breaker (:mod:`blockyard.csi.breaker`).

Blocking work (tools, mounts, attach) runs in daemon threads off the event loop, so a stuck
tool cannot hold up the plugin's shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from blockyard.csi.breaker import CircuitBreakers
from blockyard.csi.capabilities import (
    DEFAULT_FS_TYPE,
    READ_ONLY_MODES,
    AccessType,
    Capability,
    Mode,
    parse_capability,
)
from blockyard.csi.errors import IncompatibleVolumeError, MissingFieldError, UnknownObjectError
from blockyard.csi.ids import is_volume_id
from blockyard.csi.initiators import node_initiator_name
from blockyard.csi.locks import OperationLocks
from blockyard.csi.mounts import MountTable
from blockyard.csi.node_attach import (
    KernelVolumeAttacher,
    Target,
    UserspaceVolumeAttacher,
    VolumeAttacher,
)
from blockyard.csi.node_config import NodeOptions
from blockyard.csi.node_errors import (
    NodePreconditionError,
    TargetPathError,
    VolumeNotStagedError,
)
from blockyard.csi.node_fs import (
    bind_mount,
    device_numbers,
    device_size,
    grow_filesystem,
    mount,
    mount_options,
    prepare_filesystem,
    publish_block,
    remove_target,
    unmount,
)
from blockyard.csi.node_state import BLOCK_INFO_FILE, NodeStateStore, StagedVolume
from blockyard.csi.node_state import write_json_atomic as _write_json
from blockyard.csi.params import parse_chap_secrets
from blockyard.csi.proto import csi_pb2 as pb
from blockyard.csi.proto import csi_pb2_grpc as pb_grpc
from blockyard.csi.publish_rules import (
    CONTEXT_FS_TYPE,
    PUBLISH_INITIATOR,
    PUBLISH_IQN,
    PUBLISH_LUN,
    PUBLISH_NAA_ID,
    PUBLISH_PORTAL,
    PUBLISH_PORTALS,
)
from blockyard.csi.rpc import Context, RpcRunner
from blockyard.errors import BlockyardError, InvalidArgumentError, OperationInProgressError
from blockyard.mountinfo import Mount

if TYPE_CHECKING:  # server imports this module
    from blockyard.csi.server import CsiConfig

log = logging.getLogger("blockyard.csi.node")

T = TypeVar("T")
NodeCap = pb.NodeServiceCapability.RPC
NODE_CAPABILITIES: Final = (
    NodeCap.STAGE_UNSTAGE_VOLUME,
    NodeCap.GET_VOLUME_STATS,
    NodeCap.EXPAND_VOLUME,
    NodeCap.VOLUME_CONDITION,
    NodeCap.SINGLE_NODE_MULTI_WRITER,
)
#: Stacked mounts at one path that unmount will peel off before giving up.
MAX_UNMOUNT_LAYERS: Final = 16
#: CSI spec "Size Limits": the publish context holds at most this many portals we use.
MAX_PORTALS: Final = 8


async def run_blocking(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a daemon thread: the plugin's exit never waits for it (a half-done step is
    finished by the CO's retry, every step being idempotent)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001  # handed to the awaiting coroutine
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=body, name="csi-node-work", daemon=True).start()
    return await future


def _required(value: str, field: str, what: str) -> str:
    if not value:
        raise MissingFieldError(f"{field} is required: give the {what}")
    return value


def _volume_id(value: str) -> str:
    _required(value, "volume_id", "volume id")
    if not is_volume_id(value):
        raise UnknownObjectError(f"volume {value!r} does not exist: not an id this driver issues")
    return value


def _abs_path(value: str, field: str) -> str:
    _required(value, field, "path kubelet chose")
    if not os.path.isabs(value):
        raise InvalidArgumentError(f"{field} {value!r} must be an absolute path")
    return os.path.normpath(value)


def _capability(request_cap: pb.VolumeCapability, present: bool) -> Capability:
    if not present:
        raise MissingFieldError("volume_capability is required: the access type and mode")
    return parse_capability("volume_capability", request_cap)


def parse_target(volume_id: str, context: dict[str, str]) -> Target:
    """The iSCSI target from ControllerPublishVolume's publish_context."""
    iqn = context.get(PUBLISH_IQN, "")
    if not iqn:
        raise InvalidArgumentError(
            f"publish_context.{PUBLISH_IQN} is missing: this volume was not published by the "
            "blockyard CSI controller (is the CSIDriver's attachRequired true?)"
        )
    portals_text = context.get(PUBLISH_PORTALS, "") or context.get(PUBLISH_PORTAL, "")
    portals = tuple(p.strip() for p in portals_text.split(",") if p.strip())
    if not portals:
        raise InvalidArgumentError(
            f"publish_context has no {PUBLISH_PORTALS} or {PUBLISH_PORTAL}: nothing to connect "
            "to; check the controller's publish_context"
        )
    if len(portals) > MAX_PORTALS:
        raise InvalidArgumentError(
            f"publish_context lists {len(portals)} portals, max {MAX_PORTALS}"
        )
    preferred = context.get(PUBLISH_PORTAL, "")
    if preferred in portals:
        # The controller names the current primary first; the node tries it first.
        portals = (preferred, *(p for p in portals if p != preferred))
    lun_text = context.get(PUBLISH_LUN, "0") or "0"
    if not lun_text.isdigit():
        raise InvalidArgumentError(f"publish_context.{PUBLISH_LUN} {lun_text!r} is not a number")
    return Target(
        volume_id,
        iqn,
        portals,
        int(lun_text),
        context.get(PUBLISH_NAA_ID, ""),
        initiator_name=context.get(PUBLISH_INITIATOR, ""),
    )


class NodeService(pb_grpc.NodeServicer):
    def __init__(
        self,
        *,
        node_id: str,
        options: NodeOptions,
        attacher: VolumeAttacher,
        runner: RpcRunner,
        topology: dict[str, str],
    ) -> None:
        self.node_id = node_id
        self.initiator_name = node_initiator_name(node_id)
        self.options = options
        self.attacher = attacher
        self.runner = runner
        self.topology = topology
        self.store = NodeStateStore(options.state_dir)
        self.breakers = CircuitBreakers(options.state_dir / "breaker")
        self.mounts = MountTable(
            timeout_s=options.mount_table_timeout_s,
            storm_threshold=options.mount_storm_threshold,
        )
        self.locks = OperationLocks()

    def recover(self) -> None:
        """At start: adopt attachments, report what is staged. Changes no mount."""
        self.attacher.recover()
        for record in self.store.all():
            problem = self.attacher.healthy(record)
            if problem is None:
                log.info("staged volume %s at %s (%s)", record.volume_id, record.staging_path,
                         record.device)  # fmt: skip
            else:
                log.warning("staged volume %s: %s; NodeStageVolume will repair it",
                            record.volume_id, problem)  # fmt: skip
        self._report_staged()

    def _report_staged(self) -> None:
        """Tell the metrics how many volumes are staged on this node now."""
        self.runner.metrics.attachment_changed(len(self.store.all()))

    # ---- stage -------------------------------------------------------------------------------

    async def NodeStageVolume(
        self, request: pb.NodeStageVolumeRequest, context: Context
    ) -> pb.NodeStageVolumeResponse:
        async def work() -> pb.NodeStageVolumeResponse:
            volume_id = _volume_id(request.volume_id)
            staging = _abs_path(request.staging_target_path, "staging_target_path")
            cap = _capability(request.volume_capability, request.HasField("volume_capability"))
            target = self._login_target(volume_id, request)
            self.attacher_prefix_check(target)
            fs_type = ""
            if cap.access_type is AccessType.MOUNT:
                fs_type = (
                    cap.fs_type or request.volume_context.get(CONTEXT_FS_TYPE) or DEFAULT_FS_TYPE
                )
            with self.locks.claim("NodeStageVolume", f"volume:{volume_id}"):
                self.breakers.check(volume_id)
                try:
                    await run_blocking(lambda: self._stage(target, staging, cap, fs_type))
                except (InvalidArgumentError, OperationInProgressError):
                    raise
                except BlockyardError as exc:
                    state = self.breakers.record_failure(volume_id, str(exc))
                    log.warning(
                        "NodeStageVolume %s: failure %d in a row (%d open the circuit breaker)",
                        volume_id,
                        state.failures,
                        self.breakers.threshold,
                    )
                    if state.failures == self.breakers.threshold:
                        self.runner.metrics.breaker_tripped(volume_id)
                    self.runner.metrics.breaker_state(volume_id, state.opened_at is not None)
                    raise
                self.breakers.record_success(volume_id)
                self.runner.metrics.breaker_state(volume_id, False)
                self._report_staged()
            return pb.NodeStageVolumeResponse()

        return await self.runner.run(context, "NodeStageVolume", request.volume_id, work)

    def _login_target(self, volume_id: str, request: pb.NodeStageVolumeRequest) -> Target:
        """Where to log in (publish_context), as whom (this node's initiator name, which must
        be the one the controller put in the volume's ACL) and with which CHAP credentials
        (the request's secrets)."""
        target = parse_target(volume_id, dict(request.publish_context))
        if target.initiator_name and target.initiator_name != self.initiator_name:
            raise NodePreconditionError(
                f"volume {volume_id} was published for initiator {target.initiator_name}, but "
                f"this node (id {self.node_id}) logs in as {self.initiator_name}; the "
                "VolumeAttachment belongs to another node"
            )
        secrets = parse_chap_secrets("secrets", request.secrets)
        return replace(
            target,
            initiator_name=self.initiator_name,
            chap=secrets.chap,
            target_chap=secrets.mutual,
        )

    def attacher_prefix_check(self, target: Target) -> None:
        prefix = getattr(self.attacher, "prefix", None)
        if prefix is not None:
            prefix.require(target.iqn, "log in to")

    def _stage(self, target: Target, staging: str, cap: Capability, fs_type: str) -> None:
        volume_id = target.volume_id
        record = self.store.get(volume_id)
        access = cap.access_type.value
        if record is not None and record.status == "staged":
            if record.staging_path != staging:
                raise IncompatibleVolumeError(
                    f"volume {volume_id} is already staged at {record.staging_path}; unstage it "
                    "there first"
                )
            if record.access_type != access or record.fs_type != fs_type:
                raise IncompatibleVolumeError(
                    f"volume {volume_id} is staged as {record.access_type} "
                    f"{record.fs_type}, not {access} {fs_type}"
                )
        if os.path.lexists(staging) and not os.path.isdir(staging):
            raise TargetPathError(
                f"staging_target_path {staging} exists and is not a directory; the staging "
                "path is always a directory. Remove it and retry"
            )
        os.makedirs(staging, exist_ok=True)
        table = self.mounts.check_storm()
        attached = self.attacher.attach(target)
        record = StagedVolume(
            volume_id=volume_id,
            staging_path=staging,
            access_type=access,
            fs_type=fs_type,
            attach_kind=self.attacher.kind,
            device=attached.device,
            attachment_id=attached.attachment_id,
            iqn=target.iqn,
            portals=list(target.portals),
            lun=target.lun,
            mount_flags=list(cap.mount_flags),
        )
        self.store.put(record)
        if cap.access_type is AccessType.BLOCK:
            major, minor = device_numbers(attached.device)
            _write_json(
                Path(staging) / BLOCK_INFO_FILE,
                {"volume_id": volume_id, "device": attached.device, "major": major,
                 "minor": minor},
            )  # fmt: skip
        else:
            self._mount_staging(record, cap, table)
        self.store.put(record.with_(status="staged"))
        log.info("staged %s at %s (%s %s)", volume_id, staging, attached.device, fs_type or "block")

    def _mount_staging(self, record: StagedVolume, cap: Capability, table: list[Mount]) -> None:
        staging, device = record.staging_path, record.device
        major, minor = device_numbers(device)
        present = self.mounts.at(staging, table)
        if present:
            if present[-1].dev == f"{major}:{minor}":
                return
            raise NodePreconditionError(
                f"staging_target_path {staging} is already a mountpoint of {present[-1].source}, "
                f"not of this volume's device {device}; unmount it and retry"
            )
        read_only = cap.mode in READ_ONLY_MODES
        done = prepare_filesystem(device, record.fs_type, staging, read_only=read_only)
        mount(device, staging, record.fs_type, mount_options(record.fs_type, cap.mount_flags,
                                                              read_only))  # fmt: skip
        log.info("%s: %s, mounted at %s", record.volume_id, done, staging)

    # ---- unstage -----------------------------------------------------------------------------

    async def NodeUnstageVolume(
        self, request: pb.NodeUnstageVolumeRequest, context: Context
    ) -> pb.NodeUnstageVolumeResponse:
        async def work() -> pb.NodeUnstageVolumeResponse:
            volume_id = _required(request.volume_id, "volume_id", "volume id")
            staging = _abs_path(request.staging_target_path, "staging_target_path")
            with self.locks.claim("NodeUnstageVolume", f"volume:{volume_id}"):
                await run_blocking(lambda: self._unstage(volume_id, staging))
            self.runner.metrics.breaker_removed(volume_id)
            self._report_staged()
            return pb.NodeUnstageVolumeResponse()

        return await self.runner.run(context, "NodeUnstageVolume", request.volume_id, work)

    def _unstage(self, volume_id: str, staging: str) -> None:
        record = self.store.get(volume_id) if is_volume_id(volume_id) else None
        self._unmount_all(staging)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(staging, BLOCK_INFO_FILE))
        if record is not None and record.staging_path != staging:
            log.info("%s is staged at %s, not %s: only that path was cleaned", volume_id,
                     record.staging_path, staging)  # fmt: skip
            return
        if is_volume_id(volume_id):
            self.attacher.detach(volume_id, record)
        self.store.delete(volume_id)
        log.info("unstaged %s from %s", volume_id, staging)

    def _unmount_all(self, path: str) -> None:
        for _ in range(MAX_UNMOUNT_LAYERS):
            if not self.mounts.at(path):
                return
            unmount(path)
        raise NodePreconditionError(
            f"{path} still has mounts after {MAX_UNMOUNT_LAYERS} unmounts; inspect `findmnt {path}`"
        )

    # ---- publish -----------------------------------------------------------------------------

    async def NodePublishVolume(
        self, request: pb.NodePublishVolumeRequest, context: Context
    ) -> pb.NodePublishVolumeResponse:
        async def work() -> pb.NodePublishVolumeResponse:
            volume_id = _volume_id(request.volume_id)
            target = _abs_path(request.target_path, "target_path")
            staging = _abs_path(request.staging_target_path, "staging_target_path")
            cap = _capability(request.volume_capability, request.HasField("volume_capability"))
            read_only = request.readonly or cap.mode in READ_ONLY_MODES
            with self.locks.claim("NodePublishVolume", f"volume:{volume_id}"):
                await run_blocking(
                    lambda: self._publish(volume_id, staging, target, cap, read_only)
                )
            return pb.NodePublishVolumeResponse()

        return await self.runner.run(context, "NodePublishVolume", request.volume_id, work)

    def _staged(self, volume_id: str, staging: str | None) -> StagedVolume:
        record = self.store.get(volume_id)
        if record is None or record.status != "staged":
            raise VolumeNotStagedError(
                f"volume {volume_id} is not staged on node {self.node_id}; NodeStageVolume first"
            )
        if staging is not None and record.staging_path != staging:
            raise VolumeNotStagedError(
                f"volume {volume_id} is staged at {record.staging_path}, not {staging}"
            )
        return record

    def _publish(
        self, volume_id: str, staging: str, target: str, cap: Capability, read_only: bool
    ) -> None:
        record = self._staged(volume_id, staging)
        if record.access_type != cap.access_type.value:
            raise InvalidArgumentError(
                f"volume {volume_id} is staged as {record.access_type}; it cannot be published "
                f"as {cap.access_type.value}"
            )
        table = self.mounts.read()
        if cap.access_type is AccessType.BLOCK:
            if self.mounts.at(target, table):
                raise TargetPathError(
                    f"target_path {target} is a mountpoint; a raw block volume is published as "
                    "a device node. Unpublish (unmount) it and retry"
                )
            done = publish_block(target, device_numbers(record.device))
            log.info("published %s at %s: %s", volume_id, target, done)
            return
        self.mounts.check_storm(table)
        staged = self.mounts.at(staging, table)
        if not staged:
            raise VolumeNotStagedError(
                f"staging_target_path {staging} of volume {volume_id} is not mounted (the mount "
                "was lost); unstage and stage the volume again"
            )
        if os.path.lexists(target) and not os.path.isdir(target):
            raise TargetPathError(
                f"target_path {target} exists and is not a directory; a file system volume is "
                "published on a directory. Remove it and retry"
            )
        os.makedirs(target, exist_ok=True)
        present = self.mounts.at(target, table)
        if present:
            top = present[-1]
            if top.dev == staged[-1].dev and top.read_only == read_only:
                return
            raise IncompatibleVolumeError(
                f"target_path {target} is already mounted ({top.source}, "
                f"{'ro' if top.read_only else 'rw'}) differently from this request; unpublish "
                "it first"
            )
        bind_mount(staging, target, read_only=read_only)
        log.info("published %s at %s (%s)", volume_id, target, "ro" if read_only else "rw")

    async def NodeUnpublishVolume(
        self, request: pb.NodeUnpublishVolumeRequest, context: Context
    ) -> pb.NodeUnpublishVolumeResponse:
        async def work() -> pb.NodeUnpublishVolumeResponse:
            volume_id = _required(request.volume_id, "volume_id", "volume id")
            target = _abs_path(request.target_path, "target_path")
            with self.locks.claim("NodeUnpublishVolume", f"volume:{volume_id}"):
                await run_blocking(lambda: self._unpublish(target))
            return pb.NodeUnpublishVolumeResponse()

        return await self.runner.run(context, "NodeUnpublishVolume", request.volume_id, work)

    def _unpublish(self, target: str) -> None:
        self._unmount_all(target)
        remove_target(target)

    # ---- stats, expand, info -----------------------------------------------------------------

    async def NodeGetVolumeStats(
        self, request: pb.NodeGetVolumeStatsRequest, context: Context
    ) -> pb.NodeGetVolumeStatsResponse:
        async def work() -> pb.NodeGetVolumeStatsResponse:
            volume_id = _volume_id(request.volume_id)
            path = _abs_path(request.volume_path, "volume_path")
            return await run_blocking(lambda: self._stats(volume_id, path))

        return await self.runner.run(context, "NodeGetVolumeStats", request.volume_id, work)

    def _stats(self, volume_id: str, path: str) -> pb.NodeGetVolumeStatsResponse:
        if not os.path.lexists(path):
            raise UnknownObjectError(f"volume_path {path} does not exist on this node")
        record = self.store.get(volume_id)
        problem = None if record is None else self.attacher.healthy(record)
        Usage = pb.VolumeUsage
        st = os.lstat(path)
        if stat.S_ISBLK(st.st_mode) or (record is not None and record.access_type == "block"):
            device = path if stat.S_ISBLK(st.st_mode) else (record.device if record else path)
            try:
                size = device_size(device)
            except OSError as exc:
                size = 0
                problem = problem or f"cannot open {device}: {exc.strerror}"
            usage = [Usage(unit=Usage.BYTES, total=size)]
        else:
            if not self.mounts.at(path):
                problem = problem or f"{path} is not mounted (the volume's mount is gone)"
            fs = os.statvfs(path)
            usage = [
                Usage(unit=Usage.BYTES, total=fs.f_blocks * fs.f_frsize,
                      available=fs.f_bavail * fs.f_frsize,
                      used=(fs.f_blocks - fs.f_bfree) * fs.f_frsize),
                Usage(unit=Usage.INODES, total=fs.f_files, available=fs.f_favail,
                      used=fs.f_files - fs.f_ffree),
            ]  # fmt: skip
        condition = pb.VolumeCondition(abnormal=problem is not None, message=problem or "healthy")
        return pb.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    async def NodeExpandVolume(
        self, request: pb.NodeExpandVolumeRequest, context: Context
    ) -> pb.NodeExpandVolumeResponse:
        async def work() -> pb.NodeExpandVolumeResponse:
            volume_id = _volume_id(request.volume_id)
            _abs_path(request.volume_path, "volume_path")
            required = request.capacity_range.required_bytes
            limit = request.capacity_range.limit_bytes
            if required < 0 or limit < 0 or (limit and required > limit):
                raise InvalidArgumentError(
                    f"capacity_range required_bytes {required} / limit_bytes {limit} is invalid"
                )
            with self.locks.claim("NodeExpandVolume", f"volume:{volume_id}"):
                size = await run_blocking(lambda: self._expand(volume_id, required))
            return pb.NodeExpandVolumeResponse(capacity_bytes=size)

        return await self.runner.run(context, "NodeExpandVolume", request.volume_id, work)

    def _expand(self, volume_id: str, required_bytes: int) -> int:
        record = self.store.get(volume_id)
        if record is None:
            raise UnknownObjectError(f"volume {volume_id} is not staged on node {self.node_id}")
        size = self.attacher.refresh_size(record, required_bytes)
        if record.access_type == "mount":
            grow_filesystem(record.device, record.fs_type, record.staging_path)
        log.info("expanded %s to %d bytes", volume_id, size)
        return size

    async def NodeGetCapabilities(
        self, request: pb.NodeGetCapabilitiesRequest, context: Context
    ) -> pb.NodeGetCapabilitiesResponse:
        async def work() -> pb.NodeGetCapabilitiesResponse:
            return pb.NodeGetCapabilitiesResponse(
                capabilities=[
                    pb.NodeServiceCapability(rpc=NodeCap(type=t)) for t in NODE_CAPABILITIES
                ]
            )

        return await self.runner.run(context, "NodeGetCapabilities", self.node_id, work)

    async def NodeGetInfo(
        self, request: pb.NodeGetInfoRequest, context: Context
    ) -> pb.NodeGetInfoResponse:
        async def work() -> pb.NodeGetInfoResponse:
            return pb.NodeGetInfoResponse(
                node_id=self.node_id,
                max_volumes_per_node=self.options.max_volumes,
                accessible_topology=pb.Topology(segments=self.topology),
            )

        return await self.runner.run(context, "NodeGetInfo", self.node_id, work)


def build_attacher(options: NodeOptions, managed_prefix: str, node_id: str) -> VolumeAttacher:
    if options.kernel_attach():
        return KernelVolumeAttacher(managed_prefix, node_id)
    return UserspaceVolumeAttacher(
        options.attach_state_dir, managed_prefix, node_id, options.attach_launcher.argv_prefix()
    )


def build_node_service(config: CsiConfig, runner: RpcRunner) -> pb_grpc.NodeServicer:
    """The Node service for ``config`` (the entry point :mod:`blockyard.csi.server` calls).
    Adopts existing attachments before it returns; changes no mount."""
    options = config.node_options
    if not config.managed_prefix:
        raise NodePreconditionError("the node service needs --managed-prefix")
    service = NodeService(
        node_id=config.node_id,
        options=options,
        attacher=build_attacher(options, config.managed_prefix, config.node_id),
        runner=runner,
        topology={config.topology.key: config.topology.value},
    )
    service.recover()
    return service


__all__ = ["Mode", "NodeService", "build_node_service", "parse_target", "run_blocking"]
