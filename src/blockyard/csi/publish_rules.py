"""What ControllerPublishVolume decides and tells the node: whether a volume may be shared
with another node in a given access mode, the publish context (portals, IQN, LUN, NAA id) and
the volume condition, plus the context keys the node service reads. Pure functions; the
controller (:mod:`blockyard.csi.controller`) calls them and the node
(:mod:`blockyard.csi.node`) reads what they produce."""

from __future__ import annotations

from typing import Final

from blockyard.csi.capabilities import MULTI_NODE_MODES, Capability, Mode
from blockyard.csi.errors import PublishConflictError
from blockyard.csi.proto import csi_pb2 as pb
from blockyard.csi.publish_store import Attachment
from blockyard.scsi.alua import AccessState
from blockyard.server.backend import VolumeDescription

#: MULTI_NODE_MULTI_WRITER block volumes: the source and the target of a VM live migration.
MAX_RWX_BLOCK_NODES: Final = 2
#: Volume context key of the file system chosen at creation (read by the node service).
CONTEXT_FS_TYPE: Final = "fsType"
#: publish_context keys (read by the node service).
PUBLISH_PORTAL: Final = "portal"
PUBLISH_PORTALS: Final = "portals"
PUBLISH_IQN: Final = "iqn"
PUBLISH_LUN: Final = "lun"
PUBLISH_NAA_ID: Final = "naaId"
#: The initiator name the node must log in with (the one now in the volume's ACL).
PUBLISH_INITIATOR: Final = "initiatorName"
#: ALUA states in which a portal serves I/O, best first (SPC-4 §5.16.2).
SERVING_STATES: Final = (AccessState.ACTIVE_OPTIMIZED, AccessState.ACTIVE_NON_OPTIMIZED)


def check_sharing(volume_id: str, cap: Capability, others: list[Attachment]) -> None:
    """May ``volume_id`` be published with ``cap`` while it is published to ``others``?"""
    if not others:
        return
    nodes = ", ".join(sorted(a.node_id for a in others))
    multi_names = {Mode.Mode.Name(m) for m in MULTI_NODE_MODES}
    if not cap.multi_node or any(a.mode not in multi_names for a in others):
        raise PublishConflictError(
            f"volume {volume_id} is published to node(s) {nodes} and its access mode allows one "
            "node at a time; ControllerUnpublishVolume it there first (or use a multi-node "
            "access mode)"
        )
    if any(a.mode != cap.mode_name for a in others):
        raise PublishConflictError(
            f"volume {volume_id} is published to node(s) {nodes} with another access mode "
            f"than {cap.mode_name}; publish it with one mode everywhere"
        )
    if cap.mode == Mode.MULTI_NODE_MULTI_WRITER and len(others) >= MAX_RWX_BLOCK_NODES:
        raise PublishConflictError(
            f"volume {volume_id} is published read-write to {len(others)} nodes ({nodes}) "
            f"already; a ReadWriteMany block volume serves at most {MAX_RWX_BLOCK_NODES} (the "
            "two ends of a live migration)"
        )


def describe_attachment(a: Attachment) -> str:
    return f"{a.access_type} {a.mode}{' read-only' if a.readonly else ''}"


def publish_context(desc: VolumeDescription) -> dict[str, str]:
    """How the node reaches the volume: its portals, best ALUA state first (the current
    primary's portal leads), the target IQN, the LUN and the NAA id that identifies the LU
    on every path."""
    export = desc.export
    rank = {state: i for i, state in enumerate(SERVING_STATES)}
    portals = sorted(export.portals, key=lambda p: rank.get(p.state, len(rank)))
    context = {
        PUBLISH_PORTALS: ",".join(p.address for p in portals),
        PUBLISH_IQN: export.iqn,
        PUBLISH_LUN: str(export.lun),
        PUBLISH_NAA_ID: export.naa_id,
    }
    if portals:
        context[PUBLISH_PORTAL] = portals[0].address
    return context


def volume_condition(desc: VolumeDescription) -> pb.VolumeCondition:
    serving = [p for p in desc.export.portals if p.state in SERVING_STATES]
    if not serving:
        states = ", ".join(f"{p.address} {p.state.name}" for p in desc.export.portals) or "none"
        return pb.VolumeCondition(
            abnormal=True,
            message=f"no portal serves volume {desc.name} (portals: {states}; role "
            f"{desc.role.name}, epoch {desc.epoch})",
        )
    return pb.VolumeCondition(
        abnormal=False,
        message=f"served on {len(serving)} portal(s); role {desc.role.name}, epoch {desc.epoch}",
    )
