# -*- test-case-name: tests.test_ownership -*-
"""Who owns the data directory: the service user, whoever starts what.

Postfix has ``postfix set-permissions``; here it happens by itself:

* ``twistd --uid U --gid G twistmail`` started as root gives the data
  directory, and everything in it, to U:G before twistd drops privileges
  (``adopt``), so what the admin CLI created as root before the first start,
  or what was restored from a backup, is writable by the server.
* The admin CLI run as root acts as the owner of an existing data directory
  (``actAsOwner``): ``twistmail user add`` or ``sendmail`` from root's cron
  never leaves a root-owned file the server cannot rewrite.
* A server that still cannot write its directory says so at start, with the
  fix (``checkWritable``), instead of answering ``451`` to every message.
"""

from __future__ import annotations

import grp
import os
import pwd
import tempfile


def serviceIds(options) -> tuple[int | None, int | None]:
    """twistd's ``--uid``/``--gid`` (the gid defaulting to the user's, as twistd does),
    from the twistmail plugin options' parent; (None, None) when not run by twistd or
    without them."""
    parent = getattr(options, "parent", None)
    if parent is None:
        return None, None
    uid, gid = parent.get("uid"), parent.get("gid")
    if uid is not None and gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    return uid, gid


def adopt(top: str, uid: int, gid: int) -> int:
    """Give C{top} and everything below it to uid:gid; the number of entries changed.

    Symbolic links are changed themselves, never followed (a link planted in the
    data directory cannot hand a system file to the service user).
    """
    changed = 0

    def own(path: str) -> None:
        nonlocal changed
        st = os.lstat(path)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.lchown(path, uid, gid)
            changed += 1

    own(top)
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            own(os.path.join(directory, name))
    return changed


def actAsOwner(dataDir: str) -> None:
    """As root, become the owner of an existing data directory that is not root's."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(dataDir)
    except FileNotFoundError:
        return  # created as root now; the server adopts it at its next start as root
    if st.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)


def describeUser(uid: int, gid: int) -> str:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group}"


def checkWritable(dataDir: str) -> str | None:
    """None when this process can create files in the data directory and the
    directories directly in it; otherwise the problem and its fix, for one line."""
    who = describeUser(os.geteuid(), os.getegid())
    try:
        entries = [e.path for e in os.scandir(dataDir) if e.is_dir(follow_symlinks=False)]
    except OSError as e:
        entries, problem = [], e
    else:
        problem = None
    for directory in [dataDir] + entries:
        if problem is not None:
            break
        try:
            fd, path = tempfile.mkstemp(prefix=".write-check-", dir=directory)
            os.close(fd)
            os.unlink(path)
        except OSError as e:
            problem = e
    if problem is None:
        return None
    return (f"the data directory {dataDir} is not writable by {who} "
            f"({problem.strerror}: {problem.filename or dataDir}). Fix: start twistd as root with "
            f"--uid/--gid so twistmail gives the directory to that user, or run "
            f"chown -R {who} {dataDir} (and make its parent directories searchable by it)")
