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

"""messaging-multicast while a target broker dies or hangs.

The targets are real RabbitMQ brokers reached through oslo.messaging's
rabbit driver: the shared broker behind a TCP proxy that the test kills,
a tarpit (TCP accepted, no AMQP answer), and a second rabbitmq-server node
standing for another region.
"""

import logging
import re
import threading
import time
import urllib.parse

from oslo_messaging_ext.notify import _multicast_lanes as lanes
from oslo_messaging_ext import samples
from oslo_messaging_ext.tests.functional import base
from oslo_messaging_ext.tests.functional import outage
from oslo_messaging_ext.tests.functional import test_multicast
from oslo_messaging_ext.tests import utils as test_utils

# The replica bound of these tests, and what a call may take beyond it on
# a loaded machine: far below what an outage cost without the bound
# (forever for a lost broker, 5 to 22 s for a hung one).
REPLICA_TIMEOUT = 0.3
SLACK = 1.0
# The bound of the healthy targets' rules: what a loaded machine may take
# to publish, so that none of their replicas is dropped.
HEALTHY_TIMEOUT = 10.0


class OutageTestCase(test_multicast.MulticastBrokerTestCase):

    def setUp(self):
        super().setUp()
        self.logs = self.useFixture(test_utils.FakeLogger(
            'oslo', level=logging.DEBUG))
        self.driver_logs = self.useFixture(test_utils.FakeLogger(
            'oslo_messaging_ext', level=logging.DEBUG))

    def upstream(self):
        parsed = urllib.parse.urlsplit(self.url)
        return parsed.hostname or '127.0.0.1', parsed.port or 5672

    def notify_all(self, notifier, count, limit):
        """Send ``count`` notifications; return each call's duration.

        Calls run on a thread of their own, so that a call that never
        returns fails the test instead of hanging it.
        """
        durations = []

        def send():
            payload = samples.glance_upload_payload()
            for index in range(count):
                start = time.monotonic()
                notifier.info({}, 'image.upload', dict(payload, index=index))
                durations.append(time.monotonic() - start)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        finished = threading.Event()
        threading.Thread(target=lambda: (sender.join(), finished.set()),
                         daemon=True).start()
        self.assertTrue(finished.wait(limit),
                        '%d of %d notify() calls returned within %s s'
                        % (len(durations), count, limit))
        return durations

    def rules_config(self, rules, standard, **options):
        """A configuration with ``rules``: {name: (url or None, target)}.

        The rules named "healthy" or "region2" get HEALTHY_TIMEOUT, the
        others REPLICA_TIMEOUT.
        """
        extra = ''.join('%s = %s\n' % item for item in options.items())
        text = ('[oslo_messaging_notifications]\n'
                'driver = messaging-multicast\n'
                'topics = %s\n'
                '[oslo_messaging_multicast]\n'
                'rules = %s\n%s' % (standard, ','.join(rules), extra))
        for name, (url, target) in rules.items():
            timeout = (HEALTHY_TIMEOUT if name in ('healthy', 'region2')
                       else REPLICA_TIMEOUT)
            text += ('[multicast_rule_%s]\nselector = *\ntargets = %s\n'
                     'replica_timeout = %s\n' % (name, target, timeout))
            if url:
                text += 'transport_url = %s\n' % url
        return text

    def drops(self, driver, rule):
        return sum(d.failures.total for r in driver._rules
                   if r.name == rule for d in r.destinations)

    def wait_for_drops(self, driver, rule, expected):
        """The drops of ``rule`` once they reach ``expected``.

        A replica's fate is known when its publish ends or its broker is
        declared stuck (STUCK_AFTER seconds without progress).
        """
        limit = lanes.STUCK_AFTER + base.DELIVERY_TIMEOUT
        test_utils.wait_until(
            lambda: self.drops(driver, rule) >= expected, limit)
        return self.drops(driver, rule)

    def reported(self, rule):
        """The drops of ``rule`` the driver's ERROR lines add up to."""
        return sum(int(n) for n in re.findall(
            r'dropped (\d+) replicas of rule %s ' % rule,
            self.driver_logs.output))


