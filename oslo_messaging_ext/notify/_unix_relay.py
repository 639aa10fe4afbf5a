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

"""The per-process relay behind the ``unix`` notification driver.

Private to the driver: _impl_unix.py states the delivery semantics, this
module implements them, and _unix_protocol.py holds the lines exchanged.
One :class:`Relay` exists per socket path and per process. Its I/O thread
is, by election, either

* the **hub**: it holds the listening socket, accepts subscribers and the
  other processes of the service (publishers), and copies every line to
  every subscriber's bounded buffer; or
* a **publisher**: it forwards its process's lines to the hub, and learns
  from the hub how many subscribers there are.

The relay always runs in a native OS thread, even in an eventlet
monkey-patched process, so that delivery never depends on the service
yielding to the eventlet hub.
"""

import atexit
import collections
import errno
import itertools
import logging
from multiprocessing import util as mp_util
import os
import signal
import sys
import time
import traceback

from oslo_messaging_ext.notify import _unix_protocol as proto
from oslo_messaging_ext.notify import _unix_sockfile as sockfile

LOG = logging.getLogger(__name__)

_READ_SIZE = 262144
_IOV_MAX = 512
# Bounds the reads of what a sibling sent before hanging up (256 MiB).
_MAX_READS_AT_HANGUP = 1024
# A subscriber is saturated when its buffer has less room than this (or
# than half the buffer, if smaller).
_SATURATION_MARGIN = 65536
# Milliseconds the I/O thread waits for more lines after sending a batch:
# the latency bound traded for batching under load.
_LINGER = 5
_RETRY_MIN, _RETRY_MAX = 0.05, 5.0
# A sibling holds the lock file for milliseconds: retry soon, then back off.
_LOCK_RETRY_MIN = 0.005
# An upstream connection that ends sooner than this was refused or broken
# at once: the next attempt backs off instead of reconnecting in a loop.
_UPSTREAM_SETTLED = 1.0
# Out of file descriptors (EMFILE...): stop accepting for a while.
_ACCEPT_PAUSE_MIN, _ACCEPT_PAUSE_MAX = 0.1, 2.0
# Connections accepted but not yet known to be siblings or subscribers;
# past it, further ones are closed until these are classified.
_MAX_UNCLASSIFIED = 128
# Drop counts are reported within this many seconds, even when no
# notification follows to carry them.
_DROP_REPORT_INTERVAL = 0.1
# A repeated warning is logged at most once per this many seconds.
_LOG_INTERVAL = 60.0
# Room a drop notice needs in a subscriber's buffer.
_NOTICE_ROOM = 512
# accept() errors that concern the process, not the connection.
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# How long a clean shutdown may wait to hand queued lines over.
_CLOSE_FLUSH_TIMEOUT = 5.0
# How long it may wait for its subscribers to read what is queued for them.
_CLOSE_SUBSCRIBERS_TIMEOUT = 1.0
# After that, how long a subscriber has to read the rest of a line it got
# a part of, so that it never sees a cut line.
_CLOSE_LINE_END_TIMEOUT = 1.0

# Seconds a new connection has to introduce itself as a publisher; after
# that it is a subscriber (subscribers send nothing). Lines are held for it
# meanwhile, and sent if it turns out to be a subscriber.
_HANDSHAKE_GRACE = 0.05
_NEW, _SUBSCRIBER, _SIBLING = 'new', 'subscriber', 'publisher'
# Who is fed lines: subscribers, and new connections until they say what
# they are.
_FED = (_NEW, _SUBSCRIBER)

_IDLE, _STARTING, _HUB, _PUBLISHER = 'idle', 'starting', 'hub', 'publisher'


# Records the relay thread could not log itself (see _log), oldest first.
_deferred_records = collections.deque()
_MAX_DEFERRED_RECORDS = 1000
_deferred_lost = [0]
_green_drainer_started = [False]


def _logging_is_green():
    patcher = sys.modules.get('eventlet.patcher')
    return patcher is not None and patcher.is_monkey_patched('thread')


def _log(level, msg, *args, exc_info=False):
    """Log from the relay thread, never taking a green lock.

    In a process eventlet patched, the logging module's and its handlers'
    locks are green: a native thread that takes one while a green thread
    holds it hangs the whole process. There the relay thread only appends
    the record to a deque (atomic, no lock), and the service's side logs
    it: on its next notification, at close, and from a green thread
    within a second.
    """
    if exc_info:
        msg += '\n%s'
        args += (traceback.format_exc().rstrip(),)
    if not _logging_is_green():
        LOG.log(level, msg, *args)
    elif len(_deferred_records) < _MAX_DEFERRED_RECORDS:
        _deferred_records.append((level, msg, args))
    else:
        _deferred_lost[0] += 1


def emit_deferred_records():
    """Log what the relay thread handed over; call it on the service side."""
    while True:
        try:
            level, msg, args = _deferred_records.popleft()
        except IndexError:
            break
        LOG.log(level, msg, *args)
    lost, _deferred_lost[0] = _deferred_lost[0], 0
    if lost:
        LOG.warning('Unix notification relay: %d log records were lost '
                    '(more than %d waited to be logged)', lost,
                    _MAX_DEFERRED_RECORDS)


