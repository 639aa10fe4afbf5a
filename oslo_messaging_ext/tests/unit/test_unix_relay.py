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

"""The relay's hub and publisher halves, driven by hand.

No I/O thread runs: each test puts a Relay in the state it needs, with
socket pairs for its peers, and calls the step under test, so that the
order of events that a thread would make a matter of luck is fixed.
"""

import json
import os
import select
import socket

import fixtures
from oslotest import base

from oslo_messaging_ext.notify import _unix_protocol as proto
from oslo_messaging_ext.notify import _unix_relay


def notification(seq):
    return json.dumps({'event_type': 'image.upload',
                       'payload': {'seq': seq}}).encode() + b'\n'


class RelayTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        tmpdir = self.useFixture(fixtures.TempDir()).path
        self.relay = _unix_relay.Relay(
            os.path.join(tmpdir, 'n.sock'), service='relay-unit',
            mode=0o660, gid=os.getegid(), max_subscribers=8,
            buffer_size=1 << 20)
        self.relay._poller = select.poll()

    def pair(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        theirs.settimeout(5.0)
        return ours, theirs

    def peer(self, kind):
        ours, theirs = self.pair()
        peer = _unix_relay._Peer(ours)
        peer.kind = kind
        self.relay._peers[peer.fd] = peer
        self.relay._poller.register(ours, select.POLLIN)
        return peer, theirs

    def test_a_sibling_dropped_on_a_failed_send_still_relays_its_lines(self):
        # A sibling that exits right after sending its last lines: the hub
        # sees the failure first when it sends the sibling a status line.
        self.relay.state = _unix_relay._HUB
        subscriber, subscriber_end = self.peer(_unix_relay._SUBSCRIBER)
        sibling, sibling_end = self.peer(_unix_relay._SIBLING)
        sibling_end.sendall(b''.join(notification(seq) for seq in range(50)))
        sibling_end.close()

        self.relay._count_changed()

        self.assertNotIn(sibling.fd, self.relay._peers)
        reader = subscriber_end.makefile('rb')
        self.addCleanup(reader.close)
        received = [json.loads(reader.readline())['payload']['seq']
                    for _ in range(50)]
        self.assertEqual(list(range(50)), received)

    def test_lines_the_lost_hub_did_not_take_are_reported(self):
        self.relay.state = _unix_relay._PUBLISHER
        upstream, hub_end = self.pair()
        self.relay._upstream = upstream
        self.relay._poller.register(upstream, select.POLLIN)
        batch = b''.join(notification(seq) for seq in range(10))
        # The hub took 3 lines and half of the fourth.
        cut = len(b''.join(notification(seq) for seq in range(3))) + 5
        self.relay._upstream_pending = memoryview(batch)[cut:]

        self.relay._lose_upstream()

        self.assertEqual(_unix_relay._STARTING, self.relay.state)
        [notice] = self.relay._outbox
        self.assertTrue(notice.encode().startswith(proto.DROPPED_PREFIX))
        self.assertEqual(7, proto.dropped_count(notice))

    def test_notifications_in_a_cut_batch(self):
        batch = (b'image.upload"}}\n' +
                 proto.control_line(role='publisher', service='s', pid=1) +
                 notification(1) +
                 proto.dropped_envelope(5, 'publisher 1') +
                 notification(2))
        self.assertEqual(1 + 1 + 5 + 1, _unix_relay._notifications_in(batch))
        self.assertEqual(0, _unix_relay._notifications_in(b''))
