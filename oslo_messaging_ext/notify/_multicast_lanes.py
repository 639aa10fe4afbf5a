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

"""Per-broker lanes: where the multicast driver's replicas are published.

A Lane is one transport's queue and publisher thread, shared by every
driver of the process that publishes on that transport. The fate of a
replica is what happens to it:

* It is published once, in order, by the lane's thread; the service's
  call waits for it at most replica_timeout, and a publish still running
  then goes on in the background and counts as published if it lands.
* The caller does not wait for a lane whose current publish has already
  outlasted replica_timeout: its replicas queue behind it.
* A publish that raises trips its target's breaker; one that makes no
  progress for STUCK_AFTER seconds (connecting included) trips the
  broker's: what is queued and what comes during the backoff is dropped
  without any network attempt. A slow broker is never skipped.
* On the notification transport, the service's own broker, a sync
  replica is published on the service's thread while the lane is idle
  and healthy, with no handoff: a thread could not isolate the service
  from the broker its standard notification has just been sent to,
  synchronously and with the notifier's retry.
"""

import atexit
import collections
import threading
import time

from oslo_messaging_ext.notify import _multicast_report

LOG = _multicast_report.LOG

THREAD_PREFIX = 'messaging-multicast-'

# In async mode the publisher shares the interpreter lock with the
# service: while the service has submitted replicas within BUSY_WINDOW
# seconds, it sleeps (at least BACKOFF seconds at a time) instead of
# competing with it. A replica waits at most MAX_DEFER seconds for a lull,
# and none waits once the queue is half full.
BUSY_WINDOW = 0.005
BACKOFF = 0.001
MAX_DEFER = 0.5
# A publish that has not returned after this many seconds, the connection
# it may open included, means a failed broker.
STUCK_AFTER = 5.0
# The failure backoff doubles up to this factor.
MAX_BACKOFF_FACTOR = 16
# How often, at most, a lane logs its counters at INFO (when they moved).
STATS_INTERVAL = 600.0

DROP_MESSAGE = ('messaging-multicast dropped %(count)d replicas of rule '
                '%(rule)s to target %(target)s since the last report: '
                '%(cause)s')
STATS_MESSAGE = ('messaging-multicast broker %(broker)s: %(published)d '
                 'replicas published, %(dropped)d dropped%(causes)s, '
                 '%(pending)d pending, breaker %(breaker)s')


class Job:
    """One replica to publish to one destination."""

    __slots__ = ('destination', 'ctxt', 'original', 'event_key', 'priority',
                 'waiter', 'done')

    def __init__(self, destination, ctxt, original, event_key, priority):
        self.destination = destination
        self.ctxt = ctxt
        self.original = original
        self.event_key = event_key
        self.priority = priority
        self.waiter = None
        self.done = False


def drop_all(jobs, kind, cause, now=False):
    """Count ``jobs`` as dropped: one report per target, not per job."""
    drop_entries([(job, kind, cause) for job in jobs], now=now)


def drop_entries(entries, now=False):
    """Count (job, kind, cause) entries: one report per target."""
    by_target = {}
    for job, kind, cause in entries:
        destination, counts = by_target.setdefault(
            id(job.destination.state), (job.destination, {}))
        counts[kind, cause] = counts.get((kind, cause), 0) + 1
    for destination, counts in by_target.values():
        for (kind, _), count in counts.items():
            destination.lane.count_drop(kind, count)
        destination.failures.report(
            {'rule': destination.rule, 'target': destination.label},
            {cause: count for (_, cause), count in counts.items()}, now=now)


class Breaker:
    """Skip a target, or a broker, for a while after it failed."""

    __slots__ = ('open_until', 'failures')

    def __init__(self):
        self.open_until = 0.0
        self.failures = 0

    def is_open(self, moment):
        return moment < self.open_until

    def trip(self, backoff, moment):
        self.failures += 1
        factor = min(2 ** (self.failures - 1), MAX_BACKOFF_FACTOR)
        self.open_until = moment + backoff * factor

    def reset(self):
        self.failures = 0
        self.open_until = 0.0

    def describe(self, moment):
        if self.is_open(moment):
            return 'open for %.1f s' % (self.open_until - moment)
        return 'closed'


