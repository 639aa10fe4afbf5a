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
and checks what three kinds of consumers receive: ``oslo-notify-tail``
recording the unix socket, the replica queues of the default multicast
rule, and an oslo.messaging listener on glance's standard notification
topic. The recording and the replica queues are judged by
``notification_check``, the check the devstack job of ``.zuul.yaml`` runs
after tempest.
"""

import collections
import importlib.metadata
import os
import re
import signal
import subprocess
import sys

import fixtures
from testtools import content

from oslo_messaging_ext.tests.functional import base
from oslo_messaging_ext.tests.functional_glance import glance
from oslo_messaging_ext.tests.functional_glance import notification_check
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
# oslo-notify-tail's documented exit status when interrupted.
RECORDER_INTERRUPTED = 130
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


class Recorder:
    """``oslo-notify-tail --follow --format json``, as the gate job runs it.

    :param sock_path: the socket to record
    :param path: the NDJSON file it writes
    """

    def __init__(self, sock_path, path):
        self.path = path
        command = os.path.join(sys.prefix, 'bin', 'oslo-notify-tail')
        with open(path, 'wb') as out, open(path + '.stderr', 'wb') as err:
            self.process = subprocess.Popen(
                [command, '--follow', '--format', 'json', sock_path],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    @property
    def received(self):
        """The notifications recorded so far (a partial line is not)."""
        return notification_check.read_recording(self.path)[0]

    def stop(self):
        """Interrupt it as a job's post-run does; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def stderr(self):
        return glance.tail(self.path + '.stderr')


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
        # Nobody consumes the replica topics: the check drains their
        # queues at the end, as in the gate.
        self.addCleanup(self.delete_queues, self.url, [
            '%s%s.%s' % (self.replica_prefix, host, priority)
            for host in REPLICA_HOSTS for priority in base.PRIORITIES])
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

    def record(self, path):
        """Record the unix socket with oslo-notify-tail."""
        recorder = Recorder(path, os.path.join(self.dir, 'unix.ndjson'))
        self.addCleanup(recorder.stop)
        self.addOnException(lambda exc_info: self.addDetail(
            'oslo-notify-tail stderr', content.text_content(
                recorder.stderr())))
        return recorder

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
        """Update ``image_id`` until ``collector`` records an update.

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
        unix = self.record(sock_path)
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
        # Still running when interrupted: it never lost the socket.
        self.assertEqual(RECORDER_INTERRUPTED, unix.stop(), unix.stderr())
        recording = unix.received
        self.assertEqual(unix_expected, events_of(recording, {first, second}))
        self.assertTrue(all(n['publisher_id'].startswith('image.')
                            for n in recording
                            if n['event_type'] != notification_check.
                            DROPPED_EVENT_TYPE))

        # The gate's check, on this run: no drop, the expected events, and
        # on each replica queue exactly the configured events of every
        # image recorded from its creation (the first and second ones).
        transport_url, rules = notification_check.load_config(api.conf_path)
        self.assertEqual(
            [(self.replica_prefix + host + '.info') for host in REPLICA_HOSTS],
            [queue for rule in rules for _, queue in rule.queues])
        replicas = notification_check.collect_replicas(
            transport_url, rules, recording, base.DELIVERY_TIMEOUT)
        self.addDetail('notification check', content.text_content(
            notification_check.summary(recording, replicas)))
        self.assertEqual([], notification_check.check(recording, rules,
                                                      replicas))

        # The replica queues, warm-up image included: the configured
        # events only, re-published, and nothing else.
        for (exchange, queue), got in replicas.items():
            self.assertEqual(EXCHANGE, exchange)
            self.assertEqual(replica_expected, events_of(got, images), queue)
            self.assertEqual(sum(replica_expected.values()), len(got),
                             'unexpected notifications on %s: %s'
                             % (queue, [n['event_type'] for n in got]))
            self.assertEqual({REPLICA_PUBLISHER_ID},
                             {n['publisher_id'] for n in got})

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

        # Shutdown as devstack does it: the plugin's unstack phase leaves
        # the running glance-api's socket in place; no process of uwsgi
        # survives; the clean phase leaves neither the socket nor its
        # directory (nor the latter's systemd-tmpfiles entry) behind.
        graceful = api.stop()
        self.assertTrue(api.socket_after_unstack)
        self.addDetail('uwsgi stop', content.text_content(
            'stopped on SIGTERM' if graceful else
            'still running %ss after SIGTERM, killed' % glance.STOP_TIMEOUT))
        self.assertFalse(os.path.exists(sock_path))
        self.assertFalse(os.path.exists(api.run_dir))
        self.assertFalse(os.path.exists(
            api.plugin_env['OSLO_MESSAGING_EXT_TMPFILES_CONF']))
