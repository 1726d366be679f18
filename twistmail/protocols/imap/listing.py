# -*- test-case-name: tests.test_imap_listext,tests.test_imap_list -*-
"""LIST and LSUB: RFC 3501 §6.3.8-9 with LIST-EXTENDED (RFC 5258), SPECIAL-USE
(RFC 6154) and LIST-STATUS (RFC 5819).

Parsing the command and choosing what to list are here, apart from the server,
so the rules of four RFCs can be read in one place; the server only fetches
the folder names and writes the lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twistmail.protocols.imap import names, response
from twistmail.protocols.imap.parser import Arguments, ParseError

#: RFC 5258 multiple patterns: each is matched against every folder name.
MAX_LIST_PATTERNS = 64
#: RFC 5258 §3.1 selection options (SPECIAL-USE: RFC 6154 §3).
SELECTION_OPTIONS = {b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH", b"SPECIAL-USE"}
#: RFC 5258 §3.2 return options (SPECIAL-USE: RFC 6154 §3; STATUS: RFC 5819 §2).
RETURN_OPTIONS = {b"SUBSCRIBED", b"CHILDREN", b"SPECIAL-USE", b"STATUS"}
#: STATUS items (RFC 3501 §6.3.10; SIZE: RFC 8438 §2).
STATUS_ITEMS = {b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN", b"SIZE",
                b"HIGHESTMODSEQ"}


@dataclass
class ListRequest:
    """A parsed LIST or LSUB command."""

    lsub: bool
    select: set = field(default_factory=set)
    returns: set = field(default_factory=set)
    status: list = field(default_factory=list)  # RETURN (STATUS (items)), RFC 5819
    matchers: list = field(default_factory=list)
    rootOnly: bool = False  # LIST "" "": the hierarchy delimiter (RFC 3501 §6.3.8)
    patternCount: int = 0  # the server refuses more than MAX_LIST_PATTERNS

    @property
    def verb(self) -> bytes:
        return b"LSUB" if self.lsub else b"LIST"


@dataclass
class Listed:
    """One LIST/LSUB response line: the name, its attributes and RFC 5258 extended data."""

    name: str
    attributes: list
    childInfo: bool = False  # RFC 5258 §3.5 CHILDINFO ("SUBSCRIBED")

    @property
    def selectable(self) -> bool:
        return not {"\\Noselect", "\\NonExistent"} & set(self.attributes)

    def line(self, verb: bytes, utf8: bool = False) -> bytes:
        """The response line; C{utf8}: the session enabled UTF8=ACCEPT (RFC 6855 §3)."""
        out = (b"* " + verb + b" " + response.flagList(self.attributes) + b' "/" ' +
               response.astring(names.encode(self.name, utf8), utf8))
        if self.childInfo:
            out += b' ("CHILDINFO" ("SUBSCRIBED"))'
        return out


def statusItems(args: Arguments) -> list[bytes]:
    """``( status-att *(SP status-att) )``: BAD for an item we do not know."""
    items = [i.upper() for i in args.parenthesized(args.atom)]
    unknown = set(items) - STATUS_ITEMS
    if unknown:
        raise ParseError("unknown STATUS item " + sorted(unknown)[0][:32].decode("ascii", "replace"))
    return items


def parse(args: Arguments, lsub: bool, utf8: bool = False) -> ListRequest:
    """The arguments after C{LIST}/C{LSUB} (RFC 5258 §6 list grammar); C{utf8}: the
    reference and patterns are UTF-8, not modified UTF-7 (RFC 6855 §3)."""
    request = ListRequest(lsub)
    args.sp()
    if not lsub and args.peek() == b"(":
        request.select = {o.upper() for o in args.parenthesized(args.atom)}
        unknown = request.select - SELECTION_OPTIONS
        if unknown:
            raise ParseError("unknown LIST selection option " + _first(unknown))
        # RFC 5258 §3.1: RECURSIVEMATCH only modifies another selection option.
        if b"RECURSIVEMATCH" in request.select and not request.select & {b"SUBSCRIBED",
                                                                        b"SPECIAL-USE"}:
            raise ParseError("RECURSIVEMATCH needs another selection option")
        args.sp()
    reference = _pattern(args.astring(), utf8)
    args.sp()
    if not lsub and args.peek() == b"(":
        patterns = [_pattern(p, utf8) for p in args.parenthesized(args.listMailbox)]
    else:
        patterns = [_pattern(args.listMailbox(), utf8)]
    request.patternCount = len(patterns)
    if not lsub and args.accept(b" RETURN "):
        _returnOptions(args, request)
    args.end()
    if reference is None:
        return request
    request.rootOnly = patterns == [""]
    request.matchers = [names.pattern(reference, p) for p in patterns if p is not None]
    return request


def _returnOptions(args: Arguments, request: ListRequest) -> None:
    args.expect(b"(")
    while not args.accept(b")"):
        if request.returns:
            args.sp()
        option = args.atom().upper()
        if option not in RETURN_OPTIONS:
            raise ParseError("unknown LIST return option " + _first({option}))
        if option == b"STATUS":
            args.sp()
            request.status = statusItems(args)
        request.returns.add(option)


def _first(options: set) -> str:
    return sorted(options)[0][:32].decode("ascii", "replace")


def _pattern(wire: bytes, utf8: bool) -> str | None:
    """A LIST pattern or reference, or None if it is not valid modified UTF-7 (or UTF-8):
    such a pattern matches nothing, and the command still succeeds (as Dovecot answers)."""
    try:
        return names.decode(wire, utf8)
    except names.BadName:
        return None


def parents(folderNames) -> set:
    """Every name with a folder below it: C{a} and C{a/b} for C{a/b/c}."""
    return {name[:i] for name in folderNames for i, c in enumerate(name) if c == names.SEPARATOR}


def select(request: ListRequest, folderNames: list, subscribed: set,
           specialUse: dict) -> list[Listed]:
    """What LIST or LSUB answers, in order."""
    matchers = request.matchers
    if not matchers:
        return []
    lsub = request.lsub
    existing = set(folderNames)
    # Every name with a folder below it, in one pass (not a scan per folder listed).
    hasChildren = parents(existing)
    onlySubscribed = lsub or b"SUBSCRIBED" in request.select
    onlySpecial = b"SPECIAL-USE" in request.select

    def selected(name: str) -> bool:
        """RFC 5258 §3.1: the selection options, pattern aside."""
        if onlySubscribed and name not in subscribed:
            return False
        return not onlySpecial or (name in existing and name in specialUse)

    def matches(name: str) -> bool:
        return any(m.match(name) for m in matchers)

    noselect: set = set()
    childInfo: set = set()
    if lsub or b"RECURSIVEMATCH" in request.select:
        # RFC 3501 §6.3.9 (LSUB) and RFC 5258 §3.5 (RECURSIVEMATCH): a parent the
        # pattern matches, with a selected folder below it that the pattern does not.
        chosen = subscribed if onlySubscribed else existing
        for below in chosen:  # each has at most folders.MAX_DEPTH parents
            if not selected(below):
                continue
            for parent in parents([below]) - noselect - childInfo:
                if any(m.match(parent) and not m.match(below) for m in matchers):
                    if lsub:
                        if parent not in subscribed:
                            noselect.add(parent)
                    else:
                        childInfo.add(parent)
    candidates = sorted(existing | subscribed | noselect | childInfo) if onlySubscribed \
        else sorted(existing | childInfo) if childInfo else folderNames
    out = []
    for name in candidates:
        if not matches(name):
            continue
        if name not in noselect and name not in childInfo and not selected(name):
            continue
        use = specialUse.get(name) if name in existing else None
        attributes = []
        if name in noselect:
            attributes.append("\\Noselect")
        elif name not in existing:
            attributes.append("\\NonExistent" if not lsub else "\\Noselect")
        else:
            attributes.append("\\HasChildren" if name in hasChildren else "\\HasNoChildren")
        if use is not None:
            attributes.append(use)
        if not lsub and b"SUBSCRIBED" in request.select | request.returns and name in subscribed:
            attributes.append("\\Subscribed")
        out.append(Listed(name, attributes, childInfo=name in childInfo))
    return out
