"""A released Mooncake WRITE is waited for past Mooncake's own transfer timeout (MC_TRANSFER_TIMEOUT):
with a shorter wait the prefill would say push_failed and the decode free blocks that the WRITE still
lands in (a deployment that raises MC_TRANSFER_TIMEOUT to 300 s is common)."""

import pytest

from pdlaunch.kv_transfer.mooncake.sender import release_wait_seconds


@pytest.mark.parametrize(("value", "expected"), [
    (None, 60.0), ("30", 60.0), ("300", 315.0), ("600.5", 615.5),
    ("", 60.0), ("abc", 60.0), ("nan", 60.0), ("inf", 60.0), ("-5", 60.0),
])
def test_release_wait_covers_mooncakes_transfer_timeout(value: str | None, expected: float) -> None:
    environ = {} if value is None else {"MC_TRANSFER_TIMEOUT": value}
    assert release_wait_seconds(environ) == expected
