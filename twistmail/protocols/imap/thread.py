# -*- test-case-name: tests.test_imap_sort -*-
"""THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (RFC 5256 §4), and the THREAD response.

Every walk over the thread trees here is a loop, not a recursion: a chain of
replies (or a crafted References field) is as deep as it is long.
"""

from __future__ import annotations

from twistmail.protocols.imap.sort import Described

ALGORITHMS = (b"ORDEREDSUBJECT", b"REFERENCES")


class Node:
    """A message in a thread tree, or a dummy (C{message} None) standing for one that
    is only referred to."""

    __slots__ = ("message", "parent", "children")

    def __init__(self, message: Described | None = None) -> None:
        self.message = message
        self.parent: Node | None = None
        self.children: list[Node] = []

    def adopt(self, child: Node) -> None:
        if child.parent is not None:
            child.parent.children.remove(child)
        child.parent = self
        self.children.append(child)

    def isAncestorOf(self, other: Node) -> bool:
        """C{self} is C{other} or above it (only a node with children can be above one)."""
        if self is other:
            return True
        if not self.children:
            return False
        node = other.parent
        while node is not None:
            if node is self:
                return True
            node = node.parent
        return False


def _dateKey(message: Described) -> tuple:
    """Sent date, then mailbox order for equal dates."""
    return (message.sent, message.seq)


def orderedSubject(messages: list[Described]) -> list[Node]:
    """RFC 5256 §4 ORDEREDSUBJECT: one thread per base subject, its first message (by sent
    date) the parent of the others; threads in the order of their first messages."""
    roots: list[Node] = []
    bySubject: dict[str, Node] = {}
    for message in sorted(messages, key=lambda m: (m.subject, m.sent, m.seq)):
        root = bySubject.get(message.subject)
        if root is None:
            bySubject[message.subject] = root = Node(message)
            roots.append(root)
        else:
            root.adopt(Node(message))
    roots.sort(key=lambda r: _dateKey(r.message))
    return roots


def references(messages: list[Described]) -> list[Node]:
    """RFC 5256 §4 REFERENCES, its steps numbered as there."""
    table: dict[str, Node] = {}
    nodes = []
    for message in sorted(messages, key=lambda m: m.seq):
        # (1) the message's own id; a missing or repeated one is replaced by a unique one.
        node = table.get(message.messageId) if message.messageId else None
        if node is None or node.message is not None:
            node = Node(message)
            table[message.messageId if message.messageId and message.messageId not in table
                  else f"\0{message.seq}"] = node
        else:
            node.message = message
        nodes.append(node)
        # (1)(A) each reference the parent of the next, unless it has one or it would loop.
        previous = None
        for reference in message.references:
            current = table.get(reference)
            if current is None:
                table[reference] = current = Node()
            if previous is not None and current.parent is None and not current.isAncestorOf(previous):
                previous.adopt(current)
            previous = current
        # (1)(B) the last reference becomes the message's parent (none: it has none).
        if node.parent is not None:
            node.parent.children.remove(node)
            node.parent = None
        if previous is not None and not node.isAncestorOf(previous):
            previous.adopt(node)
    # (2) the root set.
    roots = [n for n in table.values() if n.parent is None]
    # (4) prune dummies: children first, so a promoted child is already pruned.
    for node in reversed(_preorder(roots)):
        node.children = _pruned(node, node.children, atRoot=False)
    roots = _pruned(None, roots, atRoot=True)
    # (5) gather the roots with the same base subject.
    roots = _bySubject(roots)
    # (6) siblings by sent date; a dummy (only at the top) by its first child's.
    for node in _preorder(roots):
        node.children.sort(key=_nodeDate)
    roots.sort(key=_nodeDate)
    return roots


def _preorder(roots: list[Node]) -> list[Node]:
    out = []
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(reversed(node.children))
    return out


def _pruned(parent: Node | None, children: list[Node], atRoot: bool) -> list[Node]:
    """(4)(A) an empty dummy goes; (B) a dummy gives its children its place, but at the
    root only a single one (several stay together under it)."""
    out = []
    for child in children:
        if child.message is not None:
            out.append(child)
        elif not child.children:
            continue
        elif atRoot and len(child.children) > 1:
            out.append(child)
        else:
            for grandchild in child.children:
                grandchild.parent = parent
            out.extend(child.children)
    return out


def _subjectOf(node: Node) -> Described | None:
    """(5)(B) a root's message, or a dummy's first child's."""
    if node.message is None and node.children:
        return node.children[0].message
    return node.message


def _bySubject(roots: list[Node]) -> list[Node]:
    # (A), (B): one root per base subject; a dummy wins over a message, and a message
    # that is not a reply or forward over one that is.
    table: dict[str, Node] = {}
    for root in roots:
        message = _subjectOf(root)
        if message is None or not message.subject:
            continue
        held = table.get(message.subject)
        if (held is None or (root.message is None and held.message is not None) or
                (held.message is not None and held.message.isReply and
                 root.message is not None and not root.message.isReply)):
            table[message.subject] = root
    # (C) merge each other root with the same subject into the table's.
    out = []
    replaced: dict[int, Node] = {}
    for root in roots:
        message = _subjectOf(root)
        held = table.get(message.subject) if message is not None and message.subject else None
        if held is None or held is root:
            out.append(root)
            continue
        held = replaced.get(id(held), held)
        if held.message is None and root.message is None:
            for child in list(root.children):
                held.adopt(child)
        elif held.message is None:
            held.adopt(root)
        elif root.message is None:
            root.adopt(held)  # a dummy holding several of the subject: the held one joins it
            replaced[id(table[message.subject])] = root
            out.append(root)
        elif not held.message.isReply and root.message.isReply:
            held.adopt(root)
        else:
            dummy = Node()
            dummy.adopt(held)
            dummy.adopt(root)
            replaced[id(table[message.subject])] = dummy
            out.append(dummy)
    # A root merged away, or replaced by a dummy, is no longer at the top.
    return [r for r in out if r.parent is None and (r.message is not None or r.children)]


def _nodeDate(node: Node) -> tuple:
    return _dateKey(node.message if node.message is not None else node.children[0].message)


def render(roots: list[Node], uid: bool) -> bytes:
    """The THREAD response's data (RFC 5256 §5): ``(1 2 (3)(4 5))(6)``.

    A parent with one child is followed by it in the same list; with several,
    each child starts a list of its own.
    """
    out: list[bytes] = []
    stack: list = [(True, root) for root in reversed(roots)]
    while stack:
        opening, node = stack.pop()
        if not opening:
            out.append(b")")
            continue
        numbers = []
        while True:
            if node.message is not None:
                numbers.append(b"%d" % (node.message.uid if uid else node.message.seq))
            if len(node.children) != 1:
                break
            node = node.children[0]
        out.append(b"(" + b" ".join(numbers) + (b" " if numbers and node.children else b""))
        stack.append((False, None))
        stack.extend((True, child) for child in reversed(node.children))
    return b"".join(out)
