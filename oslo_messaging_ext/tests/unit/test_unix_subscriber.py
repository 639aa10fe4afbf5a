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

import json
import os
import socket
import subprocess
import sys
import threading
import time
import unittest

import fixtures
from oslo_config import cfg
import oslo_messaging
from oslo_messaging.notify import dispatcher as notify_dispatcher
from oslotest import base

from oslo_messaging_ext.notify import _impl_unix
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


# Upstream these modules live inside oslo.messaging itself, so importing
# them imports oslo_messaging (and its eventlet deprecation warning): the
# promise that a reader does not pay for oslo.messaging is this project's.
skip_inside_oslo_messaging = unittest.skipIf(
    __name__.split('.')[0] == 'oslo_messaging',
    'the subscriber is part of oslo.messaging here, so importing it '
    'imports oslo_messaging')


class FakeService:
    """A listening socket that writes ``lines`` to one connection."""

    def __init__(self, path, lines):
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(4)
        self.lines = lines
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            self._serve_once()
        finally:
            self.done.set()

    def _serve_once(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        # One subscriber only, as a service that then stops.
        self.listener.close()
        with conn:
            try:
                conn.sendall(b''.join(self.lines))
            except OSError:
                pass  # the subscriber left first (| head)

    def close(self):
        # shutdown() wakes an accept() that no subscriber will ever answer
        # (close() alone does not on Linux). Waiting on an event, not on
        # join(timeout): under eventlet on Python 3.13 that raises instead
        # of returning.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the served connection
        self.listener.close()
        self.done.wait(5)


def encoded(notifications):
    return [json.dumps(n).encode() + b'\n' for n in notifications]


def sequenced(source, numbers, **fields):
    """Notifications of one process, stamped as the unix driver does."""
    return [dict({'event_type': 'image.update', 'priority': 'INFO',
                  'publisher_id': 'image.host1', 'payload': {'n': number},
                  'sequence': {'source': source, 'number': number}},
                 **fields) for number in numbers]


def drop_notice(count, **sources):
    """A drop notice; ``sources`` of the count per source, the rest none."""
    return {'event_type': unix_subscriber.DROPPED_EVENT_TYPE,
            'priority': 'WARN', 'publisher_id': 'oslo_messaging_ext.unix',
            'payload': {'dropped': count, 'where': 'subscriber buffer',
                        'pid': 1, 'sources': sources}}


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
        test_utils.join(first.thread, 10)
        first.close()
        os.unlink(self.path)
        second = FakeService(self.path, encoded(NOTIFICATIONS[1:2]))
        self.addCleanup(second.close)
        test_utils.join(reader, 10)
        self.assertFalse(reader.is_alive())
        self.assertEqual(['m1', 'm2'], received)
        self.assertEqual(2, subscription.connections)

    def follow(self, subscription, until):
        """Read ``subscription`` in a thread until ``until(received)``."""
        received = []

        def read():
            for notification in subscription:
                received.append(notification)
                if until(received):
                    subscription.close()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        self.addCleanup(reader.join, 10)
        self.addCleanup(subscription.close)
        return reader, received

    def wait_watching(self, reason):
        """Follow the path until the subscription waits for ``reason``.

        The backoff alone would then wait 2.5 s at least: connecting
        sooner proves that the path is watched.
        """
        events = []
        subscription = unix_subscriber.Subscription(
            self.path, reconnect=True, min_backoff=5.0, max_backoff=5.0,
            poll_interval=0.02, on_event=events.append)
        reader, received = self.follow(subscription, lambda r: r)
        self.assertTrue(test_utils.wait_until(lambda: events, 5))
        self.assertIsInstance(events[0], unix_subscriber.Waiting)
        self.assertIsInstance(events[0].reason, reason)
        return reader, received, events

    def test_connects_as_soon_as_the_socket_appears(self):
        reader, received, events = self.wait_watching(
            unix_subscriber.SocketMissing)
        appeared = time.monotonic()
        self.serve(NOTIFICATIONS[:1])
        test_utils.join(reader, 10)
        self.assertLess(time.monotonic() - appeared, 2.0)
        self.assertEqual(['m1'], [n['message_id'] for n in received])
        # Waiting is said once, however many attempts it took.
        self.assertEqual([unix_subscriber.Waiting,
                          unix_subscriber.Connected],
                         [type(e) for e in events])
        self.assertIsNone(events[1].downtime)

    def test_a_stale_socket_is_retried_when_replaced(self):
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()
        reader, received, events = self.wait_watching(
            unix_subscriber.ServiceNotListening)
        # A restarted service binds a new socket and renames it into place.
        fresh = os.path.join(self.tmpdir, 'fresh.sock')
        service = FakeService(fresh, encoded(NOTIFICATIONS[:1]))
        self.addCleanup(service.close)
        appeared = time.monotonic()
        os.rename(fresh, self.path)
        test_utils.join(reader, 10)
        self.assertLess(time.monotonic() - appeared, 2.0)
        self.assertEqual(1, len(received))

    def test_reconnection_is_reported_with_the_time_away(self):
        events = []
        subscription = unix_subscriber.Subscription(
            self.path, reconnect=True, min_backoff=0.01, poll_interval=0.01,
            on_event=events.append)
        first = self.serve(NOTIFICATIONS[:1])
        reader, received = self.follow(subscription,
                                       lambda r: len(r) == 2)
        test_utils.join(first.thread, 10)
        os.unlink(self.path)
        self.serve(NOTIFICATIONS[1:2])
        test_utils.join(reader, 10)
        # Waiting, if the second service was not there yet.
        self.assertEqual([unix_subscriber.Connected,
                          unix_subscriber.Disconnected,
                          unix_subscriber.Connected],
                         [type(e) for e in events
                          if not isinstance(e, unix_subscriber.Waiting)])
        self.assertEqual(2, events[-1].connection)
        self.assertGreaterEqual(events[-1].downtime, 0)

    def test_a_stopping_hub_that_still_accepts_is_no_reconnection(self):
        # A hub that stops closes its subscribers, yet accepts (and closes)
        # for a moment: reconnecting to it is no reconnection to report.
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(self.path)
        listener.listen(64)
        accepted = []

        def stopping_hub():
            conn, _ = listener.accept()
            conn.sendall(encoded(NOTIFICATIONS[:1])[0])
            conn.close()
            listener.settimeout(0.05)
            deadline = time.monotonic() + 0.6
            while time.monotonic() < deadline:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                accepted.append(conn)
                conn.close()
            listener.close()
            os.unlink(self.path)

        hub = threading.Thread(target=stopping_hub, daemon=True)
        hub.start()
        events = []
        subscription = unix_subscriber.Subscription(
            self.path, reconnect=True, min_backoff=0.01, max_backoff=0.02,
            poll_interval=0.01, on_event=events.append)
        reader, received = self.follow(subscription,
                                       lambda r: len(r) == 2)
        test_utils.join(hub, 10)
        self.serve(NOTIFICATIONS[1:2])
        test_utils.join(reader, 10)
        self.assertGreater(len(accepted), 0)
        self.assertEqual([(unix_subscriber.Connected, 1),
                          (unix_subscriber.Disconnected, 1),
                          (unix_subscriber.Connected, 2)],
                         [(type(e), e.connection) for e in events
                          if not isinstance(e, unix_subscriber.Waiting)])
        self.assertGreaterEqual(events[-1].downtime, 0.5)

    def test_a_silent_service_counts_as_connected(self):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(self.path)
        listener.listen(1)
        self.addCleanup(listener.close)
        events = []
        subscription = unix_subscriber.Subscription(
            self.path, on_event=events.append)
        self.follow(subscription, lambda r: True)
        self.assertTrue(test_utils.wait_until(lambda: events, 5))
        self.assertEqual([(unix_subscriber.Connected, 1, None)],
                         [(type(e), e.connection, e.downtime)
                          for e in events])

    def test_a_connection_closed_at_once_is_retried_with_backoff(self):
        # As a hub with sock_max_subscribers reached does: never spin.
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(self.path)
        listener.listen(64)
        self.addCleanup(listener.close)
        accepted = []

        def refuse():
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                accepted.append(time.monotonic())
                conn.close()

        threading.Thread(target=refuse, daemon=True).start()
        subscription = unix_subscriber.Subscription(
            self.path, reconnect=True, min_backoff=0.2, max_backoff=0.4)
        self.follow(subscription, lambda r: True)
        time.sleep(1.5)  # measuring a rate over a period, not syncing
        subscription.close()
        listener.close()
        self.assertLessEqual(len(accepted), 8)
        self.assertGreaterEqual(len(accepted), 2)

    @skip_inside_oslo_messaging
    def test_lazy_dispatcher_import(self):
        # The tail and any reader that needs no endpoint stay light.
        code = ('import sys; from oslo_messaging_ext import unix_subscriber;'
                'print("oslo_messaging" in sys.modules);'
                'unix_subscriber.EndpointDispatcher;'
                'print("oslo_messaging" in sys.modules)')
        env = dict(os.environ, OSLO_MESSAGING_EXT_EVENTLET='0')
        result = subprocess.run([sys.executable, '-c', code], env=env,
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(['False', 'True'], result.stdout.split(),
                         result.stderr)
        self.assertIn('EndpointDispatcher', dir(unix_subscriber))
        self.assertRaises(AttributeError, getattr, unix_subscriber, 'nope')

    def test_priorities_are_oslo_messagings(self):
        self.assertEqual(tuple(notify_dispatcher.PRIORITIES),
                         unix_subscriber.PRIORITIES)


class CounterTestCase(base.BaseTestCase):

    def observe(self, counter, notifications, connection=1):
        return [gap for gap in (counter.observe(n, connection)
                                for n in notifications) if gap]


class GapCounterTestCase(CounterTestCase):
    """The gaps of unix_subscriber.GapCounter, on synthetic lines."""

    def test_consecutive_numbers_are_no_gap(self):
        counter = unix_subscriber.GapCounter()
        self.assertEqual([], self.observe(
            counter, sequenced('a', [1, 2, 3]) + sequenced('b', [7, 8])))
        self.assertEqual(0, counter.gaps)

    def test_a_gap_per_source(self):
        counter = unix_subscriber.GapCounter()
        lines = (sequenced('a', [1]) + sequenced('b', [10]) +
                 sequenced('a', [4]) + sequenced('b', [11, 15]))
        gaps = self.observe(counter, lines)
        self.assertEqual([('a', 2, 3, 2), ('b', 12, 14, 3)],
                         [(g.source, g.first, g.last, g.count)
                          for g in gaps])
        self.assertEqual(5, counter.gaps)
        self.assertFalse(any(g.reconnected for g in gaps))
        self.assertEqual('image.host1', gaps[0].publisher_id)

    def test_a_line_cut_after_its_stamp_is_missed_once(self):
        # The hub died inside line 2 of 1-ab; the process then sent 3.
        counter = unix_subscriber.GapCounter()
        self.observe(counter, sequenced('1-ab', [1]))
        counter.count_cut(b'{"sequence":{"source":"1-ab","number":2},"pay')
        self.assertEqual([], self.observe(counter, sequenced('1-ab', [3])))
        self.assertEqual((1, 1, 0), (counter.lost, counter.gaps,
                                     counter.unattributed))
        # Cut before its number: the next of its source (4, then 5).
        counter.count_cut(b'{"sequence":{"source":"1-ab","numb')
        self.assertEqual([], self.observe(counter, sequenced('1-ab', [5])))
        self.assertEqual((2, 2), (counter.lost, counter.gaps))
        # Cut before its source is known for sure: unattributed.
        self.observe(counter, sequenced('1-ac', [1]))
        counter.count_cut(b'{"sequence":{"source":"1-a')
        counter.count_cut(b'{"seq')
        self.assertEqual((4, 2, 2, 4), (counter.lost, counter.gaps,
                                        counter.unattributed,
                                        counter.dropped))

    def test_nothing_is_known_before_the_first_line(self):
        counter = unix_subscriber.GapCounter()
        self.assertEqual([], self.observe(counter, sequenced('a', [42])))
        self.assertEqual(0, counter.gaps)

    def test_across_a_reconnection(self):
        counter = unix_subscriber.GapCounter()
        self.observe(counter, sequenced('a', [1, 2]), connection=1)
        gaps = self.observe(counter, sequenced('a', [6]) +
                            sequenced('new', [4]), connection=2)
        self.assertEqual(3, gaps[0].count)
        self.assertTrue(gaps[0].reconnected)
        self.assertFalse(gaps[0].before_first)
        # A process first heard of after reconnecting: reported, with its
        # earlier numbers, but not counted (it may predate the
        # subscription).
        self.assertTrue(gaps[1].before_first)
        self.assertEqual((1, 3), (gaps[1].first, gaps[1].last))
        self.assertEqual(3, counter.gaps)

    def test_lines_without_a_valid_sequence_are_ignored(self):
        counter = unix_subscriber.GapCounter()
        invalid = [{}, {'sequence': 'x'}, {'sequence': {'source': 'a'}},
                   {'sequence': {'source': 'a', 'number': True}},
                   {'sequence': {'source': 'a', 'number': 0}},
                   {'sequence': {'source': 1, 'number': 5}},
                   {'sequence': {'source': 'a', 'number': '5'}}]
        self.assertEqual([], self.observe(counter, invalid))
        self.assertEqual([], self.observe(counter, sequenced('a', [3])))

    def test_a_number_going_back_is_no_gap(self):
        counter = unix_subscriber.GapCounter()
        gaps = self.observe(counter, sequenced('a', [5, 3, 4, 6]))
        self.assertEqual([], gaps)
        self.assertEqual(0, counter.gaps)


class LossRuleTestCase(CounterTestCase):
    """GapCounter's rule on synthetic lines: each loss counted once."""

    def losses(self, counter):
        return (counter.gaps, counter.pending, counter.unattributed,
                counter.lost)

    def test_a_notice_then_the_gap_that_covers_it_counts_once(self):
        counter = unix_subscriber.GapCounter()
        self.observe(counter, sequenced('a', [1, 2]) +
                     [drop_notice(3, a=3)] + sequenced('a', [6]))
        self.assertEqual((3, 0, 0, 3), self.losses(counter))
        self.assertEqual(3, counter.dropped)

    def test_a_gap_beyond_the_notice_counts_the_gap(self):
        # Two were reported, five are missing: the other three were lost
        # without notice (a hub switch-over).
        counter = unix_subscriber.GapCounter()
        self.observe(counter, sequenced('a', [1]) + [drop_notice(2, a=2)] +
                     sequenced('a', [7]))
        self.assertEqual((5, 0, 0, 5), self.losses(counter))

    def test_a_notice_beyond_the_gap_stays_pending(self):
        counter = unix_subscriber.GapCounter()
        self.observe(counter, sequenced('a', [1]) + [drop_notice(4, a=4)] +
                     sequenced('a', [3]))
        self.assertEqual((1, 3, 0, 4), self.losses(counter))

    def test_pending_without_a_later_line_of_its_source(self):
        counter = unix_subscriber.GapCounter()
        gaps = self.observe(counter, sequenced('a', [1, 2]) +
                            [drop_notice(4, a=4)] + sequenced('b', [1, 2]))
        self.assertEqual([], gaps)
        self.assertEqual((0, 4, 0, 4), self.losses(counter))

    def test_pending_is_per_source(self):
        counter = unix_subscriber.GapCounter()
        self.observe(counter, sequenced('a', [1]) + sequenced('b', [1]) +
                     [drop_notice(5, a=2, b=3)] + sequenced('a', [4]))
        # a's gap covers its 2; b's 3 are still pending.
        self.assertEqual((2, 3, 0, 5), self.losses(counter))

    def test_unattributed_counts_are_losses_of_their_own(self):
        counter = unix_subscriber.GapCounter()
        self.observe(counter, sequenced('a', [1]) + [drop_notice(5, a=2)] +
                     sequenced('a', [4]))
        self.assertEqual((2, 0, 3, 5), self.losses(counter))

    def test_a_notice_without_sources_is_unattributed(self):
        counter = unix_subscriber.GapCounter()
        notice = drop_notice(7)
        del notice['payload']['sources']
        self.observe(counter, sequenced('a', [1]) + [notice] +
                     sequenced('a', [3]))
        self.assertEqual((1, 0, 7, 8), self.losses(counter))

    def test_sources_beyond_the_total_are_unattributed(self):
        counter = unix_subscriber.GapCounter()
        self.observe(counter, [drop_notice(2, a=3)])
        self.assertEqual((0, 0, 2, 2), self.losses(counter))

    def test_a_gap_across_a_reconnection_covers_what_was_credited(self):
        # Counted by the hub and told on the first connection; the
        # process's next line arrives on the second.
        counter = unix_subscriber.GapCounter()
        self.observe(counter, sequenced('a', [1, 2]) + [drop_notice(3, a=3)],
                     connection=1)
        self.assertEqual((0, 3, 0, 3), self.losses(counter))
        gap, = self.observe(counter, sequenced('a', [9]), connection=2)
        self.assertTrue(gap.reconnected)
        self.assertEqual((6, 0, 0, 6), self.losses(counter))

    def test_a_source_first_heard_of_keeps_what_was_credited(self):
        # Its first line shows no gap: the reported drops stay counted.
        counter = unix_subscriber.GapCounter()
        self.observe(counter, [drop_notice(2, b=2)], connection=1)
        gap, = self.observe(counter, sequenced('b', [3]), connection=2)
        self.assertTrue(gap.before_first)
        self.assertEqual((0, 2, 0, 2), self.losses(counter))


class MissedTestCase(SubscriberTestCase):
    """Subscription.missed: drop notices and gaps, each loss once."""

    def read_all(self, lines):
        self.serve(lines)
        events = []
        with unix_subscriber.Subscription(
                self.path, on_event=events.append) as subscription:
            received = list(subscription)
        return subscription, received, [
            e for e in events if isinstance(e, unix_subscriber.Gap)]

    def test_a_reported_drop_is_also_a_gap_and_counted_once(self):
        subscription, received, gaps = self.read_all(
            sequenced('a', [1, 2]) + [drop_notice(3, a=3)] +
            sequenced('a', [6]))
        self.assertEqual(4, len(received))
        self.assertEqual((3, 3, 3), (subscription.dropped,
                                     subscription.gaps, subscription.missed))
        self.assertEqual([3], [g.count for g in gaps])

    def test_an_unreported_loss_is_a_gap(self):
        subscription, _, _ = self.read_all(
            sequenced('a', [1, 2]) + [drop_notice(1, a=1)] +
            sequenced('a', [4]) + sequenced('b', [1, 5]))
        self.assertEqual((1, 4, 4), (subscription.dropped,
                                     subscription.gaps, subscription.missed))

    def test_a_loss_not_followed_by_its_process_is_only_reported(self):
        subscription, _, gaps = self.read_all(
            sequenced('a', [1, 2]) + [drop_notice(4, a=4)])
        self.assertEqual([], gaps)
        self.assertEqual((4, 0, 4), (subscription.dropped,
                                     subscription.gaps, subscription.missed))

    def test_an_invalid_drop_count_is_ignored(self):
        notice = drop_notice(-5)
        subscription, received, _ = self.read_all(
            [notice, dict(notice, payload='x')] + sequenced('a', [1]))
        self.assertEqual(3, len(received))
        self.assertEqual(0, subscription.dropped)

    def test_missed_across_reconnection(self):
        events = []
        subscription = unix_subscriber.Subscription(
            self.path, reconnect=True, min_backoff=0.01, poll_interval=0.01,
            on_event=events.append)
        first = self.serve(sequenced('a', [1, 2]))
        reader, received = self.follow(subscription,
                                       lambda r: len(r) == 4)
        test_utils.join(first.thread, 10)
        os.unlink(self.path)
        self.serve([drop_notice(2, a=2)] + sequenced('a', [7]))
        test_utils.join(reader, 10)
        gap, = (e for e in events if isinstance(e, unix_subscriber.Gap))
        self.assertTrue(gap.reconnected)
        self.assertEqual((3, 6), (gap.first, gap.last))
        self.assertEqual((2, 4, 4), (subscription.dropped,
                                     subscription.gaps, subscription.missed))


class DriverAccountingTestCase(base.BaseTestCase):
    """What a lagging subscriber of the real driver is told it missed."""

    BURST = 300

    def setUp(self):
        super().setUp()
        tmpdir = self.useFixture(fixtures.TempDir()).path
        self.path = os.path.join(tmpdir, 'n.sock')
        conf = cfg.ConfigOpts()
        conf([], project='unix-subscriber-unit')
        _impl_unix.register_opts(conf)
        conf.set_override('sock_path', self.path,
                          group='oslo_messaging_notifications')
        conf.set_override('sock_buffer_size', 65536,
                          group='oslo_messaging_notifications')
        transport = oslo_messaging.get_notification_transport(
            conf, url='fake:/')
        self.addCleanup(transport.cleanup)
        self.notifier = oslo_messaging.Notifier(
            transport, driver='unix', publisher_id='image.host1')
        # A driver of the same configuration shares the process's
        # connection to the hub, and so knows its subscribers.
        self.watcher = _impl_unix.UnixSocketDriver(conf, [], transport)
        self.addCleanup(self.watcher.close)

    def test_every_notification_is_received_or_counted_once(self):
        self.notifier.info({}, 'start', {})
        gate = threading.Event()
        gate.set()
        received = []
        subscription = unix_subscriber.Subscription(self.path,
                                                    reconnect=True)
        self.addCleanup(subscription.close)

        def read():
            for _line, notification in subscription.records():
                gate.wait()
                received.append(notification)
                if notification['event_type'] == 'last':
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        self.addCleanup(reader.join, 10)
        self.assertTrue(test_utils.wait_until(
            lambda: self.watcher.subscribers() == 1, 10))
        self.notifier.info({}, 'first', {})
        self.assertTrue(test_utils.wait_until(lambda: received, 10))
        gate.clear()  # the subscriber stops reading
        payload = {'blob': 'x' * 20000}
        for number in range(self.BURST):
            self.notifier.info({}, 'burst', dict(payload, n=number))
        gate.set()

        # Until one reaches the subscriber: with it comes what the process
        # could not hand over to a hub that lagged, and before it what the
        # hub dropped for the subscriber.
        def last():
            self.notifier.info({}, 'last', {})
            return not reader.is_alive()

        self.assertTrue(test_utils.wait_until(last, 20))
        # 'start' reaches the subscriber if the hub read it after
        # accepting the subscriber: it is not counted. From 'first' (2)
        # to the 'last' received, every one is delivered or counted.
        delivered = [n for n in received if n['event_type'] not in (
            unix_subscriber.DROPPED_EVENT_TYPE, 'start')]
        self.assertTrue(all(unix_subscriber.SEQUENCE_KEY in n
                            for n in delivered))
        expected = delivered[-1][unix_subscriber.SEQUENCE_KEY]['number'] - 1
        self.assertGreater(subscription.dropped, 0)
        self.assertEqual(expected, len(delivered) + subscription.dropped)
        self.assertEqual(expected, len(delivered) + subscription.missed)
        # The hub's drops, all of this process, were followed by its
        # 'last' line: the gaps cover them, and nothing stays pending.
        self.assertEqual(subscription.dropped, subscription.gaps)
        self.assertEqual(0, subscription.gap_counter.pending)
        self.assertEqual(0, subscription.gap_counter.unattributed)


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