class TargetState:
    """What the lanes of a process know of one target of one broker."""

    def __init__(self):
        self.breaker = Breaker()
        self.failures = _multicast_report.Reporter(DROP_MESSAGE)


class Waiter:
    """A caller waiting for its replicas to one lane."""

    __slots__ = ('left', 'done')

    def __init__(self, count):
        self.left = count
        self.done = threading.Event()


class _State:
    """A lane's locks, queue, thread and counters in one process."""

    def __init__(self):
        # Reentrant: a driver collected while this thread holds it
        # releases its lanes.
        self.cond = threading.Condition(threading.RLock())
        self.queue = collections.deque()
        self.thread = None
        # When the publish in progress started, and its job.
        self.busy_since = None
        self.busy = None
        self.stuck_tripped = False
        self.maxsize = 0
        self.last_submit = 0.0
        self.watched = False
        self.published = 0
        self.dropped = collections.Counter()
        self.stats_line = _multicast_report.StatsLine(STATS_MESSAGE,
                                                      STATS_INTERVAL)


class Lane:
    """The queue and publisher thread of one transport."""

    def __init__(self, transport, label='', inline=False):
        self.transport = transport
        self.label = label
        self.inline = inline
        self.users = 0
        self.breaker = Breaker()
        self.flush_timeout = 0.0
        self._targets = {}
        self._stopped = False
        self._state = _multicast_report.ForkLocal(_State)

    def target_state(self, exchange, topic):
        with self._state.get().cond:
            return self._targets.setdefault((exchange, topic), TargetState())

    # Callers.

    def submit(self, jobs, maxsize, waiter=None):
        """Queue ``jobs``; return until when their waiter should wait."""
        st = self._state.get()
        refused = []
        with st.cond:
            now = st.last_submit = time.monotonic()
            st.maxsize = maxsize
            stuck = self._check_stuck(st, now)
            if self._stopped:
                refused = [('stopped', 'the driver was cleaned up', jobs)]
            elif self.breaker.is_open(now):
                refused = [('broker_failed', 'skipped: the broker made no '
                            'progress for %s s lately (circuit breaker '
                            'open)' % STUCK_AFTER, jobs)]
            else:
                idle = not st.queue
                room = max(0, maxsize - len(st.queue))
                for job in jobs[:room]:
                    job.waiter = waiter
                    st.queue.append((now, job))
                if room < len(jobs):
                    refused = [('queue_full', 'the queue of its broker is '
                                'full (async_queue_size = %d)' % maxsize,
                                jobs[room:])]
                if st.thread is None:
                    st.thread = threading.Thread(
                        target=self._publish_loop, args=(st,), daemon=True,
                        name=THREAD_PREFIX + 'publish')
                    st.thread.start()
                # A thread that yields to the service wakes by itself:
                # woken at each call, it would contend for the GIL.
                if idle or len(st.queue) >= maxsize // 2:
                    st.cond.notify_all()
            if waiter is not None:
                waiter.left -= sum(len(item[2]) for item in refused)
                if waiter.left <= 0:
                    waiter.done.set()
            cap = None
            if st.busy_since is not None:
                cap = st.busy_since + st.busy.destination.timeout
            self._watch(st)
        self._drop_stuck(stuck)
        for kind, cause, dropped in refused:
            drop_all(dropped, kind, cause)
        return cap

    def run(self, jobs, maxsize, started):
        """Publish ``jobs`` of a synchronous call; return what to wait for.

        :returns: (waiter, deadline) or None when nothing is left to wait
        """
        if self.inline:
            jobs = self._run_inline(jobs)
            if not jobs:
                return None
        waiter = Waiter(len(jobs))
        cap = self.submit(jobs, maxsize, waiter)
        deadline = started + max(job.destination.timeout for job in jobs)
        if cap is not None:
            # Behind a publish that is late already: do not wait for it.
            deadline = min(deadline, cap)
        return waiter, deadline

    def _run_inline(self, jobs):
        st = self._state.get()
        with st.cond:
            if (self._stopped or st.queue or st.busy is not None or
                    self.breaker.is_open(time.monotonic())):
                return jobs
            self._watch(st)
        # Other service threads may publish inline at the same time, each
        # on a connection of the transport's pool, as messagingv2 does.
        for job in jobs:
            self._publish(st, job)
        return []

    def _watch(self, st):
        # At the lane's first use in a process: the monitor's ticks, and
        # the report at exit.
        if not st.watched:
            st.watched = True
            _multicast_report.watch(self)
            _register_exit_handler()

    @staticmethod
    def wait(waiter, deadline):
        if waiter.left > 0:
            waiter.done.wait(max(0.0, deadline - time.monotonic()))

    # The publisher thread.

    def _publish_loop(self, st):
        while True:
            with st.cond:
                while not st.queue:
                    if self._stopped:
                        st.thread = None
                        return
                    st.cond.wait()
                if st.queue[0][1].waiter is None:
                    self._yield_to_service(st)
                _, job = st.queue.popleft()
                st.busy, st.busy_since = job, time.monotonic()
                st.stuck_tripped = False
            try:
                self._publish(st, job)
            except Exception:
                LOG.exception('messaging-multicast publisher error')
            finally:
                with st.cond:
                    st.busy = st.busy_since = None
                    st.cond.notify_all()

    def _yield_to_service(self, st):
        # Called with st.cond held; waiting releases it.
        while st.queue and len(st.queue) < st.maxsize // 2:
            moment = time.monotonic()
            idle = moment - st.last_submit
            waited = moment - st.queue[0][0]
            if idle >= BUSY_WINDOW or waited >= MAX_DEFER:
                return
            st.cond.wait(min(MAX_DEFER - waited,
                             max(BACKOFF, BUSY_WINDOW - idle)))

    def _publish(self, st, job):
        """Publish ``job`` unless its target is skipped; count its fate."""
        destination = job.destination
        breaker = destination.state.breaker
        error = None
        if breaker.is_open(time.monotonic()):
            error = ('breaker_open', 'skipped: the target failed recently '
                     '(circuit breaker open)')
        else:
            try:
                destination.send(job)
            except Exception as exc:
                error = ('publish_failed', 'publish failed: %s: %s'
                         % (type(exc).__name__, exc))
        with st.cond:
            if job.done:
                # Counted as dropped at exit while still in flight.
                return
            job.done = True
            if error is None:
                st.published += 1
                breaker.reset()
                self.breaker.reset()
            elif error[0] == 'publish_failed':
                breaker.trip(destination.backoff, time.monotonic())
            self._resolve(job)
        if error is not None:
            drop_all([job], *error)

    @staticmethod
    def _resolve(job):
        waiter = job.waiter
        if waiter is not None:
            waiter.left -= 1
            if waiter.left <= 0:
                waiter.done.set()

    def _check_stuck(self, st, now):
        """Trip the broker's breaker if its publish made no progress.

        Called with st.cond held: returns the queued jobs to drop with
        _drop_stuck once it is released.
        """
        if (st.busy_since is None or st.stuck_tripped or
                now - st.busy_since < STUCK_AFTER):
            return []
        st.stuck_tripped = True
        self.breaker.trip(st.busy.destination.backoff, now)
        return self._take_queued(st)

    @staticmethod
    def _drop_stuck(jobs):
        if jobs:
            drop_all(jobs, 'broker_failed', 'skipped: a publish to its '
                     'broker made no progress for %s s (circuit breaker '
                     'open)' % STUCK_AFTER)

    def _take_queued(self, st):
        left = []
        for _, job in st.queue:
            job.done = True
            self._resolve(job)
            left.append(job)
        st.queue.clear()
        return left

    # Counters, the monitor, flush and stop.

    def count_drop(self, kind, count):
        st = self._state.get()
        with st.cond:
            st.dropped[kind] += count

    def stats(self):
        """The counters of this lane in this process."""
        st = self._state.get()
        with st.cond:
            return {'broker': self.label, 'published': st.published,
                    'dropped': sum(st.dropped.values()),
                    'dropped_by_cause': dict(st.dropped),
                    'pending': len(st.queue) + (st.busy is not None),
                    'breaker': self.breaker.describe(time.monotonic())}

    def tick(self, moment):
        st = self._state.get()
        with st.cond:
            stuck = self._check_stuck(st, moment)
        self._drop_stuck(stuck)
        st.stats_line.log(self.stats())
        for target in list(self._targets.values()):
            target.failures.tick(moment)
        return self.users > 0

    def flush(self, deadline):
        """Wait until nothing is pending or ``deadline``; return the rest."""
        st = self._state.current
        if st is None:
            return 0
        stuck = []
        with st.cond:
            while st.queue or st.busy is not None:
                remaining = deadline - time.monotonic()
                stuck = self._check_stuck(st, time.monotonic())
                if stuck or (st.stuck_tripped and not st.queue):
                    # Not worth waiting for: a publish that is stuck.
                    break
                if remaining <= 0:
                    break
                st.cond.wait(min(remaining, _multicast_report.TICK))
            pending = len(st.queue) + (st.busy is not None)
        self._drop_stuck(stuck)
        return pending

    def discard(self, cause, now=False):
        """Drop what is still queued or in flight, counting it."""
        st = self._state.current
        if st is None:
            return
        with st.cond:
            left = self._take_queued(st)
            busy = st.busy
            if busy is not None and not busy.done:
                busy.done = True
                self._resolve(busy)
        entries = [(job, 'flush_timeout', cause) for job in left]
        if busy is not None:
            entries.append((busy, 'in_flight', cause + ' (still being '
                            'published: whether it lands is unknown)'))
        drop_entries(entries, now=now)

    def report_now(self):
        """Log every count not logged yet."""
        moment = time.monotonic()
        for target in list(self._targets.values()):
            target.failures.tick(moment, force=True)
        self._state.get().stats_line.log(self.stats(), force=True)

    def stop(self):
        """End the thread once what it was given is done."""
        self._stopped = True
        st = self._state.current
        if st is not None:
            with st.cond:
                st.cond.notify_all()


