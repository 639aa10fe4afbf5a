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

A gap (notifications the service dropped because this subscriber did not
keep up) arrives in-band as a notification of event_type
:data:`DROPPED_EVENT_TYPE`; :attr:`Subscription.dropped` sums them.
"""

import errno
import json
import logging
import os
import random
import socket
import stat
import threading

try:
    import orjson
except ImportError:  # the stdlib decoder is as correct, only slower
    orjson = None

from oslo_messaging.notify import dispatcher as notify_dispatcher

from oslo_messaging_ext.notify import _unix_protocol

LOG = logging.getLogger(__name__)

#: The event_type of the in-band notice of notifications the service
#: dropped for this subscriber; its payload's ``dropped`` says how many.
DROPPED_EVENT_TYPE = _unix_protocol.DROPPED_EVENT_TYPE
PRIORITIES = tuple(notify_dispatcher.PRIORITIES)


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


class Subscription:
    """Notifications read from the socket of a service, in order.

    :param path: the service's ``sock_path``
    :param reconnect: when the service closes the connection (restart,
        crash) or is not there yet, connect again with exponential backoff
        instead of ending the iteration
    :param min_backoff: first delay between attempts, in seconds
    :param max_backoff: longest delay between attempts, in seconds

    Iterating yields decoded notification dicts; :meth:`lines` yields the
    raw lines. :meth:`close`, from any thread, ends the iteration.
    """

    def __init__(self, path, reconnect=False, min_backoff=0.1,
                 max_backoff=5.0):
        self.path = path
        self.reconnect = reconnect
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.dropped = 0
        self.connections = 0
        self.connected = threading.Event()
        self._closed = threading.Event()
        self._sock = None

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

    def _connect(self):
        delay = self.min_backoff
        while not self._closed.is_set():
            try:
                sock = connect(self.path)
            except _TRANSIENT:
                if not self.reconnect:
                    raise
            else:
                self._sock = sock
                self.connections += 1
                self.connected.set()
                if self._closed.is_set():
                    self._disconnect()
                    return None
                return sock
            # Jitter spreads the subscribers of a restarted service; it is
            # no secret, so bandit's B311 does not apply.
            self._closed.wait(
                delay * random.uniform(0.5, 1.0))  # nosec B311
            delay = min(delay * 2, self.max_backoff)
        return None

    def _disconnect(self):
        self.connected.clear()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def lines(self):
        """Yield each line as bytes, without its newline."""
        while not self._closed.is_set():
            sock = self._connect()
            if sock is None:
                return
            pending = b''
            try:
                while True:
                    try:
                        data = sock.recv(_unix_protocol.READ_SIZE)
                    except OSError:
                        data = b''
                    if not data:
                        break
                    chunks = (pending + data).split(b'\n')
                    pending = chunks.pop()
                    for line in chunks:
                        if line:
                            yield line
                if pending:
                    # The service stopped while this reader was so far
                    # behind that it never read the end of a line.
                    self.dropped += 1
                    LOG.warning('%s: the connection ended inside a line '
                                '(%d bytes); counted as dropped',
                                self.path, len(pending))
            finally:
                self._disconnect()
            if not self.reconnect:
                return

    def __iter__(self):
        for line in self.lines():
            try:
                notification = _decode(line)
            except ValueError:
                LOG.warning('Skipping a line of %s that is not JSON: %.80r',
                            self.path, line)
                continue
            if notification.get('event_type') == DROPPED_EVENT_TYPE:
                self.dropped += (notification.get('payload') or {}).get(
                    'dropped', 0)
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


class _Incoming:
    """A decoded notification, as NotificationDispatcher reads a message."""

    __slots__ = ('ctxt', 'message')

    def __init__(self, notification):
        self.ctxt = notification.get('context') or {}
        self.message = notification


class EndpointDispatcher(notify_dispatcher.NotificationDispatcher):
    """Call oslo.messaging notification endpoints, as a listener would.

    An endpoint has a method per priority it handles (``info``, ``warn``,
    ``error``...) taking ``(ctxt, publisher_id, event_type, payload,
    metadata)``, and optionally a ``filter_rule``
    (:class:`oslo_messaging.NotificationFilter`): this is oslo.messaging's
    own NotificationDispatcher, the one its notification listeners use, so
    endpoint code works unchanged. ``ctxt`` is the context sent with the
    notification (with ``sock_include_context``) or an empty dict;
    ``metadata`` holds ``message_id`` and ``timestamp``.

    There is no requeue on a local socket: an endpoint that raises is
    logged and the next one is called, and an endpoint's return value
    (``NotificationResult.REQUEUE`` included) is ignored.
    """

    def __init__(self, endpoints):
        super().__init__(endpoints, None)
        self._called = threading.local()

    def dispatch(self, notification):
        """Hand one decoded notification to the matching endpoints.

        :returns: how many endpoint methods were called
        """
        if not isinstance(notification.get('priority', ''), str):
            return 0
        self._called.count = 0
        super().dispatch(_Incoming(notification))
        return self._called.count

    def _exec_callback(self, callback, message):
        self._called.count += 1
        try:
            callback(message['ctxt'], message['publisher_id'],
                     message['event_type'], message['payload'],
                     message['metadata'])
        except Exception:
            LOG.exception('Notification endpoint %s raised on %s',
                          callback, message['event_type'])
        # Never NotificationResult.REQUEUE, which would stop the dispatch.
        return None

    def run(self, subscription):
        """Dispatch every notification of ``subscription`` until it ends."""
        for notification in subscription:
            self.dispatch(notification)
