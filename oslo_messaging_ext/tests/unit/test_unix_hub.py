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

"""The hub, driven by hand.

No I/O thread runs: each test builds a Hub with socket pairs for its
peers and calls the step under test, so that the order of events that a
thread would make a matter of luck is fixed.
"""

import errno
import json
import os
from unittest import mock

import fixtures
from oslotest import base

from oslo_messaging_ext.notify import _unix_hub
from oslo_messaging_ext.notify import _unix_log
from oslo_messaging_ext.notify import _unix_protocol as proto
from oslo_messaging_ext.tests import utils as test_utils

# The hub runs in the relay's native thread and polls natively; driven by
# hand here, it gets the same modules in an eventlet-patched run.
select = proto.native('select')
socket = proto.native('socket')

notification = test_utils.notification_line


class HubTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        self.counts = []
        self.unsent = 0
        self.hub = self.make_hub(listener, select.poll())

    def make_hub(self, listener, poller):
        def take_unsent():
            count, self.unsent = self.unsent, 0
            return count

        return _unix_hub.Hub(
            listener, poller, '/run/n.sock', service='hub-unit',
            max_subscribers=8, buffer_size=1 << 20, take_unsent=take_unsent,
            counts_changed=lambda *counts: self.counts.append(counts))

    def logged(self, logger):
        # In an eventlet-patched run the hub hands its records over to the
        # service side instead of logging them itself.
        _unix_log.emit_deferred_records()
        return logger.output

    def pair(self):
        return test_utils.native_socket_pair(self)

    def peer(self, kind):
        ours, theirs = self.pair()
        peer = _unix_hub.Peer(ours)
        peer.kind = kind
        self.hub.peers[peer.fd] = peer
        self.hub._poller.register(ours, select.POLLIN)
        return peer, theirs

    def test_a_publisher_dropped_on_a_failed_send_still_relays_its_lines(self):
        # A publisher that exits right after sending its last lines: the hub
        # sees the failure first when it sends the publisher a status line.
        subscriber, subscriber_end = self.peer(_unix_hub._SUBSCRIBER)
        publisher, publisher_end = self.peer(_unix_hub._PUBLISHER)
        publisher_end.sendall(b''.join(notification(seq) for seq in range(50)))
        publisher_end.close()

        self.hub._count_changed()

        self.assertNotIn(publisher.fd, self.hub.peers)
        reader = subscriber_end.makefile('rb')
        self.addCleanup(reader.close)
        received = [json.loads(reader.readline())['payload']['seq']
                    for _ in range(50)]
        self.assertEqual(list(range(50)), received)

    def test_status_lines_to_a_publisher_that_does_not_read_stay_bounded(self):
        publisher, publisher_end = self.peer(_unix_hub._PUBLISHER)
        for _ in range(20000):
            self.hub._count_changed()
        self.assertLessEqual(len(publisher.pending), 2)
        self.assertLess(publisher.pending_bytes, 1024)

    def test_accept_out_of_descriptors_pauses_and_logs_once(self):
        logger = self.useFixture(test_utils.FakeLogger(_unix_hub.__name__))
        listener = mock.Mock()
        listener.accept.side_effect = OSError(errno.EMFILE, 'Too many')
        self.hub = self.make_hub(listener, mock.Mock())
        for _ in range(1000):
            self.hub._accept()
        self.assertEqual(1, self.logged(logger).count('accept failed'))
        self.hub._poller.modify.assert_called_with(listener, 0)
        self.assertGreater(self.hub._resume_accepting(None), 0)

    def test_publishers_of_another_uid_are_logged_once(self):
        logger = self.useFixture(test_utils.FakeLogger(_unix_hub.__name__))
        self.useFixture(fixtures.MockPatch(
            'oslo_messaging_ext.notify._unix_sockfile.peer_uid',
            return_value=os.geteuid() + 1))
        hello = proto.control_line(role=proto.ROLE_PUBLISHER,
                                   service='hub-unit', pid=1)
        for _ in range(5):
            peer, peer_end = self.peer(_unix_hub._NEW)
            self.hub._identify(peer, hello)
            self.assertIs(_unix_hub._SUBSCRIBER, peer.kind)
        self.assertEqual(1, self.logged(logger).count('ignoring a publisher'))

    def test_a_stopping_hub_never_leaves_a_cut_line(self):
        subscriber, subscriber_end = self.peer(_unix_hub._SUBSCRIBER)
        batch = b''.join(notification(seq) for seq in range(1000))
        subscriber.pending.append(memoryview(batch)[10:])
        subscriber.pending.append(notification(1000))
        subscriber.pending_bytes = len(batch) - 10 + len(notification(1000))

        unread = self.hub.trim_to_line_end(subscriber)

        self.assertEqual(1000, unread)
        [rest] = subscriber.pending
        self.assertEqual(notification(0)[10:], bytes(rest))

    def test_a_publisher_whose_handshake_came_late_is_still_heard(self):
        # A publisher starved of CPU for longer than the grace period is
        # taken for a subscriber; its handshake must still make it one,
        # or every line it sends would be ignored, uncounted.
        subscriber, subscriber_end = self.peer(_unix_hub._NEW)
        late, late_end = self.peer(_unix_hub._NEW)
        for peer in (subscriber, late):
            peer.classify_at = 0
        self.hub.tick(None)
        self.assertEqual(_unix_hub._SUBSCRIBER, late.kind)
        self.assertEqual((2, 0, False), self.counts[-1])

        late_end.sendall(proto.control_line(
            role=proto.ROLE_PUBLISHER, service='hub-unit', pid=1) +
            b''.join(notification(seq) for seq in range(3)))
        self.hub.handle(late.fd, select.POLLIN)

        self.assertEqual(_unix_hub._PUBLISHER, late.kind)
        self.assertEqual((1, 0, False), self.counts[-1])
        reader = subscriber_end.makefile('rb')
        self.addCleanup(reader.close)
        received = [json.loads(reader.readline())['payload']['seq']
                    for _ in range(3)]
        self.assertEqual([0, 1, 2], received)
        # It is sent status lines only from now on.
        late_end.setblocking(False)
        for line in late_end.recv(65536).splitlines():
            self.assertIsNotNone(proto.parse_control(line), line)

    def test_a_subscriber_that_sends_anything_else_is_not_read_again(self):
        subscriber, subscriber_end = self.peer(_unix_hub._NEW)
        subscriber.classify_at = 0
        self.hub.tick(None)
        subscriber_end.sendall(b'hello\n')
        self.hub.handle(subscriber.fd, select.POLLIN)
        self.assertEqual(_unix_hub._SUBSCRIBER, subscriber.kind)
        self.assertFalse(subscriber.reading)

    def test_a_handshake_cut_by_the_grace_period_still_counts(self):
        late, late_end = self.peer(_unix_hub._NEW)
        hello = proto.control_line(role=proto.ROLE_PUBLISHER,
                                   service='hub-unit', pid=1)
        late_end.sendall(hello[:10])
        self.hub.handle(late.fd, select.POLLIN)
        late.classify_at = 0
        self.hub.tick(None)
        late_end.sendall(hello[10:])
        self.hub.handle(late.fd, select.POLLIN)
        self.assertEqual(_unix_hub._PUBLISHER, late.kind)
