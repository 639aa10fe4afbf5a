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

import io
import json
import os
import socket
import threading
from unittest import mock

import fixtures
import oslo_messaging
from oslo_messaging.notify import dispatcher as notify_dispatcher
from oslotest import base

from oslo_messaging_ext.cmd import tail
from oslo_messaging_ext.tests import utils as test_utils
from oslo_messaging_ext import unix_subscriber

NOTIFICATIONS = [
    {'message_id': 'm1', 'publisher_id': 'image.host1',
     'event_type': 'image.upload', 'priority': 'INFO',
     'payload': {'id': 'i1', 'status': 'active'}, 'timestamp': 't1'},
    {'message_id': 'm2', 'publisher_id': 'compute.host2',
     'event_type': 'compute.instance.create.end', 'priority': 'WARN',
     'payload': {'id': 'i2'}, 'timestamp': 't2',
     'context': {'user': 'u2'}},
    {'message_id': 'm3', 'publisher_id': 'oslo_messaging_ext.unix',
     'event_type': unix_subscriber.DROPPED_EVENT_TYPE, 'priority': 'WARN',
     'payload': {'dropped': 7}, 'timestamp': 't3'},
    {'message_id': 'm4', 'publisher_id': 'image.host1',
     'event_type': 'image.delete', 'priority': 'ERROR',
     'payload': {'id': 'i1'}, 'timestamp': 't4'},
]


class FakeService:
    """A listening socket that writes ``lines`` to each connection."""

    def __init__(self, path, lines):
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(4)
        self.lines = lines
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        # One subscriber only, as a service that then stops.
        self.listener.close()
        with conn:
            conn.sendall(b''.join(self.lines))

    def close(self):
        self.listener.close()
        self.thread.join(5)


def encoded(notifications):
    return [json.dumps(n).encode() + b'\n' for n in notifications]


class SubscriberTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.tmpdir = self.useFixture(fixtures.TempDir()).path
        self.path = os.path.join(self.tmpdir, 's.sock')

    def serve(self, notifications=NOTIFICATIONS):
        service = FakeService(self.path, encoded(notifications))
        self.addCleanup(service.close)
        return service

    def test_iterates_decoded_notifications_and_counts_drops(self):
        self.serve()
        with unix_subscriber.Subscription(self.path) as subscription:
            received = list(subscription)
        self.assertEqual(NOTIFICATIONS, received)
        self.assertEqual(7, subscription.dropped)

    def test_connect_errors_say_what_is_wrong(self):
        self.assertRaises(unix_subscriber.SocketMissing,
                          unix_subscriber.connect, self.path)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()
        exc = self.assertRaises(unix_subscriber.ServiceNotListening,
                                unix_subscriber.connect, self.path)
        self.assertIn('not running', str(exc))
        self.assertIn(self.path, str(exc))

    def test_reconnects_with_backoff(self):
        subscription = unix_subscriber.Subscription(
            self.path, reconnect=True, min_backoff=0.01, max_backoff=0.05)
        received = []

        def read():
            for notification in subscription:
                received.append(notification['message_id'])
                if len(received) == 2:
                    subscription.close()

        reader = threading.Thread(target=read)
        reader.start()
        # Nothing there at first; then two services in turn.
        first = FakeService(self.path, encoded(NOTIFICATIONS[:1]))
        first.thread.join(10)
        first.close()
        os.unlink(self.path)
        second = FakeService(self.path, encoded(NOTIFICATIONS[1:2]))
        self.addCleanup(second.close)
        reader.join(10)
        self.assertFalse(reader.is_alive())
        self.assertEqual(['m1', 'm2'], received)
        self.assertEqual(2, subscription.connections)


class Endpoint:

    def __init__(self):
        self.calls = []

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        self.calls.append(('info', ctxt, publisher_id, event_type, payload,
                           metadata))

    def warn(self, ctxt, publisher_id, event_type, payload, metadata):
        self.calls.append(('warn', ctxt, publisher_id, event_type, payload,
                           metadata))


class FilteredEndpoint(Endpoint):
    filter_rule = oslo_messaging.NotificationFilter(
        publisher_id='^image\\.', event_type='^image\\.')


class FailingEndpoint:

    def info(self, *args):
        raise RuntimeError('endpoint bug')


class RequeueingEndpoint:

    def info(self, *args):
        return oslo_messaging.NotificationResult.REQUEUE


class DecodeTestCase(base.BaseTestCase):

    def test_orjson_and_stdlib_read_the_same(self):
        if unix_subscriber.orjson is None:
            self.skipTest('orjson (optional: the orjson extra) is not '
                          'installed: no second decoder to compare')
        line = json.dumps({'event_type': 'image.upload',
                           'payload': {'name': 'caf\u00e9', 'size': 1036,
                                       'ratio': 0.5, 'tags': []}}).encode()
        self.assertEqual(json.loads(line), unix_subscriber._decode(line))

    def test_what_only_the_stdlib_reads_still_decodes(self):
        # The driver's stdlib fallback writes NaN, which orjson refuses.
        decoded = unix_subscriber._decode(b'{"payload":{"x":NaN}}')
        self.assertNotEqual(decoded['payload']['x'],
                            decoded['payload']['x'])

    def test_not_json_raises_value_error(self):
        self.assertRaises(ValueError, unix_subscriber._decode, b'{nope')


