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

"""Replicate glance image notifications with the messaging-multicast driver.

A notifier configured with the glance replication rules emits the recorded
glance image life cycle; an oslo.messaging notification listener per topic
(the standard one and each replica target) prints what arrives. It runs on
the in-process fake transport unless --transport-url names a broker.
"""

import os
import tempfile
import textwrap
import threading
import time
import urllib.parse
import uuid

from oslo_config import cfg
import oslo_messaging

from oslo_messaging_ext.notify import _impl_multicast
from oslo_messaging_ext import samples

CONFIG = """\
[oslo_messaging_notifications]
driver = messaging-multicast
topics = {standard}

[oslo_messaging_multicast]
rules = glance_replication, active_images

[multicast_rule_glance_replication]
selector = event_type in image.upload,image.delete
targets = {host1},{host2}
publisher_id = GLANCE:MASTER

[multicast_rule_active_images]
selector = event_type glob image.*
selector = payload.status exact active
targets = audit/{active}
"""

WAIT = 30.0


def add_arguments(parser):
    parser.add_argument('--transport-url', metavar='URL',
                        help='run on this broker, e.g. '
                             'rabbit://guest:guest@127.0.0.1:5672/ '
                             '(default: the in-process fake transport)')


class _Printer:
    """A notification endpoint printing what its topic receives."""

    lock = threading.Lock()

    def __init__(self, label):
        self.label = label
        self.count = 0

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        with self.lock:
            self.count += 1
            print('  %-34s %-15s from %-16s status=%s'
                  % (self.label, event_type, publisher_id,
                     payload.get('status')), flush=True)


def run(args):
    on_broker = bool(args.transport_url)
    # On a broker, queues outlive the demo: unique names keep runs apart.
    suffix = '-' + uuid.uuid4().hex[:6] if on_broker else ''
    names = {'standard': 'notifications' + suffix,
             'host1': 'glance.repl.host1' + suffix,
             'host2': 'glance.repl.host2' + suffix,
             'active': 'images.active' + suffix}
    config = CONFIG.format(**names)
    print('Service configuration:\n\n%s' % textwrap.indent(config, '    '))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'service.conf')
        with open(path, 'w') as f:
            f.write(config)
        conf = cfg.ConfigOpts()
        conf(['--config-file', path], project='oslo-messaging-ext-demo')
    transport = oslo_messaging.get_notification_transport(
        conf, url=args.transport_url or 'fake:/')
    listeners = []
    printers = {}
    expected = {}
    try:
        for label, topic, exchange in [
                ('standard ' + names['standard'], names['standard'], None),
                (names['host1'], names['host1'], None),
                (names['host2'], names['host2'], None),
                ('audit/' + names['active'], names['active'], 'audit')]:
            printers[topic] = _Printer(label)
            listener = oslo_messaging.get_notification_listener(
                transport,
                [oslo_messaging.Target(topic=topic, exchange=exchange)],
                [printers[topic]], executor='threading')
            listener.start()
            listeners.append(listener)

        notifier = oslo_messaging.Notifier(transport,
                                           publisher_id='image.localhost')
        life_cycle = samples.glance_life_cycle()
        expected.update(dict.fromkeys(printers, 0))
        expected[names['standard']] = len(life_cycle)
        # The Notifier keeps its drivers to itself: a driver of the same
        # configuration tells where each notification is replicated.
        driver = _impl_multicast.MulticastDriver(
            conf, conf.oslo_messaging_notifications.topics, transport)
        try:
            for envelope in life_cycle:
                for rule in driver.matching_rules(envelope, {}):
                    for destination in rule.destinations:
                        expected[destination.topic] += 1
        finally:
            driver.cleanup()
        where = (_masked(args.transport_url) if on_broker
                 else 'the fake transport')
        print('Emitting the glance image life cycle on %s:\n' % where)
        for envelope in life_cycle:
            notifier.info({}, envelope['event_type'], envelope['payload'])

        deadline = time.monotonic() + WAIT
        while (any(printers[t].count < n for t, n in expected.items()) and
               time.monotonic() < deadline):
            time.sleep(0.05)
        missing = {t: n - printers[t].count for t, n in expected.items()
                   if printers[t].count < n}
        print('\n%s' % ('Every notification and replica arrived.'
                        if not missing else 'MISSING: %s' % missing))
        return 1 if missing else 0
    finally:
        for listener in listeners:
            listener.stop()
            listener.wait()
        if on_broker:
            _delete_queues(args.transport_url, expected)
        transport.cleanup()


def _masked(url):
    parsed = urllib.parse.urlsplit(url)
    if parsed.password:
        netloc = parsed.netloc.replace(':%s@' % parsed.password, ':****@')
        parsed = parsed._replace(netloc=netloc)
    return parsed.geturl()


def _delete_queues(url, topics):
    """Delete the queues the demo's listeners and publishers declared.

    oslo.messaging has no public means of deleting a queue, so this speaks
    to the broker with kombu, which oslo.messaging requires for its rabbit
    driver: imported here, as only a demo run on a broker needs it.
    """
    import kombu

    amqp_url = urllib.parse.urlsplit(url)._replace(scheme='amqp').geturl()
    with kombu.Connection(amqp_url, connect_timeout=5) as conn:
        channel = conn.channel()
        for topic in topics:
            channel.queue_delete('%s.info' % topic)
