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

"""The unix relays of a process across fork and exit (private).

One relay exists per socket path and per process (:data:`relays`). This
module keeps them right whoever forks the process and however it ends:

* A process that forks never holds a running relay thread at fork time.
  os.fork() and multiprocessing run Python's at-fork hooks: before the
  fork, each relay's thread is parked at a safe point (waiting on a lock,
  not holding the GIL nor any lock of its own) and the relay's fork lock
  is taken (no lock file nor half-bound socket is inherited); the parent
  then resumes its thread, and the child forgets what it inherited and
  joins again as a publisher.
* uWSGI forks its workers without Python's at-fork hooks (unless run
  with ``--py-call-osafterfork``), so the parked thread cannot be had
  there: its master, which loads the application before forking (without
  ``--lazy-apps``), never starts a relay thread (:func:`in_uwsgi_master`).
  uWSGI's own post-fork hook, where uWSGI is present, makes each worker's
  relay its own; and any relay that finds itself in another process than
  the one that made it (a fork no hook told about) does the same before
  it acts (:func:`adopt`).
* At exit the relays hand their queued lines over and remove their socket;
  a multiprocessing child, which ends in os._exit(), does so from its
  finalizers.
"""

import atexit
import functools
import logging
import multiprocessing
from multiprocessing import util as mp_util
import os
import sys

from oslo_messaging_ext.notify import _unix_log as unix_log
from oslo_messaging_ext.notify import _unix_protocol as proto

LOG = logging.getLogger(__name__)
_log = functools.partial(unix_log.log, LOG)

# How long a fork waits for a relay thread to park. It parks within a pass
# of its loop, which never blocks; past this the fork goes on.
PARK_TIMEOUT = 1.0

# The relays of this process, by socket path.
relays = {}

# Serializes the adoption of a relay by a child that no at-fork hook told
# about its fork: two of its threads may notice it at once.
_adopt_lock = proto.native('threading').Lock()


class Parking:
    """Where a relay thread waits while its process forks.

    Before a fork the forking thread holds the gate, and waits until the
    relay thread, at the top of its loop, waits on it: the thread then
    holds no lock and not the GIL, and is not half-way through anything
    the child would inherit.
    """

    def __init__(self):
        threading = proto.native('threading')
        self._gate = threading.Lock()
        self._parked = threading.Event()
        self._resumed = threading.Event()
        self._wanted = False

    def park(self, wake, path):
        """In the forking thread: wait until the relay thread is parked.

        :param wake: wakes the relay thread up
        :param path: the socket path, for the log
        """
        self._gate.acquire()
        self._resumed.clear()
        self._wanted = True
        wake()
        if not self._parked.wait(PARK_TIMEOUT):
            _log(logging.WARNING, 'Unix notification socket %s: the relay '
                 'thread did not pause for a fork within %.1f s; forking '
                 'anyway', path, PARK_TIMEOUT)

    def unpark(self):
        """After the fork, in the parent: let the relay thread go on.

        It is seen past the gate before the next fork may park it again:
        a thread still waiting on the gate of the last fork would not tell
        the next one that it is parked.
        """
        if not self._wanted:
            return
        self._wanted = False
        parked = self._parked.is_set()
        self._parked.clear()
        self._gate.release()
        if parked:
            self._resumed.wait(PARK_TIMEOUT)

    def here(self):
        """In the relay thread, at a safe point: park if a fork waits."""
        if self._wanted:
            self._parked.set()
            with self._gate:
                pass
            self._resumed.set()

    def parked(self):
        return self._parked.is_set()


def in_uwsgi_master():
    """Whether this is uWSGI's master, which forks the workers.

    Without --lazy-apps the master loads the application, so creates the
    driver, then forks the workers without Python's at-fork hooks: a relay
    thread running there would be copied into each worker half-way (the
    workers then hang taking the GIL), and the master may run no Python
    afterwards. Mules and the spooler are forked from it and may relay.
    """
    uwsgi = sys.modules.get('uwsgi')
    if uwsgi is None:
        return False
    try:
        if uwsgi.worker_id() != 0:
            return False
        mule_id = getattr(uwsgi, 'mule_id', None)
        if mule_id is not None and mule_id() != 0:
            return False
        spooler = getattr(uwsgi, 'i_am_the_spooler', None)
        return not (spooler is not None and spooler())
    except Exception:
        return False


def adopt(relay):
    """Make a relay inherited through a fork no hook told about our own."""
    with _adopt_lock:
        if relay.pid != os.getpid():
            relay.after_fork_in_child()


def register_for_multiprocessing(relay):
    """Close ``relay`` at the end of a multiprocessing child.

    Such a child ends in os._exit, without atexit. Its finalizer registry
    is emptied when it starts, so for a relay made before the fork the
    finalizer is registered from an after-fork hook that multiprocessing
    runs after that; a relay made in the child (cotyledon's workers make
    their notifier there) registers it at once.
    """
    if multiprocessing.parent_process() is not None:
        _finalize_in_multiprocessing_child(relay)
    mp_util.register_after_fork(relay, _finalize_in_multiprocessing_child)


def _finalize_in_multiprocessing_child(relay):
    mp_util.Finalize(relay, relay.close, exitpriority=100)


def _before_fork():
    for relay in list(relays.values()):
        relay.park()
        relay.fork_lock.acquire()


def _after_fork_in_parent():
    for relay in list(relays.values()):
        relay.fork_lock.release()
        relay.unpark()


def _after_fork_in_child():
    for relay in list(relays.values()):
        relay.after_fork_in_child()
        # A forked worker joins at once, so that the socket exists (and
        # its subscribers are counted) before its first notification.
        relay.start()


def _after_uwsgi_fork():
    # With --py-call-osafterfork Python's hooks ran first: nothing is left
    # to adopt then, but a relay idle in the master starts here.
    for relay in list(relays.values()):
        adopt(relay)
        relay.start()


def _install_uwsgi_post_fork_hook():
    """Run _after_uwsgi_fork in every process uWSGI forks.

    Through uwsgidecorators.postfork, so that the application's own
    post-fork functions, registered the same way, run too; failing that
    (an embedded uWSGI without it), chained to uwsgi.post_fork_hook.
    """
    uwsgi = sys.modules.get('uwsgi')
    if uwsgi is None:
        return
    # Importing uwsgidecorators replaces a hook the application set itself.
    previous = getattr(uwsgi, 'post_fork_hook', None)
    try:
        import uwsgidecorators
    except ImportError:
        def post_fork_hook():
            _after_uwsgi_fork()
            if previous is not None:
                previous()

        uwsgi.post_fork_hook = post_fork_hook
        return
    if previous is not None and previous is not uwsgi.post_fork_hook:
        uwsgidecorators.postfork(previous)
    uwsgidecorators.postfork(_after_uwsgi_fork)


def _close_all_at_exit():
    for relay in list(relays.values()):
        try:
            relay.close()
        except Exception:
            LOG.exception('Unix notification socket %s: failed to close',
                          relay.path)


os.register_at_fork(before=_before_fork,
                    after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)
_install_uwsgi_post_fork_hook()
