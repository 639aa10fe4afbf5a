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


"""Validation of the ``messaging-multicast`` configuration.

load_rules turns a configuration into the driver's rules. It reads every
rule and onmcast option before it fails, so that one MulticastConfigError
names all the problems, each with its group, option and value.
"""

import logging
import re
import socket

from oslo_config import cfg

from oslo_messaging_ext.notify import _multicast_delivery
from oslo_messaging_ext.notify import _multicast_opts
from oslo_messaging_ext.notify import _multicast_rules

# The driver's logger, as in _multicast_delivery.
LOG = logging.getLogger('oslo_messaging_ext.notify._impl_multicast')

_RULE_NAME = re.compile(r'^[A-Za-z0-9_.-]+$')
_TOPIC_NAME = re.compile(r'^[^\s/]+$')


class MulticastConfigError(cfg.Error):
    """The multicast configuration is invalid; the driver did not load."""

    def __init__(self, problems):
        self.problems = problems
        super().__init__(
            'Invalid messaging-multicast configuration (the driver is not '
            'loaded): %s' % '; '.join(problems))


def _problem(group, option, value, reason):
    return f'[{group}] {option} = {value}: {reason}'


def load_rules(conf, group, topics, transports):
    """Return the rules configured in ``conf``, in configuration order.

    :param group: the [oslo_messaging_multicast] group of ``conf``
    :param topics: the notifier's topics, which replicas may not use on
        the notifier's transport
    :param transports: the RuleTransports the rules publish on
    :raises MulticastConfigError: naming every problem found
    """
    loader = _RuleLoader(conf, topics, transports)
    rules = loader.load_rule_groups(group)
    rules += loader.load_onmcast(group, len(rules))
    if loader.problems:
        raise MulticastConfigError(loader.problems)
    return rules


