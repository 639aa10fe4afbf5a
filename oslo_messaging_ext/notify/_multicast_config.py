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

load() turns a configuration into the driver's rules. It reads every rule
and onmcast option before it fails, so that one MulticastConfigError names
all the problems, each with its group, option and value. What is valid but
probably not what the operator meant (an unknown option, a group name
close to ours) comes back as warnings.

The check tool (oslo-messaging-ext-check) runs the same load() as the
driver.
"""

import collections
import difflib
import functools
import ipaddress
import logging
import os
import re
import socket
import threading
import time

from oslo_config import cfg
import oslo_messaging

from oslo_messaging_ext.notify import _multicast_delivery
from oslo_messaging_ext.notify import _multicast_opts
from oslo_messaging_ext.notify import _multicast_rules

# The driver's logger, as in _multicast_delivery.
LOG = logging.getLogger('oslo_messaging_ext.notify._impl_multicast')

_RULE_NAME = re.compile(r'^[A-Za-z0-9_.-]+$')
_TOPIC_NAME = re.compile(r'^[^\s/]+$')
# \$ not preceded by a backslash: oslo.config reads it as a literal $.
_ESCAPED_DOLLAR = re.compile(r'(?<!\\)\\\$')
_HOST_LABEL = re.compile(r'^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?$')

# AMQP limits names and routing keys to 255 bytes; a replica's routing key
# is TOPIC.PRIORITY, the longest priority being "critical".
_MAX_NAME_BYTES = 255
_MAX_TOPIC_BYTES = _MAX_NAME_BYTES - len('.critical')

# Ports a URL without one means, by transport.
_DEFAULT_PORTS = {'rabbit': 5672, 'amqp': 5672, 'kafka': 9092}

DRIVER = 'messaging-multicast'
NOTIFICATIONS_GROUP = 'oslo_messaging_notifications'
_STANDARD_DRIVERS = ('messaging', 'messagingv2')

# While replication is off, it is said again at most this often.
REMINDER_INTERVAL = 60.0

LoadedRules = collections.namedtuple('LoadedRules', 'rules warnings')


class MulticastConfigError(cfg.Error):
    """The multicast configuration is invalid: replication is off."""

    def __init__(self, problems, warnings=()):
        self.problems = problems
        self.warnings = list(warnings)
        super().__init__(
            'Invalid messaging-multicast configuration, replication is '
            'off: %s' % '; '.join(problems))


def _problem(group, option, value, reason):
    return f'[{group}] {option} = {value}: {reason}'


def mask_url(text):
    """``text`` with the password of each host of a transport URL masked."""
    scheme, sep, rest = text.partition('://')
    netloc, slash, path = rest.partition('/')
    if not sep:
        return '****' if '@' in text else text
    if '@' not in netloc:
        return text
    hosts = []
    for host in netloc.split(','):
        if '@' not in host:
            if ':' in host and '@' in netloc.split(host, 1)[1]:
                # A "," inside a password: mask the credentials whole.
                return f'{scheme}://****@{netloc.rpartition("@")[2]}' \
                       f'{slash}{path}'
            hosts.append(host)
            continue
        user_info, _, address = host.rpartition('@')
        user, colon, _ = user_info.partition(':')
        hosts.append(f'{user}{colon}{"****" if colon else ""}@{address}')
    return '{}://{}{}{}'.format(scheme, ','.join(hosts), slash, path)


def shown_value(name, text, secret=()):
    """How a value is named in an error: URLs and secrets masked."""
    if text is None:
        return ''
    if name == 'transport_url' or '://' in text:
        return mask_url(text)
    return '****' if name in secret else text


def read_error(exc, secret=False):
    """Why oslo.config could not read a value, for an operator.

    :param secret: whether the value is secret: oslo.config's message
        quotes part of it ("no such option word1" for Pa$word1)
    """
    if isinstance(exc, cfg.ConfigFileValueError):
        return 'invalid value: %s' % str(exc).rpartition(' is not valid: ')[2]
    detail = '' if secret else ' (%s)' % exc
    if isinstance(exc, (cfg.NoSuchOptError, cfg.TemplateSubstitutionError)):
        return ('oslo.config reads "$NAME" and "${NAME}" in a value as the '
                'value of option NAME%s; write "$$" for a literal "$", '
                'e.g. Pa$$word1 or ^end$$' % detail)
    return f'cannot be read: {type(exc).__name__}{detail}'


_SECRETS = frozenset(opt.dest for opt in (_multicast_opts.multicast_opts +
                                          _multicast_opts.rule_opts)
                     if opt.secret)


def read_options(conf, group_name, files):
    """({option: value}, problems) of every option of ``group_name``.

    oslo.config only checks a value when it is read: an option of a
    feature that is off (async_queue_size = lots) would otherwise never
    be. Whatever reading raises (a wrong type, a "$" that interpolation
    cannot resolve, anything) is a problem naming group, option and the
    value as written, never an exception.

    :param files: file_sections() of ``conf``
    """
    values, problems = {}, []
    raw = files.get(group_name, {})
    for name in sorted(conf[group_name].keys()):
        try:
            values[name] = conf[group_name][name]
        except Exception as exc:
            text = raw.get(name, [None])[-1]
            problems.append(_problem(group_name, name,
                                     shown_value(name, text, _SECRETS),
                                     read_error(exc, name in _SECRETS)))
    return values, problems


def load(conf, group, topics, transports):
    """Return the LoadedRules of ``conf``: its rules, in order, and warnings.

    Whatever goes wrong while reading or compiling the options is a
    MulticastConfigError, never another exception: a bad configuration
    turns replication off, never the driver.

    :param group: the [oslo_messaging_multicast] group of ``conf``
    :param topics: the notifier's topics, which replicas may not use on
        the notifier's broker
    :param transports: the RuleTransports the rules publish on
    :raises MulticastConfigError: naming every problem found
    """
    try:
        loader = _RuleLoader(conf, topics, transports)
        options, loader.problems = read_options(conf, _multicast_opts.GROUP,
                                                loader.files)
        names = options.get('rules') or []
        rules = loader.load_rule_groups(names)
        rules += loader.load_onmcast(
            options.get('onmcast_replica_shape', 'onmcast'), len(rules))
        warnings = (loader.warnings + _listed_drivers_warnings(conf) +
                    unknown_keys(conf, names, loader.files))
    except Exception as exc:
        # A defect of ours, not of the configuration: still never the
        # driver's failure.
        LOG.debug('messaging-multicast: loading failed', exc_info=True)
        raise MulticastConfigError(['[%s]: the configuration could not be '
                                    'loaded: %s: %s'
                                    % (_multicast_opts.GROUP,
                                       type(exc).__name__, exc)])
    if loader.problems:
        raise MulticastConfigError(loader.problems, warnings)
    return LoadedRules(rules, warnings)


def driver_warnings(drivers):
    """Warnings about the [oslo_messaging_notifications] driver list."""
    doubled = [name for name in _STANDARD_DRIVERS if name in drivers]
    if DRIVER not in drivers or not doubled:
        return []
    return ['[%s] driver = %s: %s and %s both send the standard '
            'notification, so every consumer receives it twice; %s alone '
            'sends it once (standard_message_format = 1.0 for the format '
            'of messaging)' % (NOTIFICATIONS_GROUP, ','.join(drivers),
                               DRIVER, ' and '.join(doubled), DRIVER)]


def _listed_drivers_warnings(conf):
    try:
        drivers = conf[NOTIFICATIONS_GROUP].driver
    except Exception:
        # Not registered (a bare ConfigOpts) or unreadable: the service
        # reports it.
        return []
    return driver_warnings(drivers)


def onmcast_configured(files):
    """Whether the files hold onmcast's multicast_events."""
    return 'multicast_events' in files.get('DEFAULT', {})


