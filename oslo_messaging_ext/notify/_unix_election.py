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

"""Who serves a unix notification socket: the election (private).

Every process of a service runs it when its relay starts and whenever it
loses its hub. Under the lock file beside the socket, a process connects
to the socket: if a process of the service user listens there, it joins
it as a publisher; if nobody does, it removes a stale socket file and
binds the path itself, becoming the hub. The lock serializes the
processes, so that none unlinks the socket another has just bound.

Nothing here waits: the lock is only tried, the connection is
non-blocking, and a failed attempt is retried with backoff
(:class:`Retry`) while notifications are queued, then dropped and counted.
"""

import collections
import functools
import logging
import os
import time

from oslo_messaging_ext.notify import _unix_log as unix_log
from oslo_messaging_ext.notify import _unix_protocol as proto
from oslo_messaging_ext.notify import _unix_sockfile as sockfile

LOG = logging.getLogger(__name__)
_log = functools.partial(unix_log.log, LOG)

RETRY_MIN, RETRY_MAX = 0.05, 5.0
# A publisher binding holds the lock file for milliseconds: retry soon
# (LOCK_RETRIES times), then back off.
LOCK_RETRY = 0.005
LOCK_RETRIES = 6
# Distinct reasons a join failed that are throttled each on its own; a
# reason naming a pid or a uid changes with its holder.
_REASONS_REMEMBERED = 8


class Hub:
    """Elected: this process binds the path."""

    def __init__(self, listener, bound_id):
        self.listener = listener
        self.bound_id = bound_id


class Publisher:
    """Elected: another process of the service user serves the path."""

    def __init__(self, sock):
        self.sock = sock


def elect(path, mode, gid):
    """Join the hub of ``path``, or become it; call it under the lock.

    :returns: :class:`Hub` or :class:`Publisher`
    :raises RelayError: the path is held by another user, or is not a
        socket
    :raises OSError: anything else (a full backlog included), retried
    """
    native = proto.native('socket')
    sock = native.socket(native.AF_UNIX, native.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(path)
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        sock.close()
        if sockfile.remove_stale(path,
                                 isinstance(exc, ConnectionRefusedError)):
            _log(logging.INFO, 'Removed stale unix notification socket %s',
                 path)
        return Hub(*sockfile.bind_listener(path, mode, gid))
    except BaseException:
        # BlockingIOError included: the hub's backlog is full.
        sock.close()
        raise
    try:
        uid = sockfile.peer_uid(sock)
        if uid != os.geteuid():
            raise sockfile.UnsafeSocketFile(
                'it is held by a process of uid %d, not of the service '
                'user (uid %d); nothing is sent to it' % (uid, os.geteuid()))
    except BaseException:
        sock.close()
        raise
    return Publisher(sock)


def unlink_ours(path, lock_path, bound_id):
    """Remove the socket file if it is still the one we bound.

    Under the lock, so that a publisher's socket bound meanwhile is never
    removed; if the lock cannot be had at once, the file is left (a
    stale socket never blocks a start-up). A directory removed already
    (a temporary one, /run at shutdown) took the socket with it.
    """
    try:
        with sockfile.Lock(lock_path):
            sockfile.unlink_if_ours(path, bound_id)
    except FileNotFoundError:
        # The lock file is created if missing: the directory is.
        pass
    except sockfile.LockBusy:
        _log(logging.WARNING, 'Unix notification socket %s: not removed, '
             'its lock file is held by another process', path)
    except (OSError, proto.RelayError) as exc:
        _log(logging.WARNING, 'Unix notification socket %s: not removed: '
             '%s', path, exc)


class Retry:
    """When to run the election again, and what to say meanwhile."""

    def __init__(self, path, lock_path):
        self.path = path
        self.lock_path = lock_path
        self.at = 0.0
        self._delay = RETRY_MIN
        self._lock_retries = 0
        # One throttle per reason: a repeated failure is said once per
        # interval, and never hides a different one that follows it (the
        # lock busy for a moment, then another user's socket).
        self._failures = collections.OrderedDict()

    def due(self, now):
        return now >= self.at

    def wait_ms(self):
        return max(0, self.at - time.monotonic()) * 1000

    def joined(self, as_hub):
        self._lock_retries = 0
        if as_hub:
            self._delay = RETRY_MIN

    def later(self, delay=None):
        """Retry after ``delay``, or after the next step of the backoff."""
        if delay is None:
            delay = self._delay
            self._delay = min(self._delay * 2, RETRY_MAX)
        self.at = time.monotonic() + delay

    def at_once(self):
        """The hub of a connection that lasted left: re-elect now."""
        self._delay = RETRY_MIN
        self.later(0)

    def lock_busy(self):
        # A publisher binding right now, or someone else holding the
        # lock: never wait for it.
        self._lock_retries += 1
        if self._lock_retries <= LOCK_RETRIES:
            self.later(LOCK_RETRY)
            return
        self.failed('its lock file %s is held by another process'
                    % self.lock_path)

    def failed(self, reason):
        self.say(reason)
        self.later()

    def say(self, reason):
        reason = str(reason)
        throttle = self._failures.pop(reason, None) or unix_log.Throttle()
        # Most recent last; the reasons of long ago are forgotten.
        self._failures[reason] = throttle
        while len(self._failures) > _REASONS_REMEMBERED:
            self._failures.popitem(last=False)
        unsaid = throttle.hit()
        if unsaid:
            _log(logging.WARNING, 'Unix notification socket %s: cannot join '
                 '(%s; %d attempts since the last report); retrying with '
                 'backoff, notifications meanwhile are queued, then '
                 'dropped and counted', self.path, reason, unsaid)
