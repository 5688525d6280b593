"""Folding observations into the session model, without processes."""

from __future__ import annotations

from takeover_console.model import SessionModel
from takeover_console.observations import event_observation, sample_observation, worker_observation

SERVER_PID = 100
FORWARDER_PID = 200


def server_event(kind: str, t: float, **fields) -> dict:
    return event_observation("server", {"role": "server", "pid": SERVER_PID, "gen": 1, "kind": kind, "mono": t, **fields})


def forwarder_event(kind: str, t: float, **fields) -> dict:
    return event_observation("forwarder", {"role": "forwarder", "pid": FORWARDER_PID, "gen": 1, "kind": kind, "mono": t, **fields})


def client_event(kind: str, t: float, **fields) -> dict:
    return event_observation("client", {"role": "client", "pid": 300, "gen": 1, "kind": kind, "mono": t, **fields})


def handoff(conn: str, t: float, server_fd: int = 9, forwarder_fd: int = 12) -> list[dict]:
    """The observations of one connection handed to the forwarder and answered there."""
    return [
        server_event("accepted", t, conn=conn, peer="127.0.0.1:50000", fd=server_fd, inode=5000),
        server_event("offered", t + 0.0001, conn=conn, fd=server_fd, inode=5000),
        forwarder_event("taken", t + 0.0002, conn=conn, fd=forwarder_fd, inode=5000, peer="127.0.0.1:50000", from_pid=SERVER_PID, peer_fd=server_fd),
        server_event("taken", t + 0.0003, conn=conn, fd=server_fd, peer_fd=forwarder_fd, latency_ms=0.25),
        server_event("released", t + 0.0004, conn=conn, fd=server_fd),
        forwarder_event("served", t + 0.0005, conn=conn, fd=forwarder_fd, bytes_in=9, latency_ms=0.3),
        forwarder_event("closed", t + 0.0006, conn=conn, fd=forwarder_fd, outcome="served"),
        client_event("answered", t + 0.0007, seq=1, by="forwarder", latency_ms=0.8),
    ]


def started_workers(t: float = 1.0) -> list[dict]:
    return [
        worker_observation("forwarder", "forwarder", FORWARDER_PID, 1, "started", "started", t=t),
        worker_observation("server", "server", SERVER_PID, 1, "started", "started", t=t),
        worker_observation("client", "client", 300, 1, "started", "started", t=t),
    ]


def fold(observations: list[dict]) -> SessionModel:
    model = SessionModel()
    for observation in observations:
        model.apply(observation)
    return model


def test_handoff_counts_forwarder_answer():
    model = fold(started_workers() + handoff("100:1", 2.0))
    assert model.counters.by_forwarder == 1
    assert model.counters.handoffs == 1
    assert model.counters.fallbacks == 0
    assert model.processes["forwarder"].answered == 1


def test_handoff_connection_closed_after():
    model = fold(started_workers() + handoff("100:1", 2.0))
    assert "100:1" not in model.connections
    assert model.closed[-1].held_by == ["server", "forwarder"]
    assert model.closed[-1].outcome == "served"


def test_socket_held_by_both_midway():
    observations = started_workers() + handoff("100:1", 2.0)[:3]
    model = fold(observations)
    assert model.connections["100:1"].holders == {"server": 9, "forwarder": 12}


def test_log_tells_handoff_plainly():
    model = fold(started_workers() + handoff("100:1", 2.0))
    texts = [entry.text for entry in model.log]
    assert "server accepted 127.0.0.1:50000 as fd 9" in texts
    assert "handed fd 9 to forwarder, arrived as fd 12 (0.25 ms)" in texts


def test_killed_forwarder_drops_holdings():
    observations = started_workers() + handoff("100:1", 2.0)[:5]
    observations.append(worker_observation("forwarder", "forwarder", FORWARDER_PID, 1, "exited", "exited: killed by SIGKILL (killed with SIGKILL)", t=3.0))
    model = fold(observations)
    assert "100:1" not in model.connections
    assert model.processes["forwarder"].state == "exited"
    assert model.log[-1].text == "forwarder killed (SIGKILL), pid 200"


def test_fallback_counted_with_reason():
    observations = started_workers() + [
        server_event("accepted", 2.0, conn="100:2", peer="127.0.0.1:50001", fd=9, inode=5001),
        server_event("fallback", 2.001, conn="100:2", fd=9, reason="no forwarder"),
        server_event("served", 2.002, conn="100:2", fd=9, bytes_in=9, latency_ms=0.4),
        server_event("closed", 2.003, conn="100:2", fd=9, outcome="served"),
        client_event("answered", 2.004, seq=2, by="server", latency_ms=1.0),
    ]
    model = fold(observations)
    assert model.counters.by_server == 1
    assert model.counters.fallback_reasons["no forwarder"] == 1
    assert "forwarder unreachable: fallback, server serves 127.0.0.1:50001" in [e.text for e in model.log]


def test_rates_bucket_per_second():
    observations = started_workers()
    for i in range(5):
        observations += handoff(f"100:{i}", 10.1 + i * 0.1)
    observations.append(client_event("failed", 11.5, seq=9, error="reset", reply=""))
    model = fold(observations)
    assert model.rates(2) == [(0, 5, 0), (0, 0, 1)]
    assert model.counters.errors["reset"] == 1


def test_sample_sets_process_figures():
    sample = {
        "mono": 5.0,
        "processes": [{"pid": SERVER_PID, "cpu_percent": 3.5, "rss": 1000, "num_fds": 12, "rows": []}],
        "shared": [{"inode": 5000, "holders": [[SERVER_PID, 9], [FORWARDER_PID, 12]]}],
    }
    model = fold(started_workers() + [sample_observation(sample)])
    assert model.processes["server"].cpu_percent == 3.5
    assert model.processes["server"].fds == 12
    assert model.shared_now == 1
    assert model.shared_peak == 1


