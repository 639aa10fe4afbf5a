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

"""A healthy broker far away loses no replica.

The target broker is the real RabbitMQ behind a TcpProxy that adds
DELAY seconds each way, as another region's broker; every case starts a
driver with no connection yet (a process start), with the default
replica_timeout. The replicas delivered, counted by consuming the target
queue on the broker, must equal what messagingv2 delivers through the
same proxy, and no notify() may wait longer than replica_timeout.
"""

import threading
import time

import oslo_messaging

from oslo_messaging_ext.notify import _multicast_opts
from oslo_messaging_ext import samples
from oslo_messaging_ext.tests.functional import base
from oslo_messaging_ext.tests.functional import outage
from oslo_messaging_ext.tests.functional import test_multicast_outage

DELAY = 0.025
REPLICA_TIMEOUT = {opt.name: opt.default
                   for opt in _multicast_opts.rule_opts}['replica_timeout']
# What a call may take beyond the bound on a loaded machine.
SLACK = test_multicast_outage.SLACK
# 600 confirmed publishes one after the other at 2 x DELAY each, and more
# on a loaded machine.
WAN_DELIVERY_TIMEOUT = 180.0


def send_all(notifier, threads, per_thread, limit):
    """Send ``threads`` x ``per_thread`` notifications; return durations."""
    durations = []
    lock = threading.Lock()
    payload = samples.glance_upload_payload()

    def send(offset):
        for index in range(per_thread):
            start = time.monotonic()
            notifier.info({}, 'image.upload',
                          dict(payload, index=offset + index))
            with lock:
                durations.append(time.monotonic() - start)

    workers = [threading.Thread(target=send, args=(n * per_thread,),
                                daemon=True) for n in range(threads)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + limit
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    return durations


class WanTestCase(test_multicast_outage.OutageTestCase):

    def deliver(self, threads, per_thread, async_fanout):
        proxy = self.useFixture(outage.TcpProxy(self.upstream(),
                                                delay=DELAY))
        standard = base.unique_name('notifications')
        # Nobody reads the standard topic here: its queue goes at the end.
        self.addCleanup(self.delete_queues, self.url, ['%s.info' % standard])
        replicas = base.unique_name('wan')
        reference = base.unique_name('wan-v2')
        self.load_config("""
            [oslo_messaging_notifications]
            driver = messaging-multicast
            topics = %s
            [oslo_messaging_multicast]
            rules = wan
            async_fanout = %s
            [multicast_rule_wan]
            selector = *
            targets = %s
            transport_url = %s
            """ % (standard, async_fanout, replicas, proxy.url()))
        replica_collector = self.start_listener(replicas)
        reference_collector = self.start_listener(reference)
        notifier, driver = self.notifier()
        v2 = oslo_messaging.Notifier(
            self.notification_transport(proxy.url()),
            publisher_id='image.localhost', driver='messagingv2',
            topics=[reference])
        total = threads * per_thread
        limit = total * (REPLICA_TIMEOUT + SLACK)

        durations = send_all(notifier, threads, per_thread, limit)
        reference_durations = send_all(v2, threads, per_thread, limit)

        self.assertEqual(total, len(durations), 'calls returned in time')
        self.assertEqual(total, len(reference_durations))
        delivered = len(replica_collector.wait_for(
            total, timeout=WAN_DELIVERY_TIMEOUT))
        reference_delivered = len(reference_collector.wait_for(
            total, timeout=WAN_DELIVERY_TIMEOUT))
        self.assertEqual(total, reference_delivered)
        self.assertEqual(reference_delivered, delivered,
                         'replicas delivered against messagingv2 through '
                         'the same proxy; dropped: %d' % driver.dropped)
        self.assertEqual(0, driver.dropped)
        self.assertLess(max(durations), REPLICA_TIMEOUT + SLACK)
        # Far away is not failed: the broker was never skipped.
        self.assertNotIn('messaging-multicast dropped',
                         self.driver_logs.output)

    def test_process_start_and_burst_of_200_sync(self):
        self.deliver(1, 200, async_fanout=False)

    def test_process_start_and_burst_of_200_async(self):
        self.deliver(1, 200, async_fanout=True)

    def test_process_start_and_4_threads_of_150_sync(self):
        self.deliver(4, 150, async_fanout=False)

    def test_process_start_and_4_threads_of_150_async(self):
        self.deliver(4, 150, async_fanout=True)
