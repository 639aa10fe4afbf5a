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
"pid": P}`` first; LINE + one JSON notification; DROPPED + ``{cause:
count}`` (CAUSES), before the next LINE. The hub sends each process one
COUNT message carrying a memfd (SCM_RIGHTS) whose first native uint32 is
the number of subscribers. Nothing here imports oslo.messaging.
"""

import importlib
import json
import os
import sys
import time
import uuid

from oslo_utils import timeutils

HELLO, LINE, DROPPED, COUNT = b'H', b'N', b'D', b'C'
# Why a process could not hand a notification over.
ABSENT, FULL, TOO_LARGE = 'hub absent', 'ingest full', 'too large'
CAUSES = (ABSENT, FULL, TOO_LARGE)
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


class Throttle:
    """Say a repeated event at most once a minute, with its count."""

    def __init__(self):
        self._next, self._unsaid = 0.0, 0

    def hit(self):  # how many to say now (0: not yet)
        self._unsaid += 1
        now = time.monotonic()
        if now < self._next:
            return 0
        unsaid, self._unsaid = self._unsaid, 0
        self._next = now + 60.0
        return unsaid


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


def parse_counts(data):
    """{cause: count} of a DROPPED message's body; {} if not valid."""
    try:
        counts = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(counts, dict):
        return {}
    return {k: v for k, v in counts.items()
            if k in CAUSES and valid_count(v) and v}
