"""A released Mooncake WRITE is waited for past Mooncake's own transfer timeout (MC_TRANSFER_TIMEOUT):
with a shorter wait the prefill would say push_failed and the decode free blocks that the WRITE still
lands in (a deployment that raises MC_TRANSFER_TIMEOUT to 300 s is common).

The wait follows what Mooncake itself makes of the value, not what it looks like: Mooncake 0.3.13's
transfer engine (TransferEnginePy's constructor in mooncake/engine.so) reads `max(5, (int)strtol(value,
NULL, 10))` seconds when the variable is set and 30 when it is not. So `120s` is 120 s there (a wait
that fell back to 30 s for a value float() refuses freed blocks a minute before Mooncake gave up), and
`abc`, `` or `-5` are 5 s. READINGS is that table, written out from the disassembly."""

import pytest

from pdlaunch.kv_transfer.mooncake.sender import release_wait_seconds

# value -> the seconds Mooncake's transfer engine gives a transfer with MC_TRANSFER_TIMEOUT=value
READINGS: dict[str | None, int] = {
    None: 30, "30": 30, "300": 300, " 45": 45, "600.5": 600, "120s": 120, "90 seconds": 90, "+40": 40,
    "1e3": 5, "": 5, "abc": 5, "nan": 5, "inf": 5, "-5": 5, "0": 5, "3": 5, "0x100": 5,
    "4294967396": 100,  # 2**32 + 100: the long strtol returns is cut to a C int
    "2147483648": 5,  # 2**31: a negative int
    # More digits than Python's int() converts (4300): strtol stops at LONG_MAX (cut to the int -1) or LONG_MIN (0)
    "9" * 5000: 5, "-" + "9" * 5000: 5, "0" * 5000 + "45": 45,
}


@pytest.mark.parametrize(("value", "mooncake"), READINGS.items())
def test_release_wait_outlasts_mooncakes_own_reading_of_the_timeout(value: str | None, mooncake: int) -> None:
    environ = {} if value is None else {"MC_TRANSFER_TIMEOUT": value}
    wait = release_wait_seconds(environ)
    assert wait == max(60.0, mooncake + 15.0), (value, wait)


@pytest.mark.parametrize("value", [None, "300"])
def test_release_wait_grows_a_second_per_gb_as_mooncakes_timeout_does(value: str | None) -> None:
    # Mooncake gives a transfer `transfer_timeout_nsec_ + total_length` ns: a 20 GB WRITE runs up to 20 s longer.
    environ = {} if value is None else {"MC_TRANSFER_TIMEOUT": value}
    assert release_wait_seconds(environ, 20 * 10**9) == release_wait_seconds(environ) + 20.0