class _RuleLoader:
    """Reads the rules of a configuration and collects its problems."""

    def __init__(self, conf, topics, transports):
        self.conf = conf
        self.topics = topics
        self.transports = transports
        self.problems = []

    def _register_compatible(self, opts):
        conflicts = _multicast_opts.register_compatible(self.conf, opts)
        for opt, value in conflicts:
            self.problems.append(_problem(
                'DEFAULT', opt.name, value,
                'the service already registered an option of this name '
                'with another type; rename the event key'))
        return not conflicts

    def _check_target(self, transport, topic, group, option, value):
        if transport is self.transports.standard and topic in self.topics:
            self.problems.append(_problem(
                group, option, value,
                'topic %r is a standard notification topic on the same '
                'transport: the broker would bind the replicas into the '
                'standard %s.<priority> queues, whatever the exchange, and '
                'every standard consumer would receive duplicates. Use '
                'another topic or another transport_url.' % (topic, topic)))
            return False
        return True

    def load_rule_groups(self, group):
        """The rules named in [oslo_messaging_multicast] rules."""
        rules = []
        names = group.rules
        seen = set()
        for name in names:
            if name in seen:
                self.problems.append(_problem(
                    _multicast_opts.GROUP, 'rules', ','.join(names),
                    'rule %r is listed twice' % name))
                continue
            seen.add(name)
            if not _RULE_NAME.match(name):
                self.problems.append(_problem(
                    _multicast_opts.GROUP, 'rules', ','.join(names),
                    'rule name %r may only hold letters, digits, "_", '
                    '"." and "-"' % name))
                continue
            group_name = _multicast_opts.register_rule_opts(self.conf, name)
            rule = self._load_rule(name, group_name, len(rules))
            if rule is not None:
                rules.append(rule)
        return rules

    def _load_rule(self, name, group_name, ordinal):
        rule_conf = self.conf[group_name]
        before = len(self.problems)
        selectors = []
        for text in rule_conf.selector:
            try:
                selectors.append(_multicast_rules.Selector.parse(text))
            except ValueError as exc:
                self.problems.append(_problem(group_name, 'selector', text,
                                              exc))
        if not rule_conf.targets:
            if group_name not in self.conf.list_all_sections():
                self.problems.append(_problem(
                    _multicast_opts.GROUP, 'rules',
                    ','.join(self.conf[_multicast_opts.GROUP].rules),
                    'rule %r is not defined: there is no [%s] group'
                    % (name, group_name)))
            else:
                self.problems.append(_problem(
                    group_name, 'targets', '',
                    'a rule needs at least one target'))
            return None
        try:
            transport = self.transports.get(rule_conf.transport_url)
        except Exception as exc:
            # The URL is secret: name the option, never print its value.
            self.problems.append(_problem(
                group_name, 'transport_url', '****',
                'invalid transport URL: %s' % exc))
            return None
        try:
            delivery = _multicast_opts.read_rule_delivery_opts(self.conf,
                                                               group_name)
        except ValueError as exc:
            self.problems.append(str(exc))
            return None
        destinations = []
        targets = ','.join(rule_conf.targets)
        for target in rule_conf.targets:
            exchange, _, topic = target.rpartition('/')
            if (not _TOPIC_NAME.match(topic) or
                    (exchange and not _TOPIC_NAME.match(exchange)) or
                    target.startswith('/')):
                self.problems.append(_problem(
                    group_name, 'targets', targets,
                    'target %r is not TOPIC or EXCHANGE/TOPIC' % target))
                continue
            if not self._check_target(transport, topic, group_name,
                                      'targets', targets):
                continue
            destinations.append(_multicast_delivery.Destination(
                key=(id(transport), exchange or None, topic),
                transport=transport, exchange=exchange or None, topic=topic,
                version=2.0, shape='clean',
                publisher_id=rule_conf.publisher_id, rule=name,
                label=target, **delivery))
        if len(self.problems) > before:
            return None
        if not selectors:
            LOG.info('messaging-multicast rule %s has no selector: it '
                     'replicates every notification', name)
        return _multicast_rules.Rule(name, ordinal, selectors, destinations)

    def load_onmcast(self, group, first_ordinal):
        """The rules of onmcast's multicast_events, in [DEFAULT]."""
        conf = self.conf
        if (not self._register_compatible(_multicast_opts.onmcast_opts) or
                not conf.multicast_events):
            return []
        shape = group.onmcast_replica_shape
        prefix = conf.multicast_topic_prefix or ''
        publisher_id = (conf.publisher_id or
                        '%s-MULTICAST' % socket.gethostname())
        events = ','.join(conf.multicast_events)
        standard = self.transports.standard
        rules = []
        seen = set()
        for key in conf.multicast_events:
            key = key.strip().lower()
            if not key or key in seen:
                self.problems.append(_problem(
                    'DEFAULT', 'multicast_events', events,
                    'event key %r is empty or listed twice' % key))
                continue
            seen.add(key)
            event_opt = cfg.ListOpt(
                key, default=[],
                help='(onmcast compatibility) Targets of event key %s.' % key)
            if not self._register_compatible([event_opt]):
                continue
            hosts = conf[key]
            if not hosts:
                self.problems.append(_problem(
                    'DEFAULT', key, '',
                    'event key %r of multicast_events has no targets' % key))
                continue
            destinations = []
            for host in sorted(set(hosts), key=hosts.index):
                if shape == 'onmcast':
                    topic, version = f'{prefix}{host}.{key}', 1.0
                else:
                    topic, version = f'{prefix}{host}', 2.0
                if not _TOPIC_NAME.match(topic):
                    self.problems.append(_problem(
                        'DEFAULT', key, ','.join(hosts),
                        'target %r gives the invalid topic %r'
                        % (host, topic)))
                    continue
                if not self._check_target(standard, topic, 'DEFAULT', key,
                                          ','.join(hosts)):
                    continue
                destinations.append(_multicast_delivery.Destination(
                    key=(id(standard), None, topic),
                    transport=standard, exchange=None, topic=topic,
                    version=version, shape=shape, publisher_id=publisher_id,
                    rule='[DEFAULT] %s' % key, label=topic))
            rules.append(_multicast_rules.Rule(
                '[DEFAULT] %s' % key, first_ordinal + len(rules), [],
                destinations, event_key=key))
        return rules
