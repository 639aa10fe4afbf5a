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
module runs the relay's thread and its states, with _unix_outbox.py (the
queue from the notifying threads), _unix_election.py (who serves the
path), _unix_hub.py (what the hub does), _unix_upstream.py (a publisher's
link to the hub), _unix_fork.py (fork and exit), _unix_stop.py (its clean
stop), _unix_sockfile.py (everything that touches the socket file) and
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

import functools
import logging
import os
import signal
import time

from oslo_messaging_ext.notify import _unix_election as election
from oslo_messaging_ext.notify import _unix_fork as unix_fork
from oslo_messaging_ext.notify import _unix_hub as unix_hub
from oslo_messaging_ext.notify import _unix_log as unix_log
from oslo_messaging_ext.notify import _unix_outbox as outbox
from oslo_messaging_ext.notify import _unix_protocol as proto
from oslo_messaging_ext.notify import _unix_sockfile as sockfile
from oslo_messaging_ext.notify import _unix_stop as unix_stop
from oslo_messaging_ext.notify import _unix_upstream as upstream

LOG = logging.getLogger(__name__)
_log = functools.partial(unix_log.log, LOG)

# Milliseconds the I/O thread waits for more lines after sending a batch:
# the latency bound traded for batching under load.
_LINGER = 5
# Drop counts are reported within this many seconds, even when no
# notification follows to carry them.
_DROP_REPORT_INTERVAL = 0.1
# How long a clean shutdown may wait to hand queued lines over.
_CLOSE_FLUSH_TIMEOUT = 5.0

