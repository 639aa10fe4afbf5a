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

"""The ``messaging-multicast`` notification driver.

A drop-in for ``messagingv2`` that also replicates selected notifications
to other topics, exchanges and brokers.

Delivery semantics:

* The standard notification is always sent first, exactly as the
  ``messagingv2`` driver (or ``messaging``, for the 1.0 format) sends it,
  on the notifier's transport and topics, at most once.
* Then every replica is published, at most once, to each distinct target
  of the rules the notification matches. A target that fails (broker down,
  unreachable host, refused publish) is logged with its rule and target and
  never raises into the service nor keeps the other targets from being
  published. ``retry`` applies to replicas as it does to the original.
* With ``async_fanout``, replicas are published by a background worker from
  a bounded queue: the service's call returns once the original is sent.
  Replicas that do not fit in the queue are counted and reported in the
  log, and the queue is flushed, within ``async_flush_timeout``, on driver
  cleanup and at interpreter exit.

Configuration is validated completely when the driver is loaded; an error
names the group, the option and the value, and no half-configured driver
is ever returned.
"""

import atexit
import collections
import functools
import logging
import os
import re
import socket
import weakref

from oslo_config import cfg
from oslo_messaging.notify import messaging
from oslo_messaging.notify import notifier

from oslo_messaging_ext.notify import _multicast_delivery
from oslo_messaging_ext.notify import _multicast_rules

LOG = logging.getLogger(__name__)

GROUP = 'oslo_messaging_multicast'
RULE_GROUP_PREFIX = 'multicast_rule_'

multicast_opts = [
    cfg.ListOpt('rules',
                default=[],
                help='Names of the replication rules. Each rule NAME is '
                     'configured in its own group [%sNAME]; a notification '
                     'matching several rules reaches each distinct target '
                     'once.' % RULE_GROUP_PREFIX),
    cfg.StrOpt('standard_message_format',
               default='2.0',
               choices=[('2.0', 'the messagingv2 envelope'),
                        ('1.0', 'the messaging driver format, without '
                                'envelope, for legacy consumers')],
               help='Format of the standard notification, sent first on the '
                    'notifier\'s topics. Replicas of rules always use 2.0.'),
    cfg.BoolOpt('async_fanout',
                default=False,
                help='Publish replicas from a background worker, so that the '
                     'service\'s call returns as soon as the standard '
                     'notification is sent. Replicas that do not fit in the '
                     'queue are dropped, counted and logged.'),
    cfg.IntOpt('async_queue_size',
               default=10000,
               min=1,
               help='Maximum number of replicas waiting for the background '
                    'worker when async_fanout is enabled.'),
    cfg.FloatOpt('async_flush_timeout',
                 default=10.0,
                 min=0,
                 help='Seconds to wait, on driver cleanup and at interpreter '
                      'exit, for queued replicas to be published. What is '
                      'still queued then is counted as dropped.'),
    cfg.StrOpt('onmcast_replica_shape',
               default='onmcast',
               choices=[('onmcast', 'what the onmcast driver sent: topic '
                                    'PREFIXTARGET.EVENT_KEY, 1.0 format, '
                                    'event_type set to the matched key and '
                                    'the whole original notification as '
                                    'payload'),
                        ('clean', 'replicas shaped like rule replicas: topic '
                                  'PREFIXTARGET, 2.0 envelope, the original '
                                  'event_type, payload, timestamp and '
                                  'message_id')],
               help='Shape of the replicas configured in [DEFAULT] with the '
                    'onmcast options (multicast_events).'),
]

rule_opts = [
    cfg.MultiStrOpt('selector',
                    default=[],
                    help='A condition the notification must meet, as '
                         '"FIELD [OPERATOR] VALUE". FIELD is event_type, '
                         'priority, publisher_id, message_id, '
                         'payload.<dotted.path> or context.<key>. OPERATOR '
                         'is exact (the default), glob, regex, prefix, '
                         'contains or in (VALUE is then a comma-separated '
                         'set), each negated by a leading "!". Repeat the '
                         'option for several selectors: all must match. A '
                         'rule without selector matches every '
                         'notification.'),
    cfg.ListOpt('targets',
                default=[],
                help='Where replicas are published: TOPIC or EXCHANGE/TOPIC. '
                     'A replica of priority P is published with routing key '
                     'TOPIC.P, so an oslo.messaging notification listener '
                     'on Target(topic=TOPIC[, exchange=EXCHANGE]) receives '
                     'it. Required.'),
    cfg.StrOpt('transport_url',
               secret=True,
               help='Transport URL of the broker the replicas of this rule '
                    'are published to. Default: the notification '
                    'transport.'),
    cfg.StrOpt('publisher_id',
               help='publisher_id of the replicas. Default: the original '
                    'notification\'s.'),
]

