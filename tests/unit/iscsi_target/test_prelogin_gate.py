"""PreloginGate: the pool of connections that have not logged in yet (caps, per-peer share,
which idle connection makes way for a newcomer, refusal when none can)."""

from __future__ import annotations

import pytest

from blockyard.server.iscsi_limits import PreloginGate


class Conn:
    def __init__(self, name: str, *, idle: bool = True) -> None:
        self.name = name
        self.idle = idle

    def __repr__(self) -> str:
        return self.name


def gate(total_max: int = 4, per_peer_max: int = 2) -> PreloginGate[Conn]:
    return PreloginGate(total_max, per_peer_max, lambda c: c.idle)


def test_admits_up_to_the_caps_then_displaces_the_oldest_idle_of_the_same_peer() -> None:
    g = gate()
    a1, a2, a3 = Conn("a1"), Conn("a2"), Conn("a3")
    assert g.admit(a1, "A").admitted and g.admit(a2, "A").admitted
    result = g.admit(a3, "A")
    assert result.admitted and result.evicted == [a1]
    assert a1 not in g and a2 in g and a3 in g
    assert g.peer_count("A") == 2 and len(g) == 2
    assert g.take_counts() == (0, 1) and g.take_counts() == (0, 0)


def test_a_peer_whose_connections_all_sent_a_login_request_gets_refused() -> None:
    g = gate()
    busy = [Conn("a1", idle=False), Conn("a2", idle=False)]
    for c in busy:
        assert g.admit(c, "A").admitted
    result = g.admit(Conn("a3"), "A")
    assert not result.admitted and result.evicted == []
    assert all(c in g for c in busy)
    assert g.take_counts() == (1, 0)


def test_at_the_total_cap_a_newcomer_displaces_its_own_peer_first() -> None:
    g = gate(total_max=4, per_peer_max=3)
    b1 = Conn("b1")  # the oldest idle overall, of another peer
    a1, a2, a3 = Conn("a1"), Conn("a2"), Conn("a3")
    for conn, peer in ((b1, "B"), (a1, "A"), (a2, "A"), (a3, "A")):
        assert g.admit(conn, peer).admitted
    # C has nothing of its own: the oldest idle of anyone (b1) makes way.
    c1 = Conn("c1")
    assert g.admit(c1, "C").evicted == [b1]
    # A is under its own cap but the pool is full: it displaces its own oldest, not c1.
    a4 = Conn("a4")
    assert g.admit(a4, "A").evicted == [a1]
    assert c1 in g and len(g) == 4


def test_a_connection_that_sent_a_login_request_is_never_displaced() -> None:
    g = gate(total_max=2, per_peer_max=2)
    real = Conn("real", idle=False)
    idle = Conn("idle")
    assert g.admit(real, "A").admitted and g.admit(idle, "B").admitted
    newcomer = Conn("x", idle=False)
    assert g.admit(newcomer, "C").evicted == [idle]
    # Both left have sent a Login Request: the next newcomer is refused, nobody displaced.
    result = g.admit(Conn("y"), "D")
    assert not result.admitted and real in g and newcomer in g


def test_forget_is_idempotent_and_frees_the_peer_share() -> None:
    g = gate()
    a1 = Conn("a1")
    g.admit(a1, "A")
    g.forget(a1)
    g.forget(a1)
    assert len(g) == 0 and g.peer_count("A") == 0
    assert g.admit(Conn("a2"), "A").admitted


def test_bad_caps_are_refused() -> None:
    with pytest.raises(ValueError):
        PreloginGate(1, 2, lambda c: True)
    with pytest.raises(ValueError):
        PreloginGate(0, 0, lambda c: True)
