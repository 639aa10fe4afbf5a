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

"""The hub process of the unix driver: its paths, its peers, its masking.

Real hub processes, started by a real driver or directly as the driver
starts them; the peers are real sockets of this process.
"""

import json
import os
import random
import socket
import stat
import subprocess
import sys
from unittest import mock

from oslo_utils import strutils

from oslo_messaging_ext.notify import _impl_unix
from oslo_messaging_ext.notify import _unix_hub
from oslo_messaging_ext.notify import _unix_protocol as proto
from oslo_messaging_ext.tests.unit import test_unix_driver
from oslo_messaging_ext.tests import utils as test_utils

TIMEOUT = test_unix_driver.TIMEOUT
# What a process sends before a notification that follows no drop.
LINE = proto.HEADER.pack(proto.LINE, 0, 0, 0)
wait_until = test_unix_driver.wait_until


def start_hub(path):
    """A hub on ``path``, as the driver starts one; its Popen."""
    return subprocess.Popen(
        [sys.executable, '-m', _impl_unix.HUB_MODULE, path],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)


class HubPathTestCase(test_unix_driver.UnixTestCase):

    def test_deleted_socket_is_bound_again_within_a_second(self):
        notifier, driver = self.notifier(sock_mode='0640')
        self.subscribe(driver)
        for path in (self.sock_path, self.sock_path + '.ingest'):
            os.unlink(path)
            # The hub checks twice a second; a second and a half with
            # a loaded machine.
            self.assertTrue(test_utils.wait_until(
                lambda: os.path.exists(path), 1.5, interval=0.01))
        self.assertEqual(0o640,
                         stat.S_IMODE(os.lstat(self.sock_path).st_mode))
        fresh = self.subscribe(driver, 2)
        notifier.info({}, 'image.upload', {'id': 'back'})
        self.assertEqual({'id': 'back'},
                         self.read_lines(fresh, 1)[0]['payload'])

    def start_claimed(self, remove=False, numbers=None):
        """A subscriber that connected between a claim and its hub.

        The hub is started as the driver starts it, given ``numbers`` of
        the claim's numbers; the path is removed first if ``remove``.
        """
        claimed = proto.claim(self.sock_path, 0o660, os.getegid())
        waited = test_utils.connect(self.sock_path)
        self.addCleanup(lambda: waited.close())
        if remove:
            os.unlink(self.sock_path)
        hub = subprocess.Popen(
            [sys.executable, '-m', _impl_unix.HUB_MODULE, self.sock_path,
             '--claimed', ','.join(map(str, claimed[:numbers]))],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            pass_fds=claimed[:3], start_new_session=True)
        self.addCleanup(hub.wait, TIMEOUT)
        self.addCleanup(hub.terminate)
        for fd in claimed[:3]:
            os.close(fd)
        return waited

    def test_a_path_removed_before_its_hub_runs_is_bound_again(self):
        # tmpfiles removes the socket between the claim and the start of
        # the hub: the hub still serves who waited, and binds the path.
        waited = self.start_claimed(remove=True)
        self.assertTrue(test_utils.wait_until(
            lambda: os.path.exists(self.sock_path), 1.5, interval=0.01))
        notifier, _ = self.notifier()
        notifier.info({}, 'image.upload', {'id': 'waited'})
        self.assertEqual({'id': 'waited'},
                         self.read_lines(waited, 1)[0]['payload'])

    def test_hub_started_by_an_older_driver_serves(self):
        # A driver loaded before an upgrade passes the three fds alone.
        waited = self.start_claimed(numbers=3)
        notifier, _ = self.notifier()
        notifier.info({}, 'image.upload', {'id': 'older'})
        self.assertEqual({'id': 'older'},
                         self.read_lines(waited, 1)[0]['payload'])
        # It keeps its paths: it knows them as its own.
        os.unlink(self.sock_path + '.ingest')
        self.assertTrue(test_utils.wait_until(
            lambda: os.path.exists(self.sock_path + '.ingest'), 1.5,
            interval=0.01))

    def test_a_file_put_in_its_place_is_left_alone(self):
        driver = self.driver()
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))
        os.unlink(self.sock_path)
        os.symlink('/etc/passwd', self.sock_path)
        # A check of the paths has run once the ingest is back.
        os.unlink(self.sock_path + '.ingest')
        self.assertTrue(test_utils.wait_until(
            lambda: os.path.exists(self.sock_path + '.ingest'), 1.5,
            interval=0.01))
        self.assertEqual('/etc/passwd', os.readlink(self.sock_path))

    def test_symlink_is_never_bound_through(self):
        os.symlink('/nonexistent/target', self.sock_path)
        self.assertRaises(proto.RelayError, proto.bind_listener,
                          self.sock_path, 0o600, os.getegid())
        self.assertTrue(os.path.islink(self.sock_path))
        self.assertFalse(os.path.lexists('/nonexistent/target'))

    def test_one_hub_per_path(self):
        driver = self.driver()
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))
        first = test_utils.hub_pid(self.sock_path)
        # The socket deleted while a new process starts: it finds no
        # socket and starts a hub, which cannot take the lock and leaves.
        os.unlink(self.sock_path)
        second = start_hub(self.sock_path)
        self.assertEqual(0, second.wait(TIMEOUT))
        # Quietly (a package may warn as it is imported).
        said = second.stderr.read()
        self.assertNotIn(b'ERROR', said)
        self.assertNotIn(b'Traceback', said)
        second.stderr.close()
        self.assertTrue(test_utils.wait_until(
            lambda: os.path.exists(self.sock_path), 1.5, interval=0.01))
        self.assertEqual(first, test_utils.hub_pid(self.sock_path))
        sock = self.connect()
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        self.assertEqual(first, int.from_bytes(creds[:4], 'little'))

    def test_lock_file_of_another_user_is_never_taken(self):
        os.symlink('/nonexistent', self.sock_path + '.lock')
        hub = start_hub(self.sock_path)
        self.assertEqual(1, hub.wait(TIMEOUT))
        self.assertIn(b"notifications.sock.lock", hub.stderr.read())
        hub.stderr.close()
        self.assertFalse(os.path.lexists(self.sock_path))


