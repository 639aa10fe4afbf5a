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

* os.fork() and multiprocessing run Python's at-fork hooks: before the
  fork, each relay's fork lock is taken (no lock file nor half-bound
  socket is inherited); the child forgets what it inherited and joins
  again as a publisher.
* At exit the relays hand their queued lines over and remove their socket;
  a multiprocessing child, which ends in os._exit(), does so from its
  finalizers.
"""

import atexit
import logging
from multiprocessing import util as mp_util
import os

LOG = logging.getLogger(__name__)

# The relays of this process, by socket path.
relays = {}


def register_for_multiprocessing(relay):
    """Close ``relay`` at the end of a multiprocessing child.

    Such a child ends in os._exit, without atexit. Its finalizer registry
    is emptied when it starts, so the finalizer is registered from an
    after-fork hook that multiprocessing runs after that.
    """
    mp_util.register_after_fork(relay, _finalize_in_multiprocessing_child)


def _finalize_in_multiprocessing_child(relay):
    mp_util.Finalize(relay, relay.close, exitpriority=100)


def _before_fork():
    for relay in list(relays.values()):
        relay.fork_lock.acquire()


def _after_fork_in_parent():
    for relay in list(relays.values()):
        relay.fork_lock.release()


def _after_fork_in_child():
    for relay in list(relays.values()):
        relay.after_fork_in_child()
        # A forked worker joins at once, so that the socket exists (and
        # its subscribers are counted) before its first notification.
        relay.start()


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