class SyncOutageTestCase(OutageTestCase):

    def test_target_broker_lost_mid_stream_with_default_retry(self):
        region2 = self.useFixture(outage.RabbitNode(self))
        proxy = self.useFixture(outage.TcpProxy(self.upstream()))
        standard = base.unique_name('notifications')
        lost = base.unique_name('lost')
        replicated = base.unique_name('region2')
        self.load_config(self.rules_config(
            {'lost': (proxy.url(), lost),
             'region2': (region2.url, replicated)}, standard))
        standard_collector = self.start_listener(standard)
        lost_collector = self.start_listener(lost)
        region2_collector = self.start_listener(replicated, url=region2.url)
        # The notifier's default retry (-1): reconnect forever, for the
        # standard notification only.
        notifier, driver = self.notifier()

        self.notify_all(notifier, 1, base.DELIVERY_TIMEOUT)
        self.assertEqual(1, len(lost_collector.wait_for(1)))
        # On a loaded machine, the first publish (connection set-up) may
        # outlast the bound: it is then counted as dropped, though it
        # completes in the background.
        dropped_before = self.drops(driver, 'lost')
        proxy.kill()
        count = 20
        durations = self.notify_all(notifier, count,
                                    count * (REPLICA_TIMEOUT + SLACK))

        self.assertLess(max(durations), REPLICA_TIMEOUT + SLACK)
        # The lost broker cost one bounded call; the others queue behind
        # its late publish without waiting, and are skipped once it
        # failed.
        self.assertLess(sorted(durations)[-2], REPLICA_TIMEOUT)
        self.assertEqual(count + 1,
                         len(region2_collector.wait_for(count + 1)))
        self.assertEqual(count + 1,
                         len(standard_collector.wait_for(count + 1)))
        self.assertEqual(dropped_before + count,
                         self.wait_for_drops(driver, 'lost',
                                             dropped_before + count))
        self.assertEqual(0, self.drops(driver, 'region2'))
        reports = [line for line in self.driver_logs.output.splitlines()
                   if 'messaging-multicast dropped' in line]
        # The first drop at once, the next ones a minute later...
        self.assertEqual(1, len(reports), reports)
        self.assertIn('dropped 1 replicas of rule lost', reports[0])
        # ...or at cleanup, with their count by cause.
        driver.cleanup()
        self.assertEqual(dropped_before + count, self.reported('lost'))

    COUNT = 10

    def next_to_a_healthy_target(self, rule, url):
        """Send COUNT with a healthy rule and ``rule`` to ``url``.

        :returns: (driver, each call's duration), once the standard and
            healthy targets received everything
        """
        standard = base.unique_name('notifications')
        healthy = base.unique_name('healthy')
        self.load_config(self.rules_config(
            {rule: (url, base.unique_name(rule)),
             'healthy': (None, healthy)}, standard))
        standard_collector = self.start_listener(standard)
        healthy_collector = self.start_listener(healthy)
        notifier, driver = self.notifier(retry=0)

        durations = self.notify_all(notifier, self.COUNT,
                                    self.COUNT * (REPLICA_TIMEOUT + SLACK))

        self.assertLess(max(durations), REPLICA_TIMEOUT + SLACK)
        self.assertEqual(self.COUNT,
                         len(healthy_collector.wait_for(self.COUNT)))
        self.assertEqual(self.COUNT,
                         len(standard_collector.wait_for(self.COUNT)))
        return driver, durations

    def test_hung_target_broker(self):
        tarpit = self.useFixture(outage.Tarpit())
        count = self.COUNT
        driver, durations = self.next_to_a_healthy_target('hung',
                                                          tarpit.url())

        self.assertLess(sum(durations), REPLICA_TIMEOUT + count * 0.1)
        # The first publish never ends: declared stuck after STUCK_AFTER,
        # the queued ones are dropped then; its own fate is counted at
        # cleanup (unknown).
        self.assertEqual(count - 1,
                         self.wait_for_drops(driver, 'hung', count - 1))
        driver.cleanup()
        self.assertEqual(count, self.drops(driver, 'hung'))
        self.assertEqual(count, self.reported('hung'))

    def test_unresolvable_target_broker(self):
        count = self.COUNT
        driver, _ = self.next_to_a_healthy_target(
            'unresolvable', 'rabbit://guest:guest@broker.invalid:5672/')

        self.assertEqual(count,
                         self.wait_for_drops(driver, 'unresolvable', count))
        driver.cleanup()
        self.assertEqual(count, self.reported('unresolvable'))

    def test_target_broker_back_after_an_outage(self):
        proxy = self.useFixture(outage.TcpProxy(self.upstream()))
        standard = base.unique_name('notifications')
        # Nobody reads the standard topic here: its queue goes at the end.
        self.addCleanup(self.delete_queues, self.url, ['%s.info' % standard])
        flaky = base.unique_name('flaky')
        self.load_config(self.rules_config(
            {'flaky': (proxy.url(), flaky)}, standard).replace(
            '[multicast_rule_flaky]\n',
            '[multicast_rule_flaky]\nfailure_backoff = 0.5\n'))
        flaky_collector = self.start_listener(flaky)
        notifier, driver = self.notifier(retry=0)
        sent = self.notify_all(notifier, 1, base.DELIVERY_TIMEOUT)
        self.assertEqual(1, len(flaky_collector.wait_for(1)))

        proxy.kill()
        sent += self.notify_all(notifier, 5, 5 * (REPLICA_TIMEOUT + SLACK))
        self.wait_for_drops(driver, 'flaky', 1)
        self.useFixture(outage.TcpProxy(self.upstream(), port=proxy.port))

        # Once the backoff expired, replicas flow again.
        def back():
            sent.extend(self.notify_all(notifier, 1, base.DELIVERY_TIMEOUT))
            return len(flaky_collector.wait_for(2, timeout=0.5)) >= 2

        self.assertTrue(test_utils.wait_until(back, base.DELIVERY_TIMEOUT))
        self.assertLess(max(sent), REPLICA_TIMEOUT + SLACK)
        driver.cleanup()
        # Each replica was delivered or counted as dropped, never both.
        dropped = self.drops(driver, 'flaky')
        delivered = len(flaky_collector.wait_for(len(sent) - dropped))
        self.assertEqual(len(sent), delivered + dropped)
        self.assertEqual(self.drops(driver, 'flaky'), self.reported('flaky'))


