"""IMAP4rev1 (RFC 3501) with the extensions modern clients use, on Twisted's IMAP4Server.

* ``wire``: command framing: lines, literals (RFC 3501 §4.3), LITERAL+ (RFC 7888), limits.
* ``parser``: the argument grammar of RFC 3501 §9 over a framed command.
* ``server``: the protocol: states, commands, untagged updates, IDLE.
* ``view``: one session's view of a selected folder (sequence numbers, pending updates).
* ``fetch`` / ``structure``: FETCH items, BODY[section]<partial>, BODYSTRUCTURE, ENVELOPE.
* ``search``: SEARCH keys.
* ``names``: mailbox names (modified UTF-7, or UTF-8 after ENABLE UTF8=ACCEPT), LIST patterns,
  special-use folders.

Everything here talks to ``twistmail.interfaces`` only, never to a backend.
"""
