"""Who the logical unit says it is: standard INQUIRY data and the VPD pages (SPC-4 §6.6, §7.8).

The NAA identifier is derived from the volume UUID alone, so every server exporting the same
volume reports the same device identity (multipath groups the paths) and no two volumes share
one (multipath never merges different volumes).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass
from typing import Final

from blockyard.blockdev import BlockDevice
from blockyard.scsi.nexus import Nexus

# SBC-4 §6.6.4 Block Limits values this target advertises and enforces.
MAX_COMPARE_AND_WRITE_BLOCKS: Final = 1  # one logical block keeps the compare lock short
#: 512 MiB of 512-byte blocks per UNMAP descriptor; libiscsi treats more than 1 Mi as bogus.
MAX_UNMAP_LBA_COUNT: Final = 1 << 20
MAX_UNMAP_DESCRIPTORS: Final = 256
MAX_WRITE_SAME_BLOCKS: Final = 1 << 21
#: SBC-4 §5.32.2: UNMAP parameter list = 8-byte header + 16 bytes per block descriptor.
UNMAP_PARAM_LEN_MAX: Final = 8 + 16 * MAX_UNMAP_DESCRIPTORS

# SPC-4 §6.6.2 standard INQUIRY data.
PERIPHERAL_DEVICE_TYPE_DISK: Final = 0x00
VERSION_SPC4: Final = 0x06
RESPONSE_DATA_FORMAT: Final = 0x02
STANDARD_INQUIRY_LEN: Final = 74
# SPC-4 §6.6.2 Table 142 (version descriptors): SAM-5, SPC-4, SBC-3, iSCSI.
VERSION_DESCRIPTORS: Final = (0x00A0, 0x0460, 0x04C0, 0x0960)

# SPC-4 §7.8 VPD page codes.
VPD_SUPPORTED_PAGES: Final = 0x00
VPD_UNIT_SERIAL_NUMBER: Final = 0x80
VPD_DEVICE_IDENTIFICATION: Final = 0x83
VPD_BLOCK_LIMITS: Final = 0xB0  # SBC-4 §6.6.4
VPD_BLOCK_DEVICE_CHARACTERISTICS: Final = 0xB1  # SBC-4 §6.6.2
VPD_LOGICAL_BLOCK_PROVISIONING: Final = 0xB2  # SBC-4 §6.6.6
SUPPORTED_VPD_PAGES: Final = (
    VPD_SUPPORTED_PAGES,
    VPD_UNIT_SERIAL_NUMBER,
    VPD_DEVICE_IDENTIFICATION,
    VPD_BLOCK_LIMITS,
    VPD_BLOCK_DEVICE_CHARACTERISTICS,
    VPD_LOGICAL_BLOCK_PROVISIONING,
)

# SPC-4 §7.8.6.1 Table 459/460/461: code sets, associations, designator types.
CODE_SET_BINARY: Final = 0x1
CODE_SET_ASCII: Final = 0x2
CODE_SET_UTF8: Final = 0x3
ASSOC_LU: Final = 0x0
ASSOC_TARGET_PORT: Final = 0x1
ASSOC_TARGET_DEVICE: Final = 0x2
DESIG_T10_VENDOR: Final = 0x1
DESIG_NAA: Final = 0x3
DESIG_RELATIVE_TARGET_PORT: Final = 0x4
DESIG_TARGET_PORT_GROUP: Final = 0x5
DESIG_SCSI_NAME_STRING: Final = 0x8
PROTOCOL_ID_ISCSI: Final = 0x5
#: SPC-4 §7.8.6.6.5: NAA 6h = IEEE Registered Extended.
NAA_IEEE_REGISTERED_EXTENDED: Final = 0x6
#: A locally administered IEEE Company ID (CID format, X bit set in the first octet). Deployments
#: that own an OUI set theirs in :class:`LuIdentity`.
DEFAULT_COMPANY_ID: Final = 0x5A_B1_0C

# SBC-4 §6.6.2: MEDIUM ROTATION RATE 0001h = non-rotating medium (solid state).
NON_ROTATING_MEDIUM: Final = 0x0001


def _ascii_field(text: str, width: int) -> bytes:
    raw = text.encode("ascii", "replace")[:width]
    return raw.ljust(width, b" ")


@dataclass(frozen=True, slots=True)
class LuIdentity:
    """Inquiry identity of one exported volume.

    ``volume_uuid`` is the only input to the NAA designator and unit serial number.
    """

    volume_uuid: uuid.UUID
    vendor_id: str = "BLOCKYRD"
    product_id: str = "blockyard volume"
    product_revision: str = "0001"
    company_id: int = DEFAULT_COMPANY_ID

    def __post_init__(self) -> None:
        if not 0 <= self.company_id < 1 << 24:
            raise ValueError(f"company_id {self.company_id:#x} is not a 24-bit IEEE identifier")

    @property
    def serial(self) -> str:
        return self.volume_uuid.hex

    def naa_id(self) -> bytes:
        """16-byte NAA 6h designator: NAA | company id | 100 bits from SHA-256(UUID)."""
        digest = int.from_bytes(hashlib.sha256(self.volume_uuid.bytes).digest()[:13], "big")
        vendor_bits = digest >> 4  # 100 bits: 36-bit vendor id + 64-bit extension
        value = (NAA_IEEE_REGISTERED_EXTENDED << 124) | (self.company_id << 100) | vendor_bits
        return value.to_bytes(16, "big")


def standard_inquiry(identity: LuIdentity) -> bytes:
    data = bytearray(STANDARD_INQUIRY_LEN)
    data[0] = PERIPHERAL_DEVICE_TYPE_DISK
    data[2] = VERSION_SPC4
    data[3] = 0x10 | RESPONSE_DATA_FORMAT  # HISUP: LUNs are hierarchical (SAM-5)
    data[4] = STANDARD_INQUIRY_LEN - 5
    data[5] = 0x10  # TPGS 01b: implicit ALUA only
    data[6] = 0x10  # MULTIP: the volume is reachable through several servers' ports
    data[7] = 0x02  # CMDQUE
    data[8:16] = _ascii_field(identity.vendor_id, 8)
    data[16:32] = _ascii_field(identity.product_id, 16)
    data[32:36] = _ascii_field(identity.product_revision, 4)
    for i, descriptor in enumerate(VERSION_DESCRIPTORS):
        struct.pack_into(">H", data, 58 + 2 * i, descriptor)
    return bytes(data)


def _designator(code_set: int, piv_assoc_type: int, value: bytes) -> bytes:
    return bytes([code_set, piv_assoc_type, 0, len(value)]) + value


def _port_designator(code_set: int, assoc: int, kind: int, value: bytes) -> bytes:
    # PIV=1 with PROTOCOL IDENTIFIER iSCSI for port and target-device associations.
    return _designator((PROTOCOL_ID_ISCSI << 4) | code_set, 0x80 | (assoc << 4) | kind, value)


def _name_string(name: str) -> bytes:
    raw = name.encode()[:251] + b"\x00"
    return raw + bytes(-len(raw) % 4)


def _page(code: int, body: bytes) -> bytes:
    return bytes([PERIPHERAL_DEVICE_TYPE_DISK, code]) + len(body).to_bytes(2, "big") + body


def device_identification(identity: LuIdentity, nexus: Nexus) -> bytes:
    vendor = _ascii_field(identity.vendor_id, 8) + identity.serial.encode()
    body = _designator(CODE_SET_BINARY, (ASSOC_LU << 4) | DESIG_NAA, identity.naa_id())
    body += _designator(CODE_SET_ASCII, (ASSOC_LU << 4) | DESIG_T10_VENDOR, vendor)
    body += _port_designator(
        CODE_SET_BINARY,
        ASSOC_TARGET_PORT,
        DESIG_RELATIVE_TARGET_PORT,
        struct.pack(">2xH", nexus.relative_target_port_id & 0xFFFF),
    )
    body += _port_designator(
        CODE_SET_BINARY,
        ASSOC_TARGET_PORT,
        DESIG_TARGET_PORT_GROUP,
        struct.pack(">2xH", nexus.target_port_group_id & 0xFFFF),
    )
    if nexus.target_port_name:
        body += _port_designator(
            CODE_SET_UTF8,
            ASSOC_TARGET_PORT,
            DESIG_SCSI_NAME_STRING,
            _name_string(nexus.target_port_name),
        )
        target_name = nexus.target_port_name.split(",t,", 1)[0]
        body += _port_designator(
            CODE_SET_UTF8, ASSOC_TARGET_DEVICE, DESIG_SCSI_NAME_STRING, _name_string(target_name)
        )
    return _page(VPD_DEVICE_IDENTIFICATION, body)


def block_limits(device: BlockDevice) -> bytes:
    lbs = device.logical_block_size
    granularity = max(1, device.physical_block_size // lbs)
    max_transfer = device.max_transfer_blocks
    body = bytearray(0x3C)
    body[0] = 0x01  # WSNZ: WRITE SAME with zero blocks is refused, see SBC-4 §5.48
    body[1] = MAX_COMPARE_AND_WRITE_BLOCKS
    struct.pack_into(">HII", body, 2, granularity, max_transfer, max_transfer)
    struct.pack_into(">I", body, 12, 0)  # MAXIMUM PREFETCH LENGTH: PRE-FETCH is a no-op
    struct.pack_into(
        ">IIII", body, 16, MAX_UNMAP_LBA_COUNT, MAX_UNMAP_DESCRIPTORS, granularity, 0x80000000
    )  # UGAVALID=1, alignment 0
    struct.pack_into(">Q", body, 32, MAX_WRITE_SAME_BLOCKS)
    return _page(VPD_BLOCK_LIMITS, bytes(body))


def block_device_characteristics() -> bytes:
    body = bytearray(0x3C)
    struct.pack_into(">H", body, 0, NON_ROTATING_MEDIUM)
    return _page(VPD_BLOCK_DEVICE_CHARACTERISTICS, bytes(body))


def logical_block_provisioning() -> bytes:
    # SBC-4 §6.6.6: LBPU, LBPWS, LBPWS10 set; LBPRZ 001b (unmapped blocks read as zeros);
    # ANC_SUP=0; PROVISIONING TYPE 010b = thin.
    return _page(VPD_LOGICAL_BLOCK_PROVISIONING, bytes([0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0]))


def supported_pages() -> bytes:
    return _page(VPD_SUPPORTED_PAGES, bytes(SUPPORTED_VPD_PAGES))


def unit_serial(identity: LuIdentity) -> bytes:
    return _page(VPD_UNIT_SERIAL_NUMBER, identity.serial.encode())


def vpd_page(code: int, identity: LuIdentity, device: BlockDevice, nexus: Nexus) -> bytes | None:
    """The full VPD page ``code``, or None when it is not supported."""
    if code == VPD_SUPPORTED_PAGES:
        return supported_pages()
    if code == VPD_UNIT_SERIAL_NUMBER:
        return unit_serial(identity)
    if code == VPD_DEVICE_IDENTIFICATION:
        return device_identification(identity, nexus)
    if code == VPD_BLOCK_LIMITS:
        return block_limits(device)
    if code == VPD_BLOCK_DEVICE_CHARACTERISTICS:
        return block_device_characteristics()
    if code == VPD_LOGICAL_BLOCK_PROVISIONING:
        return logical_block_provisioning()
    return None