def broker_of(conf, url):
    """What ``url`` (a str or TransportURL) resolves to, for comparison.

    Two URLs naming the same virtual host on a common node publish into
    the same queues, whatever their spelling, user or other nodes:
    ``(vhost, {(address, port)})``. Host names are resolved; a name that
    does not resolve stands for itself.
    """
    if not isinstance(url, oslo_messaging.TransportURL):
        url = oslo_messaging.TransportURL.parse(conf, url)
    default_port = _DEFAULT_PORTS.get(url.transport)
    endpoints = set()
    for host in url.hosts:
        name = (host.hostname or 'localhost').lower().strip('[]')
        port = host.port or default_port
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            infos = []
        addresses = {info[4][0] for info in infos} or {name}
        endpoints.update((address, port) for address in addresses)
    return (url.virtual_host or '/', frozenset(endpoints))


def same_broker(first, second):
    """Whether two broker_of() results publish into the same queues."""
    if first[0] != second[0]:
        return False
    if not first[1] or not second[1]:
        # A URL without host (fake:/) names the driver's default broker.
        return first[1] == second[1]
    return bool(first[1] & second[1])


class _RuleLoader:
    """Reads the rules of a configuration and collects its problems."""

    def __init__(self, conf, topics, transports):
        self.conf = conf
        self.topics = topics
        self.transports = transports
        self.problems = []
        self.warnings = []
        # The files are read once, whatever the number of rules.
        self.files = _multicast_opts.file_sections(conf)
        if transports.standard_url is not None:
            self.standard_broker = broker_of(conf, transports.standard_url)
        else:
            # Unusable for the notifier too: only itself is the same.
            self.standard_broker = ('', frozenset([(id(transports), None)]))
        # topic -> [(broker, exchange, where)] of the targets loaded so far.
        self._targets = collections.defaultdict(list)

    def _register_compatible(self, opts):
        conflicts = _multicast_opts.register_compatible(self.conf, opts)
        for opt, value in conflicts:
            self.problems.append(_problem(
                'DEFAULT', opt.name, value,
                'the service already registered an option of this name '
                'with another type; rename the event key'))
        return not conflicts

    @functools.cached_property
    def _control_exchange(self):
        return getattr(self.conf, 'control_exchange', None)

    def _exchange(self, exchange):
        """The exchange a replica is published to: None is the default."""
        return exchange or self._control_exchange

    def _check_target(self, broker, exchange, topic, group, option, value):
        """Record a target; False (with the problem) if it is refused."""
        before = len(self.problems)

        def refuse(reason):
            self.problems.append(_problem(group, option, value, reason))

        if '#' in topic or '*' in topic:
            refuse('topic %r holds an AMQP wildcard ("#" or "*"): its '
                   'queue would be bound to every matching routing key of '
                   'the exchange' % topic)
        if len(topic.encode()) > _MAX_TOPIC_BYTES:
            refuse('topic %r is longer than %d bytes: with ".<priority>" '
                   'its routing key and queue name exceed AMQP\'s %d'
                   % (topic, _MAX_TOPIC_BYTES, _MAX_NAME_BYTES))
        if exchange and len(exchange.encode()) > _MAX_NAME_BYTES:
            refuse('exchange %r is longer than %d bytes'
                   % (exchange, _MAX_NAME_BYTES))
        if topic in self.topics and same_broker(broker,
                                                self.standard_broker):
            refuse('topic %r is a standard notification topic on the same '
                   'broker (compared by host, port and virtual host, '
                   'whatever the URL\'s spelling or user): the broker would '
                   'bind the replicas into the standard %s.<priority> '
                   'queues, whatever the exchange, and every standard '
                   'consumer would receive duplicates. Use another topic or '
                   'another broker.' % (topic, topic))
        exchange = self._exchange(exchange)
        for other_broker, other_exchange, where in self._targets[topic]:
            if (other_exchange != exchange and
                    same_broker(broker, other_broker)):
                refuse('topic %r is also a target under another exchange '
                       '(%s): queues belong to the virtual host, so the '
                       '%s.<priority> queues would receive every replica '
                       'twice' % (topic, where, topic))
                break
        if len(self.problems) > before:
            return False
        self._targets[topic].append((broker, exchange,
                                     f'[{group}] {option} = {value}'))
        return True

    def load_rule_groups(self, names):
        """The rules ``names`` of [oslo_messaging_multicast] rules."""
        rules = []
        seen = set()
        listed = ','.join(names)
        for name in names:
            if name in seen:
                self.problems.append(_problem(
                    _multicast_opts.GROUP, 'rules', listed,
                    'rule %r is listed twice' % name))
                continue
            seen.add(name)
            if not _RULE_NAME.match(name):
                self.problems.append(_problem(
                    _multicast_opts.GROUP, 'rules', listed,
                    'rule name %r may only hold letters, digits, "_", '
                    '"." and "-"' % name))
                continue
            group_name = _multicast_opts.register_rule_opts(self.conf, name)
            options, invalid = read_options(self.conf, group_name,
                                            self.files)
            if invalid:
                self.problems += invalid
                continue
            try:
                rule = self._load_rule(name, group_name, len(rules), options)
            except Exception as exc:
                LOG.debug('messaging-multicast: rule %s', name,
                          exc_info=True)
                self.problems.append('[%s]: the rule could not be loaded: '
                                     '%s: %s' % (group_name,
                                                 type(exc).__name__, exc))
                continue
            if rule is not None:
                rules.append(rule)
        return rules

    def _load_rule(self, name, group_name, ordinal, options):
        """The Rule of ``group_name``, whose ``options`` could be read."""
        before = len(self.problems)
        selectors = []
        raw_selectors = self.files.get(group_name, {}).get('selector', ())
        for text in options['selector']:
            try:
                check_selector_text(text)
                selectors.append(_multicast_rules.Selector.parse(text))
            except Exception as exc:
                # ValueError, or what a compiler raises (OverflowError).
                self.problems.append(_problem(group_name, 'selector', text,
                                              exc))
        for text in raw_selectors:
            if _ESCAPED_DOLLAR.search(text):
                self.warnings.append(
                    '[%s] selector = %s: oslo.config reads "\\$" as a '
                    'literal "$" (as "$$"), so a regex sees "$" (the end of '
                    'the value) there; write "[$]" or "\\x24" for a '
                    'regex\'s literal dollar' % (group_name, text))
        if not options['targets']:
            if group_name not in self.files:
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
        url = options['transport_url']
        problems = url_problems(self.conf, url) if url else []
        for reason in problems:
            self.problems.append(_problem(group_name, 'transport_url',
                                          mask_url(url), reason))
        if problems:
            return None
        try:
            transport = self.transports.get(url)
            broker = (broker_of(self.conf, url) if url
                      else self.standard_broker)
        except Exception as exc:
            self.problems.append(_problem(
                group_name, 'transport_url', mask_url(url),
                'invalid transport URL: %s'
                % str(exc).replace(url, mask_url(url))))
            return None
        delivery = {_multicast_opts.RULE_DELIVERY_OPTS[option]: value
                    for option, value in options.items()
                    if option in _multicast_opts.RULE_DELIVERY_OPTS}
        destinations = []
        targets = ','.join(options['targets'])
        for target in options['targets']:
            exchange, _, topic = target.rpartition('/')
            if (not _TOPIC_NAME.match(topic) or
                    (exchange and not _TOPIC_NAME.match(exchange)) or
                    target.startswith('/')):
                self.problems.append(_problem(
                    group_name, 'targets', targets,
                    'target %r is not TOPIC or EXCHANGE/TOPIC' % target))
                continue
            if not self._check_target(broker, exchange, topic, group_name,
                                      'targets', targets):
                continue
            destinations.append(_multicast_delivery.Destination(
                key=(id(transport), self._exchange(exchange), topic),
                transport=transport, exchange=exchange or None, topic=topic,
                version=2.0, shape='clean',
                publisher_id=options['publisher_id'], rule=name,
                label=target, **delivery))
        if not options['selector']:
            # A typo ("selectors =") must not replicate everything.
            self.problems.append(_problem(
                group_name, 'selector', '',
                'a rule needs at least one selector; "selector = %s" '
                'replicates every notification'
                % _multicast_rules.MATCH_ALL))
        if len(self.problems) > before:
            return None
        return _multicast_rules.Rule(name, ordinal, selectors, destinations)

    def _read_default(self, name):
        """A [DEFAULT] value; None, with the problem, if unreadable."""
        try:
            return self.conf[name]
        except Exception as exc:
            text = self.files.get('DEFAULT', {}).get(name, [None])[-1]
            self.problems.append(_problem('DEFAULT', name,
                                          shown_value(name, text),
                                          read_error(exc)))
            return None

    def load_onmcast(self, shape, first_ordinal):
        """The rules of onmcast's multicast_events, in [DEFAULT].

        Its options are registered in [DEFAULT] only when the files set
        multicast_events (or the service registered it already): a
        service that does not use onmcast gets no option of it.
        """
        conf = self.conf
        if (not onmcast_configured(self.files) and
                'multicast_events' not in conf):
            return []
        if not self._register_compatible(_multicast_opts.onmcast_opts):
            return []
        values = {opt.dest: self._read_default(opt.dest)
                  for opt in _multicast_opts.onmcast_opts}
        if None in (values['multicast_events'],
                    values['multicast_topic_prefix']):
            # Unreadable: named by _read_default (publisher_id is optional).
            return []
        if not values['multicast_events']:
            return []
        prefix = values['multicast_topic_prefix']
        publisher_id = (values['publisher_id'] or
                        '%s-MULTICAST' % socket.gethostname())
        events = ','.join(values['multicast_events'])
        standard = self.transports.standard
        rules = []
        seen = set()
        for key in values['multicast_events']:
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
            hosts = self._read_default(key)
            if hosts is None:
                continue
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
                if not self._check_target(self.standard_broker, None, topic,
                                          'DEFAULT', key, ','.join(hosts)):
                    continue
                destinations.append(_multicast_delivery.Destination(
                    key=(id(standard), self._exchange(None), topic),
                    transport=standard, exchange=None, topic=topic,
                    version=version, shape=shape, publisher_id=publisher_id,
                    rule='[DEFAULT] %s' % key, label=topic))
            rules.append(_multicast_rules.Rule(
                '[DEFAULT] %s' % key, first_ordinal + len(rules), [],
                destinations, event_key=key))
        return rules