def _start_green_drainer():
    """Log handed-over records within a second, notifications or not."""
    if _green_drainer_started[0] or not _logging_is_green():
        return
    _green_drainer_started[0] = True
    eventlet = sys.modules['eventlet']

    def drain_forever():
        while True:
            eventlet.sleep(1.0)
            emit_deferred_records()

    # A forked child inherits this green thread with the rest of the hub.
    eventlet.spawn_n(drain_forever)


class _Throttle(object):
    """Say a repeated event at most once per interval, with its count."""

    def __init__(self, interval=_LOG_INTERVAL):
        self.interval = interval
        self.total = 0
        self._unsaid = 0
        self._next_at = 0.0

    def hit(self):
        """Count one event; return how many to say now (0: stay quiet)."""
        self.total += 1
        self._unsaid += 1
        now = time.monotonic()
        if now < self._next_at:
            return 0
        self._next_at = now + self.interval
        unsaid, self._unsaid = self._unsaid, 0
        return unsaid


class _Peer(object):
    """A connection accepted by the hub: a subscriber until it says not."""

    __slots__ = ('sock', 'fd', 'kind', 'reading', 'inbuf', 'pending',
                 'pending_bytes', 'dropped', 'classify_at')

    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        # Unclassified for a moment: a sibling sends its handshake at once,
        # and must not be counted nor sent lines as a subscriber meanwhile.
        # Lines are queued for it but held (no POLLOUT) until then.
        self.kind = _NEW
        self.classify_at = time.monotonic() + _HANDSHAKE_GRACE
        self.reading = True
        self.inbuf = b''
        self.pending = collections.deque()
        self.pending_bytes = 0
        self.dropped = 0


