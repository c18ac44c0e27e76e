"""Mooncake tests skip, with a line that says what is missing, where the transfer engine cannot be imported."""

from __future__ import annotations

import pytest

from pdlaunch.config.mooncake_install import INSTALL_HINT, missing_reason

MISSING = missing_reason()
requires_mooncake = pytest.mark.skipif(MISSING is not None, reason=f"Mooncake tests skipped: {MISSING}; "
                                       f"to run them: {INSTALL_HINT}")
