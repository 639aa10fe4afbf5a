#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
#    WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
#    License for the specific language governing permissions and limitations
#    under the License.

"""The files beside ``sock_path`` (private): rules, lock, bind, peers.

Every call is non-blocking. Used by the hub process too.
"""

import binascii
import errno
import fcntl
import os
import socket
import stat
import struct

from oslo_messaging_ext.notify import _unix_protocol as proto

_LISTEN_BACKLOG = 128


def ingest_path(path):
    """The hub's private socket for the service's processes."""
    return path + '.ingest'


def lock_path(path):
    return path + '.lock'


def directory_problem(directory):
    """Why ``directory`` is unsafe for a socket file, or None.

    Owned by root or the service user, not writable by others unless
    sticky: nobody else can replace our files (in a sticky directory one
    can create them first: see :func:`squatted`). Members of a group that
    may write it are trusted as the owner.
    """
    st = os.stat(directory)
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        return ('its directory %s is owned by uid %d; only root or the '
                'service user (uid %d) may own it, as its owner could '
                'replace the socket' % (directory, st.st_uid, euid))
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        return ('its directory %s is writable by others and not sticky '
                '(mode %04o): anyone could replace the socket'
                % (directory, stat.S_IMODE(st.st_mode)))
    return None


def _lock_file_problem(path, st):
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        return ('its lock file %s is not a regular file of the service user '
                '(uid %d, owner %d): another user may have created it to '
                'keep the service from serving'
                % (path, os.geteuid(), st.st_uid))
    return None


def squatted(path):
    """Why another user holds a file of ``path`` for good, or None."""
    try:
        problem = _lock_file_problem(lock_path(path),
                                     os.lstat(lock_path(path)))
        if problem:
            return problem
    except FileNotFoundError:
        pass
    euid = os.geteuid()
    for name in (path, ingest_path(path)):
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid == euid or euid == 0:
            continue
        parent = os.stat(os.path.dirname(name))
        if parent.st_mode & stat.S_ISVTX and parent.st_uid != euid:
            return ('%s is a socket of uid %d in a sticky directory: the '
                    'service user (uid %d) can neither serve nor replace it'
                    % (name, st.st_uid, euid))
    return None


def try_lock(path):
    """The fd of ``path``'s lock file, locked; None if another holds it.

    Never waits. The hub holds it for its whole life: one hub per path.
    """
    name = lock_path(path)
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC |
                 os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    try:
        problem = _lock_file_problem(name, os.fstat(fd))
        if problem:
            raise proto.RelayError(problem)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def peer_uid(sock):
    """The effective uid of the process at the other end of ``sock``."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                            struct.calcsize('3i'))
    return struct.unpack('3i', creds)[1]


def file_id(path):
    """What tells our socket file from one bound later at the same path."""
    st = os.lstat(path)
    return (st.st_dev, st.st_ino)


def bind_listener(path, mode, gid, kind=socket.SOCK_STREAM):
    """(A listening socket at ``path``, exactly ``mode`` and ``gid``, its id).

    Bound in a private directory (0700), given its group and mode, then
    renamed into place: never reachable with a wider mode, nothing changed
    through a symlink. Under the lock: a stale socket is replaced, anything
    else refused.
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise proto.RelayError(
                '%s exists and is not a socket, and is never replaced: '
                'remove it to let the service serve' % path)
    except FileNotFoundError:
        pass
    parent = os.path.dirname(path)
    private_dir = os.path.join(
        parent, '.sock-' + binascii.hexlify(os.urandom(6)).decode())
    os.mkdir(private_dir, 0o700)
    private_path = os.path.join(private_dir, 's')
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.bind(private_path)
        os.chown(private_path, -1, gid, follow_symlinks=False)
        os.chmod(private_path, mode)
        sock.listen(_LISTEN_BACKLOG)
        sock.setblocking(False)
        os.rename(private_path, path)
    except BaseException:
        sock.close()
        if os.path.lexists(private_path):
            os.unlink(private_path)
        raise
    finally:
        os.rmdir(private_dir)
    return sock, file_id(path)


def unlink_if_ours(path, bound_id):
    """Remove ``path`` if it is still the socket file we bound."""
    try:
        if file_id(path) == bound_id:
            os.unlink(path)
    except FileNotFoundError:
        pass


def check_listener(path, kind=socket.SOCK_STREAM):
    """Refuse a listener of another user on ``path``; nothing is sent."""
    sock = proto.native('socket').socket(socket.AF_UNIX, kind)
    try:
        sock.setblocking(False)
        try:
            sock.connect(path)
            uid = peer_uid(sock)
        except OSError:
            return
        if uid != os.geteuid():
            raise proto.RelayError(
                'it is held by a process of uid %d, not of the service user '
                '(uid %d): another user may have bound it to read the '
                'notifications' % (uid, os.geteuid()))
    finally:
        sock.close()
