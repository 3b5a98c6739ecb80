"""The CSI driver: identity, controller and (separately) node services of ``block.blockyard.io``.

:mod:`~blockyard.csi.server` serves them on a unix socket; the controller provisions through
a :class:`~blockyard.server.backend.VolumeBackend` (a volume server now, the master later).
"""
