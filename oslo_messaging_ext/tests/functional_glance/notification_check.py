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

"""Check glance's notifications against what glance-api.conf configures.

One check, run by the devstack job of ``.zuul.yaml`` after tempest and by
``tox -e functional-glance`` after its own images, so that the gate
judges a run as the local job does::

    python -m oslo_messaging_ext.tests.functional_glance.notification_check \\
        --glance-api-conf /etc/glance/glance-api.conf \\
        --recording notifications.ndjson

Inputs: glance-api.conf as the devstack plugin wrote it (the broker, the
multicast rules), and what ``oslo-notify-tail --follow --format json``
recorded from the unix socket during the run. The replica queues of the
rules (``<topic>.info`` on the broker) are drained, waiting up to
``--timeout`` for the replicas the recording calls for. It fails when:

* the recording holds a drop notice, a sequence gap, or a line that is
  not a notification;
* an event type of ``--expect-event`` never appears in the recording;
* a replica queue holds an event type its rule does not select, or a
  publisher_id other than the rule's;
* for every image whose life the recording saw from its ``image.create``,
  a replica queue does not hold exactly one copy of each selected event
  the recording holds, no more, no less. Images created before the
  recorder connected (devstack's own uploads) are left out of this count,
  not out of the checks above.

Only the standard library, oslo.config and kombu (oslo.messaging's
dependency) are used, so it runs from devstack's virtualenv.
"""

import argparse
import collections
import json
import sys
import time
import urllib.parse

import kombu

from oslo_messaging_ext.tests import devstack

DROPPED_EVENT_TYPE = 'oslo_messaging_ext.unix.dropped'
EXPECTED_EVENTS = ('image.create', 'image.upload', 'image.activate',
                   'image.delete')
# glance's control exchange: where a rule's target without one goes.
DEFAULT_EXCHANGE = 'glance'
REPLICA_PRIORITY = 'info'
DEFAULT_TIMEOUT = 60.0
POLL_INTERVAL = 0.2

Rule = collections.namedtuple(
    'Rule', ['name', 'events', 'queues', 'publisher_id'])


class ConfigError(Exception):
    pass


def _first(section, option, default=None):
    values = section.get(option)
    return values[-1] if values else default


def _selected_events(rule, selector):
    field, _, rest = selector.partition(' ')
    operator, _, values = rest.strip().partition(' ')
    if field != 'event_type' or operator != 'in' or not values.strip():
        raise ConfigError('[multicast_rule_%s] selector = %s: only '
                          '"event_type in TYPE[,TYPE...]" can be checked'
                          % (rule, selector))
    return frozenset(v.strip() for v in values.split(',') if v.strip())


def load_config(path):
    """Read the broker and the multicast rules from glance-api.conf.

    :returns: (transport_url, [Rule])
    """
    ini = devstack.read_ini(path)
    notifications = ini.get('oslo_messaging_notifications', {})
    url = (_first(notifications, 'transport_url') or
           _first(ini.get('DEFAULT', {}), 'transport_url'))
    if not url:
        raise ConfigError('%s sets no transport_url' % path)
    names = _first(ini.get('oslo_messaging_multicast', {}), 'rules', '')
    rules = []
    for name in filter(None, (n.strip() for n in names.split(','))):
        section = ini.get('multicast_rule_%s' % name)
        if section is None:
            raise ConfigError('%s: rule %s has no [multicast_rule_%s]'
                              % (path, name, name))
        selectors = section.get('selector', [])
        if len(selectors) != 1:
            raise ConfigError('[multicast_rule_%s] has %d selectors; the '
                              'check handles one' % (name, len(selectors)))
        queues = []
        for target in _first(section, 'targets', '').split(','):
            exchange, _, topic = target.strip().rpartition('/')
            queues.append((exchange or DEFAULT_EXCHANGE,
                           '%s.%s' % (topic, REPLICA_PRIORITY)))
        rules.append(Rule(name, _selected_events(name, selectors[0]),
                          tuple(queues), _first(section, 'publisher_id')))
    return url, rules


def read_recording(path):
    """Parse an NDJSON recording: (notifications, problems)."""
    notifications, problems = [], []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            try:
                notification = json.loads(line)
                notification['event_type']
            except (ValueError, TypeError, KeyError) as exc:
                problems.append('recording line %d is not a notification '
                                '(%s): %.200r' % (number, exc, line))
                continue
            notifications.append(notification)
    return notifications, problems


def image_events(notifications, events=None, images=None):
    """Counter of (image id, event type), optionally restricted."""
    counter = collections.Counter()
    for n in notifications:
        payload = n.get('payload')
        image = payload.get('id') if isinstance(payload, dict) else None
        if image is None:
            continue
        if events is not None and n['event_type'] not in events:
            continue
        if images is not None and image not in images:
            continue
        counter[(image, n['event_type'])] += 1
    return counter


def images_seen_from_birth(notifications):
    return {image for image, event in image_events(notifications)
            if event == 'image.create'}


def expected_replicas(recording, rule):
    return image_events(recording, rule.events,
                        images_seen_from_birth(recording))


def _amqp_url(transport_url):
    parsed = urllib.parse.urlsplit(transport_url.split(',')[0])
    return parsed._replace(scheme='amqp').geturl()


