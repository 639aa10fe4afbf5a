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

"""The only places where tests reach into the unix driver's private code.

Each is a narrow seam to provoke what no public surface can (a fault in
the relay thread, another user's identity); the tests then assert on what
a subscriber or the log sees. When the relay, hub or encoder modules are
refactored, re-point this module, not the tests.
"""

from unittest import mock

import fixtures

from oslo_messaging_ext.notify import _unix_election
from oslo_messaging_ext.notify import _unix_encoding
from oslo_messaging_ext.notify import _unix_hub
from oslo_messaging_ext.notify import _unix_relay
from oslo_messaging_ext.notify import _unix_sockfile

# The parent of every logger of the driver's modules, whatever they become.
LOGGER = 'oslo_messaging_ext.notify'


def fail_once_in_relay_thread(test, exc):
    """Make the relay thread's next hand-out of lines raise ``exc``, once.

    :returns: a list that gets True when it was raised
    """
    real = _unix_hub.Hub.fan_out
    raised = []

    def fan_out(hub, data):
        if not raised:
            raised.append(True)
            raise exc
        return real(hub, data)

    test.useFixture(fixtures.MockPatchObject(_unix_hub.Hub, 'fan_out',
                                             fan_out))
    return raised


def count_elections(test):
    """Count the relay threads' elections (who serves the path) from now.

    :returns: a list that gets one item per election run, which ended
        with a hub, a publisher or a failure
    """
    real = _unix_election.elect
    runs = []

    def elect(*args, **kwargs):
        runs.append(True)
        return real(*args, **kwargs)

    test.useFixture(fixtures.MockPatchObject(_unix_election, 'elect', elect))
    return runs


def emit_relay_logs():
    """Log what the relay thread handed over (eventlet-patched runs)."""
    _unix_relay.emit_deferred_records()


def pretend_peer_uid(test, uid):
    """Every connected peer looks like a process of ``uid``."""
    test.useFixture(fixtures.MockPatchObject(_unix_sockfile, 'peer_uid',
                                             return_value=uid))


def encoders():
    """The encoder with orjson (None when absent) and the stdlib one."""
    with_orjson = (_unix_encoding.make_encoder() if _unix_encoding.orjson
                   else None)
    with mock.patch.object(_unix_encoding, 'orjson', None):
        stdlib = _unix_encoding.make_encoder()
    return with_orjson, stdlib
