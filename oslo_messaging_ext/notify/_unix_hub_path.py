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

"""Keeping a hub's socket path (private).

rm of the socket, a tmpfiles clean-up or its directory removed and
recreated leave a hub serving its connections while nobody can connect
any more. :class:`PathKeeper` notices it (one lstat a second), says it
once, and binds the path again by the rules of the first bind.
"""

import contextlib
import logging
import os
import stat
import time

from oslo_messaging_ext.notify import _unix_log as unix_log
from oslo_messaging_ext.notify import _unix_protocol as proto
from oslo_messaging_ext.notify import _unix_sockfile as sockfile

LOG = logging.getLogger(__name__)

# Seconds between two checks that the socket path still names our socket.
CHECK_INTERVAL = 1.0


class PathKeeper:
    """Watch that ``path`` names the socket a hub bound; bind it again.

    :param path: the socket path, bound by the hub's relay just now
    :param fork_lock: held while binding, as for the first bind, so that a
        fork never happens half-way through it
    """

    def __init__(self, path, fork_lock=None):
        self.path = path
        self._fork_lock = fork_lock or contextlib.nullcontext()
        # What the path must keep naming; the mode and group to bind with
        # again, as the relay bound it.
        try:
            st = os.lstat(path)
            self.bound_id = (st.st_dev, st.st_ino)
            self._mode, self._gid = stat.S_IMODE(st.st_mode), st.st_gid
        except OSError:
            self.bound_id = None
        self._check_at = time.monotonic() + CHECK_INTERVAL
        self._lost = False
        self._failures = unix_log.Throttle()

    def check(self, timeout):
        """Return (a new listener or None, the poll timeout it needs)."""
        if self.bound_id is None:
            return None, timeout
        now = time.monotonic()
        listener = None
        if now >= self._check_at:
            self._check_at = now + CHECK_INTERVAL
            listener = self._check()
        wait = (self._check_at - now) * 1000 + 1
        return listener, wait if timeout is None else min(timeout, wait)

    def _check(self):
        try:
            current = sockfile.file_id(self.path)
        except FileNotFoundError:
            current = None
        except OSError:
            current = self.bound_id
        if current == self.bound_id:
            self._lost = False
            return None
        if not self._lost:
            self._lost = True
            unix_log.log(LOG, logging.WARNING, 'Unix notification socket %s: '
                         'the path no longer names this hub\'s socket (%s); '
                         'nobody can connect until it is bound again',
                         self.path, 'removed' if current is None else
                         'replaced, left alone')
        if current is not None:
            return None
        return self._bind_again()

    def _bind_again(self):
        """Bind the path again, by the rules of the first bind."""
        directory = os.path.dirname(self.path)
        try:
            problem = sockfile.directory_problem(directory)
            if problem:
                raise sockfile.UnsafeSocketFile(problem)
            with self._fork_lock:
                with sockfile.Lock(self.path + '.lock'):
                    if os.path.lexists(self.path):
                        # Bound by another process meanwhile: its own.
                        return None
                    listener, self.bound_id = sockfile.bind_listener(
                        self.path, self._mode, self._gid)
        except sockfile.LockBusy:
            return None
        except (OSError, proto.RelayError) as exc:
            unsaid = self._failures.hit()
            if unsaid:
                unix_log.log(LOG, logging.WARNING, 'Unix notification socket '
                             '%s: cannot bind it again: %s (%d attempts since '
                             'the last report); retrying every %.0fs',
                             self.path, exc, unsaid, CHECK_INTERVAL)
            return None
        self._lost = False
        unix_log.log(LOG, logging.INFO, 'Unix notification socket %s: '
                     'bound again', self.path)
        return listener
