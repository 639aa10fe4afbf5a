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

import errno
import json
import os
import subprocess
import sys
import time
from unittest import mock

import fixtures
from oslotest import base

from oslo_messaging_ext.notify import _unix_protocol as proto
from oslo_messaging_ext.notify import _unix_relay

# The relay runs in a native thread and polls natively; driven by hand
# here, it gets the same modules in an eventlet-patched run.
select = proto.native('select')
socket = proto.native('socket')


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

    def logged(self, logger):
        # In an eventlet-patched run the relay hands its records over to
        # the service side instead of logging them itself.
        _unix_relay.emit_deferred_records()
        return logger.output

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

    def test_hub_gone_with_pollout_and_pollhup_together(self):
        # The relay used to call recv() on the upstream it had just lost,
        # and end up failed for the rest of the process's life.
        self.relay.state = _unix_relay._PUBLISHER
        upstream, hub_end = self.pair()
        self.relay._upstream = upstream
        self.relay._poller.register(upstream, select.POLLIN)
        self.relay._upstream_pending = b''.join(
            notification(seq) for seq in range(3))
        hub_end.close()

        self.relay._handle(upstream.fileno(), select.POLLOUT | select.POLLHUP)

        self.assertEqual(_unix_relay._STARTING, self.relay.state)
        self.assertIsNone(self.relay._upstream)
        [notice] = self.relay._outbox
        self.assertEqual(3, proto.dropped_count(notice))

    def test_a_connection_refused_at_once_backs_off(self):
        self.relay.state = _unix_relay._PUBLISHER
        delays = []
        for _ in range(4):
            upstream, hub_end = self.pair()
            self.relay._become_publisher(upstream)
            hub_end.close()
            self.relay._read_upstream()
            delays.append(self.relay._retry_at - time.monotonic())
        self.assertEqual(_unix_relay._STARTING, self.relay.state)
        self.assertGreater(delays[0], 0)
        self.assertGreater(delays[-1], delays[0] * 4)

    def test_status_lines_to_a_sibling_that_does_not_read_stay_bounded(self):
        self.relay.state = _unix_relay._HUB
        sibling, sibling_end = self.peer(_unix_relay._SIBLING)
        for _ in range(20000):
            self.relay._count_changed()
        self.assertLessEqual(len(sibling.pending), 2)
        self.assertLess(sibling.pending_bytes, 1024)

    def test_accept_out_of_descriptors_pauses_and_logs_once(self):
        logger = self.useFixture(fixtures.FakeLogger(
            name=_unix_relay.LOG.name))
        self.relay.state = _unix_relay._HUB
        listener = mock.Mock()
        listener.accept.side_effect = OSError(errno.EMFILE, 'Too many')
        self.relay._listener = listener
        self.relay._poller = mock.Mock()
        for _ in range(1000):
            self.relay._accept()
        self.assertEqual(1, self.logged(logger).count('accept failed'))
        self.relay._poller.modify.assert_called_with(listener, 0)
        self.assertGreater(self.relay._resume_accepting(None), 0)

    def test_publishers_of_another_uid_are_logged_once(self):
        logger = self.useFixture(fixtures.FakeLogger(
            name=_unix_relay.LOG.name))
        self.useFixture(fixtures.MockPatch(
            'oslo_messaging_ext.notify._unix_sockfile.peer_uid',
            return_value=os.geteuid() + 1))
        self.relay.state = _unix_relay._HUB
        hello = proto.control_line(role='publisher', service='relay-unit',
                                   pid=1)
        for _ in range(5):
            peer, peer_end = self.peer(_unix_relay._NEW)
            self.relay._identify(peer, hello)
            self.assertIs(_unix_relay._SUBSCRIBER, peer.kind)
        self.assertEqual(1, self.logged(logger).count('ignoring a publisher'))

    def test_a_stopping_hub_never_leaves_a_cut_line(self):
        self.relay.state = _unix_relay._HUB
        subscriber, subscriber_end = self.peer(_unix_relay._SUBSCRIBER)
        batch = b''.join(notification(seq) for seq in range(1000))
        subscriber.pending.append(memoryview(batch)[10:])
        subscriber.pending.append(notification(1000))
        subscriber.pending_bytes = len(batch) - 10 + len(notification(1000))

        unread = self.relay._trim_to_line_end(subscriber)

        self.assertEqual(1000, unread)
        [rest] = subscriber.pending
        self.assertEqual(notification(0)[10:], bytes(rest))

    def test_relay_thread_logs_do_not_hang_eventlet(self):
        script = os.path.join(os.path.dirname(__file__), 'eventlet_logging.py')
        for _ in range(3):
            result = subprocess.run([sys.executable, script], timeout=60,
                                    capture_output=True, text=True)
            self.assertEqual(0, result.returncode, result.stderr[-2000:])
            self.assertIn('relay records logged', result.stdout)