class Relay(object):
    """Relay the lines of this process to the subscribers of ``path``.

    :param path: the socket path
    :param service: the identity siblings must share to join one hub
    :param mode: the socket file's mode bits
    :param gid: the socket file's group id
    :param max_subscribers: subscribers the hub serves at most (siblings
        are not counted)
    :param buffer_size: bytes queued at most per subscriber, and in this
        process on the way to the hub
    """

    def __init__(self, path, service, mode, gid, max_subscribers,
                 buffer_size):
        self.path = path
        self.lock_path = path + '.lock'
        self.service = service
        self.mode = mode
        self.gid = gid
        self.max_subscribers = max_subscribers
        self.buffer_size = buffer_size
        self._socket = proto.native('socket')
        self._select = proto.native('select')
        self._threading = proto.native('threading')
        self._os = proto.native('os')
        self.users = 0
        self._reset()
        # A multiprocessing child ends in os._exit, without atexit: flush
        # at its finalizers instead. Its registry is emptied when it
        # starts, so the finalizer is registered from an after-fork hook
        # that multiprocessing runs after that.
        mp_util.register_after_fork(self, _finalize_in_multiprocessing_child)

    def _reset(self):
        self.pid = os.getpid()
        self.state = _IDLE
        # None while unknown: lines are queued rather than lost.
        self.subscribers = None
        # New connections not yet known to be subscribers: lines are
        # serialized for them too, so that a subscriber misses nothing
        # emitted after the hub accepted it.
        self.connecting = 0
        self.saturated = False
        self._lock = self._threading.Lock()
        # Held while file descriptors exist that a forked child must not
        # inherit half-way (the lock file, a socket being bound): the
        # at-fork hook waits for it, so a child never holds the lock file.
        # Nothing under it ever waits.
        self.fork_lock = self._threading.Lock()
        self._outbox = []
        self._outbox_bytes = 0
        self._outbox_dropped = 0
        # Lines counted, not serialized, while every subscriber was full.
        self._unsent = 0
        self._wake_pending = False
        self._stopping = False
        self._final_read_done = False
        self._lines_trimmed = False
        self._thread = None
        self._wake_r = self._wake_w = None
        self._retry_at = 0.0
        self._retry_delay = _RETRY_MIN
        self._drops_report_at = 0.0
        self._listener = None
        self._bound_id = None
        self._accept_resume_at = None
        self._accept_pause = _ACCEPT_PAUSE_MIN
        self._upstream = None
        self._upstream_since = 0.0
        self._upstream_pending = b''
        self._upstream_inbuf = b''
        self._peers = {}
        self._poller = None
        self._refusals = _Throttle()
        self._accept_failures = _Throttle()
        self._strangers = _Throttle()
        self._join_failures = _Throttle()
        self._errors = _Throttle()

    # -- the notifying threads' side ---------------------------------------

    def wanted(self):
        """Whether a line would reach anyone, starting the relay if idle.

        This is the hot path when nobody listens: no lock, no syscall. A
        fork is handled by the at-fork hook (Python's os.fork,
        multiprocessing, and uwsgi, which calls PyOS_AfterFork_Child).
        """
        if _deferred_records:
            emit_deferred_records()
        if self.state is _IDLE:
            self.start()
        if self.saturated:
            # Every subscriber's buffer is full: the line would be dropped
            # by the hub. Count it here, without serializing it; the relay
            # thread reports the count within _DROP_REPORT_INTERVAL.
            with self._lock:
                self._unsent += 1
            return False
        return self.subscribers != 0 or self.connecting != 0

    def publish(self, line):
        """Queue one JSON line (str, no newline); never blocks.

        The relay thread joins a batch with newlines and encodes it once:
        the caller's path makes no copy of the line, which matters with
        payloads beyond the small-object allocator's reach. A line larger
        than the whole buffer still goes when nothing else is queued.
        """
        with self._lock:
            size = len(line) + 1
            if (self._outbox and
                    self._outbox_bytes + size > self.buffer_size):
                self._outbox_dropped += 1
                return
            self._queue_outbox_drops_locked()
            self._outbox.append(line)
            self._outbox_bytes += size
            if self._wake_pending:
                return
            self._wake_pending = True
        self._wake()

    def _queue_notice_locked(self, count, where, first=False):
        """Queue a drop notice for the hub; the caller holds self._lock."""
        notice = proto.dropped_envelope(count, where)
        line = notice[:-1].decode('ascii')
        if first:
            self._outbox.insert(0, line)
        else:
            self._outbox.append(line)
        self._outbox_bytes += len(notice)

    def _queue_outbox_drops_locked(self):
        if self._outbox_dropped:
            self._queue_notice_locked(self._outbox_dropped,
                                      'publisher %d' % self.pid)
            self._outbox_dropped = 0

    def _wake(self):
        try:
            self._os.write(self._wake_w, b'!')
        except (BlockingIOError, OSError, TypeError):
            # A full pipe already wakes the thread; a closed one (TypeError
            # on None) means the relay stopped.
            pass

    def _take_outbox(self):
        with self._lock:
            # Drops of a full outbox are reported even if nothing follows.
            self._queue_outbox_drops_locked()
            lines, self._outbox = self._outbox, []
            self._outbox_bytes = 0
            # While lines flow, the thread comes back by itself after
            # _LINGER: notify() then needs no wake-up syscall, and the
            # thread sends a batch per pass instead of a line.
            self._wake_pending = bool(lines)
        return lines

    def start(self):
        """Start the I/O thread, which joins or becomes the hub."""
        with self._lock:
            if self.state is not _IDLE:
                return
            self.state = _STARTING
            self._wake_r, self._wake_w = self._os.pipe2(
                os.O_NONBLOCK | os.O_CLOEXEC)
            self._poller = self._select.poll()
            self._poller.register(self._wake_r, self._select.POLLIN)
            self._thread = self._threading.Thread(
                target=self._run_safely, daemon=True,
                name='oslo.messaging-ext unix relay %s' % self.path)
            self._thread.start()
        _start_green_drainer()

    def close(self, flush_timeout=_CLOSE_FLUSH_TIMEOUT):
        """Stop the relay, hand over queued lines, remove our socket."""
        if self.pid != os.getpid():
            return
        thread = self._thread
        if thread is None:
            return
        now = time.monotonic()
        self._flush_deadline = now + flush_timeout
        self._subscribers_deadline = now + min(flush_timeout,
                                               _CLOSE_SUBSCRIBERS_TIMEOUT)
        self._line_end_deadline = self._subscribers_deadline + min(
            flush_timeout, _CLOSE_LINE_END_TIMEOUT)
        self._stopping = True
        self._wake()
        if thread is not self._threading.current_thread():
            thread.join(flush_timeout + _CLOSE_LINE_END_TIMEOUT + 1.0)
        self._close_all()
        self._thread = None
        self.state = _IDLE
        self.subscribers = None
        self.connecting = 0
        emit_deferred_records()

    def after_fork_in_child(self):
        """Forget what the parent owned; rejoin lazily as a sibling."""
        for sock in [self._listener, self._upstream] + [
                p.sock for p in self._peers.values()]:
            if sock is not None:
                sock.close()
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                self._os.close(fd)
        # The parent's socket file stays the parent's: never unlink it here.
        self._reset()

    # -- the I/O thread -----------------------------------------------------

    def _run_safely(self):
        # Signals are the service's business: a C-level handler (uwsgi's
        # graceful reload runs exit() from its SIGHUP handler) must never
        # run on this thread, which the process's exit would then wait for.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            try:
                self._run()
                return
            except Exception:
                # Whatever a peer did, the relay must go on: say it, drop
                # every connection (what was in flight is counted), and
                # join again after a backoff.
                unsaid = self._errors.hit()
                if unsaid:
                    _log(logging.ERROR, 'Unix notification socket %s: relay '
                         'error (%d since the last report); reconnecting',
                         self.path, unsaid, exc_info=True)
                if self._stopping:
                    return
                self._recover()

    def _recover(self):
        self._lose_in_flight('relay error')
        self._close_connections()
        self._poller = self._select.poll()
        self._poller.register(self._wake_r, self._select.POLLIN)
        self.state = _STARTING
        self._schedule_retry()

    def _schedule_retry(self, delay=None):
        if delay is None:
            delay = self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX)
        self._retry_at = time.monotonic() + delay

    def _run(self):
        while True:
            now = time.monotonic()
            if self.state is _STARTING and now >= self._retry_at:
                self._try_to_join()
            lines = self._take_outbox() if self._can_take() else None
            if lines:
                lines.append('')
                self._deliver('\n'.join(lines).encode('utf-8'))
                timeout = _LINGER
            else:
                timeout = None
            if self._stopping and self._stop_step():
                return
            if self.state is _STARTING:
                timeout = max(0, self._retry_at - time.monotonic()) * 1000
            elif self._stopping:
                timeout = 10
            if self.state is _HUB:
                # Before new subscribers count: they missed none of these.
                self._credit_unsent()
                timeout = self._resume_accepting(timeout)
            timeout = self._classify_new_peers(timeout)
            if self.state is _HUB:
                self._refresh_saturation()
            timeout = self._report_drops(timeout)
            for fd, events in self._poller.poll(timeout):
                self._handle(fd, events)

    def _try_to_join(self):
        try:
            self._elect()
        except sockfile.LockBusy:
            # A sibling binding right now, or someone else holding the
            # lock: never wait for it (fork and close wait for fork_lock).
            if self._retry_delay < _LOCK_RETRY_MIN * 64:
                delay = _LOCK_RETRY_MIN
                self._retry_delay *= 2
            else:
                delay = None
                self._say_join_failure('its lock file %s is held by another '
                                       'process' % self.lock_path)
            self._schedule_retry(delay)
        except (proto.RelayError, OSError) as exc:
            self._say_join_failure(exc)
            self._schedule_retry()
        else:
            if self.state is _HUB:
                self._retry_delay = _RETRY_MIN

    def _say_join_failure(self, reason):
        unsaid = self._join_failures.hit()
        if unsaid:
            _log(logging.WARNING, 'Unix notification socket %s: cannot join '
                 '(%s; %d attempts since the last report); retrying with '
                 'backoff, notifications meanwhile are queued, then '
                 'dropped and counted', self.path, reason, unsaid)

    def _stop_step(self):
        """One step of a clean stop; return True when it is over."""
        now = time.monotonic()
        if not self._final_read_done:
            self._final_read_done = True
            self._read_siblings_once_more()
            self._report_counts_at_stop()
        if self._outbox or self._upstream_pending:
            if now < self._flush_deadline:
                return False
            _log(logging.WARNING, 'Unix notification socket %s: stopped '
                 'before handing over %d queued bytes', self.path,
                 self._queued_bytes())
            return True
        waiting = [p for p in self._peers.values()
                   if p.kind is _SUBSCRIBER and p.pending]
        if not waiting:
            return True
        if now < self._subscribers_deadline:
            return False
        if not self._lines_trimmed:
            # A subscriber that does not keep up must not hold the stop,
            # but it must never be left with a cut line either.
            self._lines_trimmed = True
            unread = sum(self._trim_to_line_end(p) for p in waiting)
            if unread:
                _log(logging.WARNING, 'Unix notification socket %s: stopped '
                     'with %d notifications its subscribers had not read',
                     self.path, unread)
            return not any(p.pending for p in waiting)
        if now < self._line_end_deadline:
            return False
        _log(logging.WARNING, 'Unix notification socket %s: %d subscribers '
             'did not read the end of their last line; they see it cut',
             self.path, len(waiting))
        return True

    def _report_counts_at_stop(self):
        """What was counted and not reported yet leaves with the last lines.

        A process that exits while every subscriber's buffer is full would
        otherwise take its count with it.
        """
        if self.state is _HUB:
            self._credit_unsent()
            with self._lock:
                dropped, self._outbox_dropped = self._outbox_dropped, 0
            for peer in self._fed():
                peer.dropped += dropped
            for peer in self._fed():
                self._queue_drop_notice(peer)
        else:
            self._queue_unsent_notice()

    def _report_drops(self, timeout):
        """Report drop counts within _DROP_REPORT_INTERVAL; return timeout.

        A count otherwise rides in front of the next line, and a stream
        that ends with drops would never report them.
        """
        counting = self.saturated or self._unsent or self._outbox_dropped
        if self.state is _HUB:
            waiting = [p for p in self._peers.values()
                       if p.kind is _SUBSCRIBER and p.dropped]
        else:
            waiting = ()
        if not counting and not waiting:
            return timeout
        now = time.monotonic()
        if now >= self._drops_report_at:
            self._drops_report_at = now + _DROP_REPORT_INTERVAL
            if self.state is _HUB:
                for peer in waiting:
                    if (peer.pending_bytes + _NOTICE_ROOM <=
                            self.buffer_size):
                        self._queue_drop_notice(peer)
            elif self.state is _PUBLISHER:
                self._queue_unsent_notice()
        wait = max(0, self._drops_report_at - now) * 1000 + 1
        return wait if timeout is None else min(timeout, wait)

    def _fed(self):
        """Who is sent lines: subscribers, and new connections meanwhile."""
        return [p for p in self._peers.values() if p.kind in _FED]

    def _classify_new_peers(self, timeout):
        """Make subscribers of quiet new connections; return the timeout."""
        new = [p for p in self._peers.values() if p.kind is _NEW]
        if not new:
            return timeout
        now = time.monotonic()
        due = [p for p in new if now >= p.classify_at]
        for peer in due:
            self._make_subscriber(peer)
        waits = [(p.classify_at - now) * 1000 for p in new
                 if p.kind is _NEW]
        if not waits:
            return timeout
        wait = max(0, min(waits)) + 1
        return wait if timeout is None else min(timeout, wait)

    def _can_take(self):
        if self.state is _HUB:
            return True
        return self.state is _PUBLISHER and not self._upstream_pending

    def _read_siblings_once_more(self):
        """At stop, relay what siblings sent (exited ones included)."""
        for peer in list(self._peers.values()):
            for _ in range(_MAX_READS_AT_HANGUP):
                if (peer.kind is not _SIBLING or
                        self._peers.get(peer.fd) is not peer or
                        not self._read_peer(peer)):
                    break

    def _queued_bytes(self):
        return (sum(len(line) + 1 for line in self._outbox) +
                len(self._upstream_pending) +
                sum(p.pending_bytes for p in self._peers.values()))

    def _handle(self, fd, events):
        select = self._select
        if fd == self._wake_r:
            try:
                while self._os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        elif self._listener is not None and fd == self._listener.fileno():
            self._accept()
        elif self._upstream is not None and fd == self._upstream.fileno():
            if events & select.POLLOUT:
                self._flush_upstream()
            # The flush may have found the hub gone (POLLOUT and POLLHUP
            # come together when it exits).
            if self._upstream is not None and events & (
                    select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read_upstream()
        elif fd in self._peers:
            peer = self._peers[fd]
            hangup = select.POLLHUP | select.POLLERR | select.POLLNVAL
            if events & hangup:
                if peer.kind is _NEW:
                    # Maybe a sibling that said all it had and left.
                    self._read_peer(peer)
                # Dropping a sibling relays its last lines first.
                self._drop_peer(peer)
                return
            if events & select.POLLIN:
                self._read_peer(peer)
            if events & select.POLLOUT and self._peers.get(fd) is peer:
                self._flush_peer(peer)

    # -- election -------------------------------------------------------------

    def _elect(self):
        """Join the hub of ``path``, or become it; under the lock file.

        The lock serializes siblings, so that none unlinks the socket
        another has just bound. Nothing here waits: the lock is tried, the
        connection is non-blocking, and fork_lock is held meanwhile only.
        """
        with self.fork_lock:
            with sockfile.Lock(self.lock_path):
                self._elect_locked()

    def _elect_locked(self):
        sock = self._socket.socket(self._socket.AF_UNIX,
                                   self._socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            sock.close()
            if sockfile.remove_stale(
                    self.path, isinstance(exc, ConnectionRefusedError)):
                _log(logging.INFO, 'Removed stale unix notification socket '
                     '%s', self.path)
            listener, self._bound_id = sockfile.bind_listener(
                self.path, self.mode, self.gid)
            self._become_hub(listener)
            return
        except BaseException:
            # BlockingIOError included: the hub's backlog is full.
            sock.close()
            raise
        try:
            uid = sockfile.peer_uid(sock)
            if uid != os.geteuid():
                raise sockfile.UnsafeSocketFile(
                    'it is held by a process of uid %d, not of the service '
                    'user (uid %d); nothing is sent to it' %
                    (uid, os.geteuid()))
        except BaseException:
            sock.close()
            raise
        self._become_publisher(sock)

    def _become_hub(self, listener):
        self._listener = listener
        self._poller.register(listener, self._select.POLLIN)
        self.state = _HUB
        self.subscribers = 0
        self.connecting = 0
        _log(logging.DEBUG, 'Process %d serves unix notification socket %s',
             self.pid, self.path)

    def _become_publisher(self, sock):
        self._upstream = sock
        self._upstream_since = time.monotonic()
        self._upstream_inbuf = b''
        self._upstream_pending = proto.control_line(
            role='publisher', service=self.service, pid=self.pid)
        self._poller.register(sock, self._select.POLLIN |
                              self._select.POLLOUT)
        self.state = _PUBLISHER
        self.subscribers = None

    def _lose_in_flight(self, why):
        """Count what the hub had not taken of the batch being sent.

        It is reported, as dropped, to the subscribers of the next hub.
        """
        lost = _notifications_in(self._upstream_pending)
        self._upstream_pending = b''
        if lost:
            with self._lock:
                self._queue_notice_locked(
                    lost, 'publisher %d (%s)' % (self.pid, why), first=True)

    def _lose_upstream(self, settled=None):
        """The hub went away: re-elect, keeping queued lines.

        At once after a connection that lasted, so that a switch-over is
        quick; with backoff after one that ended as soon as it was made
        (refused, or another service's hub), so as not to spin.
        """
        self._lose_in_flight('hub lost')
        self._poller.unregister(self._upstream)
        self._upstream.close()
        self._upstream = None
        self.subscribers = None
        self.connecting = 0
        self.saturated = False
        # _STARTING, not _IDLE: this thread re-elects; notify() must not
        # start another one.
        self.state = _STARTING
        if settled is None:
            settled = (time.monotonic() - self._upstream_since >=
                       _UPSTREAM_SETTLED)
        if settled:
            self._retry_delay = _RETRY_MIN
            self._schedule_retry(0)
        else:
            self._schedule_retry()

    # -- publisher side -------------------------------------------------------

    def _deliver(self, data):
        if self.state is _HUB:
            self._fan_out(data)
        else:
            self._upstream_pending = data
            self._flush_upstream()

    def _flush_upstream(self):
        select = self._select
        while self._upstream_pending:
            try:
                sent = self._upstream.send(self._upstream_pending)
            except BlockingIOError:
                self._poller.modify(self._upstream,
                                    select.POLLIN | select.POLLOUT)
                return
            except OSError:
                self._lose_upstream()
                return
            self._upstream_pending = memoryview(
                self._upstream_pending)[sent:]
        self._poller.modify(self._upstream, select.POLLIN)

    def _read_upstream(self):
        try:
            data = self._upstream.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        if not data:
            self._lose_upstream()
            return
        lines = (self._upstream_inbuf + data).split(b'\n')
        self._upstream_inbuf = lines.pop()[-proto.MAX_HANDSHAKE:]
        for line in lines:
            status = proto.parse_control(line)
            if status is None or status.get(proto.PROTOCOL_KEY) != 'hub':
                continue
            if status.get('service') != self.service:
                self._say_join_failure(
                    'it is now held by the hub of another service (%r, pid '
                    '%s)' % (status.get('service'), status.get('pid')))
                self._lose_upstream(settled=False)
                return
            self.subscribers = status.get('subscribers', 0)
            self.connecting = status.get('connecting', 0)
            self.saturated = bool(status.get('saturated'))
            # Report what was counted to the subscribers it was counted
            # for, before the hub's subscribers change any further.
            self._queue_unsent_notice()

    def _queue_unsent_notice(self):
        with self._lock:
            count, self._unsent = self._unsent, 0
            if not count:
                return
            self._queue_notice_locked(count, 'publisher %d' % self.pid)

    # -- hub side -------------------------------------------------------------

    def _accept(self):
        # What was counted, not serialized, until now was missed by the
        # present subscribers only.
        self._credit_unsent()
        accepted = 0
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(exc)
                    break
                # ECONNABORTED and friends concern that connection only.
                continue
            self._accept_pause = _ACCEPT_PAUSE_MIN
            unclassified = sum(1 for p in self._peers.values()
                               if p.kind is _NEW)
            if unclassified >= _MAX_UNCLASSIFIED:
                sock.close()
                self._say_refused('%d connections have not said yet what '
                                  'they are' % unclassified)
                continue
            sock.setblocking(False)
            peer = _Peer(sock)
            self._peers[peer.fd] = peer
            self._poller.register(sock, self._select.POLLIN)
            accepted += 1
        if accepted:
            # Every process serializes for them from now on; a new
            # connection has room, so not every buffer is full any more.
            self.saturated = False
            self._count_changed()

    def _pause_accepting(self, exc):
        """Out of file descriptors: leave connections in the backlog a while.

        The listener stays readable, so accepting again at once would spin.
        """
        pause = self._accept_pause
        self._accept_pause = min(pause * 2, _ACCEPT_PAUSE_MAX)
        self._accept_resume_at = time.monotonic() + pause
        self._poller.modify(self._listener, 0)
        unsaid = self._accept_failures.hit()
        if unsaid:
            _log(logging.WARNING, 'Unix notification socket %s: accept '
                 'failed: %s (%d times since the last report); accepting '
                 'again in %.1fs', self.path, exc, unsaid, pause)

    def _resume_accepting(self, timeout):
        if self._accept_resume_at is None:
            return timeout
        wait = (self._accept_resume_at - time.monotonic()) * 1000
        if wait > 0:
            wait += 1
            return wait if timeout is None else min(timeout, wait)
        self._accept_resume_at = None
        self._poller.modify(self._listener, self._select.POLLIN)
        return timeout

    def _say_refused(self, reason):
        unsaid = self._refusals.hit()
        if unsaid:
            _log(logging.WARNING, 'Unix notification socket %s: refused a '
                 'connection, %s (%d refused since the last report, %d in '
                 'all)', self.path, reason, unsaid, self._refusals.total)

    def _subscriber_count(self):
        return sum(1 for p in self._peers.values() if p.kind is _SUBSCRIBER)

    def _count_changed(self):
        """Publish the counts to this process and to the siblings."""
        count = self._subscriber_count()
        connecting = sum(1 for p in self._peers.values() if p.kind is _NEW)
        self.subscribers = count
        self.connecting = connecting
        status = proto.control_line(
            role='hub', service=self.service, pid=self.pid,
            subscribers=count, connecting=connecting,
            saturated=self.saturated)
        for peer in list(self._peers.values()):
            if peer.kind is _SIBLING:
                self._send_status(peer, status)

    def _send_status(self, peer, status):
        """Queue the latest status for a sibling, replacing an unsent one.

        A status line says the whole state: a sibling that does not read
        (stopped, or busy) needs the newest only, and must not make its
        queue grow with every change.
        """
        pending = peer.pending
        if pending and isinstance(pending[-1], bytes):
            peer.pending_bytes -= len(pending.pop())
        self._queue(peer, status, 0, force=True)

    def _credit_unsent(self):
        with self._lock:
            count, self._unsent = self._unsent, 0
        if count:
            for peer in self._fed():
                peer.dropped += count

    def _refresh_saturation(self):
        """Whether every fed connection's buffer is (nearly) full.

        Then notify() counts lines instead of serializing them, in this
        process and, told by the status line, in the siblings.
        """
        full = self.buffer_size - min(_SATURATION_MARGIN,
                                      self.buffer_size // 2)
        subscribers = self._fed()
        saturated = bool(subscribers) and all(
            p.pending_bytes >= full for p in subscribers)
        if saturated != self.saturated:
            self.saturated = saturated
            self._count_changed()

    def _read_peer(self, peer):
        """Read what ``peer`` sent; return False when nothing was there."""
        try:
            data = peer.sock.recv(_READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            self._drop_peer(peer)
            return
        if not data:
            if peer.kind is _SIBLING:
                self._drop_peer(peer)
            else:
                # A subscriber that shut its writing side down (socat with
                # stdin at EOF) still reads; a closed one shows POLLHUP.
                self._make_subscriber(peer)
            return
        if peer.kind is _SUBSCRIBER:
            self._stop_reading(peer)
            return
        if peer.kind is _SIBLING:
            self._relay_sibling_data(peer, data)
            return True
        self._identify(peer, peer.inbuf + data)

    def _identify(self, peer, data):
        """Subscribers send nothing: a handshake line makes a sibling."""
        line, newline, rest = data.partition(b'\n')
        if not newline:
            if len(data) > proto.MAX_HANDSHAKE:
                self._make_subscriber(peer)
            else:
                peer.inbuf = data
            return
        hello = proto.parse_control(line)
        if not hello or hello.get(proto.PROTOCOL_KEY) != 'publisher':
            self._make_subscriber(peer)
            return
        try:
            uid = sockfile.peer_uid(peer.sock)
        except OSError:
            uid = None
        if uid != os.geteuid():
            unsaid = self._strangers.hit()
            if unsaid:
                _log(logging.WARNING, 'Unix notification socket %s: ignoring '
                     'a publisher running as uid %s; only uid %d may publish '
                     '(%d ignored since the last report)', self.path, uid,
                     os.geteuid(), unsaid)
            self._make_subscriber(peer)
            return
        peer.kind = _SIBLING
        peer.inbuf = b''
        # Held for it while it could have been a subscriber: not for it.
        peer.pending.clear()
        peer.pending_bytes = 0
        peer.dropped = 0
        self._count_changed()
        if rest:
            self._relay_sibling_data(peer, rest)

    def _relay_sibling_data(self, peer, data):
        """Fan out the complete lines; keep a cut last one for later."""
        data = peer.inbuf + data
        end = data.rfind(b'\n') + 1
        peer.inbuf = data[end:]
        if end:
            self._fan_out(data[:end])

    def _make_subscriber(self, peer):
        """Whatever a subscriber sends is ignored.

        Only subscribers count against sock_max_subscribers, once known:
        siblings are always let in.
        """
        peer.reading = False
        peer.inbuf = b''
        if peer.kind is _NEW:
            if self._subscriber_count() >= self.max_subscribers:
                self._say_refused('sock_max_subscribers (%d) reached'
                                  % self.max_subscribers)
                self._drop_peer(peer)
                return
            peer.kind = _SUBSCRIBER
            self._count_changed()
        # Sends what was held while it could have been a sibling.
        self._flush_peer(peer)

    def _stop_reading(self, peer):
        peer.reading = False
        peer.inbuf = b''
        self._poller.modify(peer.sock, self._mask(peer))

    def _mask(self, peer):
        select = self._select
        mask = select.POLLIN if peer.reading else 0
        if peer.pending and peer.kind is not _NEW:
            mask |= select.POLLOUT
        return mask

    def _fan_out(self, data):
        if proto.DROPPED_PREFIX in data:
            self._fan_out_with_notices(data)
            return
        lines = data.count(b'\n')
        for peer in self._fed():
            self._queue(peer, data, lines)

    def _fan_out_with_notices(self, data):
        """Merge a publisher's drop notices into each subscriber's count.

        A notice is not queued as such: if a subscriber's buffer were full
        it would be dropped as one line, and its count lost. Each
        subscriber gets one notice, with the total, before its next line
        or within _DROP_REPORT_INTERVAL.
        """
        run = []
        for line in data.split(b'\n')[:-1]:
            if not line.startswith(proto.DROPPED_PREFIX):
                run.append(line)
                continue
            if run:
                self._fan_out(b'\n'.join(run) + b'\n')
                run = []
            count = proto.dropped_count(line)
            for peer in self._fed():
                peer.dropped += count
        if run:
            self._fan_out(b'\n'.join(run) + b'\n')

    def _queue(self, peer, data, lines, force=False):
        """Queue ``data`` for ``peer``, or count its lines as dropped.

        An empty queue takes anything, so that one notification larger
        than sock_buffer_size still reaches a subscriber that keeps up.
        """
        was_empty = not peer.pending
        if not force and not was_empty and (
                peer.pending_bytes + len(data) > self.buffer_size):
            peer.dropped += lines
            return
        if peer.sock.fileno() < 0:
            return
        if peer.dropped:
            self._queue_drop_notice(peer, flush=False)
        peer.pending.append(data)
        peer.pending_bytes += len(data)
        if was_empty and peer.kind is not _NEW:
            self._flush_peer(peer)

    def _queue_drop_notice(self, peer, flush=True):
        if not peer.dropped:
            return
        was_empty = not peer.pending
        notice = proto.dropped_envelope(peer.dropped, 'subscriber buffer')
        peer.dropped = 0
        peer.pending.append(notice)
        peer.pending_bytes += len(notice)
        if flush and was_empty and peer.kind is not _NEW:
            self._flush_peer(peer)

    def _flush_peer(self, peer):
        pending = peer.pending
        while pending:
            # Gather, not join: a subscriber that lags holds megabytes,
            # which must not be copied for each partial send.
            try:
                sent = peer.sock.sendmsg(
                    list(itertools.islice(pending, _IOV_MAX)))
            except BlockingIOError:
                break
            except OSError:
                self._drop_peer(peer)
                return
            peer.pending_bytes -= sent
            while sent:
                head = pending[0]
                if sent >= len(head):
                    sent -= len(head)
                    pending.popleft()
                else:
                    pending[0] = memoryview(head)[sent:]
                    sent = 0
        self._poller.modify(peer.sock, self._mask(peer))

    def _trim_to_line_end(self, peer):
        """Keep only the rest of a line partly sent; return lines dropped.

        Every chunk queued ends with a newline, and only the head of the
        queue can be partly sent (a memoryview into its chunk).
        """
        pending = peer.pending
        head = pending[0]
        rest = b''
        if isinstance(head, memoryview):
            whole = head.obj
            offset = len(whole) - len(head)
            if offset and whole[offset - 1:offset] != b'\n':
                rest = whole[offset:whole.index(b'\n', offset) + 1]
        unread = sum(_notifications_in(chunk) for chunk in pending)
        if rest:
            unread -= 1
        pending.clear()
        peer.pending_bytes = 0
        if rest:
            pending.append(rest)
            peer.pending_bytes = len(rest)
        self._poller.modify(peer.sock, self._mask(peer))
        return unread

    def _drop_peer(self, peer):
        if self._peers.get(peer.fd) is not peer:
            return
        del self._peers[peer.fd]
        self._poller.unregister(peer.sock)
        if peer.kind is _SIBLING:
            self._read_rest(peer)
        peer.sock.close()
        self._count_changed()

    def _read_rest(self, peer):
        """Relay what a departing sibling sent before it went.

        Whatever the reason it is dropped (its hang-up, or a status line
        that could not be sent to it because it had just exited), its last
        lines are still in the socket, readable before the error.
        """
        for _ in range(_MAX_READS_AT_HANGUP):
            try:
                data = peer.sock.recv(_READ_SIZE)
            except OSError:
                break
            if not data:
                break
            self._relay_sibling_data(peer, data)

    # -- shutdown -------------------------------------------------------------

    def _close_connections(self):
        for peer in list(self._peers.values()):
            peer.sock.close()
        self._peers = {}
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._unlink_ours()
        self._accept_resume_at = None

    def _close_all(self):
        self._close_connections()
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                self._os.close(fd)
        self._wake_r = self._wake_w = None
        self._poller = None

    def _unlink_ours(self):
        """Remove the socket file if it is still the one we bound.

        Under the lock, so that a sibling's socket bound meanwhile is never
        removed; if the lock cannot be had at once, the file is left (a
        stale socket never blocks a start-up).
        """
        with self.fork_lock:
            try:
                with sockfile.Lock(self.lock_path):
                    sockfile.unlink_if_ours(self.path, self._bound_id)
            except sockfile.LockBusy:
                _log(logging.WARNING, 'Unix notification socket %s: not '
                     'removed, its lock file is held by another process',
                     self.path)
            except (OSError, proto.RelayError) as exc:
                _log(logging.WARNING, 'Unix notification socket %s: not '
                     'removed: %s', self.path, exc)


def _notifications_in(data):
    """How many notifications ``data`` holds, a cut first line included."""
    count = 0
    for line in bytes(data).split(b'\n')[:-1]:
        if line.startswith(proto.DROPPED_PREFIX):
            count += proto.dropped_count(line)
        elif not line.startswith(proto.CONTROL_PREFIX):
            count += 1
    return count


# One relay per socket path in this process, shared by every driver
# instance that names the path.
_relays = {}


def get(path, **kwargs):
    relay = _relays.get(path)
    if relay is None:
        relay = _relays[path] = Relay(path, **kwargs)
    relay.users += 1
    return relay


def release(relay):
    relay.users -= 1
    if relay.users <= 0:
        _relays.pop(relay.path, None)
        relay.close()


def _finalize_in_multiprocessing_child(relay):
    mp_util.Finalize(relay, relay.close, exitpriority=100)


def _before_fork():
    for relay in list(_relays.values()):
        relay.fork_lock.acquire()


def _after_fork_in_parent():
    for relay in list(_relays.values()):
        relay.fork_lock.release()


def _after_fork_in_child():
    for relay in list(_relays.values()):
        relay.after_fork_in_child()
        # A forked worker joins at once, so that the socket exists (and
        # its subscribers are counted) before its first notification.
        relay.start()


def _close_all_at_exit():
    for relay in list(_relays.values()):
        try:
            relay.close()
        except Exception:
            LOG.exception('Unix notification socket %s: failed to close',
                          relay.path)


os.register_at_fork(before=_before_fork,
                    after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)
