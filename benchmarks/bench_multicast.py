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

"""messaging-multicast against messagingv2, noop and routing.

Every case sends the recorded glance image.upload payload through
oslo_messaging.Notifier and times the service's call. Drivers take turns
in short blocks and each ratio is the median of the ratios of
neighbouring blocks (see ``_harness.compare``).

* Fake transport (CPU only): 100 rules none of which matches, against
  messagingv2; the in-tree routing driver with 100 fnmatch rules against
  noop, as the anchor of what rule evaluation usually costs. The routing
  driver is measured as shipped: with this oslo.messaging it cannot load
  the drivers it routes to (it invokes them without arguments), so each
  call also raises the NoMatches that the Notifier catches; its log is
  silenced so that only the call is timed.
* Regex selectors: the attack corpus on adversarial values (see
  ``_multicast_regex``).
* Loading the configuration: 1,000 rules from a file, against ten
  times the load of 100 (loading is linear) and under 0.2 s.
* RabbitMQ (skipped, with the reason, when unreachable): k=2 targets,
  synchronous, against (k+1) x messagingv2; asynchronous, the time spent in
  the service's thread against messagingv2, and then every replica is
  counted on the broker.
* A healthy broker WAN_DELAY seconds away each way (the RabbitMQ behind a
  delaying TcpProxy): from a process start (no connection yet), a burst
  of 200 calls and 4 threads x 150, sync and async. The replicas counted
  on the broker must equal what messagingv2 delivers through the same
  proxy, and no call may wait longer than replica_timeout.
"""

import contextlib
import logging
import os
import statistics
import tempfile
import threading
import time
import urllib.parse

import kombu
from oslo_config import cfg
import oslo_messaging
from oslo_messaging.notify import _impl_routing
import yaml

from benchmarks import _harness
from benchmarks import _multicast_regex
from oslo_messaging_ext.notify import _impl_multicast
from oslo_messaging_ext.notify import _multicast_opts
from oslo_messaging_ext.tests.functional import base
from oslo_messaging_ext.tests.functional import outage
from oslo_messaging_ext.tests import utils as test_utils

RULES = 100
TARGETS = 2
# Calls per timed block; the broker cases are slower per call.
FAKE_BLOCK = 1000
BROKER_BLOCK = 100
US = 1e6
WAN_DELAY = 0.025
REPLICA_TIMEOUT = {opt.name: opt.default
                   for opt in _multicast_opts.rule_opts}['replica_timeout']
# What a call may add to the replicas' wait: the standard notification's
# publish on the local broker.
STANDARD_SEND = 0.05
# 600 confirmed publishes, one after the other, 2 x WAN_DELAY each.
WAN_DELIVERY_TIMEOUT = 180.0


def _multicast_conf(rules, **options):
    """A ConfigOpts holding ``rules``: {name: {option: value}}."""
    conf = cfg.ConfigOpts()
    _multicast_opts.register_opts(conf)
    conf.set_override('rules', list(rules), group=_multicast_opts.GROUP)
    for name, value in options.items():
        conf.set_override(name, value, group=_multicast_opts.GROUP)
    for rule, values in rules.items():
        group = _multicast_opts.register_rule_opts(conf, rule)
        for name, value in values.items():
            conf.set_override(name, value, group=group)
    return conf


def _unmatched_rules():
    # A typical configuration: rules select event types, some also a
    # priority or a payload field. None of them selects image.upload.
    rules = {}
    for i in range(RULES):
        selectors = ['event_type exact service%d.event' % i]
        if i % 3 == 1:
            selectors = ['event_type in service%d.create,service%d.delete'
                         % (i, i), 'priority exact error']
        elif i % 3 == 2:
            selectors.append('payload.status exact active')
        rules['r%d' % i] = {'selector': selectors,
                            'targets': ['replica%d' % i]}
    return rules


@contextlib.contextmanager
def _routing_config():
    groups = {'group%d' % i: {'noop': {'accepted_events': ['service%d.*' % i]}}
              for i in range(RULES)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'routing.yaml')
        with open(path, 'w') as f:
            yaml.safe_dump(groups, f)
        # The routing driver reads its file from the global configuration,
        # where importing it registered the option.
        name = _impl_routing.router_config.name
        cfg.CONF.set_override(name, path, group='oslo_messaging_notifications')
        try:
            yield
        finally:
            cfg.CONF.clear_override(name, group='oslo_messaging_notifications')


