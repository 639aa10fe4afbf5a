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

"""oslo-notify-tail --stats: counts per event type and priority, and losses.

A reader thread counts what arrives; the table is drawn once per interval:
in place on a terminal (as top does), one table after the other otherwise
(for a log file).
"""

import collections
import datetime
import threading

from oslo_messaging_ext.cmd import _tail_format

# Rows beyond the terminal's height are summed into one, so that the table
# can always be redrawn in place.
_FOOTER_ROWS = 7
_LABELS = ('all notifications', 'dropped (reported)', 'in sequence gaps',
           'missed (total)')


def _clock():
    return datetime.datetime.now().astimezone().strftime('%H:%M:%S %Z')


class Stats:
    """What a subscription received, per interval and in total.

    ``add`` and the event handler run in the reader thread, ``table`` in
    the thread that draws it; a lock keeps each table consistent.
    """

    def __init__(self, subscription):
        self.subscription = subscription
        self.total = collections.Counter()
        self.recent = collections.Counter()
        self.status = 'connecting to %s' % subscription.path
        self.notes = collections.deque(maxlen=3)
        # The losses at the previous table: (dropped, gaps, missed).
        self._losses_seen = (0, 0, 0)
        self._lock = threading.Lock()

    def add(self, notification):
        priority = _tail_format.canonical_priority(
            notification.get('priority'))
        key = (str(notification.get('event_type', '-')),
               (priority or str(notification.get('priority'))).upper())
        with self._lock:
            self.total[key] += 1
            self.recent[key] += 1

    def note(self, text):
        """Keep a line about the connection, shown under the table."""
        with self._lock:
            self.notes.append(text)

    def set_status(self, text):
        with self._lock:
            self.status = text

    def table(self, interval, max_rows=None, width=None):
        """The table's lines; starts the next interval."""
        with self._lock:
            total, recent = self.total, self.recent
            self.recent = collections.Counter()
            losses = (self.subscription.dropped, self.subscription.gaps,
                      self.subscription.missed)
            new_losses = [now - before for now, before
                          in zip(losses, self._losses_seen)]
            self._losses_seen = losses
            notes = list(self.notes)
            status = self.status
        keys = sorted(total, key=lambda k: (-total[k], k))
        name_width = max([len(label) for label in _LABELS] +
                         [len(k[0]) for k in keys])
        row = '%%-%ds  %%-8s  %%9s  %%9s' % name_width
        lines = [f'{_clock()}  {status}',
                 row % ('EVENT TYPE', 'PRIORITY', 'TOTAL', 'PER SEC')]
        if max_rows is not None and len(keys) > max_rows:
            shown, rest = keys[:max(max_rows - 1, 0)], keys[max_rows - 1:]
        else:
            shown, rest = keys, []
        for key in shown:
            lines.append(row % (key[0], key[1], total[key],
                                _rate(recent[key], interval)))
        if rest:
            lines.append(row % ('(%d more)' % len(rest), '',
                                sum(total[k] for k in rest),
                                _rate(sum(recent[k] for k in rest),
                                      interval)))
        lines.append(row % (_LABELS[0], '', sum(total.values()),
                            _rate(sum(recent.values()), interval)))
        for label, count, new in zip(_LABELS[1:], losses, new_losses):
            lines.append(row % (label, '', count, _rate(new, interval)))
        lines.extend(notes)
        if width:
            lines = [line[:width] for line in lines]
        return lines


def _rate(count, interval):
    rate = count / interval
    return '%d' % rate if rate == int(rate) else '%.1f' % rate


class InPlaceDrawer:
    """Redraws the table over the previous one on a terminal."""

    def __init__(self, out):
        self.out = out
        self._drawn = 0

    def draw(self, lines):
        # Up to the first line of the previous table, then clear below.
        prefix = '\x1b[%dF\x1b[J' % self._drawn if self._drawn else ''
        self.out.write(prefix + '\n'.join(lines) + '\n')
        self.out.flush()
        self._drawn = len(lines)


class AppendingDrawer:
    """Prints one table per interval, a blank line between them."""

    def __init__(self, out):
        self.out = out

    def draw(self, lines):
        self.out.write('\n'.join(lines) + '\n\n')
        self.out.flush()


def max_rows(height):
    """How many event rows fit a terminal of ``height`` lines (0: any)."""
    if not height:
        return 0
    return max(height - _FOOTER_ROWS - 3, 1)
