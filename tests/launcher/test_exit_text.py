"""One wording of how a process ended (errors.exit_text), shared by the launcher, the TP executor and the
kv-transfer bench."""

from __future__ import annotations

import pytest

from pdlaunch.errors import exit_text


@pytest.mark.parametrize(("code", "text"), [
    (0, "exited with code 0"),
    (3, "exited with code 3"),
    (-9, "was killed by signal 9 (SIGKILL)"),
    (-11, "was killed by signal 11 (SIGSEGV)"),
    (-200, "was killed by signal 200"),  # a number with no name here
    (None, "is running"),
])
def test_an_exit_status_reads_as_how_the_process_ended(code: int | None, text: str) -> None:
    assert exit_text(code) == text
