"""Plain-words lines for the handoff event log, one per observation worth telling."""

from __future__ import annotations

from typing import Protocol


class PeerLookup(Protocol):
    """What narration needs from the model: a connection's client address."""

    def peer_of(self, conn_id: str) -> str: ...


def describe_event(event: dict, lookup: PeerLookup) -> str | None:
    """Return the log line for one worker event, or None for events the log leaves out."""
    kind = event.get("kind")
    role = event.get("role", "?")
    conn = str(event.get("conn", ""))
    if kind == "accepted":
        return f"server accepted {event.get('peer')} as fd {event.get('fd')}"
    if kind == "offered":
        return f"server offered fd {event.get('fd')} ({lookup.peer_of(conn)}) to the forwarder"
    if kind == "taken" and role == "server":
        return f"handed fd {event.get('fd')} to forwarder, arrived as fd {event.get('peer_fd')} ({event.get('latency_ms', 0):.2f} ms)"
    if kind == "taken":
        origin = f"server fd {event['peer_fd']}" if event.get("peer_fd") is not None else f"pid {event.get('from_pid')}"
        return f"forwarder took {event.get('peer') or lookup.peer_of(conn)} as fd {event.get('fd')} (from {origin})"
    if kind == "released":
        return f"server closed its copy, fd {event.get('fd')}"
    if kind == "rejected":
        return f"forwarder rejected {lookup.peer_of(conn)}: {event.get('reason')}"
    if kind == "fallback":
        return _describe_fallback(event, lookup.peer_of(conn))
    if kind == "queried":
        return f"{role} checked who serves {lookup.peer_of(conn)}: {event.get('owner', 'asked')}"
    if kind == "closed" and event.get("outcome") != "served":
        return f"{role} closed fd {event.get('fd')} without a reply: {event.get('outcome')}"
    if kind == "channel_up" and role == "server":
        return f"handoff channel up between {role} pid {event.get('pid')} and {event.get('peer_role')} pid {event.get('peer_pid')}"
    if kind == "channel_down":
        return f"handoff channel down ({role} side): {event.get('reason')}"
    if kind == "peer_refused":
        return f"{role} refused peer pid {event.get('peer_pid')}: {event.get('reason')}"
    if kind == "listening":
        where = event.get("addr") or event.get("path")
        return f"{role} listening on {where} (fd {event.get('fd')}, inode {event.get('inode')})"
    if kind == "stopping":
        return f"{role} stopping, {event.get('in_flight', 0)} connections in flight"
    if kind == "error":
        return f"{role} error: {event.get('message')}"
    if kind == "takeover":
        return _describe_takeover(event)
    if kind == "slow_motion":
        return "slow motion on: the server keeps its copy after TAKEN" if event.get("on") else "slow motion off"
    if kind == "failed":
        return f"client request {event.get('seq')} failed: {event.get('error')}"
    return None


def _describe_takeover(event: dict) -> str | None:
    role = event.get("role", "?")
    pid = event.get("pid")
    other = event.get("peer_pid")
    phase = event.get("phase")
    old_side = event.get("side") == "old"
    if phase == "requested" and old_side:
        return f"takeover requested: new {role} pid {other} asks pid {pid} for its listeners"
    if phase == "fds_sent":
        return f"{role} pid {pid} sent {event.get('count')} listening sockets in {event.get('batches')} message(s), inodes {_inodes(event)}"
    if phase == "fds_received":
        return f"{role} pid {pid} (generation {event.get('gen')}) received listeners, inodes {_inodes(event)}"
    if phase == "ready" and old_side:
        return f"READY from pid {other}: it accepts on the same sockets, pid {pid} stops accepting"
    if phase == "draining":
        return f"old {role} pid {pid} draining {event.get('in_flight', 0)} in flight"
    if phase == "drained" and old_side:
        text = f"old {role} pid {pid} drained: {event.get('served', 0)} finished, {event.get('cut', 0)} cut off"
        if event.get("left"):
            text += f", {event.get('left')} left to the forwarder"
        return text
    if phase == "aborted":
        return f"takeover aborted, {role} pid {pid} keeps the listeners: {event.get('reason')}"
    if phase == "refused":
        return f"takeover refused: {event.get('reason')}"
    return None


def _inodes(event: dict) -> str:
    return ", ".join(str(inode) for inode in event.get("inodes") or [])


def _describe_fallback(event: dict, peer: str) -> str:
    reason = str(event.get("reason", ""))
    if reason == "no forwarder":
        return f"forwarder unreachable: fallback, server serves {peer}"
    return f"fallback, server serves {peer}: {reason}"


def describe_worker(observation: dict) -> str | None:
    """Return the log line for a worker state change reported by the supervisor."""
    state = observation.get("state")
    name = observation.get("worker")
    pid = observation.get("pid")
    detail = str(observation.get("detail", ""))
    if state == "started":
        return f"{name} started as pid {pid}"
    if state == "exited":
        if "SIGKILL" in detail and "killed with SIGKILL" in detail:
            return f"{name} killed (SIGKILL), pid {pid}"
        return f"{name} pid {pid} {detail.removeprefix('exited: ')}"
    if state == "stopping":
        return f"{name} pid {pid} asked to stop (SIGTERM)"
    return None