def _close(name, candidates):
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.8)
    return ' (did you mean %r?)' % match[0] if match else ''


def _host_problem(host):
    """Why ``host`` (a transport URL's host name) is not one, or None."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    labels = host.rstrip('.').split('.')
    for label in labels:
        if len(label) > 63:
            return ('host name %r has a label longer than 63 characters '
                    '(%r)' % (host, label))
    if len(host.rstrip('.')) > 253:
        return 'host name %r is longer than 253 characters' % host
    for label in labels:
        try:
            # An internationalized label is checked in its ASCII form.
            label = label.encode('idna').decode('ascii')
        except UnicodeError as exc:
            return f'host {host!r} is not a host name: {exc}'
        if not _HOST_LABEL.match(label):
            return ('host %r is not a host name: a label holds letters, '
                    'digits, "-" and "_", and neither starts nor ends with '
                    '"-"' % host)
    return None


def url_problems(conf, url):
    """Why a rule's transport URL cannot be published to; [] if it can."""
    try:
        parsed = oslo_messaging.TransportURL.parse(conf, url)
    except Exception as exc:
        return ['invalid transport URL: %s'
                % str(exc).replace(url, mask_url(url))]
    problems = []
    for host in parsed.hosts:
        if host.port is not None and not 0 < host.port < 65536:
            problems.append('port %d is out of range (1-65535)' % host.port)
        if host.hostname:
            problem = _host_problem(host.hostname)
            if problem:
                problems.append(problem)
    return problems


