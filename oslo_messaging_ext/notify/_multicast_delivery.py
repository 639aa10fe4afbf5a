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

"""How the ``messaging-multicast`` driver publishes replicas.

A Destination publishes the replicas of one target and reports its
failures; a FanoutWorker publishes them from a background thread when
``async_fanout`` is set; RuleTransports hands the rules the transports of
their brokers, shared by the drivers of a process.
"""

import logging
import os
import queue
import threading
import time
import uuid

import oslo_messaging
from oslo_utils import timeutils

# Logged under the driver's name, so that the level a service sets for the
# driver's logger covers all the driver logs, wherever its code lives.
LOG = logging.getLogger('oslo_messaging_ext.notify._impl_multicast')

# Failures and overflow are logged at most once per interval per cause, with
# the count since the previous report: a broker outage must not flood the
# service's log with one line per notification.
REPORT_INTERVAL = 60.0

# The fan-out worker shares the interpreter lock with the service: while
# the service has submitted replicas within BUSY_WINDOW seconds, the worker
# sleeps (at least BACKOFF seconds at a time) instead of competing with it,
# so that a burst of the service's calls is not slowed by the fan-out it
# caused. The deferral is bounded: a replica waits at most MAX_DEFER seconds
# for a lull, and none waits once the queue is half full, so under sustained
# load replicas are late by MAX_DEFER at most rather than indefinitely.
BUSY_WINDOW = 0.005
BACKOFF = 0.001
MAX_DEFER = 0.5


class _SharedTransport:
    """A rule transport, shared by the driver instances of a process.

    A service builds many Notifiers (glance about 14 a process), each
    loading its own driver: without sharing, each would open its own
    connections to a rule's broker.
    """

    def __init__(self, conf, transport):
        # Held so that the id(conf) in the key is not reused meanwhile.
        self.conf = conf
        self.transport = transport
        self.users = 0


# (id(conf), TransportURL) -> _SharedTransport
_shared_transports = {}
_shared_transports_lock = threading.Lock()


def _acquire_transport(conf, parsed_url, url):
    """Return (key, transport) for ``url``, made once per conf and broker."""
    key = (id(conf), parsed_url)
    with _shared_transports_lock:
        shared = _shared_transports.get(key)
        if shared is None:
            shared = _SharedTransport(
                conf, oslo_messaging.get_notification_transport(conf,
                                                                url=url))
            _shared_transports[key] = shared
        shared.users += 1
        return key, shared.transport


def _release_transport(key):
    """Drop a use of a shared transport; the last one cleans it up."""
    with _shared_transports_lock:
        shared = _shared_transports.get(key)
        if shared is None:
            return
        shared.users -= 1
        if shared.users > 0:
            return
        del _shared_transports[key]
    shared.transport.cleanup()


class RuleTransports:
    """The transports the rules of one driver publish on.

    A rule without transport_url, or whose URL names the notification
    transport's broker, publishes on the notification transport; any other
    broker's transport is shared with the other drivers of the process
    until release().
    """

    def __init__(self, conf, standard):
        self.conf = conf
        self.standard = standard
        self._standard_url = getattr(standard._driver, '_url', None)
        self._by_url = {}
        self._shared_keys = []

    def get(self, url):
        """The transport for ``url``: one per distinct broker and process."""
        if not url:
            return self.standard
        parsed = oslo_messaging.TransportURL.parse(self.conf, url)
        if parsed == self._standard_url:
            return self.standard
        if parsed not in self._by_url:
            key, transport = _acquire_transport(self.conf, parsed, url)
            self._by_url[parsed] = transport
            self._shared_keys.append(key)
        return self._by_url[parsed]

    def release(self):
        """Drop this driver's use of the shared transports."""
        while self._shared_keys:
            key = self._shared_keys.pop()
            try:
                _release_transport(key)
            except Exception:
                LOG.exception('messaging-multicast could not clean up a '
                              'transport')
        self._by_url.clear()


class Destination:
    """Where and how a replica is published."""

    def __init__(self, key, transport, exchange, topic, version, shape,
                 publisher_id, rule, label):
        self.key = key
        self.transport = transport
        self.exchange = exchange
        self.topic = topic
        self.version = version
        self.shape = shape
        self.publisher_id = publisher_id
        self.rule = rule
        self.label = label
        self.failures = _Reporter()

    def replica(self, original, event_key):
        if self.shape == 'onmcast':
            return {'message_id': str(uuid.uuid4()),
                    'publisher_id': self.publisher_id,
                    'event_type': event_key,
                    'priority': original['priority'],
                    'payload': original,
                    'timestamp': str(timeutils.utcnow())}
        replica = dict(original)
        if self.publisher_id:
            replica['publisher_id'] = self.publisher_id
        return replica

    def publish(self, ctxt, original, event_key, priority, retry):
        target = oslo_messaging.Target(
            topic=f'{self.topic}.{priority.lower()}',
            exchange=self.exchange)
        try:
            self.transport._send_notification(
                target, ctxt, self.replica(original, event_key),
                version=self.version, retry=retry)
        except Exception as exc:
            self.failures.report(
                'messaging-multicast could not publish replicas of rule '
                '%(rule)s to target %(target)s (%(count)d since the last '
                'report): %(error)s',
                {'rule': self.rule, 'target': self.label,
                 'error': f'{type(exc).__name__}: {exc}'})