# onmcast's options, kept in [DEFAULT] unchanged so that its configuration
# files keep working. One ListOpt per event key is registered at load.
onmcast_opts = [
    cfg.ListOpt('multicast_events',
                default=[],
                help='(onmcast compatibility; prefer rules in '
                     '[%s]) Event keys to multicast. Each key is also the '
                     'name of a [DEFAULT] option listing its targets, e.g. '
                     '"image.upload = host1,host2". A key matches a '
                     'notification whose event_type, priority, message_id '
                     'or publisher_id equals it, ignoring case.' % GROUP),
    cfg.StrOpt('multicast_topic_prefix',
               default='',
               help='(onmcast compatibility) Prefix of the replica topics '
                    'of multicast_events.'),
    cfg.StrOpt('publisher_id',
               help='(onmcast compatibility) publisher_id of the replicas '
                    'of multicast_events. Default: "<hostname>-MULTICAST".'),
]

# How the sample config and the docs show the dynamic rule groups: one
# example group, as oslo.config does for its own config source groups.
rule_group = cfg.OptGroup(
    RULE_GROUP_PREFIX + 'example',
    help='Example of a rule group. Each rule NAME listed in [%s] rules is '
         'configured in its own group [%sNAME]; this one would configure '
         'the rule "example".' % (GROUP, RULE_GROUP_PREFIX),
    dynamic_group_owner='rules')

_RULE_NAME = re.compile(r'^[A-Za-z0-9_.-]+$')
_TOPIC_NAME = re.compile(r'^[^\s/]+$')

# (pid, summary) of the configurations already reported at INFO.
_LOADED = set()


class MulticastConfigError(cfg.Error):
    """The multicast configuration is invalid; the driver did not load."""

    def __init__(self, problems):
        self.problems = problems
        super().__init__(
            'Invalid messaging-multicast configuration (the driver is not '
            'loaded): %s' % '; '.join(problems))


def _problem(group, option, value, reason):
    return '[%s] %s = %s: %s' % (group, option, value, reason)


