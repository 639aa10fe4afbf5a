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

"""oslo-messaging-ext-check: validate a notification configuration.

Reads the [oslo_messaging_notifications] section of the service's files
and checks every driver of this package it lists with the driver's own
load-time validation (the same code), without starting the service nor
connecting to any broker: for messaging-multicast, says what would be
replicated where, and, given notifications as NDJSON (one JSON object a
line, as ``oslo-notify-tail --format json`` prints them; ``-`` reads
stdin), which rule sends each of them to which destination. Exits 1 on
any problem: an error, a warning, a line that is not a notification.
"""

import argparse
import collections
import json
import logging
import os
import re
import sys
import warnings

# Importing oslo.messaging imports oslo.service's eventlet backend, which
# warns that eventlet is deprecated: noise to whoever checks a file.
warnings.filterwarnings('ignore', message=r'\s*Eventlet is deprecated')

from oslo_config import cfg  # noqa: E402

from oslo_messaging_ext.notify import _multicast_config  # noqa: E402
from oslo_messaging_ext.notify import _multicast_opts  # noqa: E402

DRIVER = _multicast_config.DRIVER
UNIX_DRIVER = 'unix'
NOTIFICATIONS_GROUP = _multicast_config.NOTIFICATIONS_GROUP

# control_exchange as each service sets it before reading its files
# (oslo_messaging.set_transport_defaults); a service not listed keeps
# oslo.messaging's default, "openstack", unless it sets its own.
SERVICE_EXCHANGES = {
    'cinder': 'openstack',
    'glance': 'glance',
    'ironic': 'ironic',
    'keystone': 'keystone',
    'neutron': 'neutron',
    'nova': 'nova',
}
OSLO_MESSAGING_EXCHANGE = 'openstack'


