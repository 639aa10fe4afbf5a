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

"""The queue from a process's notifying threads to its relay thread.

Private to the unix driver. The service's threads (green or native) put
lines in; the relay's native thread takes them out in batches. The two
sides meet under one short native lock under which nothing ever waits, so
notify() never blocks. The queue is bounded by ``buffer_size`` bytes: past
it a line is dropped and counted, and the count travels as a drop notice
in front of the next lines. Lines counted instead of serialized (every
subscriber being full) are kept here too, until the relay reports them.

A wake-up pipe tells the relay thread there is work, once per batch: while
lines flow the thread comes back by itself, and notify() makes no syscall.
"""

import os

from oslo_messaging_ext.notify import _unix_protocol as proto


class Outbox:
    """Lines of one process on their way to the hub.

    :param buffer_size: bytes queued at most
    :param pid: the process, named in its drop notices
    """

    def __init__(self, buffer_size, pid):
        self.buffer_size = buffer_size
        self.pid = pid
        self._os = proto.native('os')
        self._lock = proto.native('threading').Lock()
        self._lines = []
        self._bytes = 0
        self._dropped = 0
        # Lines counted, not serialized, while every subscriber was full.
        self._unsent = 0
        self._wake_pending = False
        self.wake_r = self.wake_w = None

    def __bool__(self):
        return bool(self._lines)

    # -- the notifying threads' side ------------------------------------

    def publish(self, line):
        """Queue one line (str, no newline); never blocks.

        The relay thread joins a batch with newlines and encodes it once:
        the caller's path makes no copy of the line, which matters with
        payloads beyond the small-object allocator's reach. A line larger
        than the whole buffer still goes when nothing else is queued.
        """
        with self._lock:
            size = len(line) + 1
            if self._lines and self._bytes + size > self.buffer_size:
                self._dropped += 1
                return
            self._queue_dropped_locked()
            self._lines.append(line)
            self._bytes += size
            if self._wake_pending:
                return
            self._wake_pending = True
        self.wake()

    def count_unsent(self):
        """Count a line the hub would drop, without serializing it."""
        with self._lock:
            self._unsent += 1

    def wake(self):
        try:
            self._os.write(self.wake_w, b'!')
        except (BlockingIOError, OSError, TypeError):
            # A full pipe already wakes the thread; a closed one (TypeError
            # on None) means the relay stopped.
            pass

    # -- the relay thread's side ------------------------------------------

    def open_wake_pipe(self):
        self.wake_r, self.wake_w = self._os.pipe2(
            os.O_NONBLOCK | os.O_CLOEXEC)
        return self.wake_r

    def close_wake_pipe(self):
        for fd in (self.wake_r, self.wake_w):
            if fd is not None:
                self._os.close(fd)
        self.wake_r = self.wake_w = None

    def drain_wake_pipe(self):
        try:
            while self._os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def take(self):
        """Take every queued line (drop notices included), oldest first."""
        with self._lock:
            # Drops of a full outbox are reported even if nothing follows.
            self._queue_dropped_locked()
            lines, self._lines = self._lines, []
            self._bytes = 0
            # While lines flow, the thread comes back by itself after its
            # linger: publish() then needs no wake-up syscall, and the
            # thread sends a batch per pass instead of a line.
            self._wake_pending = bool(lines)
        return lines

    def take_unsent(self):
        with self._lock:
            count, self._unsent = self._unsent, 0
        return count

    def take_dropped(self):
        with self._lock:
            count, self._dropped = self._dropped, 0
        return count

    def counting(self):
        """Whether counts wait to be reported; no lock taken."""
        return bool(self._unsent or self._dropped)

    def queued_bytes(self):
        return sum(len(line) + 1 for line in self._lines)

    def queue_notice(self, count, where, first=False):
        """Queue a drop notice for the hub's subscribers."""
        with self._lock:
            self._queue_notice_locked(count, where, first)

    def queue_unsent_notice(self):
        """Queue, as a drop notice, what was counted instead of sent."""
        with self._lock:
            count, self._unsent = self._unsent, 0
            if count:
                self._queue_notice_locked(count, 'publisher %d' % self.pid)

    def _queue_notice_locked(self, count, where, first=False):
        notice = proto.dropped_envelope(count, where)
        line = notice[:-1].decode('ascii')
        if first:
            self._lines.insert(0, line)
        else:
            self._lines.append(line)
        self._bytes += len(notice)

    def _queue_dropped_locked(self):
        if self._dropped:
            self._queue_notice_locked(self._dropped,
                                      'publisher %d' % self.pid)
            self._dropped = 0
