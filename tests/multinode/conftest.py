from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.multinode.netns import NamespacesUnavailable, TwoNodes


@pytest.fixture
def nodes() -> Iterator[TwoNodes]:
    """Two network namespaces joined by a veth pair; skipped where namespaces cannot be made."""
    two = TwoNodes()
    try:
        two.create()
    except NamespacesUnavailable as e:
        pytest.skip(f"needs two network namespaces: {e}")
    try:
        yield two
    finally:
        two.delete()
