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

"""Exact reports of what the multicast driver dropped, and fork safety.

A broker outage must not flood the service's log with one line per
notification, yet every ERROR line must carry the true count, per cause,
since the previous one, and a burst that ends must still be reported: the
first event of a quiet period is logged at once, the following ones are
counted and logged together REPORT_INTERVAL seconds after the previous
line by the process's monitor thread, and at once on cleanup() and at
exit.

Locks, conditions and threads do not survive a fork: a child may inherit
a lock another thread of its parent held. Every such object of the
driver lives in a ForkLocal, rebuilt in a child at its first use there.
"""

import logging
import os
import threading
import time
import weakref

# Logged under the driver's name, so that the level a service sets for the
# driver's logger covers all the driver logs, wherever its code lives.
LOG = logging.getLogger('oslo_messaging_ext.notify._impl_multicast')

REPORT_INTERVAL = 60.0
# How often the monitor thread looks at the lanes and the reports.
TICK = 0.5

# pid -> the lock that guards the rebuilding of ForkLocals in that process.
# dict.setdefault is atomic: a child makes its own, never takes one a
# thread of its parent may have held at the fork.
_process_locks = {}


def process_lock():
    pid = os.getpid()
    lock = _process_locks.get(pid)
    if lock is None:
        lock = _process_locks.setdefault(pid, threading.Lock())
    return lock


class ForkLocal:
    """A value made by ``factory`` once per process, at its first use."""

    __slots__ = ('_factory', '_pid', '_value')

    def __init__(self, factory):
        self._factory = factory
        self._pid = None
        self._value = None

    def get(self):
        pid = os.getpid()
        if self._pid != pid:
            with process_lock():
                if self._pid != pid:
                    self._value = self._factory()
                    self._pid = pid
        return self._value

    @property
    def current(self):
        """The value of this process, or None if it has none yet."""
        return self._value if self._pid == os.getpid() else None


class Reporter:
    """Counts events by cause and logs them at most once per interval.

    ``message`` is a %-format with ``count`` and ``cause`` keys: ``cause``
    is every cause since the previous line with its count.
    """

    def __init__(self, message):
        self.message = message
        self.params = {}
        self.total = 0
        self.by_cause = {}
        self._state = ForkLocal(_ReporterState)

    def report(self, params, counts, now=False):
        """Count events; log them unless logged recently.

        :param params: the line's other keys (the latest ones are logged)
        :param counts: {cause: count}
        :param now: log at once, whatever the interval
        """
        state = self._state.get()
        with state.lock:
            self.params = params
            for cause, count in counts.items():
                self.total += count
                self.by_cause[cause] = self.by_cause.get(cause, 0) + count
                state.unreported[cause] = (state.unreported.get(cause, 0) +
                                           count)
            moment = time.monotonic()
            if (not now and state.last is not None and
                    moment - state.last < REPORT_INTERVAL):
                watch(self)
                return
            line = self._take(state, moment)
        LOG.error(self.message, line)

    def _take(self, state, moment):
        counts = state.unreported
        state.unreported = {}
        state.last = moment
        if len(counts) == 1:
            # The usual case reads as before: "N replicas ...: cause".
            (cause, count), = counts.items()
            return dict(self.params, count=count, cause=cause)
        return dict(self.params, count=sum(counts.values()),
                    cause='; '.join('%d %s' % (n, cause)
                                    for cause, n in counts.items()))

    def tick(self, moment, force=False):
        """Log what is unreported once due (or now, with ``force``).

        :returns: whether something is left to report later
        """
        state = self._state.current
        if state is None:
            return False
        with state.lock:
            if not state.unreported:
                return False
            if not force and moment - state.last < REPORT_INTERVAL:
                return True
            line = self._take(state, moment)
        LOG.error(self.message, line)
        return False


class StatsLine:
    """Logs a broker's counters at INFO at most once per ``interval``.

    Only when they moved since the previous line, and whatever the
    interval with ``force`` (cleanup, exit).
    """

    def __init__(self, message, interval):
        self.message = message
        self.interval = interval
        self._last = time.monotonic()
        self._seen = None

    def log(self, stats, force=False):
        seen = (stats['published'], stats['dropped'], stats['pending'])
        moment = time.monotonic()
        if not force and (moment - self._last < self.interval or
                          seen == self._seen):
            return
        self._last, self._seen = moment, seen
        if seen == (0, 0, 0):
            return
        causes = ', '.join('%d %s' % (n, kind) for kind, n in
                           sorted(stats['dropped_by_cause'].items()))
        LOG.info(self.message, dict(stats, causes=causes and
                                    ' (%s)' % causes))


class _ReporterState:

    def __init__(self):
        self.lock = threading.Lock()
        self.unreported = {}
        self.last = None


class _MonitorState:

    def __init__(self):
        self.cond = threading.Condition(threading.Lock())
        # item -> how many times it was watched: an item watched again
        # while it ticked stays watched.
        self.watched = weakref.WeakKeyDictionary()
        self.thread = None


_monitor = ForkLocal(_MonitorState)


def watch(item):
    """Call ``item.tick(moment)`` every TICK until it returns False.

    One daemon thread per process does it, started at the first watch of
    the process and ended once nothing is watched.
    """
    state = _monitor.get()
    with state.cond:
        state.watched[item] = state.watched.get(item, 0) + 1
        if state.thread is None:
            state.thread = threading.Thread(
                target=_monitor_loop, args=(state,), daemon=True,
                name='messaging-multicast-monitor')
            state.thread.start()


def _monitor_loop(state):
    while True:
        with state.cond:
            items = list(state.watched.items())
            if not items:
                state.thread = None
                return
        moment = time.monotonic()
        for item, seen in items:
            try:
                keep = item.tick(moment)
            except Exception:
                LOG.exception('messaging-multicast monitor error')
                keep = False
            if not keep:
                with state.cond:
                    if state.watched.get(item) == seen:
                        del state.watched[item]
        with state.cond:
            state.cond.wait(TICK)
