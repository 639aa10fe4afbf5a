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

"""The messaging-multicast driver on the real RabbitMQ.

Every target is consumed by an oslo.messaging notification listener, as a
real replica consumer would be.
"""

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse

import fixtures
import kombu
import oslo_messaging

from oslo_messaging_ext.notify import _multicast_delivery as multicast_delivery
from oslo_messaging_ext import samples
from oslo_messaging_ext.tests.functional import base
from oslo_messaging_ext.tests.functional import outage
from oslo_messaging_ext.tests import utils as test_utils

# Generous: a loaded CI machine, yet far below an unbounded retry.
PROMPT = 10.0


class HangingUpListener:
    """A TCP listener that closes every connection it accepts, counted."""

    def __init__(self):
        self._sock = socket.create_server(('127.0.0.1', 0))
        self.port = self._sock.getsockname()[1]
        self._count = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            # Counted before the client can see the hang-up.
            with self._lock:
                self._count += 1
            conn.close()

    def accepted(self):
        """How many connections were accepted (and closed) so far."""
        with self._lock:
            return self._count

    def close(self):
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        test_utils.join(self._thread, 5)


class MulticastBrokerTestCase(base.BrokerTestCase):

    def write_config(self, text):
        path = os.path.join(self.useFixture(fixtures.TempDir()).path,
                            'service.conf')
        with open(path, 'w') as f:
            f.write(textwrap.dedent(text))
        return path

    def load_config(self, text):
        self.conf.conf(['--config-file', self.write_config(text)],
                       project='oslo-messaging-ext-functional')

    def notifier(self, retry=None):
        """A Notifier built the way a service builds it, from its config."""
        notifier = oslo_messaging.Notifier(self.transport,
                                           publisher_id='image.localhost',
                                           retry=retry)
        driver = notifier._driver_mgr['messaging-multicast'].obj
        self.addCleanup(driver.cleanup)
        return notifier, driver

    def assertNoMore(self, collector, count, sentinels=1):
        """Exactly ``count`` arrived before the sentinels the test sent last.

        Sent after the rest on the same path, a sentinel arrives after any
        duplicate of what went before: no time is given to a duplicate to
        show up, its absence is proven.
        """
        before = collector.wait_for_sentinels(sentinels)
        self.assertIsNotNone(before, 'the sentinel never arrived')
        self.assertEqual(count, len(before), before)


class OnmcastGlanceTestCase(MulticastBrokerTestCase):

    def test_onmcast_snippet_with_only_the_driver_line_moved(self):
        standard = base.unique_name('notifications')
        prefix = base.unique_name('glance.repl') + '.'
        # onmcast's README snippet, verbatim but for the driver line (which
        # current oslo.messaging only reads in [oslo_messaging_notifications])
        # and the names this test needs unique.
        self.load_config("""
            [DEFAULT]
            transport_url = {url}
            multicast_events = image.upload,image.delete
            multicast_topic_prefix = {prefix}
            publisher_id = GLANCE:MASTER
            image.delete = host1,host2
            image.upload = host1,host2
            [oslo_messaging_notifications]
            driver = messaging-multicast
            topics = {standard}
            """.format(url=self.url, prefix=prefix, standard=standard))
        self.transport = self.notification_transport(None)
        standard_collector = self.start_listener(standard)
        replicas = {}
        for host in ('host1', 'host2'):
            for key in ('image.upload', 'image.delete'):
                replicas[host, key] = self.start_listener(
                    f'{prefix}{host}.{key}')
        notifier, _ = self.notifier()

        envelopes = samples.glance_life_cycle()
        for envelope in envelopes:
            notifier.info({}, envelope['event_type'], envelope['payload'])
        for key in ('image.upload', 'image.delete'):
            notifier.info({}, key, base.sentinel_payload())

        received = standard_collector.wait_for(len(envelopes))
        self.assertEqual([e['event_type'] for e in envelopes],
                         [r['event_type'] for r in received[:len(envelopes)]])
        self.assertNoMore(standard_collector, len(envelopes), sentinels=2)
        for (host, key), collector in replicas.items():
            received = collector.wait_for(1)[:1]
            self.assertEqual([key], [r['event_type'] for r in received])
            replica = received[0]
            self.assertEqual('GLANCE:MASTER', replica['publisher_id'])
            # onmcast's shape: the whole original notification as payload.
            self.assertEqual(key, replica['payload']['event_type'])
            self.assertEqual('image.localhost',
                             replica['payload']['publisher_id'])
            self.assertNoMore(collector, 1)


