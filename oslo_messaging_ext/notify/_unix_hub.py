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

"""The hub process of a unix notification socket (private).

The driver claims the path (proto.claim: ``sock_path + '.lock'`` locked,
one hub per path; ``sock_path`` and ``sock_path + '.ingest'``,
SOCK_SEQPACKET and 0600, bound), then runs ``python -m
oslo_messaging_ext.notify._unix_hub`` with those fds, in its own session,
stdin and stdout on /dev/null, stderr kept (the service's journal). What
connects while the hub starts waits in the listeners' queues; the hub
admits subscribers first. It leaves GRACE seconds after its last process
left. By role: Ingest (the service's processes), Subscribers, Hub
(paths, lock, lifetime). It imports neither oslo.messaging nor eventlet.
"""

import argparse
import collections
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import time

from oslo_utils import strutils

from oslo_messaging_ext.notify import _unix_protocol as proto

LOG = logging.getLogger('oslo_messaging_ext.notify.unix_hub')

# Seconds the hub stays with no process of the service connected.
GRACE = 2.0
# Seconds between two checks that the paths still name our sockets.
CHECK_INTERVAL = 0.5
# Seconds given to subscribers to read what is queued, at exit.
FLUSH_TIMEOUT = 1.0
_IOV_MAX = 512
_READS_PER_TURN = 64
# Room a drop notice needs in a subscriber's buffer.
_NOTICE_ROOM = 512
_MAX_HELLO = 1024
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_HUP = select.POLLHUP | select.POLLERR | select.POLLNVAL
# Each key strutils masks on holds one of these (test_unix_hub checks it
# against the oslo.utils in use): a line with none is left as it is.
WORDS = (b'pass', b'pswd', b'token', b'secret', b'key', b'kek', b'cookie',
         b'configdrive', b'credential', b'fsid', b'suffix')


def clean(data):
    """Whether masking changes none of the lines of ``data``.

    ASCII without \\u escapes, holding no word once lowercased: no key or
    string holds one (no other escape hides a letter, no word a newline).
    """
    if not data.isascii() or b'\\u' in data:
        return False
    lowered = data.lower()
    return not any(word in lowered for word in WORDS)


def mask(line):
    """``line`` as ``strutils.mask_dict_password`` masks; None if invalid."""
    if line[:1] != b'{' or line[-1:] != b'}':
        return None
    if clean(line):
        return line
    try:
        envelope = json.loads(line)
    except ValueError:
        return None
    if not isinstance(envelope, dict):
        return None
    return proto.dumps(strutils.mask_dict_password(
        envelope, secret='***'))  # nosec B106: what strutils writes


class Subscriber:
    __slots__ = ('sock', 'fd', 'pending', 'pending_bytes', 'sources',
                 'causes', 'reading')

    def __init__(self, sock):
        self.sock, self.fd = sock, sock.fileno()
        self.pending, self.pending_bytes = collections.deque(), 0
        self.sources = collections.Counter()
        self.causes = collections.Counter()
        self.reading = True


def _accept(listener, admit):
    """``admit`` each waiting connection; the OSError if out of fds."""
    while True:
        try:
            admit(listener.accept()[0])
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:  # else: that connection
                return exc


