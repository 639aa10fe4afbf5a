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

"""Subscribe to the notifications a service relays with the unix driver.

Iterate over decoded notifications::

    from oslo_messaging_ext import unix_subscriber

    with unix_subscriber.Subscription('/run/glance/notifications.sock',
                                      reconnect=True) as subscription:
        for notification in subscription:
            print(notification['event_type'], notification['payload'])

or hand them to existing oslo.messaging notification endpoints, unchanged::

    dispatcher = unix_subscriber.EndpointDispatcher([MyEndpoint()])
    dispatcher.run(subscription)

What a subscriber did not receive is told two ways, which can describe
the same loss: the service reports what it dropped in-band, as
notifications of event_type :data:`DROPPED_EVENT_TYPE`
(:attr:`Subscription.dropped`), and each line carries its emitting
process's sequence number, so that a subscriber counts the gaps itself
(:attr:`Subscription.gaps`), across reconnections too.
:attr:`Subscription.missed` combines both, each loss once, by the rule of
:class:`GapCounter`.

This module imports oslo.messaging only when :class:`EndpointDispatcher` is
used, so that a reader that does not need it starts fast and quietly.
"""

import collections
import errno
import json
import logging
import os
import random
import re
import socket
import stat
import threading
import time

try:
    import orjson
except ImportError:  # the stdlib decoder is as correct, only slower
    orjson = None

from oslo_messaging_ext.notify import _unix_protocol

# EndpointDispatcher is defined by __getattr__ below.
__all__ = [  # noqa: F822
    'DROPPED_EVENT_TYPE', 'PRIORITIES', 'SubscriberError', 'SocketMissing',
    'SocketPermissionDenied', 'ServiceNotListening', 'NotASocket',
    'connect', 'Subscription', 'GapCounter', 'Gap', 'Waiting', 'Connected',
    'Disconnected', 'EndpointDispatcher',
]

LOG = logging.getLogger(__name__)

#: The event_type of the in-band notice of notifications the service
#: dropped for this subscriber; its payload's ``dropped`` says how many,
#: ``sources`` how many of them were lines of which source.
DROPPED_EVENT_TYPE = _unix_protocol.DROPPED_EVENT_TYPE
#: The priorities of oslo.messaging, in its order (lower case, as its
#: endpoints' method names; notifications carry them upper case).
PRIORITIES = ('audit', 'debug', 'info', 'warn', 'error', 'critical',
              'sample')
#: The key of the per-process sequence number of each notification line.
SEQUENCE_KEY = 'sequence'
# How the unix driver starts every line.
_STAMP = re.compile(
    rb'\{"sequence":\{"source":"([0-9a-f-]*)("?)(?:,"number":([0-9]+)\})?')


def __getattr__(name):
    # EndpointDispatcher subclasses oslo.messaging's dispatcher: load it
    # (and oslo.messaging) only for the programs that use it.
    if name == 'EndpointDispatcher':
        from oslo_messaging_ext import _endpoint_dispatcher
        return _endpoint_dispatcher.EndpointDispatcher
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | {'EndpointDispatcher'})


class SubscriberError(Exception):
    """Connecting to the socket failed; the message says why."""

    def __init__(self, path, reason, errno_=None):
        super().__init__(f'{path}: {reason}')
        self.path = path
        self.reason = reason
        self.errno = errno_


class SocketMissing(SubscriberError):
    """No socket at the path: the service is not running (yet)."""


class SocketPermissionDenied(SubscriberError):
    """The socket's mode or group does not let this user subscribe."""


class ServiceNotListening(SubscriberError):
    """A socket file exists but nothing listens: the service is down."""


class NotASocket(SubscriberError):
    """The path exists and is not a socket."""


_ERRORS = {
    errno.ENOENT: (SocketMissing, 'no such socket; is the service running '
                                  'with the unix notification driver?'),
    errno.EACCES: (SocketPermissionDenied,
                   'permission denied; subscribing needs write permission on '
                   'the socket (see sock_mode and sock_group)'),
    errno.EPERM: (SocketPermissionDenied, 'operation not permitted'),
    errno.ECONNREFUSED: (ServiceNotListening,
                         'connection refused; the socket is stale, the '
                         'service is not running'),
    errno.ENOTSOCK: (NotASocket, 'not a socket'),
    errno.ENOTDIR: (SocketMissing, 'a component of the path is not a '
                                   'directory'),
}
# Worth retrying while a service restarts.
_TRANSIENT = (SocketMissing, ServiceNotListening)


def _is_socket(path):
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return True


