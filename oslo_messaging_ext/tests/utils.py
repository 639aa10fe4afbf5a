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

"""Helpers shared by the tests."""

import json
import logging
import os
import shutil
import signal
import socket
import stat
import time
import traceback

import fixtures
from oslo_utils import strutils

from oslo_messaging_ext.notify import _impl_unix
from oslo_messaging_ext.notify import _unix_protocol as proto


# Set in CI (.ci/run): what a test needs is part of the test bed there.
REQUIRE_ENV = 'OSLO_MESSAGING_EXT_REQUIRE_BROKER'


def everything_required():
    """Whether a missing broker or tool fails a test, not skips it."""
    return strutils.bool_from_string(os.environ.get(REQUIRE_ENV, ''))


def unavailable(test, reason):
    """Skip ``test`` for ``reason`` on a laptop; fail it in CI.

    A CI run that skips a test proves nothing of what it promises: there,
    a missing broker or tool is a fault of the test bed, to be fixed.
    """
    if everything_required():
        test.fail('%s (%s is set: this is a failure, not a skip)'
                  % (reason, REQUIRE_ENV))
    test.skipTest(reason)


def require_root(test, what):
    """Go on as root only: ``what`` needs it; see :func:`unavailable`."""
    if os.geteuid() != 0:
        unavailable(test, '%s needs root' % what)


def require_tool(test, name, package):
    """The path of program ``name``; if missing, see :func:`unavailable`."""
    path = shutil.which(name)
    if not path:
        unavailable(test, '%s is not installed (Debian package %s)'
                    % (name, package))
    return path


def wait_until(predicate, timeout, interval=0.01):
    """Poll ``predicate`` until it is true or ``timeout`` passes.

    :returns: the predicate's last result
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def connect(path):
    """A blocking subscriber connection to ``path``; OSError if refused.

    Plain socket calls, as ``socat`` makes: the driver's tests do not
    depend on the subscriber library.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def subscribe_when_listening(test, path, timeout):
    """A subscriber connection to ``path``, once something listens there.

    The hub binds the socket some time after the driver loads. The
    connection is closed after ``test``.
    """
    socks = []

    def connected():
        try:
            socks.append(connect(path))
        except OSError:
            return False
        return True

    test.assertTrue(wait_until(connected, timeout),
                    'nothing listens on %s' % path)
    sock = socks[0]
    # Not sock.close: eventlet's green socket hands out its inner socket's
    # method and closes the connection when collected.
    test.addCleanup(lambda: sock.close())
    return sock


def join(thread, timeout):
    """Wait up to ``timeout`` for ``thread`` to end; whether it did.

    Thread.join(timeout) returns when the time is up, but under eventlet
    on Python 3.13 the green join raises eventlet's Timeout instead: the
    suite runs there too (tox -e eventlet-py313).
    """
    return wait_until(lambda: not thread.is_alive(), timeout)


class FakeLogger(fixtures.FakeLogger):
    """fixtures.FakeLogger on the logger ``name``, enabled for the test.

    logging.config.dictConfig() and fileConfig() disable every logger that
    exists when they run, unless told otherwise: a test that configured
    logging earlier in the same process (upstream oslo.messaging's
    test_logging_conf, for one) leaves our module loggers disabled, and a
    disabled logger records nothing, whatever its handlers. The logger is
    enabled for the test and put back as it was after it, so that what a
    test asserts on does not depend on the tests run before it. assertLogs
    on the same logger within the test sees the records too.
    """

    def __init__(self, name, **kwargs):
        super().__init__(name=name, **kwargs)
        self.logger = logging.getLogger(name)

    def _setUp(self):
        self.useFixture(fixtures.MockPatchObject(
            self.logger, 'disabled', False))
        super()._setUp()


def notification_line(seq):
    """A notification as the unix relay carries it: one JSON line."""
    return json.dumps({'event_type': 'image.upload',
                       'payload': {'seq': seq}}).encode() + b'\n'