class EndpointDispatcherTestCase(base.BaseTestCase):

    def test_signature_and_priorities_as_oslo_messaging(self):
        endpoint = Endpoint()
        dispatcher = unix_subscriber.EndpointDispatcher([endpoint])
        for notification in NOTIFICATIONS:
            dispatcher.dispatch(notification)
        self.assertEqual([
            ('info', {}, 'image.host1', 'image.upload',
             {'id': 'i1', 'status': 'active'},
             {'message_id': 'm1', 'timestamp': 't1'}),
            ('warn', {'user': 'u2'}, 'compute.host2',
             'compute.instance.create.end', {'id': 'i2'},
             {'message_id': 'm2', 'timestamp': 't2'}),
            ('warn', {}, 'oslo_messaging_ext.unix',
             unix_subscriber.DROPPED_EVENT_TYPE, {'dropped': 7},
             {'message_id': 'm3', 'timestamp': 't3'}),
        ], endpoint.calls)

    def test_filter_rule(self):
        endpoint = FilteredEndpoint()
        dispatcher = unix_subscriber.EndpointDispatcher([endpoint])
        for notification in NOTIFICATIONS:
            dispatcher.dispatch(notification)
        self.assertEqual(['image.upload'], [c[3] for c in endpoint.calls])

    def test_failing_endpoint_does_not_stop_the_others(self):
        endpoint = Endpoint()
        logger = self.useFixture(test_utils.FakeLogger(
            unix_subscriber.__name__))
        dispatcher = unix_subscriber.EndpointDispatcher(
            [FailingEndpoint(), endpoint])
        self.assertEqual(2, dispatcher.dispatch(NOTIFICATIONS[0]))
        self.assertEqual(1, len(endpoint.calls))
        self.assertIn('endpoint bug', logger.output)

    def test_requeue_is_ignored(self):
        # No requeue on a local socket: the next endpoint is still called.
        endpoint = Endpoint()
        dispatcher = unix_subscriber.EndpointDispatcher(
            [RequeueingEndpoint(), endpoint])
        self.assertEqual(2, dispatcher.dispatch(NOTIFICATIONS[0]))
        self.assertEqual(1, len(endpoint.calls))

    def test_no_endpoint_for_the_priority(self):
        dispatcher = unix_subscriber.EndpointDispatcher([Endpoint()])
        for priority in ('ERROR', None, 'no-such-priority'):
            self.assertEqual(0, dispatcher.dispatch(
                dict(NOTIFICATIONS[0], priority=priority)))

    def test_is_oslo_messagings_notification_dispatcher(self):
        self.assertIsInstance(unix_subscriber.EndpointDispatcher([]),
                              notify_dispatcher.NotificationDispatcher)


class TailTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.tmpdir = self.useFixture(fixtures.TempDir()).path
        self.path = os.path.join(self.tmpdir, 's.sock')
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.useFixture(fixtures.MonkeyPatch('sys.stdout', self.stdout))
        self.useFixture(fixtures.MonkeyPatch('sys.stderr', self.stderr))

    def run_tail(self, *args):
        service = FakeService(self.path, encoded(NOTIFICATIONS))
        self.addCleanup(service.close)
        return tail.main(list(args) + [self.path])

    def test_ndjson_when_piped_with_filters(self):
        self.assertEqual(0, self.run_tail('-e', 'image.*', '-p', 'info'))
        lines = [json.loads(x) for x in self.stdout.getvalue().splitlines()]
        # Drop notices always pass the filters.
        self.assertEqual(['m1', 'm3'], [n['message_id'] for n in lines])

    def test_publisher_filter_and_count(self):
        self.assertEqual(0, self.run_tail('-P', 'image.*', '-n', '2'))
        lines = [json.loads(x) for x in self.stdout.getvalue().splitlines()]
        self.assertEqual(['m1', 'm3', 'm4'],
                         [n['message_id'] for n in lines])

    def test_readable_lines(self):
        self.assertEqual(0, self.run_tail('--format', 'line', '-n', '1'))
        self.assertEqual('t1 INFO  image.host1 image.upload '
                         '{"id":"i1","status":"active"}\n',
                         self.stdout.getvalue())

    def test_stream_ends_before_count(self):
        self.assertEqual(tail.EXIT_INCOMPLETE, self.run_tail('-n', '10'))
        self.assertIn('after 3 of 10', self.stderr.getvalue())

    def test_missing_socket(self):
        self.assertEqual(tail.EXIT_MISSING, tail.main([self.path]))
        self.assertIn('no such socket', self.stderr.getvalue())

    def test_not_listening(self):
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()
        self.assertEqual(tail.EXIT_NOT_LISTENING, tail.main([self.path]))

    def test_not_a_socket(self):
        open(self.path, 'w').close()
        self.assertEqual(tail.EXIT_NOT_A_SOCKET, tail.main([self.path]))

    def test_permission_denied(self):
        with mock.patch('socket.socket.connect',
                        side_effect=PermissionError(13, 'Permission '
                                                        'denied')):
            self.assertEqual(tail.EXIT_PERMISSION, tail.main([self.path]))
        self.assertIn('sock_mode', self.stderr.getvalue())