class Subscribers:
    """Each has a bounded queue; what does not fit is counted, reported."""

    def __init__(self, listener, poller, path, max_subscribers, buffer_size):
        self.listener, self.path = listener, path
        self.max_subscribers, self.buffer_size = max_subscribers, buffer_size
        self.peers = {}
        self._poller = poller
        self._refusals = proto.Throttle(LOG)
        poller.register(listener, select.POLLIN)

    def admit(self, sock):
        if len(self.peers) >= self.max_subscribers:
            sock.close()
            self._refusals.warn('%s: refused a subscriber: '
                                'sock_max_subscribers (%d) reached',
                                self.path, self.max_subscribers)
            return
        sock.setblocking(False)
        peer = Subscriber(sock)
        self.peers[peer.fd] = peer
        self._poller.register(sock, select.POLLIN)

    def handle(self, peer, events):
        if events & select.POLLIN:
            # Subscribers only read: anything sent (or an EOF, as socat's
            # half-close) stops the reading, never the relaying.
            try:
                peer.sock.recv(proto.READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                self.drop(peer)
                return
            peer.reading = False
            self._poller.modify(peer.sock, self._mask(peer))
        elif events & _HUP:
            self.drop(peer)
        elif events & select.POLLOUT:
            self.flush(peer)

    def fan_out(self, data, lines, sources):
        """Queue ``data``, ``lines`` lines (``sources`` per source)."""
        limit = self.buffer_size
        for peer in list(self.peers.values()):
            if peer.pending and peer.pending_bytes + len(data) > limit:
                self._credit(peer, lines, sources, proto.SUBSCRIBER_BUFFER)
                continue
            if peer.causes:
                self._queue_notice(peer)
            peer.pending.append(data)
            peer.pending_bytes += len(data)
            self.flush(peer)

    def credit(self, count, sources, cause):
        for peer in self.peers.values():
            self._credit(peer, count, sources, cause)

    @staticmethod
    def _credit(peer, count, sources, cause):
        peer.sources.update(sources)
        peer.causes[cause] += count

    def report_drops(self, force=False):
        """Queue the drop notices that fit (all, with ``force``)."""
        for peer in list(self.peers.values()):
            room = self.buffer_size - peer.pending_bytes
            if peer.causes and (force or room >= _NOTICE_ROOM):
                self._queue_notice(peer)
                self.flush(peer)

    def _queue_notice(self, peer):
        notice = proto.dropped_envelope(sum(peer.causes.values()), ', '.join(
            sorted(peer.causes)), peer.sources)
        peer.sources.clear()
        peer.causes.clear()
        peer.pending.append(notice)
        peer.pending_bytes += len(notice)

    def flush(self, peer):
        pending = peer.pending
        while pending:
            try:
                sent = peer.sock.sendmsg(
                    [pending[i] for i in range(min(len(pending), _IOV_MAX))])
            except BlockingIOError:
                break
            except OSError:
                self.drop(peer)
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
        if self.peers.get(peer.fd) is peer:
            self._poller.modify(peer.sock, self._mask(peer))

    @staticmethod
    def _mask(peer):
        return ((select.POLLIN if peer.reading else 0) |
                (select.POLLOUT if peer.pending else 0))

    def drop(self, peer):
        if self.peers.pop(peer.fd, None) is None:
            return
        self._poller.unregister(peer.fd)
        peer.sock.close()


class Publisher:
    def __init__(self, sock):
        self.sock, self.fd = sock, sock.fileno()
        self.source = self.tally = self.header = None
        self.heard = False


class Ingest:
    """The service's processes, of the hub's uid; lines relayed by turn."""

    def __init__(self, listener, poller, path, subscribers, buffer_size):
        self.listener, self.path = listener, path
        self.publishers = {}
        self._poller, self._subscribers = poller, subscribers
        self._buffer = bytearray(2 * buffer_size + 65536)
        self._view = memoryview(self._buffer)
        self._strangers, self._invalid = (proto.Throttle(LOG),
                                          proto.Throttle(LOG))
        self._lines, self._from = [], []
        poller.register(listener, select.POLLIN)

    def admit(self, sock):
        try:
            uid = proto.peer_uid(sock)
        except OSError:
            uid = None
        if uid != os.geteuid():
            sock.close()
            self._strangers.warn('%s: refused a publisher of uid %s, not '
                                 '%d', self.path, uid, os.geteuid())
            return
        sock.setblocking(False)
        peer = Publisher(sock)
        self.publishers[peer.fd] = peer
        self._poller.register(sock, select.POLLIN)

    def handle(self, peer, events):
        gone = False
        for _ in range(_READS_PER_TURN):
            hello = peer.tally is None
            try:
                size = self._hello(peer) if hello else peer.sock.recv_into(
                    self._view, len(self._buffer), socket.MSG_TRUNC)
            except BlockingIOError:
                gone = bool(events & _HUP)
                break
            except OSError:
                size = 0
            if not size:
                gone = True
                break
            if not hello:
                self._message(peer, size)
        if gone:
            self.drop(peer)

    def _hello(self, peer):
        """Read the first message: HELLO, with the tally; 0 if not."""
        data, fds, _, _ = socket.recv_fds(peer.sock, _MAX_HELLO, 1)
        try:
            if data[:1] == proto.HELLO and len(fds) == 1:
                peer.tally = proto.map_tally(fds[0])
                peer.source = json.loads(data[1:])['source']
        except (ValueError, KeyError, TypeError):
            pass
        finally:
            for fd in fds:
                os.close(fd)
        if peer.tally is not None and isinstance(peer.source, str):
            peer.tally[proto.SUBSCRIBERS] = len(self._subscribers.peers)
            return len(data)
        if data:
            self._say_invalid(peer.source, 'not a HELLO with a tally')
        peer.tally = None
        return 0

    def _message(self, peer, size):
        if size > len(self._buffer):
            self._say_invalid(peer.source, 'a message of %d bytes' % size)
        elif self._buffer[:1] == proto.LINE and size > proto.HEADER.size:
            header, peer.heard = self._view[:proto.HEADER.size], True
            if header != peer.header:
                peer.header = header.tobytes()
                self._credit(peer, proto.HEADER.unpack(peer.header)[1:])
            line = self._view[proto.HEADER.size:size].tobytes()
            if line[:1] != b'{' or line[-1:] != b'}' or b'\n' in line:
                self._say_invalid(peer.source, 'not a JSON object')
                return
            self._lines.append(line)
            self._from.append(peer.source)
        else:
            self._say_invalid(peer.source, 'a message of unknown kind')

    def _credit(self, peer, dropped=None):
        """Report, once, what a line carried, or the tally (quiet or gone)."""
        tally = peer.tally
        for cause, where in enumerate(() if tally is None else
                                      proto.CAUSES):
            now = tally[cause] if dropped is None else dropped[cause]
            count = now - tally[proto.CREDITED + cause]
            if not count:
                continue
            self.relay()
            if 0 < count <= proto.MAX_DROP_COUNT:
                tally[proto.CREDITED + cause] = now
                self._subscribers.credit(count, {peer.source: count}, where)
            else:
                self._say_invalid(peer.source, 'a drop count of %d' % count)

    def share_count(self):
        for peer in self.publishers.values():
            if peer.tally is not None:
                peer.tally[proto.SUBSCRIBERS] = len(self._subscribers.peers)

    def credit_quiet(self):
        """Report the drops of processes that sent nothing since last."""
        for peer in list(self.publishers.values()):
            if not peer.heard:
                self._credit(peer)
            peer.heard = False

    def _say_invalid(self, source, what):
        self._subscribers.credit(1, {}, 'invalid')
        self._invalid.warn('%s: dropped an invalid message (%s, from '
                           'source %r)', self.path, what, source)

    def relay(self):
        """Mask the lines read so far (most chunks are clean as a whole)."""
        lines, sources = self._lines, self._from
        if not lines:
            return
        self._lines, self._from = [], []
        lines.append(b'')
        data = b'\n'.join(lines)
        if not clean(data):
            masked = [(mask(line), source)
                      for line, source in zip(lines, sources)]
            for source in [s for line, s in masked if line is None]:
                self._say_invalid(source, 'not a JSON object')
            lines = [line for line, _ in masked if line is not None]
            sources = [source for line, source in masked if line is not None]
            if not lines:
                return
            data = b'\n'.join(lines + [b''])
        self._subscribers.fan_out(data, len(sources),
                                  collections.Counter(sources))

    def drop(self, peer):
        if self.publishers.pop(peer.fd, None) is None:
            return
        self._credit(peer)
        self._poller.unregister(peer.fd)
        peer.sock.close()

    def close(self):
        self.relay()
        for peer in list(self.publishers.values()):
            self.drop(peer)
        self._poller.unregister(self.listener)
        self.listener.close()


class Hub:
    """Bind both sockets, relay, keep the paths, leave when idle."""

    def __init__(self, path, mode, gid, max_subscribers, buffer_size,
                 claimed):
        self.path, self.lock_fd = path, claimed[0]
        self.poller = select.poll()
        self._binds = proto.listeners(path, mode, gid)
        # The claim's, not re-read (unless an older driver gave none).
        ids = claimed[3:] or [i for p in self._binds for i in proto.file_id(p)]
        self._ids = dict(zip(self._binds, zip(ids[::2], ids[1::2])))
        listeners = [socket.socket(fileno=fd) for fd in claimed[1:3]]
        for listener in listeners:  # SO_PEERCRED then names the hub
            listener.listen(proto.LISTEN_BACKLOG)
        self.subscribers = Subscribers(listeners[0], self.poller, path,
                                       max_subscribers, buffer_size)
        # Before any line: who waited for the hub gets all it relays.
        _accept(self.subscribers.listener, self.subscribers.admit)
        self.ingest = Ingest(listeners[1], self.poller, path,
                             self.subscribers, buffer_size)
        self._idle_since = time.monotonic()
        self._check_at = self._idle_since + CHECK_INTERVAL
        self._lost, self._failures = (proto.Throttle(LOG),
                                      proto.Throttle(LOG))
        self.stopping, self._shared = False, 0

    def _bind(self, path):
        return proto.bind_listener(path, *self._binds[path])

    def run(self):
        """Serve until GRACE seconds with no publisher; never blocks."""
        while True:
            timeout = self._tick()
            if timeout is None:
                return
            subscribers, ingest = self.subscribers, self.ingest
            for fd, events in self.poller.poll(timeout * 1000):
                if fd == subscribers.listener.fileno():
                    self._pause(_accept(subscribers.listener,
                                        subscribers.admit))
                elif fd == ingest.listener.fileno():
                    self._pause(_accept(ingest.listener, ingest.admit))
                elif fd in ingest.publishers:
                    ingest.handle(ingest.publishers[fd], events)
                elif fd in subscribers.peers:
                    subscribers.handle(subscribers.peers[fd], events)
            if len(subscribers.peers) != self._shared:
                self._shared = len(subscribers.peers)
                ingest.share_count()
            ingest.relay()
            subscribers.report_drops()

    def _pause(self, exc):
        """Out of fds: else poll() reports the queue again at once."""
        if exc is not None:
            self._lost.warn('%s: accept failed: %s', self.path, exc)
            time.sleep(0.1)

    def _tick(self):
        """Do what is due; the poll timeout (s), None to leave."""
        if self.stopping:
            return None
        now = time.monotonic()
        if now >= self._check_at:
            self._check_at = now + CHECK_INTERVAL
            if not self._keep_lock():
                return None
            self._keep_paths()
            self.ingest.credit_quiet()
        timeout = self._check_at - now
        if self.ingest.publishers:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= GRACE:
            if self._nobody_left():
                return None
            self._idle_since = now
        if self._idle_since is not None:
            timeout = min(timeout, self._idle_since + GRACE - now)
        return max(timeout, 0.001)

    def _nobody_left(self):
        """Whether no publisher is connected, nor queued (then re-listen)."""
        self.ingest.listener.shutdown(socket.SHUT_RDWR)
        _accept(self.ingest.listener, self.ingest.admit)
        if not self.ingest.publishers:
            return True
        self._replace('ingest', proto.ingest_path(self.path), self._bind(
            proto.ingest_path(self.path)))
        return False

    def _replace(self, role, path, bound):
        owner = getattr(self, role)
        self.poller.unregister(owner.listener)
        owner.listener.close()
        owner.listener, self._ids[path] = bound
        self.poller.register(owner.listener, select.POLLIN)

    def _keep_lock(self):
        """Whether the lock file is ours (locked anew if it was removed)."""
        lock = proto.lock_path(self.path)
        try:
            if os.path.lexists(lock) and os.path.samestat(
                    os.fstat(self.lock_fd), os.lstat(lock)):
                return True
            fd = proto.try_lock(self.path)
        except (OSError, proto.RelayError):
            fd = None
        if fd is None:
            if os.path.isdir(os.path.dirname(self.path)):
                LOG.warning('%s: its lock file was replaced: leaving',
                            self.path)
            return False
        os.close(self.lock_fd)
        self.lock_fd = fd
        return True

    def _keep_paths(self):
        """Bind a removed path again, by the rules of the first bind."""
        for role, path in (('subscribers', self.path),
                           ('ingest', proto.ingest_path(self.path))):
            try:
                if proto.file_id(path) == self._ids[path]:
                    continue
                self._lost.warn('%s was replaced by another file; left '
                                'alone', path)
                continue
            except FileNotFoundError:
                pass
            except OSError:
                continue
            try:
                problem = proto.directory_problem(os.path.dirname(path))
                if problem:
                    raise proto.RelayError(problem)
                self._replace(role, path, self._bind(path))
            except (OSError, proto.RelayError) as exc:
                self._failures.warn('%s was removed; cannot bind it '
                                    'again: %s', path, exc)
                continue
            LOG.warning('%s was removed: bound again', path)

    def leave(self):
        """Remove both sockets, unlock, flush subscribers FLUSH_TIMEOUT."""
        for path, bound_id in self._ids.items():
            try:
                proto.unlink_if_ours(path, bound_id)
            except OSError:
                pass
        self.ingest.close()
        self.poller.unregister(self.subscribers.listener)
        self.subscribers.listener.close()
        os.close(self.lock_fd)
        self.subscribers.report_drops(force=True)
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while any(p.pending for p in self.subscribers.peers.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, events in self.poller.poll(left * 1000):
                peer = self.subscribers.peers.get(fd)
                if peer is not None:
                    self.subscribers.handle(peer, events)
        for peer in list(self.subscribers.peers.values()):
            self.subscribers.drop(peer)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='oslo_messaging_ext unix hub')
    parser.add_argument('path')
    parser.add_argument('--mode', type=lambda v: int(v, 8), default=0o660)
    parser.add_argument('--gid', type=int, default=os.getegid())
    parser.add_argument('--max-subscribers', type=int, default=64)
    parser.add_argument('--buffer-size', type=int, default=4 * 1024 * 1024)
    parser.add_argument('--claimed', help='its starter\'s proto.claim()')
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING,
        format='%(asctime)s %(process)d %(levelname)s %(name)s [-] '
               '%(message)s')
    try:
        claimed = ([int(fd) for fd in args.claimed.split(',')]
                   if args.claimed else
                   proto.claim(args.path, args.mode, args.gid))
        if claimed is None:
            return 0  # another hub serves the path
        hub = Hub(args.path, args.mode, args.gid, args.max_subscribers,
                  args.buffer_size, claimed)
    except (OSError, proto.RelayError) as exc:
        LOG.error('%s: cannot serve it: %s', args.path, exc)
        return 1
    # Leave within CHECK_INTERVAL, as at the end of the grace. Nothing is
    # raised from the handler: it could leave a lock taken.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: setattr(hub, 'stopping', True))
    try:
        hub.run()
    finally:
        hub.leave()
    return 0


if __name__ == '__main__':
    sys.exit(main())
