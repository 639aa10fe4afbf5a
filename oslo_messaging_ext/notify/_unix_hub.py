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

"""The hub of a unix notification socket (private).

The relay of one process of the service, elected, holds the listening
socket; :class:`Hub` is what it does then. It accepts connections, tells
the service's other processes (publishers, who introduce themselves with a
handshake line) from subscribers (who send nothing), and copies every line
it gets, its own process's and the publishers', to each subscriber's
bounded queue. A line that does not fit a subscriber's queue is counted for
that subscriber and reported to it in-band (DROPPED_EVENT_TYPE) before its
next line, or within _DROP_REPORT_INTERVAL, with how many were lines of
which source (the "sequence" stamp of each line, see _unix_encoding). The
publishers are told, by status lines, how many subscribers there are and
whether all are full. :class:`LineAssembler` cuts what a publisher sends
into lines; _unix_hub_path keeps the socket path bound.

It runs in the relay's native thread only, and never blocks: every socket
is non-blocking and polled by the relay's poller.
"""

import collections
import errno
import itertools
import logging
import os
import time

from oslo_messaging_ext.notify import _unix_encoding as encoding
from oslo_messaging_ext.notify import _unix_hub_path as hub_path
from oslo_messaging_ext.notify import _unix_log as unix_log
from oslo_messaging_ext.notify import _unix_protocol as proto
from oslo_messaging_ext.notify import _unix_sockfile as sockfile

LOG = logging.getLogger(__name__)

select = proto.native('select')

_IOV_MAX = 512
# Bounds the reads of what a publisher sent before hanging up (256 MiB).
_MAX_READS_AT_HANGUP = 1024
# A subscriber is saturated when its buffer has less room than this (or
# than half the buffer, if smaller).
_SATURATION_MARGIN = 65536
# Out of file descriptors (EMFILE...): stop accepting for a while.
_ACCEPT_PAUSE_MIN, _ACCEPT_PAUSE_MAX = 0.1, 2.0
# accept() errors that concern the process, not the connection.
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Connections accepted but not yet known to be publishers or subscribers;
# past it, further ones are closed until these are classified.
_MAX_UNCLASSIFIED = 128
# Room a drop notice needs in a subscriber's buffer.
_NOTICE_ROOM = 512
# A publisher's line longer than this is not a notification anyone can
# use: it is dropped (and counted) rather than held, so that a peer that
# never ends its line cannot make the hub's memory grow without bound.
MAX_LINE = 128 * 1024 * 1024

# Seconds a new connection has to introduce itself as a publisher; after
# that it is a subscriber (subscribers send nothing). Lines are held for it
# meanwhile, and sent if it turns out to be a subscriber.
_HANDSHAKE_GRACE = 0.05
_NEW, _SUBSCRIBER, _PUBLISHER = 'new', 'subscriber', 'publisher'
# Who is fed lines: subscribers, and new connections until they say what
# they are.
_FED = (_NEW, _SUBSCRIBER)


class Peer:
    """A connection accepted by the hub: a subscriber until it says not."""

    __slots__ = ('sock', 'fd', 'kind', 'reading', 'inbuf', 'pending',
                 'pending_bytes', 'dropped', 'dropped_sources',
                 'classify_at', 'line', 'stopped')

    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        # Unclassified for a moment: a publisher sends its handshake at
        # once, and must not be counted nor sent lines as a subscriber
        # meanwhile. Lines are queued for it but held (no POLLOUT) until
        # then.
        self.kind = _NEW
        self.classify_at = time.monotonic() + _HANDSHAKE_GRACE
        self.reading = True
        self.inbuf = b''
        self.pending = collections.deque()
        self.pending_bytes = 0
        self.dropped = 0
        # How many of ``dropped`` were lines of which source.
        self.dropped_sources = {}
        # What a publisher sends, cut into whole lines.
        self.line = LineAssembler()
        # Trimmed for a stop: it is sent nothing more.
        self.stopped = False