class RuleTestCase(MulticastBrokerTestCase):

    def test_payload_regex_and_second_broker(self):
        # Another region: a broker node of its own, which any user can
        # start (a vhost of the system's broker needs rabbitmqctl, which
        # only root or the rabbitmq user may run).
        region2 = self.useFixture(outage.RabbitNode(self)).url
        standard = base.unique_name('notifications')
        sized = base.unique_name('sized')
        self.load_config("""
            [oslo_messaging_notifications]
            driver = messaging-multicast
            topics = {standard}
            [oslo_messaging_multicast]
            rules = sized, region2
            [multicast_rule_sized]
            selector = payload.size regex ^[0-9]{{4,}}$
            selector = payload.disk_format in raw,qcow2
            targets = {sized}
            [multicast_rule_region2]
            selector = event_type in image.upload,image.delete
            # The standard topic is allowed on another broker.
            targets = {standard}
            transport_url = {region2}
            publisher_id = GLANCE:MASTER
            """.format(standard=standard, sized=sized, region2=region2))
        standard_collector = self.start_listener(standard)
        sized_collector = self.start_listener(sized)
        region2_collector = self.start_listener(standard, url=region2)
        notifier, _ = self.notifier()

        envelopes = samples.glance_life_cycle()
        for envelope in envelopes:
            notifier.info({}, envelope['event_type'], envelope['payload'])
        # Last, and selected by every rule.
        notifier.info({}, 'image.upload', base.sentinel_payload(
            size=10000, disk_format='raw'))

        expected_sized = [e['event_type'] for e in envelopes
                          if re.search('^[0-9]{4,}$',
                                       str(e['payload'].get('size')))]
        self.assertEqual(4, len(expected_sized))
        received = sized_collector.wait_for(len(expected_sized))
        self.assertEqual(expected_sized, [r['event_type'] for r in
                                          received[:len(expected_sized)]])
        self.assertEqual({'image.localhost'},
                         {r['publisher_id'] for r in received})
        received = region2_collector.wait_for(2)
        self.assertEqual(['image.upload', 'image.delete'],
                         [r['event_type'] for r in received[:2]])
        self.assertEqual({'GLANCE:MASTER'},
                         {r['publisher_id'] for r in received})
        for collector, count in ((standard_collector, len(envelopes)),
                                 (sized_collector, len(expected_sized)),
                                 (region2_collector, 2)):
            self.assertNoMore(collector, count)

    def test_unreachable_target_broker_with_retry_0(self):
        standard = base.unique_name('notifications')
        healthy = base.unique_name('healthy')
        # A "broker" that hangs up on every connection: each attempt to
        # reach it is seen, and fails at once.
        broken = HangingUpListener()
        self.addCleanup(broken.close)
        self.load_config("""
            [oslo_messaging_notifications]
            driver = messaging-multicast
            topics = %(standard)s
            [oslo_messaging_multicast]
            rules = down, up
            [multicast_rule_down]
            selector = *
            targets = %(healthy)s-never
            transport_url = rabbit://guest:guest@127.0.0.1:%(port)d/
            replica_retry = 0
            [multicast_rule_up]
            selector = *
            targets = %(healthy)s
            """ % {'standard': standard, 'healthy': healthy,
                   'port': broken.port})
        standard_collector = self.start_listener(standard)
        healthy_collector = self.start_listener(healthy)
        notifier, driver = self.notifier(retry=0)

        # The rule's replica_retry = 0 means one connection attempt, made
        # before notify() returned; the failed broker is then skipped
        # without any attempt until its backoff expires (10 s).
        for _ in range(2):
            notifier.info({}, 'image.upload', samples.glance_upload_payload())
            self.assertEqual(1, broken.accepted())

        self.assertEqual(2, len(standard_collector.wait_for(2)))
        self.assertEqual(2, len(healthy_collector.wait_for(2)))
        down = [d for r in driver._rules for d in r.destinations
                if r.name == 'down'][0]
        self.assertEqual(2, down.failures.total)

    def test_refused_publish_does_not_stop_other_targets(self):
        standard = base.unique_name('notifications')
        healthy = base.unique_name('healthy')
        # An exchange of another type: the broker refuses to declare it as
        # the topic exchange a replica needs, with or without retry.
        conflicting = base.unique_name('fanout-exchange')
        amqp_url = urllib.parse.urlsplit(self.url)._replace(
            scheme='amqp').geturl()
        with kombu.Connection(amqp_url, connect_timeout=5) as conn:
            kombu.Exchange(conflicting, type='fanout',
                           channel=conn.default_channel).declare()
        self.addCleanup(self.delete_exchange, amqp_url, conflicting)
        self.load_config("""
            [oslo_messaging_notifications]
            driver = messaging-multicast
            topics = {standard}
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = *
            targets = {conflicting}/refused, {healthy}
            """.format(standard=standard, healthy=healthy,
                       conflicting=conflicting))
        standard_collector = self.start_listener(standard)
        healthy_collector = self.start_listener(healthy)
        notifier, driver = self.notifier()

        start = time.monotonic()
        notifier.info({}, 'image.upload', samples.glance_upload_payload())
        self.assertLess(time.monotonic() - start, PROMPT)

        self.assertEqual(1, len(standard_collector.wait_for(1)))
        self.assertEqual(1, len(healthy_collector.wait_for(1)))
        refused = driver._rules[0].destinations[0]
        self.assertEqual(1, refused.failures.total)

    @staticmethod
    def delete_exchange(amqp_url, exchange):
        with kombu.Connection(amqp_url, connect_timeout=5) as conn:
            conn.default_channel.exchange_delete(exchange)