def check_selector_text(text):
    """Refuse an operator without value, which parse reads as a value.

    "payload.x regex" would otherwise select payload.x equal to the word
    "regex".

    :raises ValueError: naming the operator
    """
    parts = text.split()
    if len(parts) == 2 and (parts[1].lstrip('!') in
                            _multicast_rules.OPERATORS):
        raise ValueError(
            'operator %r has no value; to select the word itself, write '
            '"%s exact %s"' % (parts[1], parts[0], parts[1]))


def unknown_keys(conf, rule_names, files):
    """Warnings about what the driver would silently ignore in the files.

    Options of [oslo_messaging_multicast] and of the rule groups it does
    not know, rule groups not listed in rules, groups whose name is close
    to its own, and onmcast look-alikes in [DEFAULT].
    """
    warnings = []
    rule_groups = {_multicast_opts.RULE_GROUP_PREFIX + name
                   for name in rule_names if _RULE_NAME.match(name)}
    for section, keys in sorted(files.items()):
        if section == _multicast_opts.GROUP or section in rule_groups:
            known = set(conf[section].keys())
            for key in sorted(set(keys) - known):
                warnings.append(
                    '[%s] %s is not an option of messaging-multicast and is '
                    'ignored%s' % (section, key, _close(key, sorted(known))))
        elif section.startswith(_multicast_opts.RULE_GROUP_PREFIX):
            warnings.append(
                '[%s] is ignored: rule %r is not listed in [%s] rules'
                % (section, section[len(_multicast_opts.RULE_GROUP_PREFIX):],
                   _multicast_opts.GROUP))
        elif section == 'DEFAULT':
            onmcast = [opt.name for opt in _multicast_opts.onmcast_opts]
            for key in sorted(keys):
                if (key not in conf and key.startswith('multicast') and
                        key.replace('-', '_') not in onmcast):
                    warnings.append(
                        '[DEFAULT] %s is not an onmcast option and is '
                        'ignored%s' % (key, _close(key, onmcast)))
        elif _close(section, [_multicast_opts.GROUP]):
            warnings.append('[%s] is not a group of messaging-multicast and '
                            'is ignored%s'
                            % (section, _close(section,
                                               [_multicast_opts.GROUP])))
    return warnings


# (pid, error text) -> ReplicationOff: the drivers of a process that share
# one invalid configuration (glance builds about 14) share its reminders.
_replication_off = {}
_replication_off_lock = threading.Lock()


def replication_off(error):
    """The ReplicationOff of ``error`` in this process."""
    key = (os.getpid(), str(error))
    with _replication_off_lock:
        if key not in _replication_off:
            _replication_off[key] = ReplicationOff(error)
        return _replication_off[key]


class ReplicationOff:
    """Reminds, at a bounded rate, that replication is off.

    An invalid configuration stopped replication while the standard
    notifications still flow: said at load, and again while it lasts.
    """

    def __init__(self, error):
        self.error = error
        self.skipped = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def skip(self):
        """Count a notification not replicated; remind now and then."""
        with self._lock:
            self.skipped += 1
            now = time.monotonic()
            if now - self._last < REMINDER_INTERVAL:
                return
            self._last = now
            skipped, self.skipped = self.skipped, 0
        LOG.error('messaging-multicast replication is still off (%d '
                  'notifications sent without their replicas since the '
                  'last report): %s', skipped, self.error)
