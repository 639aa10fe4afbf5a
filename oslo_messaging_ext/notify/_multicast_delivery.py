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

A Destination publishes the replicas of one target; a Fanout hands a
driver's replicas to the per-broker lanes of the process (see
_multicast_lanes), waiting for them at most the rules' replica_timeout,
or not at all with async_fanout; RuleTransports hands the rules the
transports of their brokers, shared by the drivers of a process.
"""

import threading
import time
import uuid
import weakref

import oslo_messaging
from oslo_utils import timeutils

from oslo_messaging_ext.notify import _multicast_lanes
from oslo_messaging_ext.notify import _multicast_opts
from oslo_messaging_ext.notify import _multicast_report

LOG = _multicast_report.LOG


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
_shared_transports_lock = _multicast_report.ForkLocal(threading.Lock)


def _acquire_transport(conf, parsed_url, url):
    """Return (key, transport) for ``url``, made once per conf and broker."""
    key = (id(conf), parsed_url)
    with _shared_transports_lock.get():
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
    with _shared_transports_lock.get():
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
        # What get_notification_transport() read (a Transport does not
        # say which URL it was given); parse() falls back, as it does, to
        # [DEFAULT] transport_url.
        url = _multicast_opts.option(conf, 'oslo_messaging_notifications',
                                     'transport_url')
        try:
            self.standard_url = oslo_messaging.TransportURL.parse(conf, url)
        except oslo_messaging.InvalidTransportURL:
            self.standard_url = None  # the notifier cannot use it either
        self._by_url = {}
        self._shared_keys = []
        # id(transport) -> the broker's host:port, for the counters' lines.
        self.labels = {id(standard): 'notification transport'}

    def get(self, url):
        """The transport for ``url``: one per distinct broker and process."""
        if not url:
            return self.standard
        parsed = oslo_messaging.TransportURL.parse(self.conf, url)
        if parsed == self.standard_url:
            return self.standard
        if parsed not in self._by_url:
            key, transport = _acquire_transport(self.conf, parsed, url)
            self._by_url[parsed] = transport
            self._shared_keys.append(key)
            self.labels[id(transport)] = ','.join(
                (host.hostname or '') + (':%s' % host.port if host.port
                                         else '')
                for host in parsed.hosts) or url.split('://')[0]
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

    # Defaults of the rule delivery options, for onmcast's targets.
    _defaults = {opt.name: opt.default for opt in _multicast_opts.rule_opts}

    def __init__(self, key, transport, exchange, topic, version, shape,
                 publisher_id, rule, label,
                 timeout=_defaults['replica_timeout'],
                 retry=_defaults['replica_retry'],
                 backoff=_defaults['failure_backoff']):
        self.key = key
        self.transport = transport
        self.exchange = exchange
        self.topic = topic
        self.version = version
        self.shape = shape
        self.publisher_id = publisher_id
        self.rule = rule
        self.label = label
        self.timeout = timeout
        self.retry = retry
        self.backoff = backoff
        # Set by bind(): the breaker and drop count of this target, shared
        # with the other drivers of the process.
        self.state = None
        self.lane = None

    def bind(self, lane):
        self.state = lane.target_state(self.exchange, self.topic)

    @property
    def failures(self):
        """The Reporter counting the replicas of this target dropped."""
        return self.state.failures

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

    def send(self, job):
        """Publish the replica of ``job``; raise if the transport fails."""
        target = oslo_messaging.Target(
            topic=f'{self.topic}.{job.priority.lower()}',
            exchange=self.exchange)
        self.transport._send_notification(
            target, job.ctxt, self.replica(job.original, job.event_key),
            version=self.version, retry=self.retry)


class Fanout:
    """A driver's replicas, handed to the lanes of their brokers.

    Synchronously, every lane is given its replicas and then the call
    waits for them at most the largest replica_timeout of the replicas;
    with async_fanout, the call does not wait.
    """

    def __init__(self, destinations, queue_size, flush_timeout,
                 async_fanout=False, standard=None, labels=None):
        self._async = async_fanout
        self._queue_size = queue_size
        lanes = {}
        for destination in destinations:
            transport = destination.transport
            lane = lanes.get(id(transport))
            if lane is None:
                lane = lanes[id(transport)] = _multicast_lanes.acquire(
                    transport, (labels or {}).get(id(transport), 'default'),
                    inline=transport is standard)
                lane.flush_timeout = max(lane.flush_timeout, flush_timeout)
            destination.lane = lane
            destination.bind(lane)
        self._lanes = list(lanes.values())
        self._destinations = list(destinations)
        # Drivers a service drops without cleanup() give their lanes back
        # when collected.
        self._release = weakref.finalize(self, _release_lanes, self._lanes)
        # At exit, the lanes' own handler flushes and reports them.
        self._release.atexit = False

    def publish(self, jobs):
        if len(self._lanes) == 1:
            by_lane = {self._lanes[0]: jobs}
        else:
            by_lane = {}
            for job in jobs:
                by_lane.setdefault(job.destination.lane, []).append(job)
        if self._async:
            for lane, lane_jobs in by_lane.items():
                lane.submit(lane_jobs, self._queue_size)
            return
        started = time.monotonic()
        # The other brokers' lanes get their replicas before the
        # notification broker's are published on this thread.
        waits = [lane.run(lane_jobs, self._queue_size, started)
                 for lane, lane_jobs in sorted(
                     by_lane.items(), key=lambda item: item[0].inline)]
        for wait in waits:
            if wait is not None:
                _multicast_lanes.Lane.wait(*wait)

    @property
    def dropped(self):
        """Replicas of this driver's targets dropped in the process."""
        states = {id(d.state): d.state for d in self._destinations}
        return sum(state.failures.total for state in states.values())

    @property
    def pending(self):
        """Replicas queued for, or being published by, the lanes."""
        return sum(lane.stats()['pending'] for lane in self._lanes)

    def stats(self):
        """The counters of this driver's brokers in the process."""
        return [lane.stats() for lane in self._lanes]

    def flush(self):
        return _multicast_lanes.flush(self._lanes)

    def close(self):
        """Wait for the lanes, then give them back.

        The last driver of a lane drops and logs what is still pending.
        """
        if not self._release.alive:
            return
        self._release.detach()
        _multicast_lanes.flush(self._lanes)
        _release_lanes(self._lanes, 'not published within '
                       'async_flush_timeout = %(timeout)s s at cleanup')


def _release_lanes(lanes, cause='pending when its last driver was '
                   'garbage-collected without cleanup()'):
    for lane in lanes:
        _multicast_lanes.release(lane, cause)
