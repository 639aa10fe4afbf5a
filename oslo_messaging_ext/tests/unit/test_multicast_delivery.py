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

"""How messaging-multicast delivers replicas: bounds, breaker, counts.

On oslo.messaging's fake transport; the outages of real brokers are in
the functional tests (test_multicast_outage).
"""

import atexit
import gc
import logging
import re
import threading
import time

import fixtures
import oslo_messaging
from oslo_messaging import transport as om_transport
from oslotest import base

from oslo_messaging_ext.notify import _impl_multicast as multicast
from oslo_messaging_ext.notify import _multicast_config as multicast_config
from oslo_messaging_ext.notify import _multicast_lanes as multicast_lanes
from oslo_messaging_ext.notify import _multicast_report as multicast_report
from oslo_messaging_ext.tests.unit import test_multicast
from oslo_messaging_ext.tests import utils as test_utils

envelope = test_multicast.envelope

# Two brokers: the notifier's (fake:/) and a region's (fake://region2/).
TWO_BROKERS = """
[oslo_messaging_multicast]
rules = local, remote
%(options)s
[multicast_rule_local]
selector = *
targets = local
[multicast_rule_remote]
selector = *
targets = remote
transport_url = fake://region2/
replica_timeout = %(timeout)s
failure_backoff = %(backoff)s
"""


class DeliveryTestCase(test_multicast.DriverFixtureMixin, base.BaseTestCase):

    def setUp(self):
        super().setUp()
        # Replicas to the region's broker: recorded, blocked or refused.
        self.remote_gate = threading.Event()
        self.remote_gate.set()
        self.addCleanup(self.remote_gate.set)
        self.remote_attempts = 0
        self.remote_fails = False
        self.useFixture(fixtures.MockPatchObject(
            om_transport.Transport, '_send_notification', autospec=True,
            side_effect=self._remote))

    def _remote(self, transport, target, ctxt, message, version, retry=None):
        self.remote_attempts += 1
        self.remote_gate.wait()
        if self.remote_fails:
            raise oslo_messaging.MessageDeliveryFailure('region2 down')
        self._record(target, ctxt, message, version, retry)

    def two_brokers(self, timeout=0.2, backoff=10.0, **options):
        return self.driver(TWO_BROKERS % {
            'timeout': timeout, 'backoff': backoff,
            'options': ''.join('%s = %s\n' % o for o in options.items())})

    def timed_notify(self, driver):
        start = time.monotonic()
        driver.notify({}, envelope(), 'INFO', -1)
        return time.monotonic() - start


