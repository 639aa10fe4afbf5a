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

"""The readable line of oslo-notify-tail: what a person scans for first.

Time (with its zone), priority, event type, publisher, then the payload as
``key=value`` pairs, the keys that identify the object first (``id``,
``name``, ``status``...) and the others in the order the service sent them,
so that a line cut at the terminal's width keeps what tells images apart.
"""

import datetime
import json

from oslo_messaging_ext import unix_subscriber

#: Payload keys shown first, in this order, when present: what names the
#: object (glance's id and name, nova's uuid and display_name), then its
#: state.
IDENTIFYING_KEYS = ('id', 'uuid', 'instance_id', 'resource_id', 'name',
                    'display_name', 'status', 'state')

# Spellings operators type, mapped to the priorities oslo.messaging uses.
_ALIASES = {'warning': 'warn', 'err': 'error', 'crit': 'critical',
            'fatal': 'critical'}

# SGR colours of the priorities: the levels a person must not miss stand
# out, routine ones stay plain.
_COLOURS = {'critical': '1;31', 'error': '31', 'warn': '33',
            'audit': '36', 'debug': '2', 'sample': '2'}
_RESET = '\x1b[0m'
# oslo.messaging stamps notifications with timeutils.utcnow().
_TIMESTAMP_FORMATS = ('%Y-%m-%d %H:%M:%S.%f', '%Y-%m-%d %H:%M:%S',
                      '%Y-%m-%dT%H:%M:%S.%f', '%Y-%m-%dT%H:%M:%S')


def canonical_priority(text):
    """The oslo.messaging priority ``text`` names, lower case, or None."""
    if not isinstance(text, str):
        return None
    name = text.strip().lower()
    name = _ALIASES.get(name, name)
    return name if name in unix_subscriber.PRIORITIES else None


def priority_spellings():
    """The accepted spellings, for a usage message."""
    extra = {}
    for alias, name in _ALIASES.items():
        extra.setdefault(name, []).append(alias)
    return ', '.join('{} ({})'.format(p, ', '.join(extra[p])) if p in extra
                     else p for p in unix_subscriber.PRIORITIES)


def format_time(timestamp, utc=False):
    """``timestamp`` (UTC, as oslo.messaging writes it) with its zone.

    In local time by default, as journalctl and oslo.log show it; what
    cannot be parsed is shown as it came.
    """
    if not isinstance(timestamp, str):
        return '-'
    for fmt in _TIMESTAMP_FORMATS:
        try:
            moment = datetime.datetime.strptime(timestamp, fmt)
            break
        except ValueError:
            continue
    else:
        return timestamp
    moment = moment.replace(tzinfo=datetime.timezone.utc)
    if not utc:
        moment = moment.astimezone()
    return '%s.%03d %s' % (moment.strftime('%Y-%m-%d %H:%M:%S'),
                           moment.microsecond // 1000, moment.tzname())


def _value(value):
    if isinstance(value, str) and value and not any(
            c.isspace() or c in '"=\\' for c in value):
        return value
    return json.dumps(value, separators=(',', ':'), ensure_ascii=False)


def _object_fields(payload):
    # Versioned notifications (nova, cinder...) wrap the fields of the
    # object as "<namespace>_object.data".
    for key, value in payload.items():
        if key.endswith('_object.data') and isinstance(value, dict):
            return value
    return payload


def format_payload(payload):
    """``key=value`` pairs, the identifying keys first."""
    if not isinstance(payload, dict):
        return _value(payload)
    fields = _object_fields(payload)
    keys = [k for k in IDENTIFYING_KEYS if k in fields]
    keys += [k for k in fields if k not in IDENTIFYING_KEYS]
    return ' '.join(f'{k}={_value(fields[k])}' for k in keys)


class LineFormatter:
    """Formats notifications for a person: one line each.

    :param width: cut lines to this many columns (a terminal's width)
    :param colour: colour the priority with ANSI escapes
    :param utc: show times in UTC rather than local time
    """

    def __init__(self, width=None, colour=False, utc=False,
                 ellipsis='...'):
        self.width = width
        self.colour = colour
        self.utc = utc
        self.ellipsis = ellipsis

    def format(self, notification):
        raw_priority = notification.get('priority')
        priority = canonical_priority(raw_priority)
        label = (priority or str(raw_priority or '-')).upper()
        time_text = format_time(notification.get('timestamp'), self.utc)
        head = '%s %-5s' % (time_text, label)
        line = '{} {} {} {}'.format(
            head, notification.get('event_type', '-'),
            notification.get('publisher_id', '-'),
            format_payload(notification.get('payload')))
        if self.width and len(line) > self.width:
            line = line[:max(self.width - len(self.ellipsis), 0)]
            line += self.ellipsis
        code = _COLOURS.get(priority)
        start = len(time_text) + 1
        if self.colour and code and len(line) >= start + len(label):
            line = '{}\x1b[{}m{}{}{}'.format(
                line[:start], code, label, _RESET, line[start + len(label):])
        return line


def format_line(notification, width=None):
    """One plain readable line (see :class:`LineFormatter`)."""
    return LineFormatter(width=width).format(notification)