def native_socket_pair(test):
    """Connected AF_UNIX sockets, ours non-blocking, closed after ``test``.

    Native even in an eventlet-patched run: the relay's thread, which the
    relay and hub unit tests stand in for, never uses green sockets.
    """
    socket = proto.native('socket')
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    test.addCleanup(ours.close)
    test.addCleanup(theirs.close)
    ours.setblocking(False)
    theirs.settimeout(5.0)
    return ours, theirs


# nobody:nogroup on Debian and most distributions.
NOBODY = 65534


def fork_as_another_user(test, func):
    """Run ``func(channel)`` in a forked child, as nobody where root.

    Permission checks depend on who runs them: as root (CI) they can never
    fail unless another user runs them. The child's real and effective
    ids are nobody's, with no supplementary group; its saved uid stays
    root's only so that it can write its coverage data before it exits.
    Not root, the child runs as the suite's user: the caller makes the
    identity differ some other way.

    Fork before the test loads a unix driver: a forked child rejoins the
    relays of its parent.

    :returns: (the child's uid, ``channel``'s other end: a connected
        AF_UNIX socket); the child is killed and reaped at cleanup
    """
    parent_end, child_end = socket.socketpair()
    as_root = os.geteuid() == 0
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            parent_end.close()
            if as_root:
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, 0)
                os.setresuid(NOBODY, NOBODY, 0)
            func(child_end)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            if as_root:
                os.setresuid(0, 0, 0)
                os.setresgid(0, 0, 0)
            os._exit(status)
    child_end.close()
    test.addCleanup(_reap, pid)
    test.addCleanup(parent_end.close)
    return (NOBODY if as_root else os.geteuid()), parent_end


def let_others_reach(test, directory):
    """Let other users traverse the test's own directories to ``directory``.

    A test's temporary directory is nested in per-test ones of mode 0700
    (oslotest's): another user could not even reach it. The modes are put
    back after the test.
    """
    path = os.path.realpath(directory)
    # Up to /tmp, changing temporary directories only (mkdtemp's names).
    while os.path.basename(path).startswith('tmp') and path != '/tmp':
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if not mode & 0o001:
            os.chmod(path, mode | 0o001)
            test.addCleanup(os.chmod, path, mode)
        path = os.path.dirname(path)


def _reap(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def call_as_another_user(test, func, *args, **kwargs):
    """``func(*args, **kwargs)`` run by :func:`fork_as_another_user`.

    :returns: ``func``'s JSON-able result, or {'error': class name,
        'message': str} for what it raised
    """
    def run(channel):
        try:
            result = {'result': func(*args, **kwargs)}
        except Exception as exc:
            result = {'error': type(exc).__name__, 'message': str(exc)}
        channel.sendall(json.dumps(result).encode() + b'\n')

    _, channel = fork_as_another_user(test, run)
    channel.settimeout(30)
    with channel.makefile('rb') as reader:
        line = reader.readline()
    test.assertTrue(line, 'the child said nothing')
    return json.loads(line)


def hub_pid(path, timeout=30.0):
    """The pid of the hub serving ``path`` (SO_PEERCRED), or None.

    Until the hub has listened itself, SO_PEERCRED names the process that
    bound the socket for it (proto.claim): the hub is waited for then.
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = proto.native('socket').socket(socket.AF_UNIX,
                                             socket.SOCK_SEQPACKET)
        with sock:
            try:
                sock.connect(path + '.ingest')
            except OSError:
                return None
            pid = int.from_bytes(sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[:4], 'little')
        if runs_hub(pid):
            return pid
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)  # polling for the hub to start


def runs_hub(pid):
    """Whether process ``pid`` runs the unix driver's hub."""
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return _impl_unix.HUB_MODULE.encode() in f.read().split(b'\0')
    except OSError:
        return False


def alive(pid):
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rpartition(')')[2].split()[0] != 'Z'
    except OSError:
        return False


def stop_hub_at_cleanup(test, path):
    """SIGTERM the hub of ``path`` at cleanup, and wait until it is gone.

    It would leave by itself once no process of the service is connected,
    a few seconds later.
    """
    def stop():
        pid = hub_pid(path)
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        # Traced by coverage and on a loaded machine, it may take a while.
        test.assertTrue(wait_until(lambda: not alive(pid), 30.0))
    test.addCleanup(stop)