class MulticastDriver(notifier.Driver):
    """Send notifications like messagingv2, and replicas selected by rules.

    See the module docstring for the delivery semantics and
    doc/source/admin/multicast.rst for the configuration.
    """

    def __init__(self, conf, topics, transport):
        super().__init__(conf, topics, transport)
        conf.register_opts(multicast_opts, group=GROUP)
        group = conf[GROUP]
        self._transports = _multicast_delivery.RuleTransports(conf, transport)
        try:
            self._configure(conf, group)
        except BaseException:
            self._transports.release()
            raise
        if group.standard_message_format == '1.0':
            self._standard = messaging.MessagingDriver(
                conf, topics=topics, transport=transport, version=1.0)
        else:
            self._standard = messaging.MessagingV2Driver(
                conf, topics=topics, transport=transport)
        self._worker = None
        if group.async_fanout:
            self._worker = _multicast_delivery.FanoutWorker(
                group.async_queue_size, group.async_flush_timeout)
            self._at_exit = functools.partial(_flush_at_exit,
                                              weakref.ref(self))
            atexit.register(self._at_exit)
        summary = {'rules': len(self._rules),
                   'targets': len({d.key for r in self._rules
                                   for d in r.destinations}),
                   'async': group.async_fanout}
        # Services build many Notifiers (glance about 14 a process), each
        # loading its own driver: say it at INFO once per configuration.
        key = (os.getpid(), tuple(sorted(summary.items())))
        log = LOG.debug if key in _LOADED else LOG.info
        _LOADED.add(key)
        log('messaging-multicast loaded: %(rules)d rules, '
            '%(targets)d distinct targets, async_fanout=%(async)s', summary)

    # Loading and validation.

    def _configure(self, conf, group):
        problems = []
        rules = self._load_rules(conf, group, problems)
        rules += self._load_onmcast(conf, group, problems, len(rules))
        if problems:
            raise MulticastConfigError(problems)
        self._rules = rules
        self._by_event_type = collections.defaultdict(list)
        self._unindexed = []
        self._onmcast_keys = {}
        for rule in rules:
            if rule.event_key is not None:
                self._onmcast_keys[rule.event_key] = rule
                continue
            event_types = None
            for selector in rule.selectors:
                indexable = selector.indexable_event_types
                if indexable is not None:
                    event_types = (indexable if event_types is None
                                   else event_types & indexable)
            if event_types is None:
                self._unindexed.append(rule)
            elif not event_types:
                LOG.warning('messaging-multicast rule %s can never match: '
                            'its event_type selectors exclude each other',
                            rule.name)
            for event_type in event_types or ():
                self._by_event_type[event_type].append(rule)

    def _check_target(self, transport, topic, group, option, value,
                      problems):
        if transport is self.transport and topic in self.topics:
            problems.append(_problem(
                group, option, value,
                'topic %r is a standard notification topic on the same '
                'transport: the broker would bind the replicas into the '
                'standard %s.<priority> queues, whatever the exchange, and '
                'every standard consumer would receive duplicates. Use '
                'another topic or another transport_url.' % (topic, topic)))
            return False
        return True

    def _load_rules(self, conf, group, problems):
        rules = []
        names = group.rules
        seen = set()
        for name in names:
            if name in seen:
                problems.append(_problem(GROUP, 'rules', ','.join(names),
                                         'rule %r is listed twice' % name))
                continue
            seen.add(name)
            if not _RULE_NAME.match(name):
                problems.append(_problem(
                    GROUP, 'rules', ','.join(names),
                    'rule name %r may only hold letters, digits, "_", '
                    '"." and "-"' % name))
                continue
            group_name = RULE_GROUP_PREFIX + name
            conf.register_opts(rule_opts, group=group_name)
            rule = self._load_rule(conf, name, group_name, len(rules),
                                   problems)
            if rule is not None:
                rules.append(rule)
        return rules

    def _load_rule(self, conf, name, group_name, ordinal, problems):
        rule_conf = conf[group_name]
        before = len(problems)
        selectors = []
        for text in rule_conf.selector:
            try:
                selectors.append(_multicast_rules.Selector.parse(text))
            except ValueError as exc:
                problems.append(_problem(group_name, 'selector', text, exc))
        if not rule_conf.targets:
            if group_name not in conf.list_all_sections():
                problems.append(_problem(
                    GROUP, 'rules', ','.join(conf[GROUP].rules),
                    'rule %r is not defined: there is no [%s] group'
                    % (name, group_name)))
            else:
                problems.append(_problem(group_name, 'targets', '',
                                         'a rule needs at least one target'))
            return None
        try:
            transport = self._transports.get(rule_conf.transport_url)
        except Exception as exc:
            # The URL is secret: name the option, never print its value.
            problems.append(_problem(group_name, 'transport_url', '****',
                                     'invalid transport URL: %s' % exc))
            return None
        destinations = []
        targets = ','.join(rule_conf.targets)
        for target in rule_conf.targets:
            exchange, _, topic = target.rpartition('/')
            if (not _TOPIC_NAME.match(topic) or
                    (exchange and not _TOPIC_NAME.match(exchange)) or
                    target.startswith('/')):
                problems.append(_problem(
                    group_name, 'targets', targets,
                    'target %r is not TOPIC or EXCHANGE/TOPIC' % target))
                continue
            if not self._check_target(transport, topic, group_name,
                                      'targets', targets, problems):
                continue
            destinations.append(_multicast_delivery.Destination(
                key=(id(transport), exchange or None, topic),
                transport=transport, exchange=exchange or None, topic=topic,
                version=2.0, shape='clean',
                publisher_id=rule_conf.publisher_id, rule=name,
                label=target))
        if len(problems) > before:
            return None
        if not selectors:
            LOG.info('messaging-multicast rule %s has no selector: it '
                     'replicates every notification', name)
        return _multicast_rules.Rule(name, ordinal, selectors, destinations)

    def _load_onmcast(self, conf, group, problems, first_ordinal):
        if (not _register_compatible(conf, onmcast_opts, problems) or
                not conf.multicast_events):
            return []
        shape = group.onmcast_replica_shape
        prefix = conf.multicast_topic_prefix or ''
        publisher_id = (conf.publisher_id or
                        '%s-MULTICAST' % socket.gethostname())
        events = ','.join(conf.multicast_events)
        rules = []
        seen = set()
        for key in conf.multicast_events:
            key = key.strip().lower()
            if not key or key in seen:
                problems.append(_problem(
                    'DEFAULT', 'multicast_events', events,
                    'event key %r is empty or listed twice' % key))
                continue
            seen.add(key)
            event_opt = cfg.ListOpt(
                key, default=[],
                help='(onmcast compatibility) Targets of event key %s.' % key)
            if not _register_compatible(conf, [event_opt], problems):
                continue
            hosts = conf[key]
            if not hosts:
                problems.append(_problem(
                    'DEFAULT', key, '',
                    'event key %r of multicast_events has no targets' % key))
                continue
            destinations = []
            for host in sorted(set(hosts), key=hosts.index):
                if shape == 'onmcast':
                    topic, version = '%s%s.%s' % (prefix, host, key), 1.0
                else:
                    topic, version = '%s%s' % (prefix, host), 2.0
                if not _TOPIC_NAME.match(topic):
                    problems.append(_problem(
                        'DEFAULT', key, ','.join(hosts),
                        'target %r gives the invalid topic %r'
                        % (host, topic)))
                    continue
                if not self._check_target(self.transport, topic, 'DEFAULT',
                                          key, ','.join(hosts), problems):
                    continue
                destinations.append(_multicast_delivery.Destination(
                    key=(id(self.transport), None, topic),
                    transport=self.transport, exchange=None, topic=topic,
                    version=version, shape=shape, publisher_id=publisher_id,
                    rule='[DEFAULT] %s' % key, label=topic))
            rules.append(_multicast_rules.Rule(
                '[DEFAULT] %s' % key, first_ordinal + len(rules), [],
                destinations, event_key=key))
        return rules

    # Sending.

    def matching_rules(self, message, ctxt):
        """The rules ``message`` matches, in configuration order."""
        candidates = self._by_event_type.get(message.get('event_type'))
        if self._unindexed:
            candidates = (self._unindexed if not candidates else
                          sorted(candidates + self._unindexed,
                                 key=lambda rule: rule.ordinal))
        matched = [rule for rule in candidates or ()
                   if rule.matches(message, ctxt)]
        if self._onmcast_keys:
            for field in ('event_type', 'priority', 'message_id',
                          'publisher_id'):
                value = message.get(field)
                rule = self._onmcast_keys.get(
                    value.lower() if isinstance(value, str) else None)
                if rule is not None and rule not in matched:
                    matched.append(rule)
        return matched

    def notify(self, ctxt, message, priority, retry):
        self._standard.notify(ctxt, message, priority, retry)
        # Selectors only address the notification's fields, never the
        # underscore keys transports add, so the message is matched as is.
        try:
            rules = self.matching_rules(message, ctxt)
        except Exception:
            LOG.exception('messaging-multicast could not evaluate rules for '
                          'event_type %s', message.get('event_type'))
            return
        if not rules:
            return
        # The AMQP drivers add their own keys (_unique_id, _context_*) to the
        # message they send, as the standard send just did: replicas get
        # the notification's fields only. Copied only when a rule matched,
        # since most notifications match none.
        original = {key: value for key, value in message.items()
                    if not key.startswith('_')}
        jobs = []
        seen = set()
        for rule in rules:
            for destination in rule.destinations:
                if destination.key in seen:
                    continue
                seen.add(destination.key)
                jobs.append((destination, ctxt, original, rule.event_key,
                             priority, retry))
        if self._worker is not None:
            self._worker.submit(jobs)
            return
        for job in jobs:
            job[0].publish(*job[1:])

    @property
    def dropped(self):
        """Replicas dropped by the async_fanout queue since load."""
        return self._worker.dropped if self._worker else 0

    def flush(self):
        """Wait, within async_flush_timeout, for queued replicas.

        :returns: how many replicas are still waiting or in flight
        """
        if self._worker is not None:
            return self._worker.flush()
        return 0

    def cleanup(self):
        """Flush queued replicas, then release the rules' transports.

        A transport shared with other instances of this driver in the
        process is cleaned up with the last of them.
        """
        if self._worker is not None:
            atexit.unregister(self._at_exit)
            self._worker.flush(stop=True)
        self._transports.release()


def _register_compatible(conf, opts, problems):
    """Register ``opts`` in [DEFAULT], accepting a compatible existing one.

    onmcast's options may already be registered by the service (or by
    another instance of this driver): identical definitions are accepted
    by oslo.config, and a different list option of the same name is read
    as it is. Anything else is a configuration error.
    """
    ok = True
    for opt in opts:
        try:
            conf.register_opt(opt)
        except cfg.DuplicateOptError:
            value = conf[opt.dest]
            if isinstance(opt, cfg.ListOpt):
                expected = list
            else:
                expected = (str, type(None))
            if not isinstance(value, expected):
                problems.append(_problem(
                    'DEFAULT', opt.name, value,
                    'the service already registered an option of this name '
                    'with another type; rename the event key'))
                ok = False
    return ok


def _flush_at_exit(driver_ref):
    driver = driver_ref()
    if driver is not None:
        driver.cleanup()
