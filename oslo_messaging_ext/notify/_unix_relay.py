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
module implements them with _unix_hub.py (what the hub does),
_unix_sockfile.py (everything that touches the socket file) and
_unix_protocol.py (the lines exchanged). One :class:`Relay` exists per
socket path and per process: the notifying threads queue lines to it, and
its I/O thread, by election under the lock file, either

* is the **hub** (a :class:`_unix_hub.Hub`): it holds the listening socket,
  accepts subscribers and the service's other processes (publishers), and
  copies every line to every subscriber's bounded buffer; or
* is a **publisher**: it forwards its process's lines to the hub, and
  learns from the hub how many subscribers there are.

The relay always runs in a native OS thread, even in an eventlet
monkey-patched process, so that delivery never depends on the service
yielding to the eventlet hub.
"""

import atexit
import logging
from multiprocessing import util as mp_util
import os
import signal
import time

from oslo_messaging_ext.notify import _unix_hub as unix_hub
from oslo_messaging_ext.notify import _unix_log as unix_log
from oslo_messaging_ext.notify import _unix_protocol as proto
from oslo_messaging_ext.notify import _unix_sockfile as sockfile

LOG = logging.getLogger(__name__)

# Milliseconds the I/O thread waits for more lines after sending a batch:
# the latency bound traded for batching under load.
_LINGER = 5
_RETRY_MIN, _RETRY_MAX = 0.05, 5.0
# A publisher binding holds the lock file for milliseconds: retry soon
# (_LOCK_RETRIES times), then back off.
_LOCK_RETRY = 0.005
_LOCK_RETRIES = 6
# An upstream connection that ends sooner than this was refused or broken
# at once: the next attempt backs off instead of reconnecting in a loop.
_UPSTREAM_SETTLED = 1.0
# Drop counts are reported within this many seconds, even when no
# notification follows to carry them.
_DROP_REPORT_INTERVAL = 0.1
# How long a clean shutdown may wait to hand queued lines over.
_CLOSE_FLUSH_TIMEOUT = 5.0
# How long it may wait for its subscribers to read what is queued for them.
_CLOSE_SUBSCRIBERS_TIMEOUT = 1.0
# After that, how long a subscriber has to read the rest of a line it got
# a part of, so that it never sees a cut line.
_CLOSE_LINE_END_TIMEOUT = 1.0

_IDLE, _STARTING, _HUB, _PUBLISHER = 'idle', 'starting', 'hub', 'publisher'


def _log(level, msg, *args, exc_info=False):
    unix_log.log(LOG, level, msg, *args, exc_info=exc_info)


# The service's side logs what the relay thread handed over.
emit_deferred_records = unix_log.emit_deferred_records


class Relay:
    """Relay the lines of this process to the subscribers of ``path``.

    :param path: the socket path
    :param service: the identity publishers must share to join one hub
    :param mode: the socket file's mode bits
    :param gid: the socket file's group id
    :param max_subscribers: subscribers the hub serves at most (publishers
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
        self._lock_retries = 0
        self._drops_report_at = 0.0
        self._hub = None
        self._bound_id = None
        self._upstream = None
        self._upstream_since = 0.0
        self._upstream_pending = b''
        self._upstream_inbuf = b''
        self._poller = None
        self._join_failures = unix_log.Throttle()
        self._errors = unix_log.Throttle()

    # -- the notifying threads' side ---------------------------------------

    def wanted(self):
        """Whether a line would reach anyone, starting the relay if idle.

        This is the hot path when nobody listens: no lock, no syscall. A
        fork is handled by the at-fork hook (Python's os.fork,
        multiprocessing, and uwsgi, which calls PyOS_AfterFork_Child).
        """
        if unix_log.pending():
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
        unix_log.start_green_drainer()

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
        """Forget what the parent owned; rejoin as a publisher."""
        if self._hub is not None:
            self._hub.close()
        if self._upstream is not None:
            self._upstream.close()
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
            if self._hub is not None:
                timeout = self._hub.tick(timeout)
            timeout = self._report_drops(timeout)
            for fd, events in self._poller.poll(timeout):
                self._handle(fd, events)

    def _try_to_join(self):
        try:
            self._elect()
        except sockfile.LockBusy:
            # A publisher binding right now, or someone else holding the
            # lock: never wait for it (fork and close wait for fork_lock).
            self._lock_retries += 1
            if self._lock_retries <= _LOCK_RETRIES:
                self._schedule_retry(_LOCK_RETRY)
                return
            self._say_join_failure('its lock file %s is held by another '
                                   'process' % self.lock_path)
            self._schedule_retry()
        except (proto.RelayError, OSError) as exc:
            self._say_join_failure(exc)
            self._schedule_retry()
        else:
            self._lock_retries = 0
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
        hub = self._hub
        if not self._final_read_done:
            self._final_read_done = True
            if hub is not None:
                hub.read_publishers_once_more()
            self._report_counts_at_stop()
        if self._outbox or self._upstream_pending:
            if now < self._flush_deadline:
                return False
            _log(logging.WARNING, 'Unix notification socket %s: stopped '
                 'before handing over %d queued bytes', self.path,
                 self._queued_bytes())
            return True
        behind = hub.subscribers_behind() if hub is not None else []
        if not behind:
            return True
        if now < self._subscribers_deadline:
            return False
        if not self._lines_trimmed:
            self._lines_trimmed = True
            unread = sum(hub.trim_to_line_end(p) for p in behind)
            if unread:
                _log(logging.WARNING, 'Unix notification socket %s: stopped '
                     'with %d notifications its subscribers had not read',
                     self.path, unread)
            return not any(p.pending for p in behind)
        if now < self._line_end_deadline:
            return False
        _log(logging.WARNING, 'Unix notification socket %s: %d subscribers '
             'did not read the end of their last line; they see it cut',
             self.path, len(behind))
        return True

    def _report_counts_at_stop(self):
        """What was counted and not reported yet leaves with the last lines.

        A process that exits while every subscriber's buffer is full would
        otherwise take its count with it.
        """
        if self._hub is None:
            self._queue_unsent_notice()
            return
        with self._lock:
            dropped, self._outbox_dropped = self._outbox_dropped, 0
        self._hub.credit_dropped(self._take_unsent() + dropped)
        self._hub.report_drops(at_stop=True)

    def _report_drops(self, timeout):
        """Report drop counts within _DROP_REPORT_INTERVAL; return timeout.

        A count otherwise rides in front of the next line, and a stream
        that ends with drops would never report them.
        """
        counting = self.saturated or self._unsent or self._outbox_dropped
        if not counting and not (self._hub is not None and
                                 self._hub.unreported_drops()):
            return timeout
        now = time.monotonic()
        if now >= self._drops_report_at:
            self._drops_report_at = now + _DROP_REPORT_INTERVAL
            if self._hub is not None:
                self._hub.report_drops()
            elif self.state is _PUBLISHER:
                self._queue_unsent_notice()
        wait = max(0, self._drops_report_at - now) * 1000 + 1
        return wait if timeout is None else min(timeout, wait)

    def _take_unsent(self):
        with self._lock:
            count, self._unsent = self._unsent, 0
        return count

    def _counts_changed(self, subscribers, connecting, saturated):
        self.subscribers = subscribers
        self.connecting = connecting
        self.saturated = saturated

    def _can_take(self):
        if self.state is _HUB:
            return True
        return self.state is _PUBLISHER and not self._upstream_pending

    def _queued_bytes(self):
        return (sum(len(line) + 1 for line in self._outbox) +
                len(self._upstream_pending) +
                (self._hub.queued_bytes() if self._hub is not None else 0))

    def _handle(self, fd, events):
        select = self._select
        if fd == self._wake_r:
            try:
                while self._os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        elif self._upstream is not None and fd == self._upstream.fileno():
            if events & select.POLLOUT:
                self._flush_upstream()
            # The flush may have found the hub gone (POLLOUT and POLLHUP
            # come together when it exits).
            if self._upstream is not None and events & (
                    select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read_upstream()
        elif self._hub is not None:
            self._hub.handle(fd, events)

    # -- election -------------------------------------------------------------

    def _elect(self):
        """Join the hub of ``path``, or become it; under the lock file.

        The lock serializes publishers, so that none unlinks the socket
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
        self._hub = unix_hub.Hub(
            listener, self._poller, self.path, self.service,
            self.max_subscribers, self.buffer_size,
            take_unsent=self._take_unsent,
            counts_changed=self._counts_changed, fork_lock=self.fork_lock)
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
            role=proto.ROLE_PUBLISHER, service=self.service, pid=self.pid)
        self._poller.register(sock, self._select.POLLIN |
                              self._select.POLLOUT)
        self.state = _PUBLISHER
        self.subscribers = None

    def _lose_in_flight(self, why):
        """Count what the hub had not taken of the batch being sent.

        It is reported, as dropped, to the subscribers of the next hub.
        """
        lost = proto.notifications_in(self._upstream_pending)
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
        if self._hub is not None:
            self._hub.fan_out(data)
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
            data = self._upstream.recv(proto.READ_SIZE)
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
            if (status is None or
                    status.get(proto.PROTOCOL_KEY) != proto.ROLE_HUB):
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

    # -- shutdown -------------------------------------------------------------

    def _close_connections(self):
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None
        if self._hub is not None:
            # The hub binds the path again if it was removed.
            self._bound_id = self._hub.bound_id or self._bound_id
            self._hub.close()
            self._hub = None
            self._unlink_ours()

    def _close_all(self):
        self._close_connections()
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                self._os.close(fd)
        self._wake_r = self._wake_w = None
        self._poller = None

    def _unlink_ours(self):
        """Remove the socket file if it is still the one we bound.

        Under the lock, so that a publisher's socket bound meanwhile is never
        removed; if the lock cannot be had at once, the file is left (a
        stale socket never blocks a start-up). A directory removed already
        (a temporary one, /run at shutdown) took the socket with it.
        """
        with self.fork_lock:
            try:
                with sockfile.Lock(self.lock_path):
                    sockfile.unlink_if_ours(self.path, self._bound_id)
            except FileNotFoundError:
                # The lock file is created if missing: the directory is.
                pass
            except sockfile.LockBusy:
                _log(logging.WARNING, 'Unix notification socket %s: not '
                     'removed, its lock file is held by another process',
                     self.path)
            except (OSError, proto.RelayError) as exc:
                _log(logging.WARNING, 'Unix notification socket %s: not '
                     'removed: %s', self.path, exc)


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
