"""What ``ecsclient`` prints: the human C{status}, member ranges and shares, and the progress of
a running reconfiguration (L{ProgressPrinter})."""

from __future__ import annotations

from typing import Any, TextIO

from chainstore.ring import RING_BITS


def format_progress(operation: dict[str, Any]) -> str:
    """The progress line of a running reconfiguration (the C{operation} of C{Status})."""
    return (f"moving: {operation['step']} {operation['keys_moved']} keys, "
            f"{operation['bytes_moved']} bytes, {float(operation['seconds']):.1f}s")


def _abbreviate(position: str) -> str:
    return position[:8]


def format_range(entry: dict[str, Any]) -> str:
    """A member's range C{(from, to]} with each end cut to 8 hex digits; C{-} if it has none."""
    if "range" not in entry:
        return "-"
    start, end = entry["range"]
    if start == end:
        return "whole ring"
    return f"{_abbreviate(start)}..{_abbreviate(end)}"


def format_share(entry: dict[str, Any]) -> str:
    """The part of the key space a member heads (what balanced placement evens out)."""
    if "range" not in entry:
        return "-"
    start, end = (int(bound, 16) for bound in entry["range"])
    size = (end - start) % (1 << RING_BITS) or 1 << RING_BITS
    return f"{size / (1 << RING_BITS):.1%}"


def format_status(status: dict[str, Any]) -> str:
    """The human C{status}: a summary line, the ring, a table of members, the operation."""
    summary = [f"epoch {status['epoch']}", "serving" if status["serving"] else "stopped",
               f"replication {status['replication']}"]
    if status.get("degraded"):
        summary.append(f"DEGRADED: {len(status['ring'])} server(s) in the ring, fewer than the "
                       f"replication factor")
    lines = [", ".join(summary)]
    leader = status.get("leader")
    if leader:
        # several ECS (state in etcd): who answered, and who stands by
        standbys = ", ".join(f"{s['name']} ({s['address']})" for s in status.get("standbys", []))
        lines.append(f"leader: {leader['name']} ({leader['address']}); standbys: "
                     f"{standbys or 'none'}")
    lines.append("ring: " + (" ".join(status["ring"]) or "(empty)"))
    rows = [("NAME", "STATUS", "CONSOLE", "RANGE (FROM..TO]", "SHARE", "HEARTBEAT",
             "CONNECTED")]
    for m in status["members"]:
        heartbeat = m.get("last_heartbeat_s")
        rows.append((
            m["name"], m["status"], m["console"], format_range(m), format_share(m),
            "-" if heartbeat is None else f"{float(heartbeat):.1f}s ago",
            "yes" if m["connected"] else "no",
        ))
    if len(rows) == 1:
        lines.append("no servers")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    lines.extend(format_chains(status.get("chains") or []))
    op = status.get("operation")
    if op:
        lines.append(f"operation: {op['description']}: " + format_progress(op)[len("moving: "):])
    return "\n".join(lines)


def format_chains(chains: list[dict[str, Any]]) -> list[str]:
    """A table of each range's chain with its head's lag (writes not yet acknowledged by the
    tail) and window (batches in flight), as the head last reported them."""
    if not chains:
        return []
    rows = [("CHAIN (RANGE OF)", "HEAD", "MIDDLE", "TAIL", "LAG", "WINDOW")]
    for c in chains:
        rows.append((c["owner"], c["head"] or "-", ",".join(c["middle"]) or "-",
                     c["tail"] or "-", "-" if c["lag"] is None else str(c["lag"]),
                     "-" if c["window"] is None else str(c["window"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


class ProgressPrinter:
    """Shows progress lines as they change: on a terminal one line rewritten in place, on a pipe
    one line per change (of step, keys or bytes: the seconds alone do not make a new line)."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self._last: tuple[Any, ...] | None = None
        self._drawn = False

    def update(self, operation: dict[str, Any] | None) -> None:
        if not operation:
            return
        line = format_progress(operation)
        if self.tty:
            self.out.write("\r" + line + "\x1b[K")
            self._drawn = True
        else:
            state = (operation["step"], operation["keys_moved"], operation["bytes_moved"])
            if state == self._last:
                return
            self._last = state
            self.out.write(line + "\n")
        self.out.flush()

    def finish(self) -> None:
        """End the rewritten line, so the answer starts on a line of its own."""
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False
