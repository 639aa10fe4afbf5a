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

"""A publisher's connection to the hub of its service (private).

When another process of the service holds the socket, the relay thread
of this one is a publisher: it introduces itself with a handshake line,
then, once the hub has answered with its status, writes its batches of
lines to it, and reads the hub's status lines (how many subscribers there
are, whether all are full). Until the hub answers, lines wait in the
outbox: a listener that never answers gets none of them. Everything
is non-blocking and polled by the relay's poller; what the hub has not
taken yet stays pending here, so that what a lost hub never got can be
counted.
"""

import time

from oslo_messaging_ext.notify import _unix_protocol as proto

select = proto.native('select')

# A connection that ends sooner than this was refused or broken at once:
# the next attempt backs off instead of reconnecting in a loop.
SETTLED = 1.0
# A hub answers a handshake at once with its status. A listener that has
# not within this many seconds is paused, busy, or no hub at all: the
# relay lets it go and tries again with backoff.
ANSWER_TIMEOUT = 5.0


class Upstream:
    """The connected socket to the hub, and what is in flight on it.

    :param sock: the connected, non-blocking socket
    :param poller: the relay thread's ``select.poll`` object
    :param service: the identity the hub must share
    :param pid: this process, named in the handshake
    """

    def __init__(self, sock, poller, service, pid):
        self.sock = sock
        self.since = time.monotonic()
        self._poller = poller
        self._inbuf = b''
        # Whether a hub of the service answered.
        self.answered = False
        self.pending = proto.control_line(
            role=proto.ROLE_PUBLISHER, service=service, pid=pid)
        poller.register(sock, select.POLLIN | select.POLLOUT)

    def fileno(self):
        return self.sock.fileno()

    def settled(self):
        return time.monotonic() - self.since >= SETTLED

    def answer_wait_ms(self):
        """Milliseconds left for the hub to answer (0: too late)."""
        return max(0, self.since + ANSWER_TIMEOUT - time.monotonic()) * 1000

    def send(self, data):
        """Send a batch; return False when the hub is gone."""
        self.pending = data
        return self.flush()

    def flush(self):
        """Send what is pending; return False when the hub is gone."""
        while self.pending:
            try:
                sent = self.sock.send(self.pending)
            except BlockingIOError:
                self._poller.modify(self.sock, select.POLLIN | select.POLLOUT)
                return True
            except OSError:
                return False
            self.pending = memoryview(self.pending)[sent:]
        self._poller.modify(self.sock, select.POLLIN)
        return True

    def read_statuses(self):
        """The hub's status lines read now; None when the hub is gone."""
        try:
            data = self.sock.recv(proto.READ_SIZE)
        except BlockingIOError:
            return []
        except OSError:
            data = b''
        if not data:
            return None
        lines = (self._inbuf + data).split(b'\n')
        self._inbuf = lines.pop()[-proto.MAX_HANDSHAKE:]
        statuses = []
        for line in lines:
            status = proto.parse_control(line)
            if (status is not None and
                    status.get(proto.PROTOCOL_KEY) == proto.ROLE_HUB):
                statuses.append(status)
        return statuses

    def take_in_flight(self):
        """How many notifications the hub has not taken; forget them."""
        lost = proto.notifications_in(self.pending)
        self.pending = b''
        return lost

    def close(self):
        try:
            self._poller.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