def connect(path, timeout=10.0):
    """Connect to ``path`` and return the connected, blocking socket.

    :raises SubscriberError: (a subclass saying what went wrong)
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        code = exc.errno
        # Linux refuses a connection to a regular file as to a stale socket.
        if code == errno.ECONNREFUSED and not _is_socket(path):
            code = errno.ENOTSOCK
        cls, reason = _ERRORS.get(code, (SubscriberError, None))
        raise cls(path, reason or exc.strerror or str(exc), code)
    return sock


def _identity(path):
    """What tells one socket file at ``path`` from the next, or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    # A service binds a new socket (a new inode, a new ctime) each time it
    # starts, and each time another of its processes takes over as hub.
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class Waiting(collections.namedtuple('Waiting', 'path reason')):
    """The subscription waits for its socket; reported once per wait.

    ``reason`` is the :class:`SubscriberError` of the first attempt.
    """

    __slots__ = ()


class Connected(collections.namedtuple('Connected',
                                       'path connection downtime')):
    """Connected; ``connection`` counts from 1.

    ``downtime`` is the seconds since the previous connection ended (None
    for the first one).
    """

    __slots__ = ()


class Disconnected(collections.namedtuple('Disconnected', 'path connection')):
    """The service closed the connection (it stopped, or its hub changed)."""

    __slots__ = ()


class Gap(collections.namedtuple(
        'Gap', 'source first last publisher_id reconnected before_first')):
    """Notifications ``first`` to ``last`` of ``source`` never received.

    ``publisher_id`` is that of the line that revealed the gap;
    ``reconnected`` says that the subscriber reconnected in between. With
    ``before_first``, the line is the first one received from its source,
    on a connection after the first: the process sent ``count``
    notifications before it, of which some may predate the subscription
    (so they are not in :attr:`GapCounter.gaps`).
    """

    __slots__ = ()

    @property
    def count(self):
        return self.last - self.first + 1


def dropped_payload(payload):
    """(count, {source: count}) of a decoded notice's payload, or None.

    None when the count is not a valid one or the sources not a dict;
    sources that are not valid or do not add up within the count are left
    out (all unattributed).
    """
    try:
        count = payload['dropped']
        sources = payload.get('sources') or {}
    except (KeyError, TypeError, AttributeError):
        return None
    if not _unix_protocol.valid_count(count) or not isinstance(sources, dict):
        return None
    if not all(isinstance(k, str) and _unix_protocol.valid_count(v) and v
               for k, v in sources.items()) or sum(sources.values()) > count:
        sources = {}
    return count, sources


