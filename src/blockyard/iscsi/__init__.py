"""Sans-IO iSCSI protocol core (RFC 7143): PDU codec, text keys, negotiation, CHAP, login.

Nothing in this package touches a socket or an event loop; asyncio adapters wrap it.
"""