def test_same_observations_same_model():
    observations = started_workers()
    for i in range(20):
        observations += handoff(f"100:{i}", 2.0 + i * 0.01)
    first, second = fold(observations), fold(observations)
    assert [e.text for e in first.log] == [e.text for e in second.log]
    assert first.counters == second.counters
    assert first.rates(5) == second.rates(5)


def test_close_before_release_finishes():
    """The forwarder may answer and close before the server processes TAKEN and releases."""
    steps = handoff("100:1", 2.0)
    released, closed = steps[4], steps[6]
    steps[4], steps[6] = closed, released
    model = fold(started_workers() + steps)
    assert "100:1" not in model.connections
    assert model.closed[-1].outcome == "served"


def test_forwarder_events_first_no_leak():
    """The forwarder's pipe may deliver a whole connection before the server's events arrive."""
    steps = handoff("100:1", 2.0)
    forwarder_side = [o for o in steps if o["event"]["role"] == "forwarder"]
    server_side = [o for o in steps if o["event"]["role"] == "server"]
    model = fold(started_workers() + forwarder_side + server_side)
    assert model.connections == {}
    assert len(model.closed) == 1


def test_server_events_first_no_leak():
    steps = handoff("100:1", 2.0)
    forwarder_side = [o for o in steps if o["event"]["role"] == "forwarder"]
    server_side = [o for o in steps if o["event"]["role"] == "server"]
    model = fold(started_workers() + server_side + forwarder_side)
    assert model.connections == {}
    assert model.closed[-1].held_by == ["server", "forwarder"]


def test_forwarder_closed_before_server_taken():
    """The forwarder's closed may be folded before the server's taken; the connection still ends."""
    steps = handoff("100:1", 2.0)
    accepted, offered, f_taken, s_taken, released, served, closed, answered = steps
    model = fold(started_workers() + [accepted, offered, f_taken, served, closed, s_taken, released, answered])
    assert model.connections == {}
    assert model.closed[-1].outcome == "served"


def test_restarted_worker_counts_afresh():
    """A worker name started again with a new pid counts its answered requests from zero."""
    killed = worker_observation("forwarder", "forwarder", FORWARDER_PID, 1, "exited", "exited: SIGKILL", t=3.0)
    restarted = worker_observation("forwarder", "forwarder", FORWARDER_PID + 1, 1, "started", "started", t=4.0)
    model = fold(started_workers() + handoff("100:1", 2.0) + [killed, restarted])
    assert model.processes["forwarder"].pid == FORWARDER_PID + 1
    assert model.processes["forwarder"].answered == 0
    assert model.counters.by_forwarder == 1


def test_restarted_client_counts_afresh():
    """A new client process counts its answered requests from zero, while the session totals go on."""
    stopped = worker_observation("client", "client", 300, 1, "exited", "exited: exit code 0", t=3.0)
    restarted = worker_observation("client", "client", 301, 1, "started", "started", t=4.0)
    answer = event_observation("client", {"role": "client", "pid": 301, "gen": 1, "kind": "answered", "mono": 5.0, "seq": 1, "by": "server"})
    model = fold(started_workers() + handoff("100:1", 2.0) + [stopped, restarted, answer])
    assert model.processes["client"].answered == 1
    assert model.counters.by_forwarder + model.counters.by_server == 2


def test_late_earlier_event_sets_opened():
    """A connection's age starts at its earliest event, even when that event arrives later."""
    late_first = [
        server_event("offered", 2.0001, conn="100:1", fd=9, inode=5000),
        server_event("accepted", 2.0, conn="100:1", peer="127.0.0.1:50000", fd=9, inode=5000),
    ]
    model = fold(started_workers() + late_first)
    assert model.connections["100:1"].opened_t == 2.0


def test_bad_field_spares_later_observations():
    """An event with a field of the wrong type is counted and skipped; the observations around it still fold."""
    steps = handoff("100:1", 2.0)
    text_latency = server_event("taken", 2.00005, conn="100:2", fd=10, peer_fd=13, latency_ms="fast")
    list_pid = event_observation("server-2", {"role": "server", "pid": [100], "kind": "started", "mono": 2.00006})
    model = fold(started_workers() + steps[:2] + [text_latency, list_pid] + steps[2:])
    assert model.bad_observations == 2
    assert model.counters.by_forwarder == 1
    assert "100:1" not in model.connections


def test_odd_names_not_folded():
    """A worker or event whose role, state or pid has the wrong type changes nothing the panes show."""
    odd_state = worker_observation("forwarder", "forwarder", FORWARDER_PID, 1, "started", "started", t=3.0)
    odd_state["state"] = ["running"]
    odd_role = event_observation("forwarder", {"role": ["forwarder"], "pid": FORWARDER_PID, "kind": "listening", "mono": 3.1})
    odd_pid = worker_observation("client", "client", 301, 1, "started", "started", t=3.2)
    odd_pid["pid"] = "301"
    model = fold(started_workers() + [odd_state, odd_role, odd_pid])
    assert model.bad_observations == 3
    assert model.processes["forwarder"].state == "starting"
    assert model.processes["forwarder"].role == "forwarder"
    assert model.processes["client"].pid == 300


def test_listening_labels_control_socket():
    listening = server_event("listening", 1.5, addr="127.0.0.1:8080", fd=5, inode=7001, control="/run/c.sock", control_inode=7002)
    model = fold([*started_workers(), listening])
    assert model.inode_labels[7001] == "listener"
    assert model.inode_labels[7002] == "control socket"
