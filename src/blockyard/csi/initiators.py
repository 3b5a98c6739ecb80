"""Which iSCSI initiator name each node logs in with.

The controller and the node derive it the same way from the CSI node id, so the controller can
put a node in a volume's ACL at ControllerPublishVolume without asking the node (CSI gives the
node no other channel to the controller: NodeGetInfo's node_id is capped at 128 bytes and
topology values cannot hold an IQN's ``:``). Both attach paths use it: the userspace initiator
directly, the kernel path through a dedicated open-iscsi interface record whose
``iface.initiatorname`` it sets (the host's own ``/etc/iscsi/initiatorname.iscsi`` is left
alone). The controller also hands the name over in ``publish_context`` so the node can check
that the volume was published for it.
"""

from __future__ import annotations

from typing import Final

from blockyard.iscsi.discovery import iqn_for_volume

#: Naming authority of node initiator names (RFC 7143 §4.2.7.2); names are
#: ``iqn.2024-01.io.blockyard:node.<node id>``.
NODE_INITIATOR_PREFIX: Final = "iqn.2024-01.io.blockyard"


def node_initiator_name(node_id: str) -> str:
    """The initiator IQN of the node with CSI node id ``node_id``: one per node id, distinct for
    distinct ids (ids that are not already valid IQN text get a hash suffix, see
    :func:`~blockyard.iscsi.discovery.iqn_for_volume`), deterministic across processes."""
    return iqn_for_volume(NODE_INITIATOR_PREFIX, f"node.{node_id}")
