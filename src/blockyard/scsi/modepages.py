"""Mode pages (SPC-4 §7.5, SBC-4 §6.5): MODE SENSE data and MODE SELECT parsing.

Only the caching page's WCE bit is changeable. WCE=0 makes every write FUA, which is what
write-through means for a device whose durability barrier is ``flush()``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from blockyard.scsi.constants import PARAMETER_LIST_LENGTH_ERROR, SAVING_PARAMETERS_NOT_SUPPORTED
from blockyard.scsi.sense import CommandError, cdb_error, illegal, param_error

# SPC-4 §7.5.1 / SBC-4 §6.5.1 page codes.
PAGE_RW_ERROR_RECOVERY: Final = 0x01  # SBC-4 §6.5.10
PAGE_DISCONNECT_RECONNECT: Final = 0x02  # SPC-4 §7.5.9
PAGE_CACHING: Final = 0x08  # SBC-4 §6.5.5
PAGE_CONTROL: Final = 0x0A  # SPC-4 §7.5.8
PAGE_INFORMATIONAL_EXCEPTIONS: Final = 0x1C  # SBC-4 §6.5.8
PAGE_ALL: Final = 0x3F
SUBPAGE_ALL: Final = 0xFF

# SPC-4 §6.11 Table 150 PAGE CONTROL.
PC_CURRENT: Final = 0
PC_CHANGEABLE: Final = 1
PC_DEFAULT: Final = 2
PC_SAVED: Final = 3

CACHING_WCE: Final = 0x04
#: SBC-4 §6.3.1: DPOFUA in the device-specific parameter (DPO and FUA are honoured).
DEVICE_SPECIFIC_DPOFUA: Final = 0x10
#: MODE SELECT parameter lists longer than header + descriptor + every page are refused.
MODE_SELECT_PARAM_LEN_MAX: Final = 512


def _defaults() -> dict[int, bytes]:
    caching = bytearray(0x14)
    caching[0:2] = bytes([PAGE_CACHING, 0x12])
    caching[2] = CACHING_WCE
    control = bytearray(0x0C)
    control[0:2] = bytes([PAGE_CONTROL, 0x0A])
    control[2] = 0x02  # GLTSD: no implicit log saving
    control[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering allowed
    struct.pack_into(">H", control, 8, 0xFFFF)  # BUSY TIMEOUT PERIOD: unlimited
    rw = bytearray(0x0C)
    rw[0:2] = bytes([PAGE_RW_ERROR_RECOVERY, 0x0A])
    rw[2] = 0xC0  # AWRE, ARRE: reallocation is the backing store's business
    disconnect = bytearray(0x10)
    disconnect[0:2] = bytes([PAGE_DISCONNECT_RECONNECT, 0x0E])
    iec = bytearray(0x0C)
    iec[0:2] = bytes([PAGE_INFORMATIONAL_EXCEPTIONS, 0x0A])
    iec[2] = 0x08  # DEXCPT: no informational exception reporting
    return {
        PAGE_RW_ERROR_RECOVERY: bytes(rw),
        PAGE_DISCONNECT_RECONNECT: bytes(disconnect),
        PAGE_CACHING: bytes(caching),
        PAGE_CONTROL: bytes(control),
        PAGE_INFORMATIONAL_EXCEPTIONS: bytes(iec),
    }


DEFAULT_PAGES: Final = _defaults()


def _changeable() -> dict[int, bytes]:
    masks = {code: bytes(2) + bytes(len(page) - 2) for code, page in DEFAULT_PAGES.items()}
    caching = bytearray(masks[PAGE_CACHING])
    caching[2] = CACHING_WCE
    masks[PAGE_CACHING] = bytes(caching)
    return {code: DEFAULT_PAGES[code][:2] + mask[2:] for code, mask in masks.items()}


CHANGEABLE_PAGES: Final = _changeable()


@dataclass(frozen=True, slots=True)
class ModeSenseRequest:
    ten_byte: bool
    dbd: bool
    llbaa: bool
    pc: int
    page: int
    subpage: int


def parse_mode_sense(cdb: bytes | memoryview) -> ModeSenseRequest:
    ten = cdb[0] == 0x5A
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc = cdb[2] >> 6
    page = cdb[2] & 0x3F
    subpage = cdb[3]
    if pc == PC_SAVED:
        raise illegal(SAVING_PARAMETERS_NOT_SUPPORTED)
    if page != PAGE_ALL and page not in DEFAULT_PAGES:
        raise cdb_error(2, 5)
    if subpage not in (0, SUBPAGE_ALL):
        raise cdb_error(3)
    return ModeSenseRequest(ten, dbd, llbaa, pc, page, subpage)


def mode_sense(
    req: ModeSenseRequest, current: dict[int, bytes], block_count: int, block_size: int
) -> bytes:
    """Full MODE SENSE (6) or (10) data, header and block descriptor included."""
    source = {
        PC_CURRENT: current,
        PC_CHANGEABLE: CHANGEABLE_PAGES,
        PC_DEFAULT: DEFAULT_PAGES,
    }[req.pc]
    codes = sorted(source) if req.page == PAGE_ALL else [req.page]
    # Pages are returned in ascending order with PAGE_ALL, page 0 last (SPC-4 §6.11).
    pages = b"".join(source[c] for c in codes)
    desc = b""
    if not req.dbd:
        if req.llbaa:
            desc = struct.pack(">Q4xI", block_count, block_size)
        else:
            # SPC-4 §7.5.5: NUMBER OF LOGICAL BLOCKS, a reserved byte, 3-byte BLOCK LENGTH.
            desc = struct.pack(">II", min(block_count, 0xFFFFFFFF), block_size & 0xFFFFFF)
    if req.ten_byte:
        header_len = 8
        total = header_len + len(desc) + len(pages)
        header = struct.pack(
            ">HBBBxH",
            total - 2,
            0,
            DEVICE_SPECIFIC_DPOFUA,
            0x01 if desc and req.llbaa else 0,
            len(desc),
        )
    else:
        header_len = 4
        total = header_len + len(desc) + len(pages)
        header = bytes([min(total - 1, 0xFF), 0, DEVICE_SPECIFIC_DPOFUA, len(desc)])
    return header + desc + pages


def mode_select(
    cdb: bytes | memoryview, params: bytes | memoryview, current: dict[int, bytes], block_size: int
) -> dict[int, bytes] | None:
    """Apply MODE SELECT (6)/(10). Returns the new current pages, or None if nothing changed.

    Raises CommandError for SP=1, malformed lists, unknown pages and attempts to change bits
    that are not changeable (SPC-4 §6.9, §6.10).
    """
    ten = cdb[0] == 0x55
    if cdb[1] & 0x01:
        # SP=1: saved pages are not kept (SPC-4 §6.9: INVALID FIELD IN CDB).
        raise cdb_error(1, 0)
    header_len = 8 if ten else 4
    if not params:
        return None
    if len(params) < header_len:
        raise illegal(PARAMETER_LIST_LENGTH_ERROR)
    if ten:
        desc_len = int.from_bytes(params[6:8], "big")
        long_lba = bool(params[4] & 0x01)
    else:
        desc_len = params[3]
        long_lba = False
    pos = header_len
    if desc_len:
        unit = 16 if long_lba else 8
        if desc_len % unit or pos + desc_len > len(params):
            raise param_error(6 if ten else 3)
        for off in range(pos, pos + desc_len, unit):
            length = int.from_bytes(params[off + unit - 3 : off + unit], "big")
            if length != block_size:
                raise param_error(off + unit - 3)
        pos += desc_len
    new = dict(current)
    while pos < len(params):
        code = params[pos] & 0x3F
        if params[pos] & 0x40:
            # SPF: no subpages are supported.
            raise param_error(pos, 6)
        if pos + 2 > len(params):
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        length = params[pos + 1]
        page = bytes(params[pos : pos + 2 + length])
        if code not in DEFAULT_PAGES:
            raise param_error(pos, 5)
        if len(page) != 2 + length:
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        if len(page) != len(DEFAULT_PAGES[code]):
            raise param_error(pos + 1)
        mask = CHANGEABLE_PAGES[code]
        old = new[code]
        for i in range(2, len(page)):
            if (page[i] ^ old[i]) & ~mask[i] & 0xFF:
                raise param_error(pos + i, ((page[i] ^ old[i]) & ~mask[i] & 0xFF).bit_length() - 1)
        new[code] = old[:2] + page[2:]
        pos += len(page)
    return None if new == current else new


def check_mode_select_length(length: int, byte: int) -> None:
    if length > MODE_SELECT_PARAM_LEN_MAX:
        raise cdb_error(byte)


__all__ = ["CommandError", "ModeSenseRequest", "mode_select", "mode_sense", "parse_mode_sense"]