class AsyncOutageTestCase(OutageTestCase):

    def test_dead_and_hung_brokers_do_not_starve_the_healthy_one(self):
        proxy = self.useFixture(outage.TcpProxy(self.upstream()))
        proxy.kill()
        tarpit = self.useFixture(outage.Tarpit())
        standard = base.unique_name('notifications')
        healthy = base.unique_name('healthy')
        self.load_config(self.rules_config(
            {'dead': (proxy.url(), base.unique_name('dead')),
             'hung': (tarpit.url(), base.unique_name('hung')),
             'healthy': (None, healthy)}, standard,
            async_fanout='true', async_flush_timeout=5))
        standard_collector = self.start_listener(standard)
        healthy_collector = self.start_listener(healthy)
        notifier, driver = self.notifier()

        count = 33
        durations = self.notify_all(notifier, count, base.DELIVERY_TIMEOUT)

        received = healthy_collector.wait_for(count)
        self.assertEqual(list(range(count)),
                         sorted(r['payload']['index'] for r in received))
        self.assertEqual(count, len(standard_collector.wait_for(count)))
        self.assertLess(max(durations), SLACK)
        self.assertEqual(count, self.wait_for_drops(driver, 'dead', count))
        self.assertEqual(count - 1,
                         self.wait_for_drops(driver, 'hung', count - 1))
        # Only the stuck publish to the tarpit is left, not waited for.
        self.assertEqual(1, driver.flush())
        self.assertEqual(0, self.drops(driver, 'healthy'))
        driver.cleanup()
        self.assertEqual(count, self.drops(driver, 'hung'))
        self.assertEqual(count, self.reported('hung'))
        self.assertEqual(count, self.reported('dead'))