class LineAssembler:
    """Whole lines out of what a publisher sends, in linear time.

    The start of a line is kept as the chunks read, joined once when the
    line ends, not concatenated at every read; a line longer than
    MAX_LINE is dropped rather than held, so that a peer that never ends
    its line cannot make the hub's memory grow without bound.
    """

    __slots__ = ('parts', 'size', 'skipping')

    def __init__(self):
        self.parts = []
        self.size = 0
        # Reading past the end of a line longer than MAX_LINE.
        self.skipping = False

    def feed(self, data):
        """Return (the complete lines in ``data``, whether one overflowed)."""
        end = data.rfind(b'\n') + 1
        if not end:
            return b'', self._hold(data)
        start = 0
        if self.skipping:
            # The rest of the line too long to relay, then whole lines.
            self.skipping = False
            start = data.index(b'\n') + 1
        if self.parts:
            self.parts.append(data[:end])
            complete = b''.join(self.parts)
            self.parts = []
            self.size = 0
        elif start or end < len(data):
            complete = data[start:end]
        else:
            complete = data
        overlong = end < len(data) and self._hold(data[end:])
        return complete, overlong

    def _hold(self, data):
        if self.skipping:
            return False
        self.parts.append(data)
        self.size += len(data)
        if self.size <= MAX_LINE:
            return False
        self.parts = []
        self.size = 0
        self.skipping = True
        return True


