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

"""Relay notifications to local subscribers over a Unix socket.

``driver = unix`` and ``sock_path`` in [oslo_messaging_notifications]. A
subscriber connects to ``sock_path`` and reads, with no handshake, one
JSON line per notification: the envelope (``context`` too with
``sock_include_context``, without secrets), then ``"sequence": {"source":
S, "number": N}`` (S: the emitting process, new after fork or restart; N:
from 1, every notification it was asked to send). Values are JSON
primitives (to_primitive), masked as by ``strutils.mask_dict_password``.

A hub process per ``sock_path`` relays (see _unix_hub), so that no thread
or hook runs in the service: the first process that finds none starts
it, as oslo.privsep starts its daemon, after binding both its sockets (as
socket activation does), so that what is sent while it starts waits for
it. Its starter reaps it; one that outlives its starter is reaped by
init, a container's PID 1 or a subreaper.

Delivery semantics:

* notify() makes non-blocking system calls only, never waits for another
  process, and sends one message per notification.
* With no subscriber, nothing is serialized (the hub shares the count);
  the hub is checked alive every 0.1 s at most, and a dead one replaced
  at the next notify(). What it held is lost: the sequence shows it.
* What a process could not hand over while there were subscribers (hub
  absent, send buffer full, too large) is counted, and reported by the
  hub before the gap it leaves or when the process leaves, however.
* A subscriber gets every notification, in order per process, while it
  keeps up; past ``sock_buffer_size`` queued, they are dropped for it and
  announced by an ``oslo_messaging_ext.unix.dropped`` notification. Nobody
  blocks the service or the others. Nothing is stored.
* A forked process notices its new pid at notify(), closes its inherited
  connection (its copy only) and opens its own.

Files and peers are checked as _unix_protocol says.
"""

import errno
import functools
import itertools
import json
import logging
import math
import os
import socket
import subprocess  # nosec B404: starts the hub, as privsep its daemon
import sys
import threading
import time

from oslo_messaging.notify import notifier
from oslo_serialization import jsonutils

from oslo_messaging_ext.notify import _unix_opts as opts
from oslo_messaging_ext.notify import _unix_protocol as proto
try:
    import orjson
except ImportError:  # the stdlib encoder is as correct, only slower
    orjson = None

LOG = logging.getLogger(__name__)

GROUP = opts.GROUP
register_opts = opts.register_opts
UnixSocketConfigError = opts.UnixSocketConfigError

# Seconds between two liveness checks of the hub while nobody subscribes.
LIVENESS_INTERVAL = 0.1
# Seconds between two attempts to connect, and to start a hub.
CONNECT_INTERVAL = 0.1
SPAWN_INTERVAL = 1.0
HUB_MODULE = 'oslo_messaging_ext.notify._unix_hub'
# Context keys never sent; any key naming a token or secret neither.
_SECRET_KEY_WORDS = ('token', 'secret', 'password', 'credential')


def _check_path(path):
    def refuse(reason):
        raise UnixSocketConfigError('sock_path', path, reason)
    if not path:
        refuse('the unix notification driver needs a socket path, e.g. '
               '/run/<service>/notifications.sock')
    if not os.path.isabs(path):
        refuse('it must be an absolute path')
    # sun_path holds 107 bytes; sockets are bound in a private directory.
    directory = os.path.dirname(path)
    if (len(os.fsencode(proto.ingest_path(path))) > 107 or
            len(os.fsencode(directory)) + 16 > 107):
        refuse('too long for a Unix socket address')
    if not os.path.isdir(directory):
        refuse('its directory %s does not exist' % directory)
    if not os.access(directory, os.W_OK | os.X_OK):
        refuse('the service user (uid %d) cannot create files in %s'
               % (os.geteuid(), directory))
    problem = proto.directory_problem(directory) or proto.squatted(path)
    if problem:
        refuse(problem)
    try:
        proto.check_listener(path, socket.SOCK_STREAM)
        proto.check_listener(proto.ingest_path(path), socket.SOCK_SEQPACKET)
    except (OSError, proto.RelayError) as exc:
        refuse(str(exc))


