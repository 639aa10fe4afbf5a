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

"""What the driver and its hub share (private): what they say, and the
files beside ``sock_path`` (rules, lock, bind, peers). Every call is
non-blocking.

A process sends the hub's ingest socket (SOCK_SEQPACKET) one message per
notification, its first byte saying what it is: HELLO + ``{"source": S,
"pid": P}`` first, carrying its tally (SCM_RIGHTS); then, for each
notification, LINE + what it dropped so far (3 native uint64, one per
cause of CAUSES) + the JSON notification.

The tally is a memfd of TALLY_SIZE bytes, sealed against shrinking, of
native uint64 that both ends map: [cause] what the process dropped,
written by the process; [SUBSCRIBERS] the hub's subscribers (UNKNOWN
until it read the HELLO) and [CREDITED + cause] what a hub reported to
subscribers, both written by the hub. A hub reports drops before the
first line that counts them, and reads the tally when the process
leaves: nothing a process dropped goes unreported, whether it exits, is
killed or moves to a new hub. Nothing here imports oslo.messaging.
"""

import binascii
import errno
import fcntl
import importlib
import json
import mmap
import os
import socket
import stat
import struct
import sys
import time
import uuid

from oslo_utils import timeutils

HELLO, LINE = b'H', b'N'
# Why a process could not hand a notification over: indices in CAUSES.
ABSENT, FULL, TOO_LARGE = range(3)
CAUSES = ('hub absent', 'ingest full', 'too large')
SUBSCRIBERS, CREDITED = 3, 4  # offsets in the tally
UNKNOWN = 2 ** 64 - 1
TALLY_SIZE = 64
HEADER = struct.Struct('=c3Q')  # of a LINE: LINE and the drop counts
# Why the hub dropped a line for a subscriber.
SUBSCRIBER_BUFFER = 'subscriber buffer'
# Public as oslo_messaging_ext.unix_subscriber.DROPPED_EVENT_TYPE.
DROPPED_EVENT_TYPE = 'oslo_messaging_ext.unix.dropped'
READ_SIZE = 262144  # bytes read from a subscriber connection at once
MAX_DROP_COUNT = 2 ** 53  # beyond, garbage, not a count


def native(name):
    """The module ``name`` unpatched by eventlet (which would block)."""
    patcher = sys.modules.get('eventlet.patcher')
    if patcher is not None and patcher.is_monkey_patched(name):
        return patcher.original(name)
    return importlib.import_module(name)