def _decode(body):
    message = json.loads(body)
    # oslo.messaging's rabbit driver wraps every message in an envelope.
    if isinstance(message, dict) and 'oslo.message' in message:
        message = json.loads(message['oslo.message'])
    return message


def drain(connection, queue):
    """Take every message waiting in ``queue``; [] if it does not exist."""
    taken = []
    channel = connection.channel()
    try:
        channel.queue_declare(queue=queue, passive=True)
    except connection.channel_errors:
        return taken
    try:
        while True:
            message = channel.basic_get(queue=queue, no_ack=True)
            if message is None:
                return taken
            taken.append(_decode(message.body))
    finally:
        channel.close()


def collect_replicas(transport_url, rules, recording,
                     timeout=DEFAULT_TIMEOUT):
    """Drain the replica queues of ``rules``.

    Replication may lag the standard notification: the queues are drained
    again until each holds at least what the recording calls for, or
    ``timeout`` passes.

    :returns: {(exchange, queue): [notification]}
    """
    collected = {q: [] for rule in rules for q in rule.queues}
    wanted = {q: expected_replicas(recording, rule)
              for rule in rules for q in rule.queues}
    deadline = time.monotonic() + timeout
    with kombu.Connection(_amqp_url(transport_url),
                          connect_timeout=10) as connection:
        while True:
            for key in collected:
                collected[key] += drain(connection, key[1])
            if all(image_events(collected[k]) >= wanted[k]
                   for k in collected) or time.monotonic() >= deadline:
                return collected
            time.sleep(POLL_INTERVAL)


def check_recording(recording, expected_events=EXPECTED_EVENTS):
    problems = []
    drops = [n for n in recording if n['event_type'] == DROPPED_EVENT_TYPE]
    if drops:
        problems.append('the unix socket reported drops: %s'
                        % [n.get('payload') for n in drops])
    last = {}
    for n in recording:
        sequence = n.get('sequence')
        if not isinstance(sequence, dict):
            continue
        source, number = sequence.get('source'), sequence.get('number')
        if source in last and number != last[source] + 1:
            problems.append('sequence of %s jumps from %s to %s'
                            % (source, last[source], number))
        last[source] = number
    seen = {n['event_type'] for n in recording}
    missing = [e for e in expected_events if e not in seen]
    if missing:
        problems.append('never recorded on the unix socket: %s (recorded: '
                        '%s)' % (', '.join(missing), ', '.join(sorted(seen))))
    return problems


def check_replicas(recording, rules, replicas):
    problems = []
    for rule in rules:
        wanted = expected_replicas(recording, rule)
        for exchange, queue in rule.queues:
            got = replicas[(exchange, queue)]
            where = 'replica queue %s (exchange %s, rule %s)' % (
                queue, exchange, rule.name)
            strays = collections.Counter(
                n['event_type'] for n in got
                if n['event_type'] not in rule.events)
            if strays:
                problems.append('%s: event types the rule does not select: '
                                '%s' % (where, dict(strays)))
            publishers = {n.get('publisher_id') for n in got}
            if rule.publisher_id and publishers - {rule.publisher_id}:
                problems.append('%s: publisher_id %s, expected %s'
                                % (where, sorted(map(str, publishers)),
                                   rule.publisher_id))
            counted = image_events(got, rule.events, {i for i, _ in wanted})
            if counted != wanted:
                problems.append('%s: missing %s; extra %s' % (
                    where, dict(wanted - counted), dict(counted - wanted)))
    return problems


def check(recording, rules, replicas, expected_events=EXPECTED_EVENTS):
    """Every problem found, as sentences; [] when all is well."""
    return (check_recording(recording, expected_events) +
            check_replicas(recording, rules, replicas))


def summary(recording, replicas):
    lines = ['unix socket: %d notifications: %s' % (
        len(recording), dict(collections.Counter(
            n['event_type'] for n in recording)))]
    for (exchange, queue), got in sorted(replicas.items()):
        lines.append('%s/%s: %d notifications: %s' % (
            exchange, queue, len(got), dict(collections.Counter(
                n['event_type'] for n in got))))
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--glance-api-conf', required=True)
    parser.add_argument('--recording', required=True,
                        help='NDJSON written by oslo-notify-tail --format '
                             'json during the run')
    parser.add_argument('--expect-event', action='append', metavar='TYPE',
                        help='an event type the run must have produced; '
                             'repeat for several (default: %s)'
                             % ', '.join(EXPECTED_EVENTS))
    parser.add_argument('--timeout', type=float, default=DEFAULT_TIMEOUT,
                        help='how long to wait for replicas (seconds)')
    args = parser.parse_args(argv)
    try:
        url, rules = load_config(args.glance_api_conf)
    except (ConfigError, OSError) as exc:
        print('cannot check: %s' % exc, file=sys.stderr)
        return 2
    recording, problems = read_recording(args.recording)
    replicas = collect_replicas(url, rules, recording, args.timeout)
    print(summary(recording, replicas))
    problems += check(recording, rules, replicas,
                      args.expect_event or EXPECTED_EVENTS)
    for problem in problems:
        print('FAIL: %s' % problem, file=sys.stderr)
    if not rules:
        print('FAIL: glance-api.conf configures no multicast rule',
              file=sys.stderr)
        return 1
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
