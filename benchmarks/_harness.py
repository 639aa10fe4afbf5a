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

"""Timing and reporting helpers shared by the benchmark modules."""

import gc
import statistics
import time

from oslo_config import cfg
import oslo_messaging

from oslo_messaging_ext import samples


def glance_payload():
    return samples.glance_upload_payload()


def make_notifier(driver, conf=None, transport_url='fake:/', topics=None):
    """Return (notifier, transport) for ``driver`` on its own ConfigOpts."""
    conf = conf if conf is not None else cfg.ConfigOpts()
    conf([], project='oslo-messaging-ext-bench')
    transport = oslo_messaging.get_notification_transport(
        conf, url=transport_url)
    notifier = oslo_messaging.Notifier(
        transport, publisher_id='image.localhost', driver=driver,
        topics=topics or ['notifications'])
    return notifier, transport


def time_calls(func, count, warmup=200):
    """Call ``func()`` ``count`` times; return per-call seconds, sorted."""
    for _ in range(warmup):
        func()
    timings = []
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(count):
            start = clock()
            func()
            timings.append(clock() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    timings.sort()
    return timings


def median(timings):
    return statistics.median(timings)


def percentile(sorted_timings, fraction):
    index = min(len(sorted_timings) - 1, int(len(sorted_timings) * fraction))
    return sorted_timings[index]


class Table(object):
    """Rows of (case, measured, reference, ratio, target, verdict)."""

    def __init__(self, title):
        self.title = title
        self.rows = []

    def add(self, case, value, unit, ratio=None, target=None, ok=None):
        self.rows.append((case, value, unit, ratio, target, ok))

    def render(self):
        lines = [self.title, '=' * len(self.title)]
        header = ('case', 'measured', 'ratio', 'target', 'verdict')
        body = []
        for case, value, unit, ratio, target, ok in self.rows:
            body.append((case, '%.3f %s' % (value, unit),
                         '' if ratio is None else '%.2fx' % ratio,
                         target or '',
                         '' if ok is None else ('ok' if ok else 'MISSED')))
        widths = [max(len(r[i]) for r in [header] + body)
                  for i in range(len(header))]
        fmt = '  '.join('%%-%ds' % w for w in widths)
        lines.append(fmt % header)
        lines.append(fmt % tuple('-' * w for w in widths))
        lines.extend(fmt % row for row in body)
        return '\n'.join(lines)

    def missed(self):
        return [row[0] for row in self.rows if row[5] is False]
