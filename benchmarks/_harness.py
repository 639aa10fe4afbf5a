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
    conf.set_override('transport_url', transport_url)  # as a service's
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


class Comparison:
    """What :func:`compare` measured, in seconds per call, by name."""

    def __init__(self, medians, p99s, reference):
        self.reference = reference
        self._medians = medians
        self._p99s = p99s
        self.median = {name: median(v) for name, v in medians.items()}
        self.p99 = {name: median(v) for name, v in p99s.items()}

    def ratio(self, name, reference=None, p99=False):
        """Median over rounds of ``name``'s time over ``reference``'s."""
        series = self._p99s if p99 else self._medians
        return median([value / ref for value, ref in
                       zip(series[name], series[reference or
                                                self.reference])])


def compare(funcs, reference, count, block=1000, after_block=None):
    """Time each of ``funcs`` (name: callable) against ``funcs[reference]``.

    The calls run in short blocks, the functions taking turns in an order
    that rotates every round. Each ratio is the median over rounds of the
    ratio between blocks run one after the other: on a virtual machine
    whose speed jumps by half for a few hundred milliseconds at a time
    (seen here), whole-run medians of each function compare slow periods
    of one with fast periods of another, while neighbouring blocks share
    the period. ``after_block(name)``, if given, runs untimed after each
    block, and once after the warm-up.
    """
    names = list(funcs)
    for name in names:
        time_calls(funcs[name], 0)
        if after_block:
            after_block(name)
    medians = {name: [] for name in names}
    p99s = {name: [] for name in names}
    for round_number in range(max(1, count // block)):
        turn = round_number % len(names)
        for name in names[turn:] + names[:turn]:
            timings = time_calls(funcs[name], block, warmup=0)
            medians[name].append(median(timings))
            p99s[name].append(percentile(timings, 0.99))
            if after_block:
                after_block(name)
    return Comparison(medians, p99s, reference)


def median(timings):
    return statistics.median(timings)


def percentile(sorted_timings, fraction):
    index = min(len(sorted_timings) - 1, int(len(sorted_timings) * fraction))
    return sorted_timings[index]


class Table:
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
            shown = (str(value) if isinstance(value, int)
                     else f'{value:.3f}')
            body.append((case, f'{shown} {unit}',
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