@contextlib.contextmanager
def _quiet(name):
    """Silence ``name``'s logger (the routing driver logs every call)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _compare(notifiers, reference, count, payload, block,
             after_block=None):
    calls = {name: (lambda n=notifier: n.info({}, 'image.upload', payload))
             for name, notifier in notifiers.items()}
    return _harness.compare(calls, reference, count, block=block,
                            after_block=after_block)


def _fake_transport_table(count, payload):
    table = _harness.Table('messaging-multicast, fake transport (CPU only)')
    notifiers, transports = {}, []
    with _routing_config(), _quiet('oslo_messaging'):
        for name, driver, conf in [
                ('noop', 'noop', None),
                ('messagingv2', 'messagingv2', None),
                ('multicast', 'messaging-multicast',
                 _multicast_conf(_unmatched_rules())),
                ('routing', 'routing', None)]:
            notifiers[name], transport = _harness.make_notifier(driver,
                                                                conf=conf)
            transports.append(transport)
        # The fake transport keeps every message: drop them between blocks.
        measured = _compare(
            notifiers, 'messagingv2', count, payload, block=FAKE_BLOCK,
            after_block=lambda name: transports[0].cleanup())
    for transport in transports:
        transport.cleanup()
    us = {name: value * US for name, value in measured.median.items()}
    table.add('noop', us['noop'], 'us')
    table.add('messagingv2', us['messagingv2'], 'us')
    ratio = measured.ratio('multicast')
    table.add('multicast, %d rules, none matches' % RULES, us['multicast'],
              'us', ratio=ratio, target='<= 1.20x messagingv2',
              ok=ratio <= 1.2)
    table.add('routing, %d fnmatch rules (anchor, vs noop)' % RULES,
              us['routing'], 'us', ratio=measured.ratio('routing', 'noop'),
              target='printed')
    return table


class _Broker:
    """Unique queues on the broker, deleted afterwards; message counts."""

    def __init__(self, url):
        self.url = url
        self.queues = []
        amqp = urllib.parse.urlsplit(url)._replace(scheme='amqp').geturl()
        self._connection = kombu.Connection(amqp, connect_timeout=5)

    def topic(self, prefix):
        topic = base.unique_name('bench-' + prefix)
        self.queues.append('%s.info' % topic)
        return topic

    def message_count(self, topic):
        channel = self._connection.default_channel
        try:
            return channel.queue_declare('%s.info' % topic,
                                         passive=True).message_count
        except self._connection.channel_errors:
            return 0

    def close(self):
        channel = self._connection.default_channel
        for queue in self.queues:
            channel.queue_delete(queue)
        self._connection.release()


def _broker_table(count, payload):
    url = base.transport_url()
    reason = base.broker_unreachable_reason(url)
    if reason:
        # The first sentence says where; the rest is how to start a broker.
        return _harness.Table('messaging-multicast, RabbitMQ: skipped, %s'
                              % reason.split('. ')[0])
    table = _harness.Table('messaging-multicast, RabbitMQ')
    broker = _Broker(url)
    transports = []
    # Every call of the async case is sent: warm-up and timed ones.
    sent = count // BROKER_BLOCK * BROKER_BLOCK + 200
    async_targets = [broker.topic('async') for _ in range(TARGETS)]
    try:
        def notifier(driver, conf=None, topics=1):
            made, transport = _harness.make_notifier(
                driver, conf=conf, transport_url=url,
                topics=[broker.topic('notifications')
                        for _ in range(topics)])
            transports.append(transport)
            return made

        def rule(targets):
            return {'r': {'selector': ['event_type exact image.upload'],
                          'targets': targets}}

        notifiers = {
            'messagingv2': notifier('messagingv2'),
            # What k+1 publishes cost without our driver: the floor of the
            # synchronous case.
            'v2_k+1': notifier('messagingv2', topics=TARGETS + 1),
            'sync': notifier('messaging-multicast', _multicast_conf(
                rule([broker.topic('sync') for _ in range(TARGETS)]))),
            # The queue holds a whole round's burst: the worker then yields
            # to the service until the burst is over (see BUSY_WINDOW).
            'async': notifier('messaging-multicast', _multicast_conf(
                rule(async_targets), async_fanout=True,
                async_queue_size=2 * TARGETS * sent,
                async_flush_timeout=300.0)),
        }
        driver = notifiers['async']._driver_mgr['messaging-multicast'].obj

        def drain(name):
            # Replicas published after the async rounds would otherwise
            # slow the next case down.
            if name == 'async':
                driver.flush()

        measured = _compare(notifiers, 'messagingv2', count, payload,
                            block=BROKER_BLOCK, after_block=drain)
        driver.cleanup()
        delivered = _harness_wait(
            lambda: sum(broker.message_count(t) for t in async_targets),
            TARGETS * sent)
    finally:
        for transport in transports:
            transport.cleanup()
        broker.close()
    us = {name: value * US for name, value in measured.median.items()}
    table.add('messagingv2', us['messagingv2'], 'us')
    table.add('messagingv2 on k+1=%d topics (reference)' % (TARGETS + 1),
              us['v2_k+1'], 'us', ratio=measured.ratio('v2_k+1'))
    bound = 1.05 * (TARGETS + 1)
    ratio = measured.ratio('sync')
    table.add('multicast, k=%d targets, synchronous' % TARGETS, us['sync'],
              'us', ratio=ratio, target='<= %.2fx messagingv2' % bound,
              ok=ratio <= bound)
    ratio = measured.ratio('sync', 'v2_k+1')
    table.add('  synchronous, against messagingv2 on k+1 topics',
              us['sync'], 'us', ratio=ratio, target='<= 1.05x',
              ok=ratio <= 1.05)
    ratio = measured.ratio('async')
    table.add('multicast, async, service thread (%d/%d replicas delivered, '
              '%d dropped)' % (delivered, TARGETS * sent, driver.dropped),
              us['async'], 'us', ratio=ratio,
              target='<= 1.20x messagingv2, all delivered',
              ok=ratio <= 1.2 and delivered == TARGETS * sent)
    return table


def _harness_wait(count_now, expected, timeout=base.DELIVERY_TIMEOUT):
    """The count once it reaches ``expected``, or when it stops growing."""
    return test_utils.wait_until(
        lambda: count_now() >= expected and expected,
        timeout=timeout) or count_now()


def _send_threads(notifier, threads, per_thread, payload):
    """Send from ``threads`` threads at once; return each call's time."""
    durations = []
    lock = threading.Lock()

    def send():
        for _ in range(per_thread):
            start = time.perf_counter()
            notifier.info({}, 'image.upload', payload)
            with lock:
                durations.append(time.perf_counter() - start)

    workers = [threading.Thread(target=send) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return durations


def _wan_table(payload, quick):
    url = base.transport_url()
    title = ('messaging-multicast, healthy broker %d ms away each way'
             % (WAN_DELAY * 1000))
    reason = base.broker_unreachable_reason(url)
    if reason:
        return _harness.Table('%s: skipped, %s'
                              % (title, reason.split('. ')[0]))
    table = _harness.Table(title)
    parsed = urllib.parse.urlsplit(url)
    proxy = outage.TcpProxy((parsed.hostname or '127.0.0.1',
                             parsed.port or 5672), delay=WAN_DELAY)
    proxy.setUp()
    broker = _Broker(url)
    cases = ([('burst of 50', 1, 50), ('2 threads x 25', 2, 25)] if quick
             else [('burst of 200', 1, 200), ('4 threads x 150', 4, 150)])
    try:
        for name, threads, per_thread in cases:
            for mode in ('sync', 'async'):
                table.add(*_wan_case(broker, proxy, payload, threads,
                                     per_thread, mode, name))
    finally:
        proxy.cleanUp()
        broker.close()
    return table


def _wan_case(broker, proxy, payload, threads, per_thread, mode, name):
    replicas, reference = broker.topic('wan'), broker.topic('wan-v2')
    conf = _multicast_conf(
        {'r': {'selector': ['event_type exact image.upload'],
               'targets': [replicas], 'transport_url': proxy.url()}},
        async_fanout=mode == 'async')
    # New notifiers, new transports: the first replicas open the
    # connection, as at a process start.
    multicast, transport = _harness.make_notifier(
        'messaging-multicast', conf=conf, transport_url=broker.url,
        topics=[broker.topic('notifications')])
    v2, v2_transport = _harness.make_notifier(
        'messagingv2', transport_url=proxy.url(), topics=[reference])
    driver = multicast._driver_mgr['messaging-multicast'].obj
    total = threads * per_thread
    try:
        # The standard notifications' connection is not what is measured:
        # opened by a call the rule does not select.
        multicast.info({}, 'bench.warmup', payload)
        waits = _send_threads(multicast, threads, per_thread, payload)
        _send_threads(v2, threads, per_thread, payload)
        delivered = _harness_wait(lambda: broker.message_count(replicas),
                                  total, WAN_DELIVERY_TIMEOUT)
        expected = _harness_wait(lambda: broker.message_count(reference),
                                 total, WAN_DELIVERY_TIMEOUT)
    finally:
        driver.cleanup()
        transport.cleanup()
        v2_transport.cleanup()
    return ('%s, %s: %d/%d replicas delivered, messagingv2 %d/%d; '
            'longest call' % (name, mode, delivered, total, expected, total),
            max(waits) * 1000, 'ms', None,
            'delivered = messagingv2, call <= %d ms + %d'
            % (REPLICA_TIMEOUT * 1000, STANDARD_SEND * 1000),
            delivered == expected and
            max(waits) <= REPLICA_TIMEOUT + STANDARD_SEND)


# Rules of the configuration load case, and its target.
LOAD_RULES = 1000
LOAD_TARGET_S = 0.2


def _rules_file(directory, count):
    """A service's file with ``count`` rules, as operators write them."""
    path = os.path.join(directory, 'rules%d.conf' % count)
    names = ['rule%d' % i for i in range(count)]
    with open(path, 'w') as f:
        f.write('[oslo_messaging_multicast]\nrules = %s\n' % ','.join(names))
        for i, name in enumerate(names):
            f.write('[multicast_rule_%s]\nselector = event_type exact '
                    'service%d.event\nselector = payload.status exact '
                    'active\ntargets = replica%d\n' % (name, i, i))
    return path


def _load_seconds(path, repeat):
    """Median seconds to load the driver of ``path``, as a service does."""
    timings = []
    for _ in range(repeat):
        conf = cfg.ConfigOpts()
        transport = oslo_messaging.get_notification_transport(conf,
                                                              url='fake:/')
        conf.set_override('transport_url', 'fake:/')  # as a service's
        conf(['--config-file', path], project='oslo-messaging-ext-bench')
        start = time.perf_counter()
        driver = _impl_multicast.MulticastDriver(conf, ['notifications'],
                                                 transport)
        timings.append(time.perf_counter() - start)
        assert driver.config_error is None, driver.config_error
        driver.cleanup()
        transport.cleanup()
    return statistics.median(timings)


def _config_load_table(repeat):
    table = _harness.Table('messaging-multicast, loading the configuration')
    with tempfile.TemporaryDirectory() as tmp, _quiet(
            'oslo_messaging_ext.notify._impl_multicast'):
        small = _load_seconds(_rules_file(tmp, LOAD_RULES // 10), repeat)
        large = _load_seconds(_rules_file(tmp, LOAD_RULES), repeat)
    table.add('%d rules' % (LOAD_RULES // 10), small * 1e3, 'ms')
    ratio = large / (10 * small)
    table.add('%d rules (ratio: against 10x the %d-rule load)'
              % (LOAD_RULES, LOAD_RULES // 10), large * 1e3, 'ms',
              ratio=ratio,
              target='< %d ms, linear (<= 1.5x)' % (LOAD_TARGET_S * 1e3),
              ok=large < LOAD_TARGET_S and ratio <= 1.5)
    return table


def run(args):
    payload = _harness.glance_payload()
    fake_count = 2000 if args.quick else 20000
    broker_count = 300 if args.quick else 3000
    return [_config_load_table(3 if args.quick else 9),
            _fake_transport_table(fake_count, payload),
            _broker_table(broker_count, payload),
            _wan_table(payload, args.quick),
            _multicast_regex.table(args.quick)]
