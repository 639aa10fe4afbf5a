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

A Lane is one transport's publisher thread, shared by every driver of the
process that publishes on that transport and ended with its last user.
Publishing on a thread of its own is what bounds a replica: the caller
(the service's thread, or the lane's async feeder) waits for it at most
the rule's replica_timeout. A publish still running then is abandoned: it
runs on in the background while the lane is skipped, and the broker is
skipped until a backoff expires (a circuit breaker), each skip counted as
a drop of its target. A dead or hung broker thus never delays another
broker's replicas nor, beyond the bound, the service.

oslo.messaging's rabbit driver logs each failed connection attempt at
ERROR: on the lanes' threads those lines are demoted to DEBUG, the
driver's own count-carrying line saying what was lost; the standard
notification's lines are untouched.
"""

import atexit
import collections
import logging
import os
import queue
import threading
import time

from oslo_messaging_ext.notify import _multicast_report

LOG = _multicast_report.LOG

THREAD_PREFIX = 'messaging-multicast-'

# The async feeder shares the interpreter lock with the service: while
# the service has submitted replicas within BUSY_WINDOW seconds, it sleeps
# (at least BACKOFF seconds at a time) instead of competing with it, so
# that a burst of the service's calls is not slowed by the fan-out it
# caused. A replica waits at most MAX_DEFER seconds for a lull, and none
# waits once the queue is half full.
BUSY_WINDOW = 0.005
BACKOFF = 0.001
MAX_DEFER = 0.5
# Replicas a feeder hands to the publisher at once.
FEED_BATCH = 64
# The failure backoff doubles up to this factor.
MAX_BACKOFF_FACTOR = 16

DROP_MESSAGE = ('messaging-multicast dropped %(count)d replicas of rule '
                '%(rule)s to target %(target)s since the last report: '
                '%(cause)s')


class Job:
    """One replica to publish to one destination."""

    __slots__ = ('destination', 'ctxt', 'original', 'event_key', 'priority')

    def __init__(self, destination, ctxt, original, event_key, priority):
        self.destination = destination
        self.ctxt = ctxt
        self.original = original
        self.event_key = event_key
        self.priority = priority

    def drop(self, cause, now=False):
        drop_all([self], cause, now=now)


def drop_all(jobs, cause, now=False):
    """Count ``jobs`` as dropped: one report per target, not per job."""
    by_target = {}
    for job in jobs:
        entry = by_target.setdefault(id(job.destination.state),
                                     [job.destination, 0])
        entry[1] += 1
    for destination, count in by_target.values():
        destination.failures.report(
            {'rule': destination.rule, 'target': destination.label,
             'cause': cause}, count=count, now=now)


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


class TargetState:
    """What the lanes of a process know of one target of one broker."""

    def __init__(self):
        self.breaker = Breaker()
        self.failures = _multicast_report.Reporter(DROP_MESSAGE)


class _Batch:
    """Jobs the publisher runs in order, and who waits for them."""

    __slots__ = ('jobs', 'done', 'resolved', 'abandoned')

    def __init__(self, jobs):
        self.jobs = jobs
        self.done = threading.Event()
        # Jobs before this index have been published or dropped.
        self.resolved = 0
        self.abandoned = False

    @property
    def timeout(self):
        return max(job.destination.timeout for job in self.jobs)


class Lane:
    """The publisher thread of one transport, shared in the process."""

    def __init__(self, transport):
        self.transport = transport
        self.users = 0
        self.breaker = Breaker()
        self._targets = {}
        self._lock = threading.Lock()
        self._pid = None
        self._inbox = None
        # The abandoned batch the publisher is still running, if any.
        self._stuck = None
        self._feed = None
        self._stopped = False

    def target_state(self, exchange, topic):
        with self._lock:
            return self._targets.setdefault((exchange, topic), TargetState())

    # The publisher thread.

    def _ensure_started(self):
        # A forked child inherits the lane but not its thread: start anew.
        if self._pid == os.getpid():
            return True
        with self._lock:
            if self._pid == os.getpid():
                return True
            if self._stopped:
                return False
            self._inbox = queue.SimpleQueue()
            self._stuck = None
            threading.Thread(target=self._publish_loop, args=(self._inbox,),
                             name=THREAD_PREFIX + 'publish',
                             daemon=True).start()
            if self._feed is not None:
                self._feed.restart()
            self._pid = os.getpid()
            return True

    def _publish_loop(self, inbox):
        while True:
            batch = inbox.get()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception:
                LOG.exception('messaging-multicast publisher error')
            finally:
                batch.done.set()

    def _run(self, batch):
        for index, job in enumerate(batch.jobs):
            if batch.abandoned:
                # Its waiter gave up before the publisher reached it.
                with self._lock:
                    if self._stuck is batch:
                        self._stuck = None
                return
            destination = job.destination
            if destination.state.breaker.is_open(time.monotonic()):
                error = None
            else:
                try:
                    destination.send(job)
                    error = False
                except Exception as exc:
                    error = f'{type(exc).__name__}: {exc}'
            with self._lock:
                if batch.abandoned:
                    # The waiter counted this job and the rest as dropped.
                    if self._stuck is batch:
                        self._stuck = None
                    return
                batch.resolved = index + 1
                moment = time.monotonic()
                if error is False:
                    destination.state.breaker.reset()
                    self.breaker.reset()
                elif error:
                    destination.state.breaker.trip(destination.backoff,
                                                   moment)
            if error is None:
                job.drop('skipped: the target failed recently (circuit '
                         'breaker open)')
            elif error:
                job.drop('publish failed: %s' % error)

    # Callers.

    def start(self, jobs):
        """Hand ``jobs`` to the publisher; return the batch to wait for.

        Jobs of a broker that did not answer lately, or whose publisher is
        still busy with an abandoned publish, are dropped at once, without
        any network attempt. Returns None when no job is left.
        """
        if not jobs:
            return None
        started = self._ensure_started()
        with self._lock:
            cause = None
            if not started:
                cause = 'the driver was cleaned up'
            elif self._stuck is not None:
                cause = ('skipped: a publish to this broker abandoned '
                         'after replica_timeout is still running')
            elif self.breaker.is_open(time.monotonic()):
                cause = ('skipped: the broker did not answer within '
                         'replica_timeout lately (circuit breaker open)')
        if cause is not None:
            drop_all(jobs, cause)
            return None
        batch = _Batch(jobs)
        self._inbox.put(batch)
        return batch

    def finish(self, batch, deadline):
        """Wait for ``batch`` until ``deadline``; abandon it then."""
        if not batch.done.wait(max(0.0, deadline - time.monotonic())):
            drop_all(self.abandon(batch),
                     'not published within replica_timeout = %s s (the '
                     'broker is skipped for a while)' % batch.timeout)

    def abandon(self, batch):
        """Give up ``batch``; return its jobs not published, to drop.

        The publish in flight runs on in the background; until it ends,
        the lane's replicas are dropped without an attempt, and the broker
        is skipped for its failure backoff.
        """
        with self._lock:
            if (batch.abandoned or batch.done.is_set() or
                    batch.resolved == len(batch.jobs)):
                return []
            batch.abandoned = True
            left = batch.jobs[batch.resolved:]
            self._stuck = batch
            self.breaker.trip(left[0].destination.backoff, time.monotonic())
        return left

    def run(self, jobs):
        """Publish ``jobs``, waiting at most their largest timeout."""
        batch = self.start(jobs)
        if batch is not None:
            self.finish(batch, time.monotonic() + batch.timeout)

    def enqueue(self, jobs, settings):
        """Queue ``jobs`` for the async feeder of this lane."""
        if not self._ensure_started():
            drop_all(jobs, 'the driver was cleaned up')
            return
        feed = self._feed
        if feed is None:
            with self._lock:
                if self._feed is None:
                    self._feed = _Feed(self, *settings)
                    self._feed.restart()
                    _register_exit_handler()
                feed = self._feed
        feed.submit(jobs)

    @property
    def feed(self):
        return self._feed

    def stop(self):
        """End the threads once what they were given is done."""
        with self._lock:
            self._stopped = True
            inbox, feed = self._inbox, self._feed
        if feed is not None:
            feed.discard('not published within async_flush_timeout = %s s'
                         % feed.flush_timeout)
            feed.stop()
        if inbox is not None:
            inbox.put(None)


class _Feed:
    """The async queue of a lane and the thread that feeds its publisher."""

    def __init__(self, lane, maxsize, flush_timeout):
        self.lane = lane
        self.maxsize = maxsize
        self.flush_timeout = flush_timeout
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self.pending = 0
        self._last_submit = 0.0
        self._pid = None
        # The batch the feeder waits for, abandoned by a stop.
        self._current = None

    def restart(self):
        with self._cond:
            self._queue.clear()
            self.pending = 0
            self._pid = os.getpid()
        threading.Thread(target=self._feed_loop,
                         name=THREAD_PREFIX + 'fanout', daemon=True).start()

    def submit(self, jobs):
        moment = self._last_submit = time.monotonic()
        with self._cond:
            room = self.maxsize - len(self._queue)
            accepted = jobs[:room] if room < len(jobs) else jobs
            for job in accepted:
                self._queue.append((moment, job))
            self.pending += len(accepted)
            self._cond.notify_all()
        if len(accepted) < len(jobs):
            drop_all(jobs[len(accepted):],
                     'the async_fanout queue of its broker is full '
                     '(async_queue_size = %d)' % self.maxsize)

    def _feed_loop(self):
        lane = self.lane
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                if self._queue[0] is None:
                    return
                queued_at = self._queue[0][0]
            self._yield_to_service(queued_at)
            with self._cond:
                jobs = []
                while (self._queue and self._queue[0] is not None and
                       len(jobs) < FEED_BATCH):
                    jobs.append(self._queue.popleft()[1])
            try:
                batch = lane.start(jobs)
                if batch is not None:
                    self._current = batch
                    lane.finish(batch, time.monotonic() + batch.timeout)
            except Exception:
                LOG.exception('messaging-multicast fan-out error')
            finally:
                with self._cond:
                    self._current = None
                    self.pending -= len(jobs)
                    self._cond.notify_all()

    def _yield_to_service(self, queued_at):
        while len(self._queue) < self.maxsize // 2:
            moment = time.monotonic()
            idle = moment - self._last_submit
            waited = moment - queued_at
            if idle >= BUSY_WINDOW or waited >= MAX_DEFER:
                return
            time.sleep(min(MAX_DEFER - waited,
                           max(BACKOFF, BUSY_WINDOW - idle)))

    def flush(self, deadline):
        """Wait until nothing is pending or ``deadline``; return the rest."""
        with self._cond:
            if self._pid != os.getpid():
                return 0
            while self.pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self.pending

    def discard(self, cause, now=False):
        """Drop what is still queued or in flight, counting it."""
        with self._cond:
            if self._pid != os.getpid():
                return
            left = [item[1] for item in self._queue if item is not None]
            self._queue = collections.deque(
                item for item in self._queue if item is None)
            self.pending -= len(left)
            current = self._current
            self._cond.notify_all()
        if current is not None:
            left = self.lane.abandon(current) + left
        drop_all(left, cause, now=now)

    def stop(self):
        with self._cond:
            self._queue.append(None)
            self._cond.notify_all()


# id(transport) -> Lane
_lanes = {}
_lanes_lock = threading.Lock()
_exit_handler_registered = False


def acquire(transport):
    """The lane of ``transport``, counting one more user."""
    with _lanes_lock:
        lane = _lanes.get(id(transport))
        if lane is None:
            lane = _lanes[id(transport)] = Lane(transport)
            _quiet_replica_driver_logs()
        lane.users += 1
        return lane


def release(lane):
    """Count one user less; the last one ends the lane's threads."""
    with _lanes_lock:
        lane.users -= 1
        if lane.users > 0:
            return
        if _lanes.get(id(lane.transport)) is lane:
            del _lanes[id(lane.transport)]
    lane.stop()