class _Reporter:
    """Counts an event and logs it at most once per REPORT_INTERVAL."""

    def __init__(self):
        self.total = 0
        self._unreported = 0
        self._last = None
        self._lock = threading.Lock()

    def report(self, message, params, count=1):
        with self._lock:
            self.total += count
            self._unreported += count
            now = time.monotonic()
            if self._last is not None and now - self._last < REPORT_INTERVAL:
                LOG.debug(message, dict(params, count=self._unreported))
                return
            self._last = now
            params = dict(params, count=self._unreported)
            self._unreported = 0
        LOG.error(message, params)


class FanoutWorker:
    """A bounded queue of replicas and the daemon thread publishing them."""

    def __init__(self, maxsize, flush_timeout):
        self._maxsize = maxsize
        self._flush_timeout = flush_timeout
        self._lock = threading.Lock()
        self._queue = None
        self._thread = None
        self._pid = None
        # Replicas submitted and not yet published (or failed): what a
        # stop would lose.
        self._pending = 0
        self._last_submit = 0.0
        self.overflow = _Reporter()
        self.abandoned = _Reporter()

    def _ensure_started(self):
        # A forked child inherits the queue but not the thread: start anew.
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is not None and self._pid == os.getpid():
                return
            self._queue = queue.Queue(self._maxsize)
            self._pending = 0
            self._thread = threading.Thread(
                target=self._run, args=(self._queue,),
                name='messaging-multicast-fanout', daemon=True)
            self._pid = os.getpid()
            self._thread.start()

    def submit(self, jobs):
        self._ensure_started()
        now = self._last_submit = time.monotonic()
        for index, job in enumerate(jobs):
            with self._lock:
                self._pending += 1
            try:
                self._queue.put_nowait((now,) + job)
            except queue.Full:
                with self._lock:
                    self._pending -= 1
                self.overflow.report(
                    'messaging-multicast dropped %(count)d replicas since '
                    'the last report: the async_fanout queue is full '
                    '(async_queue_size = %(size)d)',
                    {'size': self._maxsize}, count=len(jobs) - index)
                return

    def _run(self, jobs):
        while True:
            job = jobs.get()
            if job is None:
                return
            if isinstance(job, threading.Event):
                job.set()
                continue
            (queued_at, destination, ctxt, original, event_key, priority,
             retry) = job
            self._yield_to_service(jobs, queued_at)
            try:
                destination.publish(ctxt, original, event_key, priority,
                                    retry)
            except Exception:
                LOG.exception('messaging-multicast fan-out worker error')
            finally:
                with self._lock:
                    self._pending -= 1

    def _yield_to_service(self, jobs, queued_at):
        while jobs.qsize() < self._maxsize // 2:
            now = time.monotonic()
            idle = now - self._last_submit
            waited = now - queued_at
            if idle >= BUSY_WINDOW or waited >= MAX_DEFER:
                return
            time.sleep(min(MAX_DEFER - waited,
                           max(BACKOFF, BUSY_WINDOW - idle)))

    def flush(self, stop=False):
        """Wait for queued replicas; return how many are still pending.

        With ``stop``, the worker ends and what it did not publish within
        the timeout is counted as dropped.
        """
        with self._lock:
            thread, jobs = self._thread, self._queue
            if thread is None or self._pid != os.getpid():
                return 0
            if stop:
                self._thread = None
        deadline = time.monotonic() + self._flush_timeout
        done = threading.Event()
        try:
            jobs.put(None if stop else done, timeout=self._flush_timeout)
        except queue.Full:
            pass
        remaining = max(0.0, deadline - time.monotonic())
        if stop:
            thread.join(remaining)
        else:
            done.wait(remaining)
        with self._lock:
            left = self._pending
        if stop and left:
            self.abandoned.report(
                'messaging-multicast dropped %(count)d queued replicas: '
                'not published within async_flush_timeout = %(timeout)s s',
                {'timeout': self._flush_timeout}, count=left)
        return left

    @property
    def dropped(self):
        return self.overflow.total + self.abandoned.total
