# -*- test-case-name: tests.test_imap_sort -*-
"""The base subject of RFC 5256 §2.1, which SORT SUBJECT and THREAD compare.

``Re: [list] Fwd: Hello (fwd)`` and ``hello`` are one subject: the reply and
forward markers, list tags and trailing ``(fwd)`` are taken off in the order
§2.1 gives, and whether any of them was there is kept (THREAD=REFERENCES
step 5 puts a reply under its original).
"""

from __future__ import annotations

import re

#: Longer subjects are cut here first: each step is linear, but a subject of
#: thousands of nested "[fwd:" repeats them all.  No real subject comes close.
MAX_SUBJECT = 16 * 1024

# RFC 5256 §5 ABNF; its strings are case-insensitive.  BLOBCHAR is ASCII but "[" and "]".
_BLOB = r"\[[\x01-\x5a\x5c\x5e-\x7f]*\][ \t]*"
_REFWD = r"(?:re|fwd?)[ \t]*(?:" + _BLOB + r")?:"
_LEADER = re.compile(r"(?:[ \t]+|(?:" + _BLOB + r")*" + _REFWD + r")", re.IGNORECASE | re.ASCII)
_BLOB_RE = re.compile(_BLOB, re.ASCII)
_SPACES = re.compile(r"[ \t\r\n]+")


def baseSubject(subject: str) -> tuple[str, bool]:
    """(base subject, whether it was a reply or forward) of a decoded Subject.

    The base subject is compared casefolded (i;unicode-casemap, RFC 5255 §4);
    it is returned as written here.
    """
    # (1) the caller decoded RFC 2047 words; tabs and continuations are one space.
    text = _SPACES.sub(" ", subject[:MAX_SUBJECT])
    isReply = False
    while True:
        # (2) trailing subj-trailer: "(fwd)" and white space.
        while True:
            text = text.rstrip(" \t")
            if text[-5:].lower() != "(fwd)":
                break
            text = text[:-5]
            isReply = True
        # (3), (4), (5): leaders ("Re:", "[list] Fwd:", white space), then a blob
        # unless nothing would be left, until neither matches.
        while True:
            leader = _LEADER.match(text)
            if leader:
                isReply |= not leader.group().isspace()
                text = text[leader.end():]
                continue
            text = _withoutBlobs(text)
            break
        # (6) "[fwd:" ... "]" around all of it: take them off, and again from (2).
        if text[:5].lower() == "[fwd:" and text.endswith("]"):
            text = text[5:-1]
            isReply = True
            continue
        return text, isReply


def _withoutBlobs(text: str) -> str:
    """Step (4) repeated: leading blobs go while something is left after them.

    With no leader before them (the caller's regex failed), taking one blob off
    leaves the next blob first, and no leader either: so all are taken at once,
    in linear time, but the last when nothing else would remain.
    """
    end = 0
    ends = []
    while True:
        blob = _BLOB_RE.match(text, end)
        if blob is None:
            break
        end = blob.end()
        ends.append(end)
    while ends and not text[ends[-1]:].strip(" \t"):
        ends.pop()  # RFC 5256 §2.1 (4): the base subject may not become empty
    return text[ends[-1]:] if ends else text
