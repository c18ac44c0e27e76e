"""`pdlaunch bench kv-transfer`'s table in an 80-column terminal: every figure whole, none cut to an ellipsis."""

from __future__ import annotations

import io

from rich.console import Console

from pdlaunch.bench.kv_transfer_report import KVTransferRow, print_kv_transfer_table


def _row(mode: str, tokens: int, concurrency: int, seconds: float, peer: float | None) -> KVTransferRow:
    size = concurrency * tokens * 131072  # Llama-3-8B's bf16 KV: 128 KiB a token
    return KVTransferRow(connector="nixl", transport=None, mode=mode, num_tokens=tokens, concurrency=concurrency,
                         bytes=size, descriptors=1024, seconds=seconds, gbps=size / seconds / 1e9,
                         raw_copy_gbps=2345.6, peer_copy_gbps=peer, verified=True, prefill_device="cuda:0",
                         decode_device="cuda:1", cumem=False, staging=None, push_phases_ms=None)


def test_every_figure_is_whole_at_80_columns() -> None:
    rows = [_row("pull", 8192, 1, 0.86234, None), _row("push", 8192, 16, 12.34567, 456.7)]
    out = io.StringIO()
    print_kv_transfer_table(Console(file=out, width=80, color_system=None), rows)
    text = out.getvalue()
    assert "…" not in text, text
    for figure in ("8192", "16x8192", "1024.0", "16384.0", "862.34", "12345.67", "1.25", "2345.6", "456.7", "yes"):
        assert figure in text, (figure, text)
    assert max(len(line) for line in text.splitlines()) <= 80