class AsyncFanoutTestCase(MulticastBrokerTestCase):

    CONFIG = """
        [DEFAULT]
        transport_url = %(url)s
        [oslo_messaging_notifications]
        driver = messaging-multicast
        topics = %(standard)s
        [oslo_messaging_multicast]
        rules = all
        async_fanout = true
        async_flush_timeout = %(timeout)s
        [multicast_rule_all]
        selector = *
        targets = %(targets)s
        # Generous: these tests hold the publisher on purpose.
        replica_timeout = %(timeout)s
        """

    def async_config(self, targets):
        """The async configuration; the standard queue is deleted after."""
        standard = base.unique_name('notifications')
        # Nobody consumes the standard topic in these tests.
        self.addCleanup(self.delete_queues, self.url, ['%s.info' % standard])
        return self.CONFIG % {'url': self.url, 'standard': standard,
                              'targets': ','.join(targets),
                              'timeout': base.DELIVERY_TIMEOUT}

    def test_every_replica_delivered_including_those_queued_at_shutdown(self):
        targets = [base.unique_name('async'), base.unique_name('async')]
        self.load_config(self.async_config(targets))
        collectors = [self.start_listener(t) for t in targets]
        notifier, driver = self.notifier()
        # Hold the worker on its first replica, so that every replica is
        # still queued when the driver is shut down.
        gate = threading.Event()
        self.addCleanup(gate.set)
        send = multicast_delivery.Destination.send

        def gated(destination, *args, **kwargs):
            gate.wait()
            return send(destination, *args, **kwargs)

        self.useFixture(fixtures.MockPatchObject(
            multicast_delivery.Destination, 'send', autospec=True,
            side_effect=gated))
        count = 100
        payload = samples.glance_upload_payload()
        for _ in range(count):
            notifier.info({}, 'image.upload', payload)
        self.assertEqual(2 * count, driver._fanout.pending)

        gate.set()
        notifier.info({}, 'image.upload', base.sentinel_payload())
        driver.cleanup()

        self.assertEqual(0, driver.dropped)
        for collector in collectors:
            self.assertNoMore(collector, count)

    def test_service_under_eventlet_flushes_at_exit(self):
        target = base.unique_name('async-eventlet')
        path = self.write_config(self.async_config([target]))
        collector = self.start_listener(target)
        count = 50
        # A service process as eventlet-based services run: monkey patched
        # first, then exiting right after its last notification.
        script = textwrap.dedent("""
            import eventlet
            eventlet.monkey_patch()
            import sys
            from oslo_config import cfg
            import oslo_messaging

            conf = cfg.ConfigOpts()
            conf(['--config-file', sys.argv[1]])
            notifier = oslo_messaging.Notifier(
                oslo_messaging.get_notification_transport(conf),
                publisher_id='image.localhost')
            for i in range(int(sys.argv[2])):
                notifier.info({}, 'image.upload', {'index': i})
            """)
        result = subprocess.run([sys.executable, '-c', script, path,
                                 str(count)], capture_output=True, text=True,
                                timeout=2 * base.DELIVERY_TIMEOUT)
        self.assertEqual(0, result.returncode, result.stderr)
        received = collector.wait_for(count)
        self.assertEqual(list(range(count)),
                         sorted(r['payload']['index'] for r in received))
        # The service has exited: what it published is all queued, ahead
        # of a sentinel sent now.
        oslo_messaging.Notifier(
            self.transport, publisher_id='image.localhost',
            driver='messagingv2', topics=[target]).info(
                {}, 'image.upload', base.sentinel_payload())
        self.assertNoMore(collector, count)