def _finite(value):
    """``value`` with every NaN and infinity replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def make_encoder():
    """``encode(envelope) -> bytes``: one JSON line, no newline.

    Through to_primitive what JSON cannot hold; NaN and infinities null.
    orjson is faster; what it refuses goes to the stdlib: same values.
    """
    default = functools.partial(jsonutils.to_primitive,
                                convert_instances=True, fallback=repr)
    strict = json.JSONEncoder(default=default, check_circular=False,
                              allow_nan=False, separators=(',', ':')).encode

    def stdlib_encode(message):
        try:
            return strict(message).encode('ascii')
        except ValueError:
            return strict(_finite(default(message))).encode('ascii')

    if orjson is None:
        return stdlib_encode
    dumps, refused = orjson.dumps, orjson.JSONEncodeError
    fast = orjson.OPT_PASSTHROUGH_DATETIME
    non_str_keys = fast | orjson.OPT_NON_STR_KEYS  # twice as slow: a retry

    def encode(message):
        try:
            return dumps(message, default=default, option=fast)
        except refused:
            pass
        try:
            return dumps(message, default=default, option=non_str_keys)
        except refused:
            return stdlib_encode(message)
    return encode


def redact_context(ctxt):
    """A copy of ``ctxt`` without tokens or secrets (the hub masks it)."""
    if hasattr(ctxt, 'redacted_copy'):
        ctxt = ctxt.redacted_copy()
    if hasattr(ctxt, 'to_dict'):
        ctxt = ctxt.to_dict()
    if not isinstance(ctxt, dict):
        return {}
    return {k: v for k, v in ctxt.items()
            if not any(w in str(k).lower() for w in _SECRET_KEY_WORDS)}


def hub_interpreter():
    """sys.executable, unless not Python (uWSGI's): the environment's."""
    if os.path.basename(sys.executable or '').startswith('python'):
        return sys.executable
    for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix):
        for name in ('python%d.%d' % sys.version_info[:2], 'python3'):
            candidate = os.path.join(prefix, 'bin', name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    raise FileNotFoundError('no Python interpreter found to run it')


class Publisher:
    """A process's connection to the hub of a path, and its numbers.

    Shared by the drivers of the path; renewed in a new process.
    """

    def __init__(self, s):
        self.path, self._mode, self._gid = s['path'], s['mode'], s['gid']
        self._hub_argv = [
            s['path'], '--mode', '%o' % s['mode'], '--gid', str(s['gid']),
            '--max-subscribers', str(s['max_subscribers']),
            '--buffer-size', str(s['buffer_size'])]
        self._buffer_size = s['buffer_size']
        self.users = 0
        self._child = None
        self._warn = proto.Throttle(LOG).warn
        self._renew()

    def _renew(self):
        self.pid = os.getpid()
        self.source = '%d-%s' % (self.pid, os.urandom(6).hex())
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._sock = self._count = self._tally = None
        self._wanted = False
        self._connect_at = self._spawn_at = self._check_at = 0.0

    def _forked(self):
        if self._sock is not None:
            self._sock.close()  # our copy: the parent keeps its own
        if self._tally is not None:
            os.close(self._tally_fd)
        self._child = None
        self._renew()

    def subscribers(self):
        """How many subscribers the hub has (None: not known yet)."""
        if self.pid != os.getpid():
            self._forked()
        if self._sock is None:
            with self._lock:
                self._connect()
        count = self._count
        if count is None or count[proto.SUBSCRIBERS] == proto.UNKNOWN:
            return None
        return count[proto.SUBSCRIBERS]

    def publish(self, message, encode):
        if self.pid != os.getpid():
            self._forked()
        count = self._count
        if count is not None and not count[proto.SUBSCRIBERS]:
            next(self._numbers)
            if time.monotonic() >= self._check_at:
                self._check_alive()
            return
        with self._lock:
            number = next(self._numbers)
            sock = self._sock or self._connect()
            if sock is None:
                # Missed by subscribers only if there were some.
                if self._wanted:
                    self._dropped(proto.ABSENT)
                return
            # The stamp first: a line cut short still says whose it was.
            line = encode({'sequence': {'source': self.source,
                                        'number': number}, **message})
            try:
                sock.send(self._header + line)
            except OSError as exc:
                self._not_sent(exc, len(line))

    def _not_sent(self, exc, size):
        if isinstance(exc, BlockingIOError):
            cause = proto.FULL
        elif exc.errno == errno.EMSGSIZE:
            cause = proto.TOO_LARGE
            self._warn('Unix notification socket %s: dropped a notification '
                       'of %d bytes, more than the send buffer to the hub '
                       '(%d bytes) holds', self.path, size,
                       self._sock.getsockopt(socket.SOL_SOCKET,
                                             socket.SO_SNDBUF))
        else:
            cause = proto.ABSENT
            self._lost()
        self._dropped(cause)

    def _dropped(self, cause):
        tally = self._tally
        tally[cause] += 1
        self._header = proto.HEADER.pack(proto.LINE, *tally[:3])

    def _check_alive(self):
        """Whether the hub still holds our connection; reconnect if not."""
        self._check_at = time.monotonic() + LIVENESS_INTERVAL
        with self._lock:
            if self._sock is not None:
                try:
                    if self._sock.recv(1, socket.MSG_PEEK):
                        return
                except BlockingIOError:
                    return
                except OSError:
                    pass
                self._lost()
            self._connect()

    def _lost(self):
        self._wanted = self._count is not None and \
            self._count[proto.SUBSCRIBERS] not in (0, proto.UNKNOWN)
        self._sock.close()
        self._sock = self._count = None
        self._connect_at = 0.0

    def _connect(self):
        """The connection to the hub; None if there is none yet."""
        now = time.monotonic()
        if self._sock is not None or now < self._connect_at:
            return self._sock
        self._connect_at = now + CONNECT_INTERVAL
        self._reap()
        sock = proto.native('socket').socket(socket.AF_UNIX,
                                             socket.SOCK_SEQPACKET)
        sock.setblocking(False)  # a full queue: EAGAIN, never a wait
        try:
            sock.connect(proto.ingest_path(self.path))
            uid = proto.peer_uid(sock)
            if uid != os.geteuid():
                self._warn('Unix notification socket %s: its hub runs as '
                           'uid %d, not as the service user (uid %d): '
                           'nothing is sent to it', self.path, uid,
                           os.geteuid())
                sock.close()
                return None
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return self._spawn()
        except OSError:
            sock.close()
            return None
        try:
            if self._tally is None:
                self._tally_fd, self._tally = proto.new_tally()
                self._header = proto.HEADER.pack(proto.LINE, 0, 0, 0)
            self._tally[proto.SUBSCRIBERS] = proto.UNKNOWN
            try:  # past wmem_max with CAP_NET_ADMIN (SO_SNDBUFFORCE)
                sock.setsockopt(socket.SOL_SOCKET, 32, self._buffer_size)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                self._buffer_size)
            socket.send_fds(sock, [proto.HELLO + proto.dumps(
                {'source': self.source, 'pid': self.pid})], [self._tally_fd])
        except OSError:
            sock.close()
            return None
        self._sock, self._count = sock, self._tally
        return sock

    def _spawn(self):
        """Claim the path, start its hub (it outlives us), connect to it.

        None if another process holds the lock, or if that failed.
        """
        now = time.monotonic()
        if now < self._spawn_at:
            return None
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in sys.path if p))
        claimed = None
        try:
            claimed = proto.claim(self.path, self._mode, self._gid)
            if claimed is None:
                return None
            self._spawn_at = now + SPAWN_INTERVAL
            # Our interpreter, our module, our own arguments; no shell.
            self._child = subprocess.Popen(  # nosec B603
                [hub_interpreter(), '-m', HUB_MODULE] + self._hub_argv +
                ['--claimed', ','.join(map(str, claimed))],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                pass_fds=claimed[:3], start_new_session=True, env=env)
        except (OSError, proto.RelayError) as exc:
            self._warn('Unix notification socket %s: cannot start its '
                       'hub: %s', self.path, exc)
            return None
        finally:
            for fd in (claimed or ())[:3]:
                os.close(fd)  # the hub's now
        # Now, so that the hub lives as long as its starter (a uWSGI
        # master that loads the service, then only forks).
        self._connect_at = 0.0
        return self._connect()

    def _reap(self):
        if self._child is not None and self._child.poll() is not None:
            self._child = None

    def close(self):
        with self._lock:
            if self._sock is not None and self.pid == os.getpid():
                self._lost()
            if self._tally is not None and self.pid == os.getpid():
                os.close(self._tally_fd)
                self._tally = None
            self._reap()


_publishers = {}
_publishers_lock = threading.Lock()


def _publisher(s):
    with _publishers_lock:
        publisher = _publishers.get(s['path'])
        if publisher is None:
            publisher = _publishers[s['path']] = Publisher(s)
        publisher.users += 1
        return publisher


def validate(conf):
    """The settings by name; UnixSocketConfigError names what is wrong."""
    register_opts(conf)
    group = conf[GROUP]
    _check_path(group.sock_path)
    return {'path': group.sock_path,
            'mode': opts.parse_mode(group.sock_mode),
            'gid': opts.resolve_group(group.sock_group),
            'max_subscribers': opts.bounded(group, 'sock_max_subscribers'),
            'buffer_size': opts.bounded(group, 'sock_buffer_size'),
            'include_context': group.sock_include_context}


class UnixSocketDriver(notifier.Driver):
    """Relay notifications to subscribers of a local Unix socket."""

    def __init__(self, conf, topics, transport):
        super().__init__(conf, topics, transport)
        s = validate(conf)
        self._include_context = s['include_context']
        self._encode = make_encoder()
        LOG.debug('unix notification driver loaded: socket %s, mode %04o, '
                  'gid %d; it relays every notification of this service '
                  'and ignores topics', s['path'], s['mode'], s['gid'])
        self._publisher = _publisher(s)
        # So that the socket exists while the service serves.
        self._publisher.subscribers()

    def notify(self, ctxt, message, priority, retry):
        publisher = self._publisher
        if publisher is None:
            return
        try:
            if self._include_context:
                message = dict(message, context=redact_context(ctxt))
            publisher.publish(message, self._encode)
        except Exception:
            LOG.exception('Cannot send notification %s (%s) to the unix '
                          'notification socket; dropped.',
                          message.get('message_id'),
                          message.get('event_type'))

    def subscribers(self):
        """How many subscribers the hub has (None: not known yet)."""
        return None if self._publisher is None else \
            self._publisher.subscribers()

    def close(self):
        """Optional: the last driver of a path in a process disconnects."""
        publisher, self._publisher = self._publisher, None
        if publisher is None:
            return
        with _publishers_lock:
            publisher.users -= 1
            if publisher.users > 0:
                return
            _publishers.pop(publisher.path, None)
        publisher.close()