_registry = _multicast_report.ForkLocal(threading.Lock)
# id(transport) -> Lane
_lanes = {}
_exit_handler_registered = False


def acquire(transport, label='', inline=False):
    """The lane of ``transport``, counting one more user."""
    with _registry.get():
        lane = _lanes.get(id(transport))
        if lane is None:
            lane = _lanes[id(transport)] = Lane(transport, label, inline)
        lane.users += 1
        return lane


def release(lane, cause):
    """Count one user less; the last one ends the lane's thread.

    What is still pending then is dropped with ``cause`` (with a
    %(timeout)s key for the flush timeout) and logged at once, with every
    count not logged yet.
    """
    with _registry.get():
        lane.users -= 1
        if lane.users > 0:
            return
        if _lanes.get(id(lane.transport)) is lane:
            del _lanes[id(lane.transport)]
    _discard(lane, cause)
    lane.stop()


def _discard(lane, cause):
    lane.discard(cause % {'timeout': lane.flush_timeout}, now=True)
    lane.report_now()


def flush(lanes):
    """Wait for what ``lanes`` still publish; return what is left."""
    started = time.monotonic()
    return sum(lane.flush(started + lane.flush_timeout) for lane in lanes)


def _flush_at_exit():
    with _registry.get():
        lanes = list(_lanes.values())
    flush(lanes)
    for lane in lanes:
        _discard(lane, 'not published within async_flush_timeout = '
                 '%(timeout)s s at exit')


def _register_exit_handler():
    # One handler for the whole process, however many drivers it loads.
    global _exit_handler_registered
    if not _exit_handler_registered:
        _exit_handler_registered = True
        atexit.register(_flush_at_exit)