class GapCounter:
    """Counts what was missed, from drop notices and sequence numbers.

    Each notification line of the unix driver carries ``"sequence":
    {"source": S, "number": N}``: ``S`` is unique to the emitting process
    (a new one after fork or restart) and ``N`` counts from 1 every
    notification that process was asked to send, delivered or not. Drop
    notices carry no sequence; their payload's ``dropped`` is the total
    and ``sources`` says how many of them were lines of which source (the
    rest is unattributed).

    A loss the service reported is also a gap as soon as its process
    sends another line that arrives; a loss nobody could report (while
    the subscriber was away, at a hub switch-over) is only a gap; a loss of
    a process that never sends again is only in a drop notice. The rule,
    kept across reconnections:

    * Per source, the last number seen and a *pending* count. A notice
      adds its per-source counts to pending, and the rest of its total to
      :attr:`unattributed`.
    * Two lines of one source numbered ``a`` then ``b`` are a gap of ``g =
      b - a - 1``: ``g`` is added to :attr:`gaps` and ``min(g, pending)``
      taken off that source's pending, as the gap counts them already.
    * :attr:`lost` = :attr:`gaps` + :attr:`pending` + :attr:`unattributed`.

    Nothing is known of a source before its first line: no gap is counted.
    On a connection after the first, :meth:`observe` still reports such a
    line's predecessors as a :class:`Gap` with ``before_first`` set (the
    process may have started while the subscriber was away), but they are
    not added to :attr:`gaps`. A line whose number is not above the last
    one of its source is ignored (it cannot happen with one service).
    """

    def __init__(self):
        #: Notifications missing between lines of one source.
        self.gaps = 0
        #: The totals of the valid drop notices, and :meth:`count_dropped`.
        self.dropped = 0
        #: Drops reported without a source (not in any gap).
        self.unattributed = 0
        self._last = {}
        self._pending = {}

    @property
    def pending(self):
        """Drops reported per source that no gap has shown (yet)."""
        return sum(self._pending.values())

    @property
    def lost(self):
        """Notifications missed, each counted once."""
        return self.gaps + self.pending + self.unattributed

    def count_dropped(self, count, sources=None):
        """Account for ``count`` drops, ``sources`` of them per source."""
        sources = sources or {}
        self.dropped += count
        self.unattributed += count - sum(sources.values())
        for source, number in sources.items():
            self._pending[source] = self._pending.get(source, 0) + number

    def count_cut(self, data):
        """Account for a line cut short by the end of a connection.

        Its sequence stamp comes first: the line is one missed of the only
        source the stamp can be (its next number, if the stamp was cut
        before its own), else an unattributed drop.
        """
        self.dropped += 1
        stamp = _STAMP.match(data)
        if stamp is not None:
            prefix, whole, number = stamp.groups()
            prefix = prefix.decode()
            known = [s for s in self._last
                     if s == prefix or (not whole and s.startswith(prefix))]
            if len(known) == 1 or (whole and number and not known):
                source = known[0] if known else prefix
                last, connection = self._last.get(source, (0, 1))
                self._last[source] = (max(last + 1, int(number or 0)),
                                      connection)
                self.gaps += 1
                return
        self.unattributed += 1

    def observe(self, notification, connection=1):
        """Account for one received notification or drop notice.

        :param connection: the number of the connection it arrived on
        :returns: a :class:`Gap` if notifications are missing before it,
            else None
        """
        if notification.get('event_type') == DROPPED_EVENT_TYPE:
            counts = dropped_payload(
                notification.get('payload'))
            if counts is None:
                LOG.warning('Ignoring a drop notice without a valid count: '
                            '%.200r', notification)
            else:
                self.count_dropped(*counts)
            return None
        sequence = notification.get(SEQUENCE_KEY)
        if not isinstance(sequence, dict):
            return None
        source, number = sequence.get('source'), sequence.get('number')
        if (not isinstance(source, str) or isinstance(number, bool) or
                not isinstance(number, int) or number < 1):
            return None
        seen = self._last.get(source)
        if seen is not None and number <= seen[0]:
            return None
        self._last[source] = (number, connection)
        publisher_id = notification.get('publisher_id')
        if seen is None:
            if connection > 1 and number > 1:
                return Gap(source, 1, number - 1, publisher_id, True, True)
            return None
        last, last_connection = seen
        if number == last + 1:
            return None
        gap = number - last - 1
        self.gaps += gap
        pending = self._pending.pop(source, 0)
        if pending > gap:
            self._pending[source] = pending - gap
        return Gap(source, last + 1, number - 1, publisher_id,
                   last_connection != connection, False)