class _Records(logging.Handler):
    """Keeps the driver's warnings and errors instead of printing them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _cli_opts():
    return [cfg.StrOpt('notifications', positional=True, required=False,
                       metavar='NOTIFICATIONS.jsonl',
                       help='Notifications to match against the rules, one '
                            'JSON object a line ("-": standard input).')]


def _split_project(argv):
    """(--project NAME's value or None, the other arguments).

    oslo.config reserves the name "project" for itself: the option is
    taken out before it parses the rest.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--project')
    known, rest = parser.parse_known_args(argv)
    return known.project, rest


def project_of(conf, given=None):
    """(project, how it was found) of the service ``conf`` configures."""
    if given:
        return given, 'given with --project'
    for path in conf.config_file or ():
        name = os.path.basename(path)
        guess = re.split(r'[-_.]', name, maxsplit=1)[0].lower()
        if guess:
            return guess, 'guessed from the file name %s' % name
    return None, 'unknown'


def _exchange_default(project):
    """(control_exchange default of ``project``, where it comes from)."""
    if project in SERVICE_EXCHANGES:
        return SERVICE_EXCHANGES[project], (
            "the default: %s's own control_exchange default" % project)
    return OSLO_MESSAGING_EXCHANGE, (
        "the default: oslo.messaging's; %s may set its own: if so, pass "
        "--project or set [DEFAULT] control_exchange"
        % (project or 'the service'))


def _broker(conf, url):
    """Where a transport URL points, without its credentials."""
    import oslo_messaging
    parsed = oslo_messaging.TransportURL.parse(conf, url)
    hosts = ','.join(h.hostname + (':%d' % h.port if h.port else '')
                     for h in parsed.hosts)
    return '{}://{}/{}'.format(parsed.transport, hosts,
                               parsed.virtual_host or '')


class Checker:
    """Loads a configuration as the drivers do and reports on it."""

    def __init__(self, conf, out, project=(None, 'unknown')):
        self.conf = conf
        self.out = out
        # (the service's project, how it was found)
        self.project = project
        self.problems = 0
        self._said = set()
        self.files = _multicast_opts.file_sections(conf)

    def say(self, text=''):
        print(text, file=self.out)

    def problem(self, level, text):
        if (level, text) in self._said:
            # The tool and the driver both saw it.
            return
        self._said.add((level, text))
        self.problems += 1
        self.say(f'{level}: {text}')

    def check_notifications(self):
        """Problems of [oslo_messaging_notifications]; the drivers listed."""
        options, problems = _multicast_config.read_options(
            self.conf, NOTIFICATIONS_GROUP, self.files)
        for text in problems:
            self.problem('ERROR', text)
        drivers = options.get('driver') or []
        listed = ','.join(drivers) or '(unset)'
        for name, count in collections.Counter(drivers).items():
            if count > 1:
                self.problem('WARNING', '[%s] driver = %s: %s is listed %d '
                             'times; oslo.messaging loads it once'
                             % (NOTIFICATIONS_GROUP, listed, name, count))
        for warning in _multicast_config.driver_warnings(drivers):
            self.problem('WARNING', warning)
        known = _notification_drivers()
        for name in dict.fromkeys(drivers):
            if known and name not in known:
                hint = (' (driver is a multi-valued option: give one '
                        'driver a line, "driver = NAME" repeated)'
                        if ',' in name else '')
                self.problem('ERROR', '[%s] driver = %s: there is no '
                             'notification driver %r: the service logs an '
                             'error and sends nothing through it%s'
                             % (NOTIFICATIONS_GROUP, listed, name, hint))
        self.check_legacy_driver(drivers, listed)
        if not drivers:
            self.say('No notification driver: the service sends no '
                     'notification.')
        else:
            self.say('Notification drivers: %s.' % ', '.join(
                dict.fromkeys(drivers)))
        return drivers

    def check_legacy_driver(self, drivers, listed):
        if 'notification_driver' not in self.files.get('DEFAULT', {}):
            return
        if drivers:
            self.problem('WARNING', '[DEFAULT] notification_driver is not '
                         'read by oslo.messaging any more and is ignored: '
                         'remove it')
            return
        named = self.files['DEFAULT']['notification_driver'][-1] or DRIVER
        self.problem(
            'ERROR', '[DEFAULT] notification_driver is not read by '
            'oslo.messaging any more: with [%s] driver = %s the service '
            'sends no notification at all. Set [%s] driver = %s and remove '
            'notification_driver.'
            % (NOTIFICATIONS_GROUP, listed, NOTIFICATIONS_GROUP, named))

    def exchange(self):
        """Set control_exchange's default as the service does; say it."""
        project, how = self.project
        self.say('Service: {} ({}).'.format(project or 'unknown', how))
        default, note = _exchange_default(project)
        # What the service does before reading its files.
        self.conf.set_default('control_exchange', default)
        self.exchange_note = note
        if 'control_exchange' not in self.files.get('DEFAULT', {}):
            return
        self.exchange_note = 'set in [DEFAULT] control_exchange'
        try:
            self.conf.control_exchange
        except Exception as exc:
            self.problem('ERROR', '[DEFAULT] control_exchange = %s: %s'
                         % (self.files['DEFAULT']['control_exchange'][-1],
                            _multicast_config.read_error(exc)))
            # The rest is checked as if it were unset.
            self.conf.set_override('control_exchange', default)
            self.exchange_note = note

    def check_unix(self):
        """The unix driver's options, through the driver's own validation."""
        from oslo_messaging_ext.notify import _impl_unix
        from oslo_messaging_ext.notify import _unix_opts

        _unix_opts.register_opts(self.conf)
        options, problems = _multicast_config.read_options(
            self.conf, _unix_opts.GROUP, self.files)
        problems = [text for text in problems
                    if text.startswith('[%s] sock_' % _unix_opts.GROUP)]
        for text in problems:
            self.problem('ERROR', text)
        if problems:
            return
        try:
            settings = _impl_unix.validate(self.conf)
        except Exception as exc:
            self.problem('ERROR', 'unix driver: %s' % exc)
            return
        self.say('unix: socket %s, mode %04o, gid %d, at most %d '
                 'subscribers, %d bytes queued per subscriber.'
                 % (settings['path'], settings['mode'], settings['gid'],
                    settings['max_subscribers'], settings['buffer_size']))

    def load(self):
        """Build the multicast driver as a Notifier would; return it."""
        import oslo_messaging
        from oslo_messaging_ext.notify import _impl_multicast

        try:
            transport = oslo_messaging.get_notification_transport(self.conf)
        except Exception as exc:
            self.problem('ERROR', 'the notification transport cannot be '
                         'loaded, the service cannot send notifications: '
                         '%s: %s' % (type(exc).__name__, _multicast_config.
                                     mask_url(str(exc))))
            # The rules are still checked, on a transport that says so.
            transport = oslo_messaging.get_notification_transport(
                self.conf, url='fake:/')
        records = _Records()
        logger = logging.getLogger(_impl_multicast.__name__)
        logger.addHandler(records)
        propagate, logger.propagate = logger.propagate, False
        try:
            driver = _impl_multicast.MulticastDriver(
                self.conf, self.conf[NOTIFICATIONS_GROUP].topics, transport)
        finally:
            logger.removeHandler(records)
            logger.propagate = propagate
        for record in records.records:
            if record.levelno >= logging.ERROR:
                # The error itself is printed problem by problem below.
                continue
            self.problem('WARNING', record.getMessage().replace(
                'messaging-multicast: ', '', 1))
        error = driver.config_error
        for text in error.problems if error is not None else ():
            self.problem('ERROR', text)
        if error is not None:
            self.say('Replication would be OFF: the standard notifications '
                     'would still be sent.')
        return transport, driver

    def describe(self, driver):
        standard = ', '.join(self.conf[NOTIFICATIONS_GROUP].topics)
        self.say('Standard notifications: topics %s on the notification '
                 'transport.' % standard)
        if not driver._rules:
            self.say('No replication rule.')
        for rule in driver._rules:
            if rule.event_key is not None:
                condition = ('event_type, priority, message_id or '
                             'publisher_id equals %r' % rule.event_key)
            else:
                condition = ' and '.join(
                    '{} {}{} {}'.format(s.field, '!' if s.negated else '',
                                        s.operator, s.value)
                    if s.operator != 'all' else 'every notification'
                    for s in rule.selectors)
            self.say(f'Rule {rule.name}: {condition}')
            for destination in rule.destinations:
                self.say('  -> %s' % self.destination(destination))

    def broker(self, destination):
        """The destination's broker, None for the notification transport."""
        group = 'multicast_rule_' + destination.rule
        if group in self.conf and self.conf[group].transport_url:
            return _broker(self.conf, self.conf[group].transport_url)
        return None

    def destination(self, destination):
        exchange = destination.exchange or '{} ({})'.format(
            self.conf.control_exchange, self.exchange_note)
        return ('exchange %s, routing key %s.<priority>, format %s, on %s'
                % (exchange, destination.topic, destination.version,
                   self.broker(destination) or 'the notification transport'))

    def replica(self, rule, destination, priority):
        """Where one replica goes: RULE -> EXCHANGE/ROUTING_KEY [BROKER]."""
        broker = self.broker(destination)
        return '{} -> {}/{}.{}{}'.format(
            rule.name, destination.exchange or self.conf.control_exchange,
            destination.topic, priority, ' on %s' % broker if broker else '')

    def match(self, driver, lines):
        self.say()
        self.say('Notifications:')
        replicated = replicas = count = 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                message, ctxt = _notification(json.loads(line))
            except ValueError as exc:
                self.problem('ERROR', 'line %d is not a notification: %s'
                             % (number, exc))
                continue
            count += 1
            label = 'line %d %s %s' % (number, message.get('event_type'),
                                       message.get('message_id', ''))
            if driver.config_error is not None:
                self.say('%s: not replicated (replication is off)' % label)
                continue
            seen = set()
            sent = []
            for rule in driver.matching_rules(message, ctxt):
                for destination in rule.destinations:
                    if destination.key not in seen:
                        seen.add(destination.key)
                        sent.append(self.replica(
                            rule, destination,
                            str(message.get('priority', '')).lower()))
            if sent:
                replicated += 1
                replicas += len(sent)
                self.say('{}: {}'.format(label, '; '.join(sent)))
            else:
                self.say('%s: not replicated' % label)
        self.say('%d notifications, %d replicated, %d replicas.'
                 % (count, replicated, replicas))


def _notification(obj):
    """(message, context) of an NDJSON line's object."""
    if not isinstance(obj, dict):
        raise ValueError('not a JSON object')
    if 'oslo.message' in obj:
        # The wire format of the AMQP drivers (oslo.messaging 2.0 envelope).
        obj = json.loads(obj['oslo.message'])
        ctxt = {k[len('_context_'):]: v for k, v in obj.items()
                if k.startswith('_context_')}
    else:
        ctxt = obj.get('context') or {}
    if 'event_type' not in obj:
        raise ValueError('no event_type')
    return obj, ctxt


def _notification_drivers():
    """Names of the notification drivers installed (empty if unknown)."""
    try:
        from importlib import metadata
        return {ep.name for ep in metadata.entry_points(
            group='oslo.messaging.notify.drivers')}
    except Exception:
        return set()


def _config(argv):
    """The ConfigOpts of the service's files, with oslo.messaging's opts.

    :returns: (conf, project, how the project was found)
    """
    given, argv = _split_project(sys.argv[1:] if argv is None else argv)
    conf = cfg.ConfigOpts()
    conf.register_cli_opts(_cli_opts())
    import oslo_messaging.opts
    for group, opts in oslo_messaging.opts.list_opts():
        conf.register_opts(opts, group=group)
    description = (__doc__.splitlines()[0] + ' --project NAME names the '
                   'service (glance, nova, ...) whose control_exchange '
                   'default applies; by default it is guessed from the '
                   'first file\'s name.')
    conf(argv, project='oslo-messaging-ext-check',
         default_config_files=[], default_config_dirs=[],
         description=description)
    project, how = project_of(conf, given)
    if project:
        # As the service reads them: its project names it (the unix
        # driver's hub is shared by the processes of one project).
        conf(argv, project=project, default_config_files=[],
             default_config_dirs=[], description=description)
    return conf, project, how


def main(argv=None, out=None):
    out = out or sys.stdout
    try:
        conf, project, how = _config(argv)
    except cfg.Error as exc:
        print('ERROR: %s' % exc, file=sys.stderr)
        return 2
    if not conf.config_file and not conf.config_dir:
        print('ERROR: give the service\'s configuration with --config-file '
              '(and --config-dir)', file=sys.stderr)
        return 2
    checker = Checker(conf, out, (project, how))
    try:
        return _check(checker)
    except Exception as exc:
        # A defect of this tool: one line, never a traceback.
        print('ERROR: the check could not complete: %s: %s'
              % (type(exc).__name__, _multicast_config.mask_url(str(exc))),
              file=sys.stderr)
        return 2


def _check(checker):
    conf = checker.conf
    drivers = checker.check_notifications()
    checker.exchange()
    if UNIX_DRIVER in drivers:
        checker.check_unix()
    if DRIVER in drivers or (not drivers and _multicast_config.
                             onmcast_configured(checker.files)):
        # Also when only the old driver line names it: what it would do
        # once the line moves.
        transport, driver = checker.load()
        try:
            checker.describe(driver)
            if conf.notifications:
                if conf.notifications == '-':
                    checker.match(driver, sys.stdin)
                else:
                    with open(conf.notifications, encoding='utf-8') as lines:
                        checker.match(driver, lines)
        finally:
            driver.cleanup()
            transport.cleanup()
    else:
        if _multicast_opts.GROUP in checker.files:
            checker.problem('WARNING', '[%s] is configured, but [%s] driver '
                            'does not list %s: its rules do not apply'
                            % (_multicast_opts.GROUP, NOTIFICATIONS_GROUP,
                               DRIVER))
        if conf.notifications:
            checker.problem('ERROR', 'notifications given, but %s is not '
                            'listed: nothing is replicated' % DRIVER)
    checker.say()
    checker.say('Problems: %d' % checker.problems)
    return 1 if checker.problems else 0


if __name__ == '__main__':
    sys.exit(main())