def new_tally():
    """(fd, uint64 view) of a new tally, sealed against shrinking."""
    fd = os.memfd_create('unix-notification-tally',
                         os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, TALLY_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd, memoryview(mmap.mmap(fd, TALLY_SIZE)).cast('Q')


def map_tally(fd):
    """The tally of ``fd``; None unless sealed against shrinking (SIGBUS)."""
    try:
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            return memoryview(mmap.mmap(fd, TALLY_SIZE)).cast('Q')
    except (OSError, ValueError):
        pass
    return None


class Throttle:
    """Say a repeated event at most once a minute, with its count."""

    def __init__(self, log):
        self._log, self._next, self._unsaid = log, 0.0, 0

    def warn(self, message, *args):
        self._unsaid += 1
        now = time.monotonic()
        if now >= self._next:
            self._log.warning(message + ' (%d times)', *args, self._unsaid)
            self._unsaid, self._next = 0, now + 60.0


class RelayError(Exception):
    """The socket path cannot be used; the message says why."""


def dumps(value):
    return json.dumps(value, separators=(',', ':')).encode('utf-8')


def dropped_envelope(count, where, sources=None):
    """The in-band notice of ``count`` dropped ``where``, by source."""
    return dumps({
        'event_type': DROPPED_EVENT_TYPE,
        'message_id': str(uuid.uuid4()),
        'publisher_id': 'oslo_messaging_ext.unix',
        'priority': 'WARN',
        'payload': {'dropped': count, 'where': where, 'pid': os.getpid(),
                    'sources': sources or {}},
        'timestamp': str(timeutils.utcnow()),
    }) + b'\n'


def valid_count(value):
    return type(value) is int and 0 <= value <= MAX_DROP_COUNT


LISTEN_BACKLOG = 128


def ingest_path(path):
    """The hub's private socket for the service's processes."""
    return path + '.ingest'


def lock_path(path):
    return path + '.lock'


def directory_problem(directory):
    """Why another user could replace files in ``directory``, or None.

    Members of a group that may write it are trusted as the owner; in a
    sticky one, another user can create our files first: see squatted().
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
    """Why a file of ``path`` cannot be ours, or None."""
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
        if not stat.S_ISSOCK(st.st_mode):
            return ('%s exists and is not a socket (a symlink, a regular '
                    'file or a directory is never replaced)' % name)
        if st.st_uid == euid or euid == 0:
            continue
        parent = os.stat(os.path.dirname(name))
        if parent.st_mode & stat.S_ISVTX and parent.st_uid != euid:
            return ('%s is a socket of uid %d in a sticky directory: the '
                    'service user (uid %d) can neither serve nor replace it'
                    % (name, st.st_uid, euid))
    return None


def try_lock(path):
    """The fd of ``path``'s lock file, locked; None if another holds it."""
    name = lock_path(path)
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC |
                 os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    try:
        problem = _lock_file_problem(name, os.fstat(fd))
        if problem:
            raise RelayError(problem)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException as exc:
        os.close(fd)
        if getattr(exc, 'errno', None) in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
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
    """(A listener at ``path`` of ``mode`` and ``gid``, its file_id).

    Bound in a private directory, given its group and mode, renamed into
    place: never wider, never through a symlink.
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise RelayError(
                '%s exists and is not a socket, and is never replaced: '
                'remove it to let the service serve' % path)
    except FileNotFoundError:
        pass
    parent = os.path.dirname(path)
    private_dir = os.path.join(
        parent, '.sock-' + binascii.hexlify(os.urandom(6)).decode())
    os.mkdir(private_dir, 0o700)
    private_path = os.path.join(private_dir, 's')
    sock = native('socket').socket(socket.AF_UNIX, kind)
    try:
        sock.bind(private_path)
        os.chown(private_path, -1, gid, follow_symlinks=False)
        os.chmod(private_path, mode)
        sock.listen(LISTEN_BACKLOG)
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


def listeners(path, mode, gid):
    """{path: (mode, gid, type)} of a hub's two listeners."""
    return {path: (mode, gid, socket.SOCK_STREAM), ingest_path(path): (
        0o600, os.getegid(), socket.SOCK_SEQPACKET)}


def claim(path, mode, gid):
    """[lock fd, both listeners' fds, their file_ids' 4 ints]; None if locked.

    The driver claims the path, then starts its hub: what connects and
    sends meanwhile waits for the hub in the listeners' queues.
    """
    fds, ids = [try_lock(path)], []
    if fds[0] is None:
        return None
    try:
        for where, args in listeners(path, mode, gid).items():
            sock, bound = bind_listener(where, *args)
            fds.append(sock.detach())
            ids.extend(bound)
    except BaseException:
        list(map(os.close, fds))
        raise
    return fds + ids


def unlink_if_ours(path, bound_id):
    """Remove ``path`` if it is still the socket file we bound."""
    try:
        if file_id(path) == bound_id:
            os.unlink(path)
    except FileNotFoundError:
        pass


def check_listener(path, kind=socket.SOCK_STREAM):
    """Refuse a listener of another user on ``path``; nothing is sent."""
    sock = native('socket').socket(socket.AF_UNIX, kind)
    try:
        sock.setblocking(False)
        try:
            sock.connect(path)
            uid = peer_uid(sock)
        except OSError:
            return
        if uid != os.geteuid():
            raise RelayError(
                'it is held by a process of uid %d, not of the service user '
                '(uid %d): another user may have bound it to read the '
                'notifications' % (uid, os.geteuid()))
    finally:
        sock.close()
