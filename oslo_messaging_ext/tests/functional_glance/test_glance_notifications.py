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

"""glance's real notifications, through both drivers, on RabbitMQ.

glance-api runs under uwsgi with two single-threaded workers, configured by
the devstack plugin's post-config step. The test drives the images v2 API
and checks what three kinds of consumers receive: a subscriber of the unix
socket (our subscriber library), oslo.messaging listeners on the replica
topics of the default multicast rule, and an oslo.messaging listener on
glance's standard notification topic.
"""

import collections
import importlib.metadata
import os
import re
import threading

import fixtures
from testtools import content

from oslo_messaging_ext.tests.functional import base
from oslo_messaging_ext.tests.functional_glance import glance
from oslo_messaging_ext.tests import utils as test_utils

# glance sets its control exchange to "glance"; replicas of a rule target
# without an exchange go to the notifier's default exchange, the same one.
EXCHANGE = 'glance'
REPLICA_HOSTS = ('host1', 'host2')
REPLICA_PUBLISHER_ID = 'GLANCE:MASTER'
REPLICATED_EVENTS = ('image.upload', 'image.delete')

# What glance (33.0.0, pinned in constraints.txt) emits for each step.
CREATE = ['image.create']
UPLOAD = ['image.update', 'image.prepare', 'image.upload', 'image.activate',
          'image.update']
PATCH = ['image.update']
DELETE = ['image.delete']

DRIVERS = ('messaging-multicast', 'unix')
DRIVER_ENTRY_POINTS = 'oslo.messaging.notify.drivers'

# ERROR or CRITICAL records of our drivers, or of oslo.messaging's notifier
# reporting that a driver raised, in oslo.log's default format.
DRIVER_ERROR_RE = re.compile(
    r'^.* \d+ (ERROR|CRITICAL) (oslo_messaging_ext|oslo_messaging\.notify)'
    r'\S* .*$', re.M)


def events_of(received, image_ids):
    """Counter of (image id, event type) for the images of ``image_ids``."""
    return collections.Counter(
        (n['payload'].get('id'), n['event_type']) for n in received
        if isinstance(n['payload'], dict) and
        n['payload'].get('id') in image_ids)


def expected(image_id, *steps):
    return collections.Counter(
        (image_id, event) for step in steps for event in step)


