"""The ``TLS-Required: No`` header field (RFC 8689 §3), read once at the end of DATA.

The sender's other half of RFC 8689, the ``REQUIRETLS`` MAIL parameter, is a
protocol matter (L{twistmail.protocols.smtp} accepts it only under TLS; the
relay, L{twistmail.relay.sender}, enforces it).  The header field asks the
opposite: deliver even where the recipient domain's MTA-STS policy would hold
the message back (a report about broken TLS, say).  When MAIL had
``REQUIRETLS``, the field is ignored (RFC 8689 §4.1: the parameter wins).
"""

from __future__ import annotations

import re

#: RFC 8689 §3: ``TLS-Required: No``, case-insensitive, folding allowed (RFC 5322 §2.2.3).
_TLS_REQUIRED_NO = re.compile(rb"(?im)^TLS-Required[ \t]*:(?:[ \t]|\r?\n[ \t])*No[ \t]*\r?$")


def saysTLSOptional(headerSection: bytes) -> bool:
    """Whether the message's header section has ``TLS-Required: No``."""
    return bool(_TLS_REQUIRED_NO.search(headerSection))