class HubPeersTestCase(test_unix_driver.UnixTestCase):

    def publisher(self, fds=None, source='forged'):
        """A connection to the ingest socket, after HELLO with ``fds``.

        By default a tally of its own, as the driver sends (its view is
        the ``tally`` attribute of the test case).
        """
        # Native, as the driver's own: the hub sees what a process sends.
        sock = proto.native('socket').socket(socket.AF_UNIX,
                                             socket.SOCK_SEQPACKET)
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        sock.connect(self.sock_path + '.ingest')
        if fds is None:
            fd, self.tally = proto.new_tally()
            self.addCleanup(os.close, fd)
            fds = [fd]
        socket.send_fds(sock, [proto.HELLO + json.dumps(
            {'source': source}).encode()], fds)
        return sock

    def test_impostor_hub_of_another_uid_gets_nothing(self):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(listener.close)
        listener.bind(self.sock_path + '.ingest')
        listener.listen(8)
        real_peer_uid = proto.peer_uid

        def peer_uid(sock):
            if sock.type == socket.SOCK_SEQPACKET:
                return os.geteuid() + 1
            return real_peer_uid(sock)

        with mock.patch.object(proto, 'peer_uid', peer_uid):
            exc = self.assertRaises(_impl_unix.UnixSocketConfigError,
                                    self.driver)
        self.assertIn('another user may have bound it', str(exc))
        listener.settimeout(TIMEOUT)
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        conn.settimeout(TIMEOUT)
        self.assertEqual(b'', conn.recv(65536))

    def test_forged_huge_and_unterminated_data(self):
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        # A HELLO without a tally, with one that may shrink (it could
        # end the hub with SIGBUS), with a source not a string; a tally
        # with a count no process could have.
        self.publisher([])
        unsealed = os.memfd_create('unsealed')
        self.addCleanup(os.close, unsealed)
        os.ftruncate(unsealed, proto.TALLY_SIZE)
        self.publisher([unsealed])
        self.publisher(source=['not', 'a', 'string'])
        forged = self.publisher()
        forged.send(proto.HEADER.pack(proto.LINE, 2 ** 60, 0, 0) +
                    b'{"sync": -2}')
        forged.send(LINE + b'{"a": 1}\n{"b": 2}')
        forged.send(LINE + b'not json "password": x')
        forged.send(b'Z' + b'x' * 1000)
        forged.send(LINE + b'[1, 2]')
        forged.send(LINE + b'{"sync": -1}')
        # Several peers leave half a notification, and a subscriber
        # connection sends and never reads.
        for number in range(5):
            peer = self.publisher()
            peer.send(LINE + b'{"c":')
            peer.send(LINE + b'{"sync": %d}' % number)
        raw = proto.native('socket').socket(socket.AF_UNIX)
        self.addCleanup(raw.close)
        raw.connect(self.sock_path)
        raw.setblocking(False)
        try:
            while True:
                raw.send(b'x' * 65536)
        except BlockingIOError:
            pass
        synced, dropped, where = set(), 0, set()
        reader = sock.makefile('rb')
        self.addCleanup(reader.close)
        sock.settimeout(TIMEOUT)
        while len(synced) < 7:
            line = json.loads(reader.readline())
            if line.get('event_type') == proto.DROPPED_EVENT_TYPE:
                dropped += line['payload']['dropped']
                where.add(line['payload']['where'])
            else:
                synced.add(line['sync'])
        # Each bad message counted once; the forged count refused.
        self.assertEqual(13, dropped)
        self.assertEqual({'invalid'}, where)
        notifier.info({}, 'image.upload', {'id': 'after'})
        self.assertEqual({'id': 'after'},
                         json.loads(reader.readline())['payload'])

    def test_five_thousand_connections(self):
        driver = self.driver(sock_max_subscribers=4)
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))
        pid = test_utils.hub_pid(self.sock_path)
        for path, kind in ((self.sock_path, socket.SOCK_STREAM),
                           (self.sock_path + '.ingest',
                            socket.SOCK_SEQPACKET)):
            for _ in range(2500):
                sock = socket.socket(socket.AF_UNIX, kind)
                sock.setblocking(False)
                try:
                    sock.connect(path)
                except BlockingIOError:
                    pass
                sock.close()
        fds = os.listdir('/proc/%d/fd' % pid)
        self.assertTrue(wait_until(
            lambda: len(os.listdir('/proc/%d/fd' % pid)) < 32))
        self.assertTrue(test_utils.alive(pid), fds)
        self.subscribe(driver)


