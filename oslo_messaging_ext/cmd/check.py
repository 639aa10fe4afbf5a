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

Loads the messaging-multicast configuration of the service's files the way
the driver does when the service starts (the same code), without starting
the service nor connecting to any broker; says what would be replicated
where and, given notifications as NDJSON (one JSON object a line, as
``oslo-notify-tail --format json`` prints them; ``-`` reads stdin), which
rule sends each of them to which destination. Exits 1 on any problem: an
error, a warning, the driver not selected, a line that is not a
notification.
"""

import json
import logging
import sys
import warnings

# Importing oslo.messaging imports oslo.service's eventlet backend, which
# warns that eventlet is deprecated: noise to whoever checks a file.
warnings.filterwarnings('ignore', message=r'\s*Eventlet is deprecated')

from oslo_config import cfg  # noqa: E402

DRIVER = 'messaging-multicast'
NOTIFICATIONS_GROUP = 'oslo_messaging_notifications'


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


def _broker(conf, url):
    """Where a transport URL points, without its credentials."""
    import oslo_messaging
    parsed = oslo_messaging.TransportURL.parse(conf, url)
    hosts = ','.join(h.hostname + (':%d' % h.port if h.port else '')
                     for h in parsed.hosts)
    return '{}://{}/{}'.format(parsed.transport, hosts,
                               parsed.virtual_host or '')


class Checker:
    """Loads a configuration as the driver does and reports on it."""

    def __init__(self, conf, out):
        self.conf = conf
        self.out = out
        self.problems = 0

    def say(self, text=''):
        print(text, file=self.out)

    def problem(self, level, text):
        self.problems += 1
        self.say(f'{level}: {text}')

    def check_driver_selected(self, raw):
        """Whether the service would load messaging-multicast at all."""
        drivers = self.conf[NOTIFICATIONS_GROUP].driver
        legacy = 'notification_driver' in raw.get('DEFAULT', ())
        if DRIVER in drivers:
            if legacy:
                self.problem('WARNING', '[DEFAULT] notification_driver is '
                             'not read by oslo.messaging any more and is '
                             'ignored: remove it')
            return True
        if legacy:
            self.problem(
                'ERROR', '[DEFAULT] notification_driver is not read by '
                'oslo.messaging any more: with [%s] driver = %s the service '
                'sends %s. Set [%s] driver = %s and remove '
                'notification_driver.'
                % (NOTIFICATIONS_GROUP, ','.join(drivers) or '(unset)',
                   'no notification at all' if not drivers
                   else 'no replica', NOTIFICATIONS_GROUP, DRIVER))
        else:
            self.problem('ERROR', '[%s] driver = %s: %s is not selected, '
                         'its configuration below would not apply'
                         % (NOTIFICATIONS_GROUP,
                            ','.join(drivers) or '(unset)', DRIVER))
        return False

    def load(self):
        """Build the driver as a Notifier would; return it."""
        import oslo_messaging
        from oslo_messaging_ext.notify import _impl_multicast

        transport = oslo_messaging.get_notification_transport(self.conf)
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
            self.problem('WARNING', record.getMessage())
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
        exchange = destination.exchange or '%s (default)' % (
            self.conf.control_exchange)
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


def main(argv=None, out=None):
    out = out or sys.stdout
    conf = cfg.ConfigOpts()
    conf.register_cli_opts(_cli_opts())
    import oslo_messaging.opts
    for group, opts in oslo_messaging.opts.list_opts():
        conf.register_opts(opts, group=group)
    try:
        conf(argv, project='oslo-messaging-ext-check',
             default_config_files=[], default_config_dirs=[],
             description=__doc__.splitlines()[0])
    except cfg.Error as exc:
        print('ERROR: %s' % exc, file=sys.stderr)
        return 2
    if not conf.config_file and not conf.config_dir:
        print('ERROR: give the service\'s configuration with --config-file '
              '(and --config-dir)', file=sys.stderr)
        return 2
    from oslo_messaging_ext.notify import _multicast_config

    checker = Checker(conf, out)
    checker.check_driver_selected(_multicast_config.raw_sections(conf))
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
    checker.say()
    checker.say('Problems: %d' % checker.problems)
    return 1 if checker.problems else 0


if __name__ == '__main__':
    sys.exit(main())
