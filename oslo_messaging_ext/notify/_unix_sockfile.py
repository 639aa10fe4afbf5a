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

"""The socket file of the unix notification driver, and who holds it.

Private to the driver. Everything that touches ``sock_path`` or its lock
file is here, written once: the safety rule for its directory, the lock
that serializes the processes of a service, the private bind and rename,
the unlink of our own socket only, and the uid of a connected peer.

Every call is non-blocking or bounded, and never green: the relay's
native thread calls them, and a fork of the service waits for the lock
that guards them.
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


def _new_socket():
    # Looked up at each call, not bound at import: eventlet's
    # monkey_patch() replaces socket.socket (and os.open) in place, in the
    # modules imported before it ran too.
    native = proto.native('socket')
    return native.socket(native.AF_UNIX, native.SOCK_STREAM)


class LockBusy(Exception):
    """Another process holds the lock file; try again later."""


class UnsafeSocketFile(proto.RelayError):
    """Someone other than the service could read or replace the socket."""


def directory_problem(directory):
    """Why ``directory`` is unsafe for a socket file, or None.

    The rule: the directory is owned by root or by the service user, and
    is not writable by others unless it is sticky (as /tmp is), so that
    nobody else can replace the socket or its lock file. In a sticky
    directory another user can still create the path first; the driver
    then refuses to publish to them (see :func:`peer_uid`). Members of the
    directory's group, if it is group-writable, are trusted as the owner.
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


def _lock_file_problem(lock_path, st):
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        return ('its lock file %s is not a regular file of the service user '
                '(uid %d, owner %d): another user may have created it to '
                'keep the service from serving'
                % (lock_path, os.geteuid(), st.st_uid))
    return None


def squatted(path, lock_path):
    """Why another user holds ``path`` or its lock file for good, or None.

    At driver load: what is certain now and would keep the service from
    ever serving (the lock file, or a socket file it may not replace, of
    another user). A live listener is checked by :func:`check_listener`.
    """
    try:
        problem = _lock_file_problem(lock_path, os.lstat(lock_path))
    except FileNotFoundError:
        problem = None
    if problem:
        return problem
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    euid = os.geteuid()
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid == euid or euid == 0:
        return None
    parent = os.stat(os.path.dirname(path))
    if parent.st_mode & stat.S_ISVTX and parent.st_uid != euid:
        return ('it is a socket of uid %d in a sticky directory: the service '
                'user (uid %d) can neither serve nor replace it'
                % (st.st_uid, euid))
    return None


class Lock:
    """The lock file beside the socket, taken without ever waiting.

    A publisher holds it for a few milliseconds while it binds or removes
    the socket; a process of another user that holds it forever only
    delays the election, which is retried with backoff.
    """

    def __init__(self, path):
        self.path = path
        self._fd = None

    def __enter__(self):
        fd = proto.native('os').open(
            self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC |
            os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        try:
            problem = _lock_file_problem(self.path, os.fstat(fd))
            if problem:
                raise UnsafeSocketFile(problem)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise LockBusy(self.path)
                raise
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc_info):
        fd, self._fd = self._fd, None
        os.close(fd)


def peer_uid(sock):
    """The effective uid of the process at the other end of ``sock``."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                            struct.calcsize('3i'))
    return struct.unpack('3i', creds)[1]


def file_id(path):
    """What tells our socket file from one bound later at the same path."""
    st = os.lstat(path)
    return (st.st_dev, st.st_ino)


def bind_listener(path, mode, gid):
    """Bind a listening socket at ``path`` with exactly ``mode`` and ``gid``.

    The socket is bound in a private directory (mode 0700) beside
    ``path``, given its group and mode there, then renamed into place:
    it is never reachable with a wider mode, even for an instant, and
    nothing is ever changed through a symlink. Call it under the lock.

    :returns: the non-blocking listening socket and its file id
    """
    parent = os.path.dirname(path)
    private_dir = os.path.join(
        parent, '.sock-' + binascii.hexlify(os.urandom(6)).decode())
    os.mkdir(private_dir, 0o700)
    private_path = os.path.join(private_dir, 's')
    sock = _new_socket()
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


def remove_stale(path, refused):
    """Remove a socket nobody listens on; never anything else.

    :param refused: whether connecting was refused (a stale socket), as
        opposed to the path missing
    :raises RelayError: when the path is not a socket
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise proto.RelayError('it exists and is not a socket, and is never '
                               'replaced: remove it to let the service '
                               'serve')
    if refused:
        os.unlink(path)
        return True
    return False


def unlink_if_ours(path, bound_id):
    """Remove ``path`` if it is still the socket file we bound.

    Call it under the lock, so that a publisher's socket bound meanwhile at
    the same path is never removed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == bound_id:
        os.unlink(path)
        return True
    return False


def check_listener(path, service):
    """Refuse a live listener on ``path`` that another user runs.

    At driver load, without ever waiting: the connection is non-blocking
    and nothing is read. A publisher's handshake (marked as a probe) is
    sent only to a process of the service user, so that a hub does not
    take the connection for a subscriber. Anything transient (nobody
    listening, a full backlog, a hub exiting or paused) is left to the
    relay, which retries with backoff.

    :raises UnsafeSocketFile: when another user listens on ``path``
    """
    sock = _new_socket()
    try:
        sock.setblocking(False)
        try:
            sock.connect(path)
            uid = peer_uid(sock)
        except OSError:
            return
        # Before anything is sent: the hello names the service and pid.
        if uid != os.geteuid():
            raise UnsafeSocketFile(
                'it is held by a process of uid %d, not of the service user '
                '(uid %d): another user may have bound it to read the '
                'notifications' % (uid, os.geteuid()))
        try:
            sock.send(proto.control_line(role=proto.ROLE_PUBLISHER,
                                         service=service, pid=os.getpid(),
                                         probe=True))
        except OSError:
            pass
    finally:
        sock.close()
