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

"""What the service's processes and the hub say (private).

A process sends the hub's ingest socket (SOCK_SEQPACKET) one message per
notification, its first byte saying what it is: HELLO + ``{"source": S,
"pid": P}`` first, carrying its tally (SCM_RIGHTS); then, for each
notification, LINE + what it dropped so far (3 native uint64, one per
cause of CAUSES) + the JSON notification. The hub sends each process one
COUNT message carrying a memfd whose first native uint32 is the number of
subscribers.

The tally is a memfd of TALLY_SIZE bytes, sealed against shrinking, of
native uint64: [cause] what the process dropped, written by the process;
[CREDITED + cause] what a hub reported to subscribers, written by the
hub. A hub reports drops before the first line that counts them, and
reads the tally when the process leaves: nothing a process dropped goes
unreported, whether it exits, is killed or moves to a new hub. Nothing
here imports oslo.messaging.
"""

import fcntl
import importlib
import json
import mmap
import os
import struct
import sys
import time
import uuid

from oslo_utils import timeutils

HELLO, LINE, COUNT = b'H', b'N', b'C'
# Why a process could not hand a notification over: indices in CAUSES.
ABSENT, FULL, TOO_LARGE = range(3)
CAUSES = ('hub absent', 'ingest full', 'too large')
CREDITED = 4  # offset in the tally
TALLY_SIZE = 64
HEADER = struct.Struct('=c3Q')  # of a LINE: LINE and the drop counts
# Why the hub dropped a line for a subscriber.
SUBSCRIBER_BUFFER = 'subscriber buffer'
# Public as oslo_messaging_ext.unix_subscriber.DROPPED_EVENT_TYPE.
DROPPED_EVENT_TYPE = 'oslo_messaging_ext.unix.dropped'
READ_SIZE = 262144  # bytes read from a subscriber connection at once
MAX_DROP_COUNT = 2 ** 53  # beyond, garbage, not a count
COUNT_SIZE = 4096  # of the subscriber count memfd


def native(name):
    """Return the module ``name`` as it was before eventlet patched it.

    notify() makes only non-blocking system calls: a green socket would
    wait for the hub instead of failing with EAGAIN.
    """
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
    """The tally of ``fd``; None unless sealed against shrinking.

    Else its process could end the hub with SIGBUS.
    """
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
    """The in-band notice of ``count`` notifications dropped ``where``.

    ``sources`` says how many of them were lines of which source (see the
    "sequence" key of a line).
    """
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