_IDLE, _STARTING, _HUB, _PUBLISHER = 'idle', 'starting', 'hub', 'publisher'

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
        self._select = proto.native('select')
        self._threading = proto.native('threading')
        self.users = 0
        self._reset()
        unix_fork.register_for_multiprocessing(self)

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
        self.outbox = outbox.Outbox(self.buffer_size, self.pid)
        self._lock = self._threading.Lock()
        # Held while file descriptors exist that a forked child must not
        # inherit half-way (the lock file, a socket being bound): the
        # at-fork hook waits for it, so a child never holds the lock file.
        # Nothing under it ever waits.
        self.fork_lock = self._threading.Lock()
        self.parking = unix_fork.Parking()
        # A CleanStop while the relay stops.
        self._stopping = None
        self._thread = None
        self.retry = election.Retry(self.path, self.lock_path)
        self._drops_report_at = 0.0
        self._hub = None
        self._bound_id = None
        self._upstream = None
        self._poller = None
        self._errors = unix_log.Throttle()

    # -- the notifying threads' side ---------------------------------------

    def wanted(self):
        """Whether a line would reach anyone, starting the relay if idle.

        This is the hot path when nobody listens: no lock, one getpid().
        A fork is handled by the at-fork hooks (os.fork, multiprocessing,
        uWSGI's post-fork hook); the pid tells of a fork none ran for.
        """
        if self.pid != os.getpid():
            unix_fork.adopt(self)
        if unix_log.pending():
            emit_deferred_records()
        if self.state is _IDLE and not self.start():
            # uWSGI's master: nothing it emits can be relayed.
            return False
        if self.saturated:
            # Every subscriber's buffer is full: the line would be dropped
            # by the hub. Count it here, without serializing it; the relay
            # thread reports the count within _DROP_REPORT_INTERVAL.
            self.outbox.count_unsent()
            return False
        return self.subscribers != 0 or self.connecting != 0

    def publish(self, line):
        """Queue one JSON line (str, no newline); never blocks."""
        if self.pid != os.getpid():
            unix_fork.adopt(self)
        self.outbox.publish(line)

    def start(self):
        """Start the I/O thread, which joins or becomes the hub.

        :returns: False in uWSGI's master, where it never runs
        """
        if self.pid != os.getpid():
            unix_fork.adopt(self)
        if unix_fork.in_uwsgi_master():
            return False
        with self._lock:
            if self.state is not _IDLE:
                return True
            self.state = _STARTING
            wake_r = self.outbox.open_wake_pipe()
            self._poller = self._select.poll()
            self._poller.register(wake_r, self._select.POLLIN)
            self._thread = self._threading.Thread(
                target=self._run_safely, daemon=True,
                name='oslo.messaging-ext unix relay %s' % self.path)
            self._thread.start()
        unix_log.start_green_drainer()
        return True

    def close(self, flush_timeout=_CLOSE_FLUSH_TIMEOUT):
        """Stop the relay, hand over queued lines, remove our socket."""
        if self.pid != os.getpid():
            # Forked without hooks: what runs is the parent's, not ours.
            unix_fork.adopt(self)
        thread = self._thread
        if thread is None:
            return
        self._stopping = unix_stop.CleanStop(self, flush_timeout)
        self.outbox.wake()
        if thread is not self._threading.current_thread():
            thread.join(flush_timeout + unix_stop.LINE_END_TIMEOUT + 1.0)
        self._close_all()
        self._thread = None
        self.state = _IDLE
        self.subscribers = None
        self.connecting = 0
        emit_deferred_records()

    def park(self):
        """Before a fork: hold the relay thread at a safe point."""
        thread = self._thread
        if (thread is not None and thread.is_alive() and
                thread is not self._threading.current_thread()):
            self.parking.park(self.outbox.wake, self.path)

    def unpark(self):
        """After a fork, in the parent: let the relay thread go on."""
        self.parking.unpark()

    def after_fork_in_child(self):
        """Forget what the parent owned; rejoin as a publisher."""
        if self._hub is not None:
            self._hub.close()
        if self._upstream is not None:
            self._upstream.sock.close()
        self.outbox.close_wake_pipe()
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
        # A hub's subscribers were all just dropped: nobody listens until
        # they reconnect, so notify() must not serialize for them. A
        # publisher's hub may still serve its own: unknown, lines queue.
        was_hub = self._hub is not None
        self._close_connections()
        self._counts_changed(0 if was_hub else None, 0, False)
        self._poller = self._select.poll()
        self._poller.register(self.outbox.wake_r, self._select.POLLIN)
        self.state = _STARTING
        self.retry.later()

    def _run(self):
        while True:
            # At the top of the loop: nothing is half-way here.
            self.parking.here()
            if self.state is _STARTING and self.retry.due(time.monotonic()):
                self._try_to_join()
            lines = self.outbox.take() if self._can_take() else None
            if lines:
                lines.append('')
                self._deliver('\n'.join(lines).encode('utf-8'))
                timeout = _LINGER
            else:
                timeout = None
            if self._stopping and self._stopping.step(
                    self._hub, self.handing_over()):
                return
            if self.state is _STARTING:
                timeout = self.retry.wait_ms()
            elif self._stopping:
                timeout = 10
            elif self._upstream is not None and not self._upstream.answered:
                timeout = self._await_answer(timeout)
            if self._hub is not None:
                timeout = self._hub.tick(timeout)
            timeout = self._report_drops(timeout)
            for fd, events in self._poller.poll(timeout):
                self._handle(fd, events)

    def _try_to_join(self):
        try:
            # fork_lock: a child must never inherit the lock file held.
            with self.fork_lock:
                with sockfile.Lock(self.lock_path):
                    elected = election.elect(self.path, self.mode, self.gid)
        except sockfile.LockBusy:
            self.retry.lock_busy()
            return
        except (proto.RelayError, OSError) as exc:
            self.retry.failed(exc)
            return
        if isinstance(elected, election.Hub):
            self._become_hub(elected)
        else:
            self._become_publisher(elected.sock)
        self.retry.joined(self.state is _HUB)

    def _await_answer(self, timeout):
        """Let go of a listener that does not answer as a hub; timeout."""
        wait = self._upstream.answer_wait_ms()
        if wait:
            return wait if timeout is None else min(timeout, wait)
        self.retry.say('it is held by a live listener that has not answered '
                       'as a hub of this service within %.0f s'
                       % upstream.ANSWER_TIMEOUT)
        self._lose_upstream(settled=False)
        return self.retry.wait_ms()

    def _report_drops(self, timeout):
        """Report drop counts within _DROP_REPORT_INTERVAL; return timeout.

        A count otherwise rides in front of the next line, and a stream
        that ends with drops would never report them.
        """
        counting = self.saturated or self.outbox.counting()
        if not counting and not (self._hub is not None and
                                 self._hub.unreported_drops()):
            return timeout
        now = time.monotonic()
        if now >= self._drops_report_at:
            self._drops_report_at = now + _DROP_REPORT_INTERVAL
            if self._hub is not None:
                self._hub.report_drops()
            elif self.state is _PUBLISHER:
                self.outbox.queue_unsent_notice()
        wait = max(0, self._drops_report_at - now) * 1000 + 1
        return wait if timeout is None else min(timeout, wait)

    def _counts_changed(self, subscribers, connecting, saturated):
        self.subscribers = subscribers
        self.connecting = connecting
        self.saturated = saturated

    def _can_take(self):
        if self.state is _HUB:
            return True
        return (self.state is _PUBLISHER and self._upstream.answered and
                not self._upstream_pending())

    def _upstream_pending(self):
        return self._upstream is not None and bool(self._upstream.pending)

    def handing_over(self):
        """Whether lines of this process wait to be handed to the hub."""
        return bool(self.outbox) or self._upstream_pending()

    def queued_bytes(self):
        return (self.outbox.queued_bytes() +
                (len(self._upstream.pending) if self._upstream else 0) +
                (self._hub.queued_bytes() if self._hub is not None else 0))

    def _handle(self, fd, events):
        select = self._select
        if fd == self.outbox.wake_r:
            self.outbox.drain_wake_pipe()
        elif self._upstream is not None and fd == self._upstream.fileno():
            if events & select.POLLOUT and not self._upstream.flush():
                self._lose_upstream()
            # The flush may have found the hub gone (POLLOUT and POLLHUP
            # come together when it exits).
            if self._upstream is not None and events & (
                    select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read_upstream()
        elif self._hub is not None:
            self._hub.handle(fd, events)

    # -- roles ----------------------------------------------------------------

    def _become_hub(self, elected):
        self._bound_id = elected.bound_id
        self._hub = unix_hub.Hub(
            elected.listener, self._poller, self.path, self.service,
            self.max_subscribers, self.buffer_size,
            take_unsent=self.outbox.take_unsent,
            counts_changed=self._counts_changed, fork_lock=self.fork_lock)
        self.state = _HUB
        self.subscribers = 0
        self.connecting = 0

    def _become_publisher(self, sock):
        self._upstream = upstream.Upstream(sock, self._poller, self.service,
                                           self.pid)
        self.state = _PUBLISHER
        self.subscribers = None

    def _deliver(self, data):
        if self._hub is not None:
            self._hub.fan_out(data)
        elif not self._upstream.send(data):
            self._lose_upstream()

    def _read_upstream(self):
        statuses = self._upstream.read_statuses()
        if statuses is None:
            self._lose_upstream()
            return
        for status in statuses:
            if status.get('service') != self.service:
                self.retry.say(
                    'it is now held by the hub of another service (%r, pid '
                    '%s)' % (status.get('service'), status.get('pid')))
                self._lose_upstream(settled=False)
                return
            self._upstream.answered = True
            self.subscribers = status.get('subscribers', 0)
            self.connecting = status.get('connecting', 0)
            self.saturated = bool(status.get('saturated'))
            # Report what was counted to the subscribers it was counted
            # for, before the hub's subscribers change any further.
            self.outbox.queue_unsent_notice()

    def _lose_in_flight(self, why):
        """Count what the hub had not taken of the batch being sent.

        It is reported, as dropped, to the subscribers of the next hub.
        """
        if self._upstream is None:
            return
        lost = self._upstream.take_in_flight()
        if lost:
            self.outbox.queue_notice(
                lost, 'publisher %d (%s)' % (self.pid, why), first=True)

    def _lose_upstream(self, settled=None):
        """The hub went away: re-elect, keeping queued lines.

        At once after a connection that lasted, so that a switch-over is
        quick; with backoff after one that ended as soon as it was made
        (refused, or another service's hub), so as not to spin.
        """
        self._lose_in_flight('hub lost')
        if settled is None:
            settled = self._upstream.settled()
        self._upstream.close()
        self._upstream = None
        self.subscribers = None
        self.connecting = 0
        self.saturated = False
        # _STARTING, not _IDLE: this thread re-elects; notify() must not
        # start another one.
        self.state = _STARTING
        if settled:
            self.retry.at_once()
        else:
            self.retry.later()

    # -- shutdown -------------------------------------------------------------

    def _close_connections(self):
        if self._upstream is not None:
            self._upstream.sock.close()
            self._upstream = None
        if self._hub is not None:
            # The hub binds the path again if it was removed.
            self._bound_id = self._hub.bound_id or self._bound_id
            self._hub.close()
            self._hub = None
            with self.fork_lock:
                election.unlink_ours(self.path, self.lock_path,
                                     self._bound_id)

    def _close_all(self):
        self._close_connections()
        self.outbox.close_wake_pipe()
        self._poller = None


def get(path, **kwargs):
    """The relay of ``path`` in this process, shared by its drivers."""
    relay = unix_fork.relays.get(path)
    if relay is None:
        relay = unix_fork.relays[path] = Relay(path, **kwargs)
    relay.users += 1
    return relay


def release(relay):
    relay.users -= 1
    if relay.users <= 0:
        unix_fork.relays.pop(relay.path, None)
        relay.close()
