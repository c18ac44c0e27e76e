"""What `pdlaunch bench kv-transfer` reports (kv_transfer.py): one row per (connector, mode, prompt length), and a
table per connector of its GB/s next to the raw copies of the same bytes."""

from __future__ import annotations

from typing import TypedDict

from rich import box
from rich.console import Console
from rich.table import Table

from pdlaunch.bench.report import MS_PER_S


class KVTransferRow(TypedDict):
    """One (connector, mode, prompt length) row of `bench kv-transfer` (kv_transfer.py)."""

    connector: str
    transport: str | None
    mode: str
    num_tokens: int
    concurrency: int  # requests started at once per timed transfer; bytes and seconds are all of theirs
    bytes: int
    descriptors: int
    seconds: float
    gbps: float
    raw_copy_gbps: float
    peer_copy_gbps: float | None
    verified: bool
    prefill_device: str
    decode_device: str
    cumem: bool
    staging: dict[str, int] | None  # the connector's staging buffer, if it stages
    push_phases_ms: dict[str, float] | None


def print_kv_transfer_table(console: Console, rows: list[KVTransferRow]) -> None:
    """Rows of run_kv_transfer_bench: GB/s of the connector next to the raw copies of the same run; one
    table per connector (NIXL first when there are several)."""
    if rows:
        console.print(f"prefill on {rows[0]['prefill_device']}, decode on {rows[0]['decode_device']}", highlight=False,
                      markup=False)
    for connector in dict.fromkeys(r["connector"] for r in rows):
        own = [r for r in rows if r["connector"] == connector]
        transport = f" over {own[0]['transport']}" if own[0]["transport"] else ""
        _print_kv_connector_table(console, own, "" if connector == "nixl" and len(own) == len(rows)
                                  else f" ({connector}{transport})")


def _print_kv_connector_table(console: Console, rows: list[KVTransferRow], which: str) -> None:
    # No vertical rules and whole cells: eleven boxed columns did not fit 80 terminal columns, and rich cut the
    # figures themselves to an ellipsis ("862.…" ms)
    table = Table(title=f"KV transfer through the connector{which}", title_justify="left",
                  caption="raw, peer: GB/s of torch copies of the same bytes", caption_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for col in ("mode", "tokens", "MiB", "descs", "ms", "GB/s", "raw", "%raw", "peer", "%peer", "ok"):
        table.add_column(col, justify="left" if col in ("mode", "ok") else "right", no_wrap=True, overflow="fold")
    for r in rows:
        peer = r["peer_copy_gbps"]
        table.add_row(
            str(r["mode"]), str(r["num_tokens"]) if r["concurrency"] == 1 else f"{r['concurrency']}x{r['num_tokens']}",
            f"{r['bytes'] / 2**20:.1f}", str(r["descriptors"]),
            f"{r['seconds'] * MS_PER_S:.2f}", f"{r['gbps']:.2f}", f"{r['raw_copy_gbps']:.1f}",
            f"{100 * r['gbps'] / r['raw_copy_gbps']:.0f}%", "-" if peer is None else f"{peer:.1f}",
            "-" if peer is None else f"{100 * r['gbps'] / peer:.0f}%", "yes" if r["verified"] else "[red]NO[/red]",
        )
    console.print(table)