class TestGlanceNotifications(base.BrokerTestCase):

    def setUp(self):
        super().setUp()
        self.require_drivers()
        self.dir = self.useFixture(fixtures.TempDir()).path
        self.topic = base.unique_name('glance-notifications')
        self.replica_prefix = base.unique_name('glance.repl') + '.'
        self.glance = glance.GlanceAPI(self.dir, self.url, self.topic,
                                       self.replica_prefix)
        self.addOnException(self.attach_diagnostics)
        # Listening before glance starts: the queues exist before the first
        # notification, and are deleted after glance stops.
        self.standard = self.start_listener(self.topic, exchange=EXCHANGE)
        self.replicas = {
            host: self.start_listener(self.replica_prefix + host,
                                      exchange=EXCHANGE)
            for host in REPLICA_HOSTS}
        self.useFixture(self.glance)

    def require_drivers(self):
        """Fail, saying which, when a driver or the library is missing."""
        found = {ep.name: ep for ep in importlib.metadata.entry_points(
            group=DRIVER_ENTRY_POINTS) if ep.name in DRIVERS}
        for name in DRIVERS:
            try:
                found[name].load()
            except (KeyError, ImportError) as exc:
                self.fail('The %s notification driver cannot be loaded (%r): '
                          'this job proves both drivers with glance and '
                          'needs them installed.' % (name, exc))
        try:
            importlib.import_module('oslo_messaging_ext.unix_subscriber')
        except ImportError as exc:
            self.fail('The unix subscriber library cannot be imported (%r)'
                      % exc)

    def attach_diagnostics(self, exc_info):
        self.addDetail('glance', content.text_content(
            self.glance.diagnostics()))

    def subscribe(self, path):
        """Connect our subscriber library to the unix socket.

        :returns: the collecting endpoint and the subscription
        """
        from oslo_messaging_ext import unix_subscriber

        subscription = unix_subscriber.Subscription(
            path, reconnect=True, min_backoff=0.05, max_backoff=0.5)
        collector = base.NotificationCollector()
        dispatcher = unix_subscriber.EndpointDispatcher([collector])
        thread = threading.Thread(target=dispatcher.run, args=(subscription,),
                                  name='unix-subscriber', daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(subscription.close)
        if not subscription.connected.wait(base.DELIVERY_TIMEOUT):
            self.fail('No unix socket to subscribe to at %s after glance '
                      'emitted its first notification' % path)
        return collector, subscription

    def wait_for_events(self, collector, wanted, what):
        def arrived():
            return events_of(collector.received, {i for i, _ in wanted})
        got = test_utils.wait_until(lambda: arrived() >= wanted,
                                    base.DELIVERY_TIMEOUT)
        if not got:
            self.fail('%s: still missing %s after %ss; received %s'
                      % (what, dict(wanted - arrived()),
                         base.DELIVERY_TIMEOUT, dict(arrived())))

    def sync_subscriber(self, api, image_id, collector, attempts=10):
        """Update ``image_id`` until ``collector`` receives an update.

        :returns: how many updates were made
        """
        for attempt in range(1, attempts + 1):
            api.update_image(image_id, 'sync_%d' % attempt, 'yes')
            if test_utils.wait_until(
                    lambda: events_of(collector.received, {image_id}),
                    timeout=base.DELIVERY_TIMEOUT / attempts):
                self.addDetail('unix subscriber sync', content.text_content(
                    'received update %d of the warm-up image' % attempt))
                return attempt
        self.fail('The unix subscriber, connected, received none of %d '
                  'updates of the warm-up image in %ss'
                  % (attempts, base.DELIVERY_TIMEOUT))

    def test_image_notifications_flow_through_both_drivers(self):
        api = self.glance
        sock_path = api.sock_path

        # The unix driver binds its socket at the service's first
        # notification: a warm-up image makes it appear. Then the warm-up
        # image is updated until the subscriber receives an update: a
        # subscriber only gets what is emitted once the driver has accepted
        # it, which connect() returning does not prove. From then on,
        # nothing may be missed.
        warm_up = api.create_image('warm-up')
        unix, subscription = self.subscribe(sock_path)
        updates = self.sync_subscriber(api, warm_up, unix)

        # While a worker is held by the upload of the first image, the
        # second image is created and deleted by the other one: both
        # workers emit notifications. The upload's worker is past its
        # database update once the image is "saving": sqlite, shared by
        # both workers, then never sees two writers at once.
        first = api.create_image('first')
        finish_upload = api.start_upload(first, os.urandom(64 * 1024))
        api.wait_for_status(first, 'saving')
        second = api.create_image('second')
        api.delete_image(second)
        finish_upload()
        api.delete_image(first)
        api.delete_image(warm_up)

        image_requests = [r for r in api.served_by()
                          if r[2].startswith('/v2/images')]
        self.addDetail('requests by worker', content.text_content(
            '\n'.join('pid %s %s %s -> %s' % r for r in image_requests)))
        workers = {(method, uri): pid
                   for pid, method, uri, _ in image_requests}
        self.assertNotEqual(
            workers[('PUT', '/v2/images/%s/file' % first)],
            workers[('DELETE', '/v2/images/%s' % second)],
            'the second image was not handled by another worker than the '
            'upload of the first: %s' % image_requests)

        images = {warm_up, first, second}
        standard_expected = (expected(warm_up, CREATE, PATCH * updates,
                                      DELETE) +
                             expected(first, CREATE, UPLOAD, DELETE) +
                             expected(second, CREATE, DELETE))
        replica_expected = collections.Counter(
            {key: 1 for key in standard_expected
             if key[1] in REPLICATED_EVENTS})
        unix_expected = (expected(first, CREATE, UPLOAD, DELETE) +
                         expected(second, CREATE, DELETE))

        # The unix socket: everything emitted while subscribed (image.create,
        # image.upload, image.activate and image.delete of the first image
        # among them), exactly once, whichever worker emitted it.
        self.wait_for_events(unix, unix_expected + expected(warm_up, DELETE),
                             'unix subscriber')
        self.assertEqual(unix_expected,
                         events_of(unix.received, {first, second}))
        self.assertEqual(0, subscription.dropped)
        self.assertTrue(all(n['publisher_id'].startswith('image.')
                            for n in unix.received))

        # The replica topics: the configured events only, re-published.
        for host, collector in self.replicas.items():
            self.wait_for_events(collector, replica_expected,
                                 'replica topic of %s' % host)
            self.assertEqual(replica_expected,
                             events_of(collector.received, images))
            self.assertEqual(
                sum(replica_expected.values()), len(collector.received),
                'unexpected notifications on the replica topic of %s: %s'
                % (host, collector.event_types()))
            self.assertEqual({(REPLICA_PUBLISHER_ID, 'info')},
                             {(n['publisher_id'], n['priority'])
                              for n in collector.received})

        # The standard topic: every event exactly once, as messagingv2
        # alone would send it. The warm-up image's deletion was emitted
        # last, so a duplicate of an earlier event would be here by now.
        self.wait_for_events(self.standard, standard_expected,
                             'standard topic %s' % self.topic)
        self.assertEqual(standard_expected,
                         events_of(self.standard.received, images))
        self.assertEqual(sum(standard_expected.values()),
                         len(self.standard.received))
        message_ids = [n['metadata']['message_id']
                       for n in self.standard.received]
        self.assertEqual(len(message_ids), len(set(message_ids)))
        self.assertTrue(all(n['publisher_id'].startswith('image.')
                            for n in self.standard.received))

        # Nothing went wrong in our drivers, as glance logged it.
        with open(api.log_path, errors='replace') as f:
            log = f.read()
        self.assertNotEqual('', log, 'glance-api wrote no log')
        self.assertEqual([], [m.group(0)
                              for m in DRIVER_ERROR_RE.finditer(log)])

        # Shutdown: no process of uwsgi survives, and the plugin's unstack
        # leaves neither the socket nor its directory (nor the latter's
        # systemd-tmpfiles entry) behind.
        graceful = api.stop()
        self.addDetail('uwsgi stop', content.text_content(
            'stopped on SIGTERM' if graceful else
            'still running %ss after SIGTERM, killed' % glance.STOP_TIMEOUT))
        self.assertFalse(os.path.exists(sock_path))
        self.assertFalse(os.path.exists(api.run_dir))
        self.assertFalse(os.path.exists(
            api.plugin_env['OSLO_MESSAGING_EXT_TMPFILES_CONF']))