class Hub:
    """Serve the subscribers and publishers of one listening socket.

    :param listener: the bound, listening, non-blocking socket
    :param poller: the relay thread's ``select.poll`` object
    :param path: the socket path, for the log
    :param service: the identity publishers must share
    :param max_subscribers: subscribers served at most (publishers are not
        counted)
    :param buffer_size: bytes queued at most per subscriber
    :param take_unsent: returns (and resets) how many lines the relay's
        process counted instead of serializing them, every subscriber
        being full
    :param counts_changed: called with (subscribers, connecting,
        saturated) whenever one of them changes
    :param fork_lock: held while binding again, as for the first bind
    """

    def __init__(self, listener, poller, path, service, max_subscribers,
                 buffer_size, take_unsent, counts_changed, fork_lock=None):
        self.listener = listener
        self.path = path
        self.service = service
        self.max_subscribers = max_subscribers
        self.buffer_size = buffer_size
        self.saturated = False
        self.peers = {}
        self._poller = poller
        self._take_unsent = take_unsent
        self._counts_changed = counts_changed
        self._accept_resume_at = None
        self._accept_pause = _ACCEPT_PAUSE_MIN
        self._refusals = unix_log.Throttle()
        self._accept_failures = unix_log.Throttle()
        self._strangers = unix_log.Throttle()
        self._long_lines = unix_log.Throttle()
        self._path_keeper = hub_path.PathKeeper(path, fork_lock)
        poller.register(listener, select.POLLIN)

    # -- what the relay calls -------------------------------------------------

    def handle(self, fd, events):
        if fd == self.listener.fileno():
            self._accept()
            return
        peer = self.peers.get(fd)
        if peer is None:
            return
        if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            if peer.kind is _NEW:
                # Maybe a publisher that said all it had and left.
                self._read_peer(peer)
            # Dropping a publisher relays its last lines first.
            self._drop_peer(peer)
            return
        if events & select.POLLIN:
            self._read_peer(peer)
        if events & select.POLLOUT and self.peers.get(fd) is peer:
            self._flush_peer(peer)

    def tick(self, timeout):
        """Do what is due; return the poll timeout (ms) it needs."""
        # Before new subscribers count: they missed none of these.
        self._credit_unsent()
        timeout = self._resume_accepting(timeout)
        timeout = self._classify_new_peers(timeout)
        timeout = self._keep_path(timeout)
        self._refresh_saturation()
        return timeout

    def fan_out(self, data):
        """Queue complete lines (bytes) for every subscriber."""
        # Lines this process counted instead of sending come before the
        # later lines of this process: a subscriber then hears of a loss
        # before the line whose sequence number shows it.
        self._credit_unsent()
        if proto.DROPPED_PREFIX in data:
            self._fan_out_with_notices(data)
            return
        lines = data.count(b'\n')
        for peer in self._fed():
            self._queue(peer, data, lines)

    def credit_dropped(self, count, sources=None):
        """Count ``count`` lines as dropped for everyone fed now.

        ``sources``: how many were lines of which source; by default all
        were this process's own.
        """
        if not count:
            return
        if sources is None:
            sources = {encoding.own_source(): count}
        for peer in self._fed():
            peer.dropped += count
            _add_sources(peer.dropped_sources, sources)

    def _credit_unsent(self):
        self.credit_dropped(self._take_unsent())

    def unreported_drops(self):
        return any(p.dropped for p in self.peers.values()
                   if p.kind is _SUBSCRIBER)

    def report_drops(self, at_stop=False):
        """Queue each subscriber's drop count, where a notice fits.

        At stop, it is queued whatever the room: the hub will not come
        back to it.
        """
        if at_stop:
            for peer in self._fed():
                self._queue_drop_notice(peer)
            return
        for peer in self.peers.values():
            if (peer.kind is _SUBSCRIBER and peer.dropped and
                    peer.pending_bytes + _NOTICE_ROOM <= self.buffer_size):
                self._queue_drop_notice(peer)

    def read_publishers_once_more(self):
        """At stop, relay what publishers sent (exited ones included)."""
        for peer in list(self.peers.values()):
            for _ in range(_MAX_READS_AT_HANGUP):
                if (peer.kind is not _PUBLISHER or
                        self.peers.get(peer.fd) is not peer or
                        not self._read_peer(peer)):
                    break

    def subscribers_behind(self):
        """The subscribers that have not been sent everything yet."""
        return [p for p in self.peers.values()
                if p.kind is _SUBSCRIBER and p.pending]

    def queued_bytes(self):
        return sum(p.pending_bytes for p in self.peers.values())

    def trim_to_line_end(self, peer):
        """Keep only the rest of a line partly sent; return lines dropped.

        A subscriber that does not keep up must not hold a stop, but it
        must never be left with a cut line either. Every chunk queued ends
        with a newline, and only the head of the queue can be partly sent
        (a memoryview into its chunk). A subscriber is then told, by a
        drop notice after that line, what it will not get: it reads on
        until the hub closes.
        """
        subscriber = peer.kind is not _PUBLISHER
        if subscriber:
            # Stop fan-out first: a line queued after the trim could be
            # cut in its turn.
            peer.stopped = True
        chunks = list(peer.pending)
        head = chunks[0]
        rest = b''
        if isinstance(head, memoryview):
            whole = head.obj
            offset = len(whole) - len(head)
            if offset and whole[offset - 1:offset] != b'\n':
                rest = whole[offset:whole.index(b'\n', offset) + 1]
            chunks[0] = memoryview(whole)[offset + len(rest):]
        unread, sources = 0, {}
        for chunk in chunks:
            count, chunk_sources = proto.accounted_in(chunk)
            unread += count
            _add_sources(sources, chunk_sources)
        peer.pending.clear()
        peer.pending_bytes = 0
        if rest:
            peer.pending.append(rest)
            peer.pending_bytes = len(rest)
        if subscriber and unread:
            peer.dropped += unread
            _add_sources(peer.dropped_sources, sources)
            self._queue_drop_notice(peer, flush=False)
        self._poller.modify(peer.sock, self._mask(peer))
        return unread

    @property
    def bound_id(self):
        """What tells the socket file the hub last bound (see sockfile)."""
        return self._path_keeper.bound_id

    def close(self):
        """Close every connection and the listener (the file stays)."""
        for peer in list(self.peers.values()):
            peer.sock.close()
        self.peers = {}
        self.listener.close()

    # -- accepting ------------------------------------------------------------

    def _accept(self):
        # What was counted, not serialized, until now was missed by the
        # present subscribers only.
        self._credit_unsent()
        accepted = 0
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(exc)
                    break
                # ECONNABORTED and friends concern that connection only.
                continue
            self._accept_pause = _ACCEPT_PAUSE_MIN
            unclassified = sum(1 for p in self.peers.values()
                               if p.kind is _NEW)
            if unclassified >= _MAX_UNCLASSIFIED:
                sock.close()
                self._say_refused('%d connections have not said yet what '
                                  'they are' % unclassified)
                continue
            sock.setblocking(False)
            peer = Peer(sock)
            self.peers[peer.fd] = peer
            self._poller.register(sock, select.POLLIN)
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
        self._poller.modify(self.listener, 0)
        unsaid = self._accept_failures.hit()
        if unsaid:
            unix_log.log(LOG, logging.WARNING, 'Unix notification socket %s: '
                         'accept failed: %s (%d times since the last '
                         'report); accepting again in %.1fs', self.path, exc,
                         unsaid, pause)

    def _resume_accepting(self, timeout):
        if self._accept_resume_at is None:
            return timeout
        wait = (self._accept_resume_at - time.monotonic()) * 1000
        if wait > 0:
            wait += 1
            return wait if timeout is None else min(timeout, wait)
        self._accept_resume_at = None
        self._poller.modify(self.listener, select.POLLIN)
        return timeout

    def _say_refused(self, reason):
        unsaid = self._refusals.hit()
        if unsaid:
            unix_log.log(LOG, logging.WARNING, 'Unix notification socket %s: '
                         'refused a connection, %s (%d refused since the '
                         'last report, %d in all)', self.path, reason, unsaid,
                         self._refusals.total)

    # -- keeping the path ---------------------------------------------------

    def _keep_path(self, timeout):
        listener, timeout = self._path_keeper.check(timeout)
        if listener is not None:
            self._poller.unregister(self.listener)
            self.listener.close()
            self.listener = listener
            self._accept_resume_at = None
            self._poller.register(listener, select.POLLIN)
        return timeout

    # -- telling publishers from subscribers ----------------------------------

    def _classify_new_peers(self, timeout):
        """Make subscribers of quiet new connections; return the timeout."""
        new = [p for p in self.peers.values() if p.kind is _NEW]
        if not new:
            return timeout
        now = time.monotonic()
        for peer in new:
            if now >= peer.classify_at:
                self._make_subscriber(peer, reading=True)
        waits = [(p.classify_at - now) * 1000 for p in new
                 if p.kind is _NEW]
        if not waits:
            return timeout
        wait = max(0, min(waits)) + 1
        return wait if timeout is None else min(timeout, wait)

    def _identify(self, peer, data):
        """Subscribers send nothing: a handshake line makes a publisher.

        Of a new connection, or of one already taken for a subscriber: a
        publisher starved of CPU past the grace period introduces itself
        late, and what it sends must not be ignored, uncounted.
        """
        line, newline, rest = data.partition(b'\n')
        if not newline:
            if len(data) > proto.MAX_HANDSHAKE:
                self._not_a_publisher(peer)
            else:
                peer.inbuf = data
            return
        hello = proto.parse_control(line)
        if not hello or hello.get(proto.PROTOCOL_KEY) != proto.ROLE_PUBLISHER:
            self._not_a_publisher(peer)
            return
        try:
            uid = sockfile.peer_uid(peer.sock)
        except OSError:
            uid = None
        if uid != os.geteuid():
            unsaid = self._strangers.hit()
            if unsaid:
                unix_log.log(LOG, logging.WARNING, 'Unix notification socket '
                             '%s: ignoring a publisher running as uid %s; '
                             'only uid %d may publish (%d ignored since the '
                             'last report)', self.path, uid, os.geteuid(),
                             unsaid)
            self._not_a_publisher(peer)
            return
        peer.kind = _PUBLISHER
        peer.inbuf = b''
        peer.dropped = 0
        peer.dropped_sources = {}
        if peer.pending:
            # Held for it, or sent to it, as to a subscriber: not for it.
            # Only the rest of a line partly sent stays, so that its status
            # lines start a line.
            self.trim_to_line_end(peer)
        self._count_changed()
        if rest:
            self._relay_publisher_data(peer, rest)

    def _not_a_publisher(self, peer):
        if peer.kind is _NEW:
            self._make_subscriber(peer)
        else:
            self._stop_reading(peer)

    def _make_subscriber(self, peer, reading=False):
        """Whatever a subscriber sends is ignored, but a late handshake.

        One taken for a subscriber only because it said nothing yet is
        still read (``reading``): it may be a publisher that is late. Only
        subscribers count against sock_max_subscribers, once known:
        publishers are always let in.
        """
        peer.reading = reading
        if not reading:
            peer.inbuf = b''
        if peer.kind is _NEW:
            if self._subscriber_count() >= self.max_subscribers:
                self._say_refused('sock_max_subscribers (%d) reached'
                                  % self.max_subscribers)
                self._drop_peer(peer)
                return
            peer.kind = _SUBSCRIBER
            self._count_changed()
        # Sends what was held while it could have been a publisher.
        self._flush_peer(peer)

    # -- counts and status ----------------------------------------------------

    def _fed(self):
        return [p for p in self.peers.values() if p.kind in _FED]

    def _subscriber_count(self):
        return sum(1 for p in self.peers.values() if p.kind is _SUBSCRIBER)

    def _count_changed(self):
        """Publish the counts to this process and to the publishers."""
        count = self._subscriber_count()
        connecting = sum(1 for p in self.peers.values() if p.kind is _NEW)
        self._counts_changed(count, connecting, self.saturated)
        status = proto.control_line(
            role=proto.ROLE_HUB, service=self.service, pid=os.getpid(),
            subscribers=count, connecting=connecting,
            saturated=self.saturated)
        for peer in list(self.peers.values()):
            if peer.kind is _PUBLISHER:
                self._send_status(peer, status)

    def _send_status(self, peer, status):
        """Queue the latest status for a publisher, replacing an unsent one.

        A status line says the whole state: a publisher that does not read
        (stopped, or busy) needs the newest only, and must not make its
        queue grow with every change.
        """
        pending = peer.pending
        if pending and isinstance(pending[-1], bytes):
            peer.pending_bytes -= len(pending.pop())
        self._queue(peer, status, 0, force=True)

    def _refresh_saturation(self):
        """Whether every fed connection's buffer is (nearly) full.

        Then notify() counts lines instead of serializing them, in this
        process and, told by the status line, in the publishers.
        """
        full = self.buffer_size - min(_SATURATION_MARGIN,
                                      self.buffer_size // 2)
        subscribers = self._fed()
        saturated = bool(subscribers) and all(
            p.pending_bytes >= full for p in subscribers)
        if saturated != self.saturated:
            self.saturated = saturated
            self._count_changed()

    # -- reading --------------------------------------------------------------

    def _read_peer(self, peer):
        """Read what ``peer`` sent; return False when nothing was there."""
        try:
            data = peer.sock.recv(proto.READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            self._drop_peer(peer)
            return
        if not data:
            if peer.kind is _PUBLISHER:
                self._drop_peer(peer)
            else:
                # A subscriber that shut its writing side down (socat with
                # stdin at EOF) still reads; a closed one shows POLLHUP.
                self._make_subscriber(peer)
            return
        if peer.kind is _PUBLISHER:
            self._relay_publisher_data(peer, data)
            return True
        if peer.kind is _SUBSCRIBER and not peer.reading:
            self._stop_reading(peer)
            return
        self._identify(peer, peer.inbuf + data)

    def _relay_publisher_data(self, peer, data):
        """Fan out the complete lines; keep a cut last one for later."""
        complete, overlong = peer.line.feed(data)
        if overlong:
            self.credit_dropped(1, {})
            unsaid = self._long_lines.hit()
            if unsaid:
                unix_log.log(LOG, logging.WARNING, 'Unix notification socket '
                             '%s: dropped a line longer than %d bytes from a '
                             'publisher (%d since the last report)',
                             self.path, MAX_LINE, unsaid)
        if complete:
            self.fan_out(complete)

    def _stop_reading(self, peer):
        peer.reading = False
        peer.inbuf = b''
        self._poller.modify(peer.sock, self._mask(peer))

    def _mask(self, peer):
        mask = select.POLLIN if peer.reading else 0
        if peer.pending and peer.kind is not _NEW:
            mask |= select.POLLOUT
        return mask

    # -- queueing and sending -------------------------------------------------

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
                self.fan_out(b'\n'.join(run) + b'\n')
                run = []
            self.credit_dropped(*proto.dropped_notice(line))
        if run:
            self.fan_out(b'\n'.join(run) + b'\n')

    def _queue(self, peer, data, lines, force=False):
        """Queue ``data`` for ``peer``, or count its lines as dropped.

        An empty queue takes anything, so that one notification larger
        than sock_buffer_size still reaches a subscriber that keeps up.
        """
        was_empty = not peer.pending
        if not force and (peer.stopped or not was_empty and (
                peer.pending_bytes + len(data) > self.buffer_size)):
            peer.dropped += lines
            _add_sources(peer.dropped_sources, proto.sources_in(data))
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
        notice = proto.dropped_envelope(peer.dropped, 'subscriber buffer',
                                        sources=peer.dropped_sources)
        peer.dropped = 0
        peer.dropped_sources = {}
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

    # -- hanging up -----------------------------------------------------------

    def _drop_peer(self, peer):
        if self.peers.get(peer.fd) is not peer:
            return
        del self.peers[peer.fd]
        self._poller.unregister(peer.sock)
        if peer.kind is _PUBLISHER:
            self._read_rest(peer)
        peer.sock.close()
        self._count_changed()

    def _read_rest(self, peer):
        """Relay what a departing publisher sent before it went.

        Whatever the reason it is dropped (its hang-up, or a status line
        that could not be sent to it because it had just exited), its last
        lines are still in the socket, readable before the error.
        """
        for _ in range(_MAX_READS_AT_HANGUP):
            try:
                data = peer.sock.recv(proto.READ_SIZE)
            except OSError:
                break
            if not data:
                break
            self._relay_publisher_data(peer, data)


def _add_sources(into, sources):
    for source, count in sources.items():
        into[source] = into.get(source, 0) + count
