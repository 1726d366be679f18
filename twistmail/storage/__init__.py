"""The storage backends, and what every backend's folder shares."""

from __future__ import annotations

import operator
from collections.abc import Iterable

_FLAGS = operator.attrgetter("flags")


def flagColumnOf(messages: Iterable) -> list:
    """IMailbox.flagColumn from a snapshot: for backends with no cheaper way."""
    return list(map(_FLAGS, messages))
