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
(the standard one and each replica target) receives what arrives. Each
notification is printed with the copies it produced, in emission order. It
runs on the in-process fake transport unless --transport-url names a
broker.
"""

import os
import queue
import sys
import tempfile
import textwrap
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
targets = {audit}/{active}
"""

CONTROL_EXCHANGE = """\
[DEFAULT]
control_exchange = {control}

"""

# Seconds to wait for the copies of one notification; on a broker that is
# up they take milliseconds.
WAIT = 10.0
# How long the broker may take to answer before the demo gives up.
CONNECT_TIMEOUT = 5


def add_arguments(parser):
    parser.add_argument('--transport-url', metavar='URL',
                        help='run on this broker, e.g. '
                             'rabbit://guest:guest@127.0.0.1:5672/ '
                             '(default: the in-process fake transport)')


class _Collector:
    """A notification endpoint queueing what its topic receives."""

    def __init__(self, label, arrivals):
        self.label = label
        self.arrivals = arrivals

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        self.arrivals.put((self.label, event_type, publisher_id))


def _names(on_broker):
    # On a broker, queues and exchanges outlive the demo and are shared
    # by every user of the vhost: names of this run only, deleted at the
    # end.
    suffix = '-' + uuid.uuid4().hex[:6] if on_broker else ''
    return suffix, {'standard': 'notifications' + suffix,
                    'host1': 'glance.repl.host1' + suffix,
                    'host2': 'glance.repl.host2' + suffix,
                    'audit': 'audit' + suffix,
                    'active': 'images.active' + suffix,
                    'control': 'oslo-messaging-ext-demo' + suffix}


def _legend(names, suffix):
    rows = [
        (names['standard'], 'the standard topic: every notification, as '
                            'messagingv2 sends it'),
        (names['host1'], 'rule glance_replication: image.upload and '
                         'image.delete, sent as GLANCE:MASTER'),
        (names['host2'], 'rule glance_replication, its second target'),
        ('%s/%s' % (names['audit'], names['active']),
         'rule active_images: image.* whose payload.status is active, '
         'on exchange ' + names['audit']),
    ]
    width = max(len(name) for name, _ in rows)
    text = 'Topics, one listener each:\n' + ''.join(
        '  %-*s  %s\n' % (width, name, what) for name, what in rows)
    if suffix:
        text += ('The suffix %s is this run\'s: queues and exchanges on a '
                 'broker are shared,\nso each run uses names of its own '
                 '(control_exchange too), and deletes them at the end.\n'
                 % suffix)
    return text


def run(args):
    on_broker = bool(args.transport_url)
    if on_broker:
        problem = _broker_problem(args.transport_url)
        if problem:
            sys.stderr.write(problem + '\n')
            return 1
    suffix, names = _names(on_broker)
    config = CONFIG.format(**names)
    if on_broker:
        # The exchange of the standard topic, too, is this run's only.
        config = CONTROL_EXCHANGE.format(**names) + config
    print('Service configuration:\n\n%s' % textwrap.indent(config, '    '))
    print(_legend(names, suffix))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'service.conf')
        with open(path, 'w') as f:
            f.write(config)
        conf = cfg.ConfigOpts()
        conf(['--config-file', path], project='oslo-messaging-ext-demo')
    transport = oslo_messaging.get_notification_transport(
        conf, url=args.transport_url or 'fake:/')
    # Where a service sets it, and where the driver reads it.
    conf.set_override('transport_url', args.transport_url or 'fake:/')
    arrivals = queue.Queue()
    listeners = []
    labels = {}
    try:
        for label, topic, exchange in [
                (names['standard'], names['standard'], None),
                (names['host1'], names['host1'], None),
                (names['host2'], names['host2'], None),
                ('%s/%s' % (names['audit'], names['active']),
                 names['active'], names['audit'])]:
            labels[topic] = label
            listener = oslo_messaging.get_notification_listener(
                transport,
                [oslo_messaging.Target(topic=topic, exchange=exchange)],
                [_Collector(label, arrivals)], executor='threading')
            listener.start()
            listeners.append(listener)
        where = (_masked(args.transport_url) if on_broker
                 else 'the fake transport')
        print('Emitting the glance image life cycle on %s, one '
              'notification at a time,\nwith the copies each listener '
              'received:\n' % where)
        missing = _emit(conf, transport, names, labels, arrivals)
        print('\n%s' % ('Every notification and replica arrived.'
                        if not missing else 'MISSING: %s' % missing))
        return 1 if missing else 0
    finally:
        for listener in listeners:
            listener.stop()
            listener.wait()
        transport.cleanup()
        if on_broker:
            _delete(args.transport_url, labels, names)


