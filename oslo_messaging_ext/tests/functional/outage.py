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

"""Broker outages on demand: a TCP proxy to kill, a tarpit, a second node.

* TcpProxy forwards a local port to a broker until kill(): then every
  connection through it is cut and its port refuses new ones, as a broker
  that died.
* Tarpit accepts TCP connections and never answers, as a hung broker (or a
  firewall that lets the handshake through).
* RabbitNode runs a second rabbitmq-server node, another region, with its
  own node name, ports and data directory, killed when the test ends.
"""

import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

import fixtures

from oslo_messaging_ext.tests import utils as test_utils

# How often the accept loops look at whether they were stopped.
POLL = 0.1


def _listener(port=0):
    listener = socket.socket()
    # A broker back on its port, while connections of its previous life
    # are in TIME_WAIT.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(('127.0.0.1', port))
    listener.listen(64)
    listener.settimeout(POLL)
    return listener


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


class _Acceptor(fixtures.Fixture):
    """Accepts connections on a local port until stopped."""

    def _setUp(self):
        self._stopped = threading.Event()
        self._ended = threading.Event()
        self._sockets = []
        self._lock = threading.Lock()
        self._listener = _listener(getattr(self, 'port', 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True,
                         name='test-' + type(self).__name__).start()
        self.addCleanup(self.kill)

    def url(self, credentials='guest:guest'):
        return f'rabbit://{credentials}@127.0.0.1:{self.port}/'

    def _accept_loop(self):
        # Under eventlet, a socket closed while another green thread waits
        # on it leaves that wait registered on its descriptor, which the
        # next file to get the number then trips on: each socket is closed
        # by the thread that waits on it, after a shutdown woke it.
        try:
            while not self._stopped.is_set():
                try:
                    conn, _ = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    return
                self._track(conn)
                self.accepted(conn)
        finally:
            self._listener.close()
            self._ended.set()

    def _track(self, sock):
        with self._lock:
            if self._stopped.is_set():
                sock.close()
                return
            self._sockets.append(sock)

    def accepted(self, conn):
        """Hold the connection: never answer."""

    def kill(self):
        """Cut every connection; the port then refuses new ones."""
        with self._lock:
            self._stopped.set()
            sockets, self._sockets = self._sockets, []
        _shutdown(self._listener)
        self._ended.wait(10 * POLL)
        for sock in sockets:
            _shutdown(sock)
        self.closed(sockets)

    def closed(self, sockets):
        """Close ``sockets``, which no thread of this fixture reads."""
        for sock in sockets:
            sock.close()


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Tarpit(_Acceptor):
    """Accepts TCP connections and never sends a byte."""


class TcpProxy(_Acceptor):
    """Forwards connections to ``upstream`` (host, port) until kill().

    With ``delay``, every chunk is forwarded ``delay`` seconds after it
    arrived, in order: a WAN link's latency each way, without its
    throughput cost (a delay queue, not a sleep per chunk).
    """

    def __init__(self, upstream, delay=0.0, port=0):
        super().__init__()
        self.upstream = upstream
        self.delay = delay
        # A given port: the same broker back after a kill().
        self.port = port

    def accepted(self, conn):
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        conn.settimeout(None)
        self._track(upstream)
        for source, sink in ((conn, upstream), (upstream, conn)):
            if not self.delay:
                threading.Thread(target=self._pump, args=(source, sink),
                                 daemon=True, name='test-proxy-pump').start()
                continue
            line = queue.SimpleQueue()
            threading.Thread(target=self._read, args=(source, sink, line),
                             daemon=True, name='test-proxy-read').start()
            threading.Thread(target=self._write, args=(source, sink, line),
                             daemon=True, name='test-proxy-write').start()

    @staticmethod
    def _pump(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        # The other pump reads the sink: wake it, it closes the sink.
        _shutdown(sink)
        source.close()

    def _read(self, source, sink, line):
        # Stamps each chunk with when it is due; the writer sends it then.
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                line.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        line.put((time.monotonic() + self.delay, None))
        source.close()

    @staticmethod
    def _write(source, sink, line):
        while True:
            due, data = line.get()
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if data is None:
                break
            try:
                sink.sendall(data)
            except OSError:
                # Wake the reader of this direction: it closes the source.
                _shutdown(source)
                break
        # The other direction's reader reads the sink: wake it.
        _shutdown(sink)

    def closed(self, sockets):
        """The pumps close their sockets once the shutdown woke them."""


class RabbitNode(fixtures.Fixture):
    """A second rabbitmq-server node, as another region's broker.

    Its node name, AMQP and distribution ports, data and log directories
    are its own (nothing of the system's node is read or written), and its
    process group is killed at cleanup. Runs as root or as the rabbitmq
    user alike: everything it writes is in a temporary directory.
    """

    STARTUP_TIMEOUT = 60.0

    def __init__(self, test):
        super().__init__()
        self.test = test

    def _setUp(self):
        server = shutil.which('rabbitmq-server', path=os.pathsep.join(
            ['/usr/lib/rabbitmq/bin', os.environ.get('PATH', ''),
             '/usr/sbin', '/usr/local/sbin']))
        if not server:
            test_utils.unavailable(
                self.test, 'rabbitmq-server is not installed (Debian '
                'package rabbitmq-server): cannot start a second node')
        home = self.useFixture(fixtures.TempDir()).path
        self.port = free_port()
        dist_port = free_port()
        with open(os.path.join(home, 'rabbitmq.conf'), 'w') as f:
            f.write(f'listeners.tcp.local = 127.0.0.1:{self.port}\n'
                    'loopback_users = none\n')
        with open(os.path.join(home, 'enabled_plugins'), 'w') as f:
            f.write('[].\n')
        open(os.path.join(home, 'rabbitmq-env.conf'), 'w').close()
        env = dict(
            os.environ,
            # Its own Erlang cookie, in its own HOME.
            HOME=home,
            RABBITMQ_NODENAME='oslo-msg-ext-%s@localhost' % uuid.uuid4().hex,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(dist_port),
            RABBITMQ_MNESIA_BASE=os.path.join(home, 'mnesia'),
            RABBITMQ_LOG_BASE=os.path.join(home, 'log'),
            RABBITMQ_LOGS='-',
            RABBITMQ_CONFIG_FILE=os.path.join(home, 'rabbitmq'),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(home,
                                                       'enabled_plugins'),
            RABBITMQ_CONF_ENV_FILE=os.path.join(home, 'rabbitmq-env.conf'),
            RABBITMQ_PID_FILE=os.path.join(home, 'rabbitmq.pid'))
        self._log = open(os.path.join(home, 'server.log'), 'w+')
        self.addCleanup(self._log.close)
        self._process = subprocess.Popen(
            [server], env=env, cwd=home, stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        self.addCleanup(self._kill)
        test_utils.wait_until(self._ready, self.STARTUP_TIMEOUT,
                              interval=0.2)
        if self._process.poll() is not None or not self._ready():
            self._log.seek(0)
            self.test.fail('the second rabbitmq-server node did not start '
                           'within %s s: %s' % (self.STARTUP_TIMEOUT,
                                                self._log.read()[-2000:]))
        self.url = f'rabbit://guest:guest@127.0.0.1:{self.port}/'

    def _ready(self):
        if self._process.poll() is not None:
            return True
        self._log.flush()
        with open(self._log.name) as f:
            return 'Server startup complete' in f.read()

    def _kill(self):
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait(timeout=30)
        # beam's children (erl_child_setup) share its process group.
        test_utils.wait_until(self._group_gone, 10)

    def _group_gone(self):
        try:
            os.killpg(self._process.pid, 0)
        except ProcessLookupError:
            return True
        return False