class Subscription:
    """Notifications read from the socket of a service, in order.

    :param path: the service's ``sock_path``
    :param reconnect: when the service closes the connection (restart,
        crash) or is not there yet, connect again instead of ending the
        iteration
    :param min_backoff: first delay between attempts, in seconds
    :param max_backoff: longest delay between attempts, in seconds
    :param poll_interval: while waiting, how often to look at ``path``,
        in seconds: a new socket file there (the service started, or
        another of its processes took over) is connected to at once
    :param on_event: called, in the iterating thread, with a
        :class:`Waiting`, :class:`Connected`, :class:`Disconnected` or
        :class:`Gap` as they happen. A connection is reported (and counted
        in :attr:`connections`) once it has sent a line or stayed open for
        :attr:`SETTLE` seconds: a stopping hub accepts and closes at once.

    Iterating yields decoded notification dicts; :meth:`records` yields
    ``(line, notification)`` pairs, :meth:`lines` the raw lines (without
    counting drops or gaps). :meth:`close`, from any thread, ends the
    iteration.
    """

    #: Seconds a silent new connection must stay open to count as served.
    SETTLE = 0.25

    def __init__(self, path, reconnect=False, min_backoff=0.1,
                 max_backoff=5.0, poll_interval=0.1, on_event=None):
        self.path = path
        self.reconnect = reconnect
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.poll_interval = poll_interval
        self.on_event = on_event
        self.connections = 0
        self.connected = threading.Event()
        self.gap_counter = GapCounter()
        self._closed = threading.Event()
        self._sock = None
        self._disconnected_at = None
        self._connected_to = None
        self._backoff = min_backoff

    @property
    def dropped(self):
        """Drops the service reported for this subscriber, and cut lines.

        A line cut by the end of a connection counts as one drop, of its
        source if its sequence stamp (the first key) arrived whole.
        """
        return self.gap_counter.dropped

    @property
    def gaps(self):
        """Notifications missing between lines of one process."""
        return self.gap_counter.gaps

    @property
    def missed(self):
        """Notifications that never reached this subscriber.

        Drop notices and sequence gaps can describe the same loss; each is
        counted once, by the rule of :class:`GapCounter`.
        """
        return self.gap_counter.lost

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        self._closed.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _emit(self, event):
        if self.on_event is not None:
            self.on_event(event)

    def _connect(self, eager):
        """Connect, waiting as long as ``reconnect`` says; None if closed.

        ``eager``: try at once. Otherwise wait for a new socket file at the
        path, or the backoff, first, so as never to spin.
        """
        told = False
        identity = _identity(self.path)
        while not self._closed.is_set():
            if not eager:
                identity = self._wait_for_new_socket(identity,
                                                     self._backoff)
                self._backoff = min(self._backoff * 2, self.max_backoff)
            eager = False
            try:
                sock = connect(self.path)
            except _TRANSIENT as exc:
                if not self.reconnect:
                    raise
                if not told:
                    told = True
                    self._emit(Waiting(self.path, exc))
                continue
            self._sock = sock
            self._connected_to = _identity(self.path)
            self.connected.set()
            if self._closed.is_set():
                self._disconnect()
                return None
            return sock
        return None

    def _serving(self):
        """Count and report a connection that proved to be served."""
        self.connections += 1
        downtime = None
        if self._disconnected_at is not None:
            downtime = time.monotonic() - self._disconnected_at
        self._emit(Connected(self.path, self.connections, downtime))

    def _wait_for_new_socket(self, identity, delay):
        """Wait ``delay`` (with jitter), less if a new socket file appears.

        :returns: the identity of the socket file at the end of the wait
        """
        # Jitter spreads the subscribers of a restarted service; it is
        # no secret, so bandit's B311 does not apply.
        deadline = time.monotonic() + delay * random.uniform(  # nosec B311
            0.5, 1.0)
        while True:
            current = _identity(self.path)
            if current is not None and current != identity:
                return current
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed.wait(
                    min(self.poll_interval, remaining)):
                return current

    def _disconnect(self):
        self.connected.clear()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def lines(self):
        """Yield each line as bytes, without its newline."""
        eager = True
        while not self._closed.is_set():
            sock = self._connect(eager)
            if sock is None:
                return
            served = False
            pending = b''
            # A hub that is stopping may still accept, and close at once:
            # a connection counts (and is reported) once it has sent a
            # line or stayed open for SETTLE seconds.
            sock.settimeout(self.SETTLE)
            try:
                while True:
                    try:
                        data = sock.recv(_unix_protocol.READ_SIZE)
                    except TimeoutError:
                        served = True
                        self._serving()
                        sock.settimeout(None)
                        continue
                    except OSError:
                        data = b''
                    if not data:
                        break
                    if not served:
                        served = True
                        self._serving()
                        sock.settimeout(None)
                    chunks = (pending + data).split(b'\n')
                    pending = chunks.pop()
                    if any(chunks):
                        # A connection that serves resets the backoff.
                        self._backoff = self.min_backoff
                    for line in chunks:
                        if line:
                            yield line
                if pending:
                    # The service stopped while this reader was so far
                    # behind that it never read the end of a line.
                    self.gap_counter.count_cut(pending)
                    LOG.warning('%s: the connection ended inside a line '
                                '(%d bytes); counted as dropped',
                                self.path, len(pending))
            finally:
                self._disconnect()
                if served:
                    self._disconnected_at = time.monotonic()
            if self._closed.is_set():
                return
            if served:
                self._emit(Disconnected(self.path, self.connections))
            if not self.reconnect:
                return
            # At once only if the path names another socket already (a new
            # hub); the one that closed may be stopping, still accepting.
            eager = _identity(self.path) not in (None, self._connected_to)

    def records(self):
        """Yield ``(line, notification)``, counting drops and gaps.

        A line that is not a JSON object is logged and skipped.
        """
        for line in self.lines():
            try:
                notification = _decode(line)
            except ValueError:
                notification = None
            if not isinstance(notification, dict):
                LOG.warning('Skipping a line of %s that is not a JSON '
                            'object: %.80r', self.path, line)
                continue
            gap = self.gap_counter.observe(notification, self.connections)
            if gap is not None:
                self._emit(gap)
            yield line, notification

    def __iter__(self):
        for _line, notification in self.records():
            yield notification


def _decode(line):
    """Decode one line; orjson first, being about three times faster.

    The stdlib also reads what orjson refuses but the driver may send when
    it fell back to the stdlib encoder (NaN, for one).
    """
    if orjson is not None:
        try:
            return orjson.loads(line)
        except ValueError:
            pass
    return json.loads(line)