class MaskingTestCase(test_unix_driver.UnixTestCase):

    WORDS = ['password', 'Token', 'adminPass', 'secret', 'user', 'name',
             'PASSWORD', 'auth_token', 'id', 'x', 'caf\u00e9', 'to\u212aen',
             'private_key', 'blob', '--password', 'pass', 'word']

    def value(self, rng, depth=0):
        kind = rng.randrange(7 if depth < 3 else 4)
        if kind == 0:
            return rng.choice(self.WORDS) + rng.choice(['', ' = x', ': y'])
        if kind == 1:
            return rng.choice([1, 2.5, None, True, 'ok'])
        if kind == 2:
            words = (rng.choice(self.WORDS), rng.choice(self.WORDS))
            return "{}='{}'".format(*words)
        if kind == 3:
            return '\n\t"\\' + rng.choice(self.WORDS)
        if kind in (4, 5):
            return {rng.choice(self.WORDS) + str(i): self.value(rng, depth + 1)
                    for i in range(rng.randrange(4))}
        return [self.value(rng, depth + 1) for _ in range(rng.randrange(3))]

    def test_fuzz_the_precheck_gives_what_strutils_gives(self):
        rng = random.Random(23)
        encoders = [_impl_unix.make_encoder()]
        with mock.patch.object(_impl_unix, 'orjson', None):
            encoders.append(_impl_unix.make_encoder())
        skipped, chunk = 0, []
        for _ in range(3000):
            envelope = {'payload': self.value(rng), 'event_type': 'e'}
            expected = strutils.mask_dict_password(
                json.loads(encoders[0](envelope)), secret='***')
            for encode in encoders:
                line = encode(envelope)
                masked = _unix_hub.mask(line)
                skipped += masked is line
                self.assertEqual(expected, json.loads(masked), line)
                chunk.append(line)
            # A chunk of lines, as the hub relays them, is clean only if
            # masking changes none of them.
            if len(chunk) >= 6:
                if _unix_hub.clean(b'\n'.join(chunk) + b'\n'):
                    self.assertEqual(chunk, [_unix_hub.mask(line)
                                             for line in chunk])
                chunk = []
        self.assertGreater(skipped, 100)

    def test_every_key_strutils_masks_on_holds_a_word(self):
        # WORDS against the oslo.utils in use: its list is private, and is
        # read here only, so that a new key fails the gate.
        keys = getattr(strutils, '_SANITIZE_KEYS', None)
        self.assertTrue(keys, 'oslo.utils no longer lists its keys')
        for key in keys:
            self.assertTrue(any(word.decode() in key.lower()
                                for word in _unix_hub.WORDS), key)
        line = b'{"payload":{"password":"x","a":"b"}}'
        self.assertEqual({'payload': {'password': '***', 'a': 'b'}},
                         json.loads(_unix_hub.mask(line)))
        plain = b'{"payload":{"a":"b"}}'
        self.assertIs(plain, _unix_hub.mask(plain))
