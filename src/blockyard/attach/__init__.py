"""Node attach layer: how a node turns an exported volume into a local block device.

Two paths share one seam: the kernel path (open-iscsi + dm-multipath, for real nodes) and the
userspace path (blockyard's own iSCSI initiator, for machines without a kernel initiator).
"""