class SyncBoundTestCase(DeliveryTestCase):

    def test_hung_broker_bounded_then_skipped_once_stuck(self):
        self.useFixture(fixtures.MockPatchObject(
            multicast_lanes, 'STUCK_AFTER', 1.0))
        driver = self.two_brokers(timeout=0.2)
        self.remote_gate.clear()

        first = self.timed_notify(driver)
        # Queued behind a publish already late: not waited for.
        later = [self.timed_notify(driver) for _ in range(5)]

        # Without the bound, the first call would wait for the gate.
        self.assertGreaterEqual(first, 0.2)
        self.assertLess(first, 2.0)
        self.assertLess(max(later), 0.1)
        self.assertEqual(0, driver.dropped)
        # No progress for STUCK_AFTER: the queued five are dropped, and
        # what comes during the backoff, without any attempt.
        self.assertTrue(test_utils.wait_until(
            lambda: driver.dropped == 5, 10), driver.dropped)
        self.timed_notify(driver)
        self.assertEqual(6, driver.dropped)
        self.assertEqual(1, self.remote_attempts)
        self.assertEqual(7, self.topics().count('local.info'))
        self.assertIn('5 replicas of rule remote to target remote since the '
                      'last report: skipped: a publish to its broker made '
                      'no progress for 1.0 s', self.log.output)
        # The publish in flight lands: published, not dropped.
        self.remote_gate.set()
        self.assertTrue(test_utils.wait_until(
            lambda: 'remote.info' in self.topics(), 10))
        self.assertEqual(6, driver.dropped)
        remote = [s for s in driver.stats() if s['broker'] != (
            'notification transport')]
        self.assertEqual(1, remote[0]['published'])
        self.assertEqual({'broker_failed': 6},
                         remote[0]['dropped_by_cause'])

    def test_notification_broker_replicas_published_on_the_callers_thread(
            self):
        threads = {}
        remote, local = self._remote, self._record

        def remote_thread(transport, target, *args, **kwargs):
            threads[target.topic] = threading.current_thread()
            return remote(transport, target, *args, **kwargs)

        def local_thread(target, *args, **kwargs):
            threads[target.topic] = threading.current_thread()
            return local(target, *args, **kwargs)

        om_transport.Transport._send_notification.side_effect = (
            remote_thread)
        self.transport._send_notification.side_effect = local_thread
        driver = self.two_brokers()
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(0, driver.flush())
        # No handoff for the broker the standard notification went to;
        # the other broker's replica is isolated on its lane's thread.
        self.assertIs(threading.current_thread(), threads['local.info'])
        self.assertIs(threading.current_thread(),
                      threads['notifications.info'])
        self.assertEqual(multicast_lanes.THREAD_PREFIX + 'publish',
                         threads['remote.info'].name)

    def test_slow_broker_publishes_everything_in_the_background(self):
        driver = self.two_brokers(timeout=0.05)
        self.remote_gate.clear()
        durations = [self.timed_notify(driver) for _ in range(10)]
        self.assertLess(max(durations), 1.0)
        self.remote_gate.set()
        self.assertEqual(0, driver.flush())
        # Late, not lost, and the broker was never skipped.
        self.assertEqual(10, self.topics().count('remote.info'))
        self.assertEqual(0, driver.dropped)
        self.assertEqual(10, self.remote_attempts)

    def test_breaker_skips_until_the_backoff_expires(self):
        driver = self.two_brokers(backoff=0.05)
        self.remote_fails = True
        for _ in range(3):
            driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(1, self.remote_attempts)
        # Expired: one more attempt, failing again, doubles the backoff.
        test_utils.wait_until(lambda: (driver.notify({}, envelope(), 'INFO',
                                                     -1) or
                                       self.remote_attempts == 2), 5)
        self.assertEqual(2, self.remote_attempts)
        remote = driver._rules[1].destinations[0]
        self.assertEqual(2, remote.state.breaker.failures)
        self.remote_fails = False
        test_utils.wait_until(lambda: (driver.notify({}, envelope(), 'INFO',
                                                     -1) or
                                       'remote.info' in self.topics()), 5)
        # A success closes the breaker: every call is attempted again.
        attempts = self.remote_attempts
        for _ in range(3):
            driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(attempts + 3, self.remote_attempts)
        self.assertEqual(0, remote.state.breaker.failures)

    def test_replicas_use_the_rule_retry_not_the_notifier_one(self):
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = r, s
            [multicast_rule_r]
            selector = *
            targets = t1
            replica_retry = 0
            [multicast_rule_s]
            selector = *
            targets = t2
            """)
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual([('notifications.info', -1), ('t1.info', 0),
                          ('t2.info', 1)],
                         [(p['topic'], p['retry']) for p in self.published])


class AsyncIsolationTestCase(DeliveryTestCase):

    def test_hung_broker_does_not_delay_the_other_one(self):
        driver = self.two_brokers(timeout=30, async_fanout='true')
        self.remote_gate.clear()
        count = 20
        for _ in range(count):
            driver.notify({}, envelope(), 'INFO', -1)
        self.assertTrue(test_utils.wait_until(
            lambda: self.topics().count('local.info') == count, 10))
        # The remote lane's thread may not have reached its broker yet:
        # waited for, then it made one attempt and is held.
        self.assertTrue(test_utils.wait_until(
            lambda: self.remote_attempts, 10))
        self.assertEqual(1, self.remote_attempts)
        self.remote_gate.set()
        self.assertEqual(0, driver.flush())
        self.assertEqual(count, self.topics().count('remote.info'))

    def test_hung_broker_dropped_once_stuck_in_async_mode_too(self):
        self.useFixture(fixtures.MockPatchObject(
            multicast_lanes, 'STUCK_AFTER', 0.5))
        driver = self.two_brokers(timeout=0.2, async_fanout='true')
        self.remote_gate.clear()
        count = 20
        for _ in range(count):
            driver.notify({}, envelope(), 'INFO', -1)
        self.assertTrue(test_utils.wait_until(
            lambda: driver.dropped == count - 1, 10), driver.dropped)
        # Only the stuck publish is left, and not waited for.
        self.assertEqual(1, driver.flush())
        self.assertEqual(count, self.topics().count('local.info'))
        self.assertEqual(1, self.remote_attempts)
        driver.cleanup()
        # Its fate unknown at cleanup: counted, once.
        self.assertEqual(count, driver.dropped)
        self.remote_gate.set()
        self.assertEqual(count, driver.dropped)


class SharedLaneTestCase(DeliveryTestCase):

    def test_cleanup_of_one_driver_keeps_the_others_replicas(self):
        first = self.two_brokers(timeout=30, async_fanout='true',
                                 async_flush_timeout=0.2)
        second = multicast.MulticastDriver(self.conf, ['notifications'],
                                           self.transport)
        self.addCleanup(second.cleanup)
        self.remote_gate.clear()
        for _ in range(3):
            second.notify({}, envelope(), 'INFO', -1)
        self.assertTrue(test_utils.wait_until(
            lambda: self.remote_attempts == 1, 10))
        # It waits for the lane within its flush timeout, and leaves what
        # is pending to the lane's other user.
        first.cleanup()
        self.assertEqual(0, first.dropped)
        self.remote_gate.set()
        self.assertEqual(0, second.flush())
        self.assertEqual(3, self.topics().count('remote.info'))
        self.assertEqual(0, second.dropped)


class ReportTestCase(DeliveryTestCase):

    def drop_lines(self):
        # Not the brokers' status lines ("N dropped"), which are logged
        # too when their interval ends within the test.
        return [line for line in self.log.output.splitlines()
                if re.search(r'dropped \d+ replicas of rule', line)]

    def test_every_drop_reported_at_error_within_the_interval(self):
        self.useFixture(fixtures.MockPatchObject(
            multicast_report, 'REPORT_INTERVAL', 0.3))
        driver = self.two_brokers()
        self.remote_fails = True
        count = 50
        for _ in range(count):
            driver.notify({}, envelope(), 'INFO', -1)

        def reported():
            return sum(int(n) for n in re.findall(
                r'dropped (\d+) replicas of rule remote', self.log.output))

        # The burst is over: the rest is reported once the interval ends.
        self.assertEqual(count, test_utils.wait_until(
            lambda: reported() == count and reported(), 5) or reported())
        self.assertEqual(count, driver.dropped)
        lines = self.drop_lines()
        self.assertEqual(2, len(lines), self.log.output)

    def test_deferred_line_counts_each_cause(self):
        self.useFixture(fixtures.MockPatchObject(
            multicast_report, 'REPORT_INTERVAL', 0.3))
        driver = self.two_brokers(backoff=60)
        self.remote_fails = True
        for _ in range(4):
            driver.notify({}, envelope(), 'INFO', -1)
        self.assertTrue(test_utils.wait_until(
            lambda: 'skipped: the target failed recently' in
            self.log.output, 5))
        lines = self.drop_lines()
        self.assertEqual(2, len(lines), self.log.output)
        self.assertIn('dropped 1 replicas of rule remote to target remote '
                      'since the last report: publish failed', lines[0])
        self.assertIn('dropped 3 replicas of rule remote to target remote '
                      'since the last report: skipped: the target failed '
                      'recently', lines[1])

    def test_transport_log_records_left_alone(self):
        self.driver(test_multicast.GLANCE_RULE)
        for name in ('oslo.messaging._drivers.impl_rabbit',
                     'oslo.messaging._drivers.amqpdriver'):
            self.assertEqual([], logging.getLogger(name).filters)

    def test_counters_logged_at_info_while_they_change(self):
        self.useFixture(fixtures.MockPatchObject(
            multicast_lanes, 'STATS_INTERVAL', 0.2))
        driver = self.two_brokers()
        for _ in range(3):
            driver.notify({}, envelope(), 'INFO', -1)
        for broker in ('region2', 'notification transport'):
            self.assertTrue(test_utils.wait_until(
                lambda: 'messaging-multicast broker %s: 3 replicas '
                'published, 0 dropped, 0 pending, breaker closed' % broker
                in self.log.output, 10), self.log.output)
        self.assertEqual(
            [{'broker': 'notification transport', 'published': 3,
              'dropped': 0, 'dropped_by_cause': {}, 'pending': 0,
              'breaker': 'closed'},
             {'broker': 'region2', 'published': 3, 'dropped': 0,
              'dropped_by_cause': {}, 'pending': 0, 'breaker': 'closed'}],
            sorted(driver.stats(), key=lambda s: s['broker']))

    def test_counters_logged_at_info_on_cleanup(self):
        driver = self.two_brokers()
        self.remote_fails = True
        for _ in range(3):
            driver.notify({}, envelope(), 'INFO', -1)
        driver.cleanup()
        self.assertIn('messaging-multicast broker region2: 0 replicas '
                      'published, 3 dropped (2 breaker_open, 1 '
                      'publish_failed), 0 pending, breaker closed',
                      self.log.output)
        self.assertIn('messaging-multicast broker notification transport: '
                      '3 replicas published, 0 dropped, 0 pending',
                      self.log.output)


class SharedWorkersTestCase(test_multicast.DriverFixtureMixin,
                            base.BaseTestCase):

    def test_short_lived_notifiers_leave_no_thread_or_exit_handler(self):
        self.configure(test_multicast.glance_rule(async_fanout='true'))
        self.conf.set_override('driver', ['messaging-multicast'],
                               group='oslo_messaging_notifications')
        gc.collect()
        threads = threading.active_count()
        handlers = atexit._ncallbacks()
        notifiers = []
        for _ in range(200):
            notifier = oslo_messaging.Notifier(self.transport,
                                               publisher_id='image.local')
            notifier.info({}, 'image.upload', {})
            notifiers.append(notifier)
        driver = notifiers[0]._driver_mgr['messaging-multicast'].obj
        driver.flush()
        self.assertEqual(600, len(self.published))
        # One publisher for the one broker, and the monitor thread.
        self.assertLessEqual(threading.active_count(), threads + 2)
        self.assertLessEqual(atexit._ncallbacks(), handlers + 1)
        del notifiers, notifier, driver
        gc.collect()
        self.assertTrue(test_utils.wait_until(
            lambda: threading.active_count() <= threads, 10),
            [t.name for t in threading.enumerate()])


class ValidationTestCase(test_multicast.DriverFixtureMixin, base.BaseTestCase):

    def assertRefused(self, text, *expected):
        # Refused means replication off, the standard notifications kept.
        self.configure(text)
        exc = multicast.MulticastDriver(self.conf, ['notifications'],
                                        self.transport).config_error
        self.assertIsInstance(exc, multicast_config.MulticastConfigError)
        for problem in expected:
            self.assertIn(problem, str(exc))

    def test_flush_timeout_must_be_finite_and_waitable(self):
        for value in ('inf', 'nan', '1e12', '-1'):
            self.assertRefused(test_multicast.glance_rule(
                async_fanout='true', async_flush_timeout=value),
                '[oslo_messaging_multicast] async_flush_timeout = %s'
                % value)

    def test_options_of_async_fanout_checked_when_it_is_off(self):
        self.assertRefused(test_multicast.glance_rule(
            async_queue_size='lots', async_flush_timeout='nan'),
            '[oslo_messaging_multicast] async_queue_size = lots',
            '[oslo_messaging_multicast] async_flush_timeout = nan')

    def test_rule_delivery_options(self):
        self.assertRefused(
            """
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = *
            targets = t
            replica_timeout = nan
            replica_retry = -2
            failure_backoff = 0
            """,
            '[multicast_rule_r] replica_timeout = nan',
            '[multicast_rule_r] replica_retry = -2',
            '[multicast_rule_r] failure_backoff = 0')


class ExitTestCase(base.BaseTestCase):

    def test_queue_lost_at_exit_is_logged_with_its_count(self):
        result = test_multicast.run_service(
            self, test_multicast.glance_rule(
                async_fanout='true', async_flush_timeout='0.2') +
            'replica_timeout = 60\n', sends='block')
        self.assertEqual(0, result.returncode, result.stderr)
        lost = re.findall(r'dropped (\d+) replicas of rule '
                          r'glance_replication to target (\S+) since the '
                          r'last report: (.*)', result.stderr)
        self.assertEqual({'glance.repl.host1', 'glance.repl.host2'},
                         {target for _, target, _ in lost}, result.stderr)
        # Every replica of the 50 calls, by cause, in one line per target.
        for count, target, causes in lost:
            self.assertEqual('50', count, result.stderr)
            self.assertIn('not published within async_flush_timeout = '
                          '0.2 s at exit', causes)
            self.assertEqual(50, sum(
                int(n) for n in re.findall(r'(?:^|; )(\d+) not published',
                                           causes) or [count]))