def _emit(conf, transport, names, labels, arrivals):
    """Emit each notification, print its copies; return what is missing."""
    notifier = oslo_messaging.Notifier(transport,
                                       publisher_id='image.localhost')
    # The Notifier keeps its drivers to itself: a driver of the same
    # configuration tells where each notification is replicated.
    driver = _impl_multicast.MulticastDriver(
        conf, conf.oslo_messaging_notifications.topics, transport)
    order = list(labels.values())
    missing = []
    try:
        for envelope in samples.glance_life_cycle():
            expected = [labels[names['standard']]] + [
                labels[destination.topic]
                for rule in driver.matching_rules(envelope, {})
                for destination in rule.destinations]
            notifier.info({}, envelope['event_type'], envelope['payload'])
            print('notifier emits %-15s status=%s'
                  % (envelope['event_type'],
                     envelope['payload'].get('status')))
            received = _collect(arrivals, len(expected))
            for label, event_type, publisher_id in sorted(
                    received, key=lambda r: order.index(r[0])):
                print('  -> %-*s %-15s from %s'
                      % (max(len(x) for x in order), label, event_type,
                         publisher_id))
            got = [r[0] for r in received]
            missing += [(envelope['event_type'], label) for label in expected
                        if label not in got]
    finally:
        driver.cleanup()
    return missing


def _collect(arrivals, count):
    received = []
    deadline = time.monotonic() + WAIT
    while len(received) < count:
        try:
            received.append(arrivals.get(
                timeout=max(deadline - time.monotonic(), 0)))
        except queue.Empty:
            break
    return received


def _masked(url):
    parsed = urllib.parse.urlsplit(url)
    if parsed.password:
        netloc = parsed.netloc.replace(':%s@' % parsed.password, ':****@')
        parsed = parsed._replace(netloc=netloc)
    return parsed.geturl()


def _amqp(url):
    # kombu, which oslo.messaging's rabbit driver is built on, speaks to
    # the broker directly for what oslo.messaging has no API for.
    import kombu

    amqp_url = urllib.parse.urlsplit(url)._replace(scheme='amqp').geturl()
    return kombu.Connection(amqp_url, connect_timeout=CONNECT_TIMEOUT)


def _broker_problem(url):
    """Why the broker of ``url`` cannot be used, with a hint; or None.

    oslo.messaging retries an unreachable broker forever: the demo asks
    first, once, and gives up within seconds.
    """
    try:
        with _amqp(url) as conn:
            conn.connect()
    except Exception as exc:
        return ('oslo-messaging-ext-demo: cannot use the broker at %s: %s\n'
                'Is RabbitMQ running there, and are the user and password '
                'right? Without --transport-url the demo runs on the '
                'in-process fake transport.'
                % (_masked(url), str(exc) or type(exc).__name__))
    return None


def _delete(url, labels, names):
    """Delete the queues and exchanges the demo declared on the broker."""
    with _amqp(url) as conn:
        channel = conn.channel()
        for topic in labels:
            channel.queue_delete('%s.info' % topic)
        for exchange in (names['audit'], names['control']):
            channel.exchange_delete(exchange)
