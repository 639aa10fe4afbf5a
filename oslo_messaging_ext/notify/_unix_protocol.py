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

"""The wire protocol of the unix notification driver (private).

Subscribers only read: one JSON notification a line. The service's own
processes (publishers) also write: a handshake line, then notification
lines; the hub answers them with status lines. Handshake and status lines
are JSON objects whose first key is PROTOCOL_KEY, so that they can be told
apart from notifications without decoding them.
"""

import collections
import importlib
import json
import os
import re
import sys
import uuid

from oslo_utils import timeutils

PROTOCOL_KEY = 'oslo_messaging_ext.unix'
# The roles a control line names, as the value of its PROTOCOL_KEY: a
# publisher's handshake, the hub's status.
ROLE_PUBLISHER = 'publisher'
ROLE_HUB = 'hub'
# Public as oslo_messaging_ext.unix_subscriber.DROPPED_EVENT_TYPE.
DROPPED_EVENT_TYPE = 'oslo_messaging_ext.unix.dropped'
DROPPED_PREFIX = ('{"event_type":"%s"' % DROPPED_EVENT_TYPE).encode('ascii')

# Every control line starts with this, so a publisher can tell the hub's
# status lines apart without decoding the notifications that may reach it
# before the hub has read its handshake.
CONTROL_PREFIX = ('{"%s":' % PROTOCOL_KEY).encode('ascii')
MAX_HANDSHAKE = 4096
# Bytes read from a connection at once.
READ_SIZE = 262144
# A drop count beyond this is garbage, not a count.
MAX_DROP_COUNT = 2 ** 53
# The sequence stamp ends every notification line (see _unix_encoding).
_SEQUENCE_SOURCE = re.compile(
    rb'"sequence":\{"source":"([^"\\]*)","number":[0-9]+\}\}\n')


def native(name):
    """Return the module ``name`` as it was before eventlet patched it."""
    patcher = sys.modules.get('eventlet.patcher')
    if patcher is not None and patcher.is_monkey_patched(
            'thread' if name == 'threading' else name):
        return patcher.original(name)
    return importlib.import_module(name)


class RelayError(Exception):
    """The socket path cannot be used; the message says why."""


def control_line(**fields):
    fields = dict({PROTOCOL_KEY: fields.pop('role')}, **fields)
    return json.dumps(fields, separators=(',', ':')).encode('ascii') + b'\n'


def parse_control(line):
    if not line.startswith(CONTROL_PREFIX):
        return None
    try:
        fields = json.loads(line)
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


def dropped_envelope(count, where, sources=None):
    """The in-band notice of ``count`` notifications dropped ``where``.

    event_type comes first, so that the hub can spot notices among the
    lines it relays (DROPPED_PREFIX) without decoding every line.
    ``sources`` says how many of them were lines of which source (see
    the "sequence" key); by default all were this process's own.
    """
    if sources is None:
        # Imported here: the encoding module imports oslo libraries the
        # protocol does not need.
        from oslo_messaging_ext.notify import _unix_encoding
        sources = {_unix_encoding.own_source(): count}
    return (json.dumps({
        'event_type': DROPPED_EVENT_TYPE,
        'message_id': str(uuid.uuid4()),
        'publisher_id': 'oslo_messaging_ext.unix',
        'priority': 'WARN',
        'payload': {'dropped': count, 'where': where, 'pid': os.getpid(),
                    'sources': sources},
        'timestamp': str(timeutils.utcnow()),
    }, separators=(',', ':')).encode('ascii') + b'\n')


def _valid_count(value):
    return (type(value) is int and 0 <= value <= MAX_DROP_COUNT)


def dropped_notice(line):
    """(count, {source: count}) of a drop notice; (0, {}) if invalid.

    A notice comes from a process of the service user; still, a count
    that is not a non-negative integer, or sources that do not add up
    within it, is refused rather than trusted.
    """
    try:
        payload = json.loads(line)['payload']
    except (ValueError, KeyError, TypeError):
        return 0, {}
    return dropped_payload(payload) or (0, {})


def dropped_payload(payload):
    """(count, {source: count}) of a decoded notice's payload, or None.

    None when the count is not a valid one or the sources not a dict;
    sources that are not valid or do not add up within the count are left
    out (all unattributed).
    """
    try:
        count = payload['dropped']
        sources = payload.get('sources') or {}
    except (KeyError, TypeError, AttributeError):
        return None
    if not _valid_count(count) or not isinstance(sources, dict):
        return None
    if not all(isinstance(k, str) and _valid_count(v) and v
               for k, v in sources.items()) or sum(sources.values()) > count:
        sources = {}
    return count, sources


def dropped_count(line):
    return dropped_notice(line)[0]


def sources_in(data):
    """How many lines of each source ``data`` holds (a Counter)."""
    return collections.Counter(
        m.decode('utf-8', 'replace')
        for m in _SEQUENCE_SOURCE.findall(bytes(data)))


def accounted_in(data):
    """(notifications, {source: count}) that the lines of ``data`` stand for.

    As notifications_in, with the sources of the notifications and of the
    drop notices it holds.
    """
    data = bytes(data)
    sources = sources_in(data)
    if DROPPED_PREFIX in data:
        for line in data.split(b'\n'):
            if line.startswith(DROPPED_PREFIX):
                sources.update(dropped_notice(line)[1])
    return notifications_in(data), dict(sources)


def notifications_in(data):
    """How many notifications ``data`` holds, a cut first line included.

    Control lines are not notifications; a drop notice stands for the
    notifications it counts.
    """
    count = 0
    for line in bytes(data).split(b'\n')[:-1]:
        if line.startswith(DROPPED_PREFIX):
            count += dropped_count(line)
        elif not line.startswith(CONTROL_PREFIX):
            count += 1
    return count
