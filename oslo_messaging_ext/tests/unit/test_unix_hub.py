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

import collections
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
        rest, notice = subscriber.pending
        self.assertEqual(notification(0)[10:], bytes(rest))
        # What it will not get is counted to it after that line.
        self.assertEqual(1000, proto.dropped_count(notice))

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

    # -- stopping, bounds and counts ------------------------------------------

    def test_nothing_is_queued_for_a_subscriber_after_its_trim(self):
        # At a clean stop, lines fanned out after the trim would be cut in
        # their turn when the hub gives up: fan-out stops first.
        subscriber, subscriber_end = self.peer(_unix_hub._SUBSCRIBER)
        batch = b''.join(notification(seq) for seq in range(10))
        subscriber.pending.append(memoryview(batch)[10:])
        subscriber.pending_bytes = len(batch) - 10
        self.hub.trim_to_line_end(subscriber)

        self.hub.fan_out(notification(10) + notification(11))
        self.hub._flush_peer(subscriber)

        subscriber_end.setblocking(False)
        rest, notice, end = subscriber_end.recv(65536).split(b'\n')
        self.assertEqual(notification(0)[10:], rest + b'\n')
        # The 9 lines trimmed; the 2 fanned out afterwards were not queued.
        self.assertEqual(9, proto.dropped_count(notice))
        self.assertEqual(b'', end)

    def publisher_and_subscriber(self):
        subscriber, subscriber_end = self.peer(_unix_hub._SUBSCRIBER)
        publisher, publisher_end = self.peer(_unix_hub._PUBLISHER)
        return subscriber, subscriber_end, publisher, publisher_end

    def test_an_endless_line_is_bounded_dropped_counted_and_logged(self):
        self.useFixture(fixtures.MonkeyPatch(
            'oslo_messaging_ext.notify._unix_hub.MAX_LINE', 65536))
        logger = self.useFixture(test_utils.FakeLogger(_unix_hub.__name__))
        subscriber, subscriber_end, publisher, publisher_end = (
            self.publisher_and_subscriber())
        for _ in range(40):
            self.hub._relay_publisher_data(publisher, b'x' * 8192)
            self.assertLessEqual(publisher.line.size, 65536 + 8192)
        self.assertEqual(1, subscriber.dropped)
        self.hub._relay_publisher_data(
            publisher, b'xx\n' + notification(1) + notification(2)[:5])
        self.hub._relay_publisher_data(publisher, notification(2)[5:])
        reader = subscriber_end.makefile('rb')
        self.addCleanup(reader.close)
        notice = json.loads(reader.readline())
        self.assertEqual(proto.DROPPED_EVENT_TYPE, notice['event_type'])
        self.assertEqual(1, notice['payload']['dropped'])
        self.assertEqual([1, 2], [json.loads(reader.readline())['payload']
                                  ['seq'] for _ in range(2)])
        self.assertEqual(1, self.logged(logger).count('longer than'))

    def test_a_huge_line_in_many_reads_is_relayed_whole(self):
        subscriber, subscriber_end, publisher, publisher_end = (
            self.publisher_and_subscriber())
        line = json.dumps({'payload': 'y' * (3 << 20)}).encode() + b'\n'
        for offset in range(0, len(line), proto.READ_SIZE):
            self.hub._relay_publisher_data(
                publisher, line[offset:offset + proto.READ_SIZE])
            # Held as the chunks read, never joined before the end.
            self.assertEqual(sum(map(len, publisher.line.parts)),
                             publisher.line.size)
        self.assertEqual(0, publisher.line.size)
        self.assertEqual(line, self.drain(subscriber, subscriber_end))

    def drain(self, peer, end):
        """Everything the hub has for ``peer``, read at ``end``."""
        end.setblocking(False)
        received = []
        while True:
            self.hub._flush_peer(peer)
            try:
                data = end.recv(1 << 20)
            except BlockingIOError:
                if not peer.pending:
                    return b''.join(received)
                continue
            received.append(data)

    def test_drop_notices_with_bad_counts_are_refused(self):
        subscriber, subscriber_end, publisher, publisher_end = (
            self.publisher_and_subscriber())
        good = proto.dropped_envelope(5, 'publisher 1', sources={'s': 5})
        for bad in (-5, 'x', 2 ** 60, True, None, 2.5):
            notice = json.loads(good)
            notice['payload']['dropped'] = bad
            self.hub.fan_out(json.dumps(notice, separators=(',', ':'))
                             .encode() + b'\n')
        self.assertEqual(0, subscriber.dropped)
        self.hub.fan_out(good)
        self.assertEqual(5, subscriber.dropped)
        self.assertEqual({'s': 5}, subscriber.dropped_sources)

    def test_drop_notices_say_whose_lines_were_dropped(self):
        subscriber, subscriber_end = self.peer(_unix_hub._SUBSCRIBER)
        self.hub.buffer_size = 4096
        subscriber_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        numbers = collections.Counter()
        for seq in range(3001):
            source = 'a' if seq % 3 else 'b'
            numbers[source] += 1
            self.hub.fan_out(stamped(numbers[source], source))
        # Counted, not sent, by the hub's process: reported before its
        # next line.
        self.unsent = 7
        numbers['a'] += 1
        self.hub.fan_out(stamped(numbers['a'], 'a'))
        received = self.drain(subscriber, subscriber_end)
        self.hub.report_drops()
        received += self.drain(subscriber, subscriber_end)
        received = received.splitlines()
        losses = count_losses(received)
        # Every line is either received or counted, once.
        self.assertEqual(3002 + 7, losses['received'] + losses['lost'])
        self.assertGreater(losses['noticed'], 0)


def stamped(number, source):
    return json.dumps({'event_type': 'image.upload',
                       'payload': {'seq': number},
                       'sequence': {'source': source, 'number': number}},
                      separators=(',', ':')).encode() + b'\n'


def count_losses(lines):
    """What a subscriber lost, from the raw lines it read (see unix.rst).

    Per source, a gap between two numbers is what it missed in between;
    a drop notice's per-source counts are covered by the next gap of that
    source, and count on their own only as far as no gap covers them.
    """
    last, pending = {}, collections.Counter()
    received = gaps = unattributed = noticed = 0
    for raw in lines:
        line = json.loads(raw)
        if line.get('event_type') == proto.DROPPED_EVENT_TYPE:
            sources = line['payload'].get('sources', {})
            pending.update(sources)
            unattributed += line['payload']['dropped'] - sum(
                sources.values())
            noticed += line['payload']['dropped']
            continue
        received += 1
        source, number = (line['sequence']['source'],
                          line['sequence']['number'])
        if source in last:
            gap = number - last[source] - 1
            gaps += gap
            pending[source] -= min(gap, pending[source])
        last[source] = number
    lost = gaps + sum(pending.values()) + unattributed
    return {'received': received, 'lost': lost, 'noticed': noticed,
            'gaps': gaps}