def flush_feeds(lanes, stop=False, at_exit=False):
    """Wait for the async queues of ``lanes``; return what is left.

    With ``stop``, what is still queued after async_flush_timeout is
    dropped and reported (at once ``at_exit``).
    """
    feeds = [lane.feed for lane in lanes if lane.feed is not None]
    if not feeds:
        return 0
    started = time.monotonic()
    left = 0
    for feed in feeds:
        left += feed.flush(started + feed.flush_timeout)
        if stop:
            feed.discard('not published within async_flush_timeout = %s s%s'
                         % (feed.flush_timeout,
                            ' at exit' if at_exit else ''), now=at_exit)
    return left


def _flush_at_exit():
    with _lanes_lock:
        lanes = list(_lanes.values())
    flush_feeds(lanes, stop=True, at_exit=True)


def _register_exit_handler():
    # One handler for the whole process, however many drivers it loads.
    global _exit_handler_registered
    with _lanes_lock:
        if not _exit_handler_registered:
            atexit.register(_flush_at_exit)
            _exit_handler_registered = True


class _ReplicaThreadFilter(logging.Filter):
    """Demote the transport's ERROR and WARNING lines of replica threads."""

    def filter(self, record):
        if (record.levelno > logging.DEBUG and
                threading.current_thread().name.startswith(THREAD_PREFIX)):
            record.levelno, record.levelname = logging.DEBUG, 'DEBUG'
        return True


_replica_filter = _ReplicaThreadFilter()
# The loggers oslo.messaging's AMQP drivers report connection failures on
# (oslo.log names the loggers of oslo_* modules oslo.*).
_TRANSPORT_LOGGERS = ('oslo.messaging._drivers.impl_rabbit',
                      'oslo.messaging._drivers.amqpdriver')


def _quiet_replica_driver_logs():
    for name in _TRANSPORT_LOGGERS:
        logger = logging.getLogger(name)
        if _replica_filter not in logger.filters:
            logger.addFilter(_replica_filter)
