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

"""The unix driver's failure paths, seen by a subscriber and in the log.

Each test provokes a fault the service must survive (a relay thread error,
an unsafe lock file, another user's listener, a hub or subscriber that
does not read) and asserts what the promise says an observer sees: the
log line, the subscriber's stream, delivery afterwards. Private code is
reached through tests/unix_seams.py only.
"""

import fcntl
import json
import os
import re
import socket
import stat
import uuid

import fixtures
from oslo_config import cfg
from oslo_config import fixture as config_fixture
from oslotest import base

from oslo_messaging_ext.notify import _impl_unix
from oslo_messaging_ext import samples
from oslo_messaging_ext.tests import unix_seams
from oslo_messaging_ext.tests import utils as test_utils

GROUP = 'oslo_messaging_notifications'
TIMEOUT = 10.0
NOBODY = test_utils.NOBODY


class SerializationWitness:
    """A payload value that counts the times it is serialized."""

    def __init__(self):
        self.serialized = 0

    def items(self):
        self.serialized += 1
        return {}.items()


class UnixFailurePathsTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.tmpdir = self.useFixture(fixtures.TempDir()).path
        self.sock_path = os.path.join(self.tmpdir, 'notifications.sock')
        self.lock_path = self.sock_path + '.lock'
        self.conf = self.useFixture(config_fixture.Config(cfg.ConfigOpts()))
        self.conf.conf([], project='unix-failure-paths')
        _impl_unix.register_opts(self.conf.conf)
        self.conf.config(sock_path=self.sock_path, group=GROUP)
        self.log = self.useFixture(test_utils.FakeLogger(unix_seams.LOGGER))
        self._driver = None

    def driver(self, **overrides):
        if overrides:
            self.conf.config(group=GROUP, **overrides)
        self._driver = _impl_unix.UnixSocketDriver(self.conf.conf, ['n'],
                                                   None)
        self.addCleanup(self._driver.close)
        return self._driver

    def notify(self, **payload):
        # As oslo_messaging.Notifier calls a driver. It never raises into
        # the service, whatever the relay is going through.
        self._driver.notify({}, {'message_id': str(uuid.uuid4()),
                                 'publisher_id': 'image.host',
                                 'event_type': 'image.upload',
                                 'priority': 'INFO',
                                 'payload': payload,
                                 'timestamp': '2026-11-22 03:00:00'},
                            'INFO', None)

    def logged(self, fragment):
        unix_seams.emit_relay_logs()
        return fragment in self.log.output

    def wait_logged(self, fragment):
        self.assertTrue(test_utils.wait_until(
            lambda: self.logged(fragment), TIMEOUT),
            f'never logged {fragment!r}; log: {self.log.output}')

    def subscribe(self, driver, count=1):
        sock = test_utils.subscribe_when_listening(self, self.sock_path,
                                                   TIMEOUT)
        self.assertTrue(test_utils.wait_until(
            lambda: driver.subscribers() == count, TIMEOUT))
        sock.settimeout(TIMEOUT)
        return sock

    def read_lines(self, sock, count):
        reader = sock.makefile('rb')
        self.addCleanup(reader.close)
        return [json.loads(reader.readline()) for _ in range(count)]

    def hold_lock_file(self):
        """Hold the lock file as another process would; return a release."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return lambda: fcntl.flock(fd, fcntl.LOCK_UN)

    def load_while_the_lock_is_held(self):
        """Load the driver while another process holds the lock file.

        Its relay cannot run an election until ``release()``: what the test
        puts in place meanwhile appears after the driver loaded, at run
        time. The relay says the lock is busy before that.

        :returns: the driver, and the release of the lock
        """
        release = self.hold_lock_file()
        driver = self.driver()
        self.wait_logged(self.lock_busy())
        return driver, release

    def lock_busy(self):
        return ('cannot join (its lock file %s is held by another process; '
                % self.lock_path)

    # -- the relay thread's catch-all ---------------------------------------

    def test_relay_error_is_logged_and_delivery_resumes(self):
        driver = self.driver()
        first = self.subscribe(driver)
        raised = unix_seams.fail_once_in_relay_thread(
            self, RuntimeError('injected relay fault'))
        self.notify(id='lost')
        self.wait_logged('relay error (1 since the last report); '
                         'reconnecting')
        self.assertEqual([True], raised)
        # With its traceback, which names the fault.
        self.assertIn('RuntimeError: injected relay fault', self.log.output)
        # Every connection was dropped: the subscriber sees the end.
        self.assertEqual(b'', first.recv(65536))
        # The relay joined again: a new subscriber, once the new hub
        # counts it, hears what follows.
        second = self.subscribe(driver)
        self.notify(id='after')
        [received] = self.read_lines(second, 1)
        self.assertEqual({'id': 'after'}, received['payload'])

    def test_relay_error_leaves_no_subscriber_to_serialize_for(self):
        driver = self.driver()
        self.subscribe(driver)
        witness = SerializationWitness()
        self.notify(witness=witness)
        self.assertGreater(witness.serialized, 0)
        # Held, the lock file keeps a new hub from being elected: what
        # the driver reports is the relay's, not a new hub's.
        self.hold_lock_file()
        unix_seams.fail_once_in_relay_thread(
            self, RuntimeError('injected relay fault'))
        self.notify(id='lost')
        self.wait_logged('relay error (1 since the last report)')
        # Its subscriber was dropped with every connection: none is left.
        self.assertTrue(test_utils.wait_until(
            lambda: driver.subscribers() == 0, TIMEOUT),
            'still reports %s subscribers' % driver.subscribers())
        witness = SerializationWitness()
        self.notify(witness=witness)
        self.assertEqual(0, witness.serialized)

    # -- the lock file ----------------------------------------------------

    def assertRefusedAtLoad(self, fragment):
        exc = self.assertRaises(_impl_unix.UnixSocketConfigError,
                                self.driver)
        self.assertEqual(('sock_path', GROUP, self.sock_path),
                         (exc.option, exc.group, exc.value))
        self.assertIn('Invalid value %r for option sock_path in group [%s]: '
                      % (self.sock_path, GROUP), str(exc))
        self.assertIn(fragment, str(exc))
        # Never half-configured: nothing was bound.
        self.assertFalse(os.path.lexists(self.sock_path))

    def assertRefusedAtRunTimeThenJoined(self, replace_lock_file, fragment):
        driver, release = self.load_while_the_lock_is_held()
        # Atomically: the relay never sees the path without a lock file
        # (it would create a regular one of its own).
        replacement = self.lock_path + '.new'
        replace_lock_file(replacement)
        os.rename(replacement, self.lock_path)
        release()
        self.wait_logged('cannot join (' + fragment)
        # Not joined meanwhile: no socket, notify() fine.
        self.assertFalse(os.path.lexists(self.sock_path))
        self.notify(id='while refused')
        self.assertIsNone(driver.subscribers())
        # A new reason said at once, not held back by the lock busy said
        # just before; each only once.
        self.assertEqual(1, self.log.output.count(self.lock_busy()))
        self.assertEqual(1, self.log.output.count(fragment))
        os.unlink(self.lock_path)
        sock = self.subscribe(driver)
        self.notify(id='after')
        [received] = self.read_lines(sock, 1)
        self.assertEqual({'id': 'after'}, received['payload'])

    def not_the_service_users(self, owner):
        return ('its lock file %s is not a regular file of the service user '
                '(uid %d, owner %d)' % (self.lock_path, os.geteuid(), owner))

    def test_lock_file_that_is_not_a_regular_file_is_refused(self):
        # A FIFO another user left: opening it must not hang, nor be used.
        os.mkfifo(self.lock_path, 0o600)
        self.assertRefusedAtLoad(self.not_the_service_users(os.geteuid()))
        self.assertTrue(stat.S_ISFIFO(os.lstat(self.lock_path).st_mode))

    def test_lock_file_that_is_not_a_regular_file_at_run_time(self):
        self.assertRefusedAtRunTimeThenJoined(
            lambda path: os.mkfifo(path, 0o600),
            self.not_the_service_users(os.geteuid()))

    def _lock_file_of_nobody(self, path):
        if os.geteuid() != 0:
            self.skipTest('a file of another user is made by root only')
        with open(path, 'w'):
            pass
        os.chown(path, NOBODY, NOBODY)

    def test_lock_file_of_another_user_is_refused(self):
        self._lock_file_of_nobody(self.lock_path)
        self.assertRefusedAtLoad(self.not_the_service_users(NOBODY))
        self.assertEqual(NOBODY, os.lstat(self.lock_path).st_uid)

    def test_lock_file_of_another_user_at_run_time(self):
        if os.geteuid() != 0:
            self.skipTest('a file of another user is made by root only')
        self.assertRefusedAtRunTimeThenJoined(
            self._lock_file_of_nobody, self.not_the_service_users(NOBODY))

    # -- a listener of another user ------------------------------------------

    @staticmethod
    def _listen_as_a_stranger(path, channel):
        """Bind ``path`` when told, report what the first peer sent."""
        channel.recv(1)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(8)
        channel.sendall(b'ready\n')
        conn, _ = listener.accept()
        conn.settimeout(TIMEOUT)
        received = 0
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += len(chunk)
        channel.sendall(b'%d\n' % received)
        # Listening on until the test is over: a listener gone would be a
        # stale socket, which the relay may rightly replace.
        channel.recv(1)

    def test_a_file_appearing_at_the_path_is_never_replaced(self):
        driver, release = self.load_while_the_lock_is_held()
        with open(self.sock_path, 'w') as f:
            f.write('not yours')
        before = os.lstat(self.sock_path)
        elections = unix_seams.count_elections(self)
        release()
        refused = ('cannot join (it exists and is not a socket, and is never '
                   'replaced: remove it to let the service serve; ')
        self.wait_logged(refused)
        self.notify(id='first')
        self.assertIsNone(driver.subscribers())
        # Retried with backoff, said once; the lock busy said just before
        # did not hold it back.
        self.assertTrue(test_utils.wait_until(
            lambda: len(elections) >= 3, TIMEOUT))
        self.assertEqual(1, self.log.output.count(refused))
        self.assertEqual(1, self.log.output.count(self.lock_busy()))
        after = os.lstat(self.sock_path)
        self.assertEqual((before.st_dev, before.st_ino),
                         (after.st_dev, after.st_ino))
        with open(self.sock_path) as f:
            self.assertEqual('not yours', f.read())

    def test_listener_of_another_user_appearing_at_run_time(self):
        # Nothing at the path when the driver loads; then, before the
        # relay first joins, another user binds it.
        if os.geteuid() == 0:
            # Sticky and world-writable, as /tmp: allowed by the driver,
            # and nobody can bind there.
            os.chmod(self.tmpdir, 0o1777)
            test_utils.let_others_reach(self, self.tmpdir)
        uid, channel = test_utils.fork_as_another_user(
            self, lambda channel: self._listen_as_a_stranger(self.sock_path,
                                                             channel))
        if uid == os.geteuid():
            uid += 1
            unix_seams.pretend_peer_uid(self, uid)
        driver, release = self.load_while_the_lock_is_held()
        channel.sendall(b'!')
        channel.settimeout(TIMEOUT)
        reader = channel.makefile('rb')
        self.addCleanup(reader.close)
        self.assertEqual(b'ready\n', reader.readline())
        release()
        self.notify(id='first')
        refused = ('cannot join (it is held by a process of uid %d, not of '
                   'the service user (uid %d); nothing is sent to it'
                   % (uid, os.geteuid()))
        # Said at once, though the lock busy was said a moment ago.
        self.wait_logged(refused)
        self.notify(id='secret')
        self.assertIsNone(driver.subscribers())
        # It got a connection, and not a byte: not even the handshake.
        self.assertEqual(b'0\n', reader.readline())
        self.assertEqual(1, self.log.output.count(refused))

    # -- what a stop cannot hand over -------------------------------------

    def test_stop_before_a_hub_that_never_reads_took_the_lines(self):
        # A hub that accepted this process and reads nothing: its socket
        # buffers fill, then the relay's own queue.
        release = self.hold_lock_file()
        driver = self.driver()
        mute = socket.socket(socket.AF_UNIX)
        self.addCleanup(mute.close)
        mute.bind(self.sock_path)
        mute.listen(1)
        release()
        mute.settimeout(TIMEOUT)
        conn, _ = mute.accept()
        self.addCleanup(conn.close)
        payload = samples.glance_upload_payload()
        for seq in range(3000):
            self.notify(seq=seq, **payload)
        driver.close()
        self.assertIsNotNone(re.search(
            r'stopped before handing over [1-9][0-9]* queued bytes',
            self.log.output), self.log.output)

    def test_stop_with_lines_a_subscriber_had_not_read(self):
        # One notification larger than the kernel's socket buffer, which
        # the subscriber starts to get, then a few more queued behind it;
        # the subscriber reads nothing until the service has stopped.
        driver = self.driver()
        slow = self.subscribe(driver)
        self.notify(seq=0, blob='x' * (1 << 20))
        for seq in range(1, 6):
            self.notify(seq=seq)
        driver.close()
        # The lines it had not started are counted and said...
        self.assertIn('stopped with 5 notifications its subscribers had '
                      'not read', self.log.output)
        # ... and the one it had started was given a second more, then
        # cut: said too, for the subscriber library counts it as dropped.
        self.assertIn('1 subscribers did not read the end of their last '
                      'line; they see it cut', self.log.output)
        data = b''
        while True:
            chunk = slow.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        self.assertGreater(len(data), 0)
        self.assertFalse(data.endswith(b'\n'))
        self.assertNotIn(b'\n', data)
