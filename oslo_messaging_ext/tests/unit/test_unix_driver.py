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

import datetime
import fcntl
import functools
import grp
import json
import os
import socket
import stat
import sys
import threading
import time
from unittest import mock

import fixtures
from oslo_config import cfg
from oslo_config import fixture as config_fixture
from oslo_context import context as oslo_context
import oslo_messaging
from oslotest import base

from oslo_messaging_ext.notify import _impl_unix
from oslo_messaging_ext.notify import _unix_encoding
from oslo_messaging_ext.notify import _unix_protocol
from oslo_messaging_ext.notify import _unix_relay
from oslo_messaging_ext.notify import _unix_sockfile
from oslo_messaging_ext import opts
from oslo_messaging_ext import samples
from oslo_messaging_ext.tests import utils as test_utils
from oslo_messaging_ext import unix_subscriber

GROUP = 'oslo_messaging_notifications'
TIMEOUT = 10.0


wait_until = functools.partial(test_utils.wait_until, timeout=TIMEOUT,
                               interval=0.005)


class UnixDriverTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.tmpdir = self.useFixture(fixtures.TempDir()).path
        self.sock_path = os.path.join(self.tmpdir, 'notifications.sock')
        self.conf = self.useFixture(config_fixture.Config(cfg.ConfigOpts()))
        self.conf.conf([], project='unix-unit')
        _impl_unix.register_opts(self.conf.conf)
        self.conf.config(sock_path=self.sock_path, group=GROUP)
        self.transport = oslo_messaging.get_notification_transport(
            self.conf.conf, url='fake:/')
        self.addCleanup(self.transport.cleanup)

    def driver(self, **overrides):
        if overrides:
            self.conf.config(group=GROUP, **overrides)
        driver = _impl_unix.UnixSocketDriver(self.conf.conf, ['n'],
                                             self.transport)
        self.addCleanup(driver.close)
        return driver

    def notifier(self, **overrides):
        driver = self.driver(**overrides)
        notifier = oslo_messaging.Notifier(self.transport,
                                           publisher_id='image.host',
                                           driver='noop')
        # Route the notifier to our driver instance, keeping Notifier's
        # own envelope building.
        ext = mock.Mock(obj=driver)
        notifier._driver_mgr = mock.Mock(extensions=[ext])
        notifier._driver_mgr.map.side_effect = lambda f: f(ext)
        return notifier, driver

    def connect(self):
        # The election runs in the relay's thread: wait for the socket.
        socks = []

        def connected():
            try:
                socks.append(unix_subscriber.connect(self.sock_path))
            except unix_subscriber.SubscriberError:
                return False
            return True

        self.assertTrue(wait_until(connected))
        sock = socks[0]
        # Not sock.close: eventlet's green socket hands out its inner
        # socket's method and closes the connection when collected.
        self.addCleanup(lambda: sock.close())
        return sock

    def subscribe(self, driver, count=1):
        sock = self.connect()
        self.assertTrue(wait_until(lambda: driver.subscribers() == count))
        return sock

    def another_process_publishing(self):
        # A second relay on the path, as another process of the service
        # has, once it knows of the one subscriber.
        publisher = _unix_relay.Relay(
            self.sock_path, service='unix-unit', mode=0o660,
            gid=os.getegid(), max_subscribers=64, buffer_size=65536)
        publisher.start()
        self.addCleanup(publisher.close)
        self.assertTrue(wait_until(lambda: publisher.subscribers == 1))
        return publisher

    def status_as_a_publisher(self):
        """Join the hub as another process of the service; its status."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(TIMEOUT)
            sock.connect(self.sock_path)
            sock.sendall(_unix_protocol.control_line(
                role=_unix_protocol.ROLE_PUBLISHER, service='unix-unit',
                pid=os.getpid()))
            return _unix_protocol.parse_control(
                sock.makefile('rb').readline())

    def read_lines(self, sock, count):
        reader = sock.makefile('rb')
        self.addCleanup(reader.close)
        sock.settimeout(TIMEOUT)
        return [json.loads(reader.readline()) for _ in range(count)]

    def assertConfigError(self, option, value, fragment, **overrides):
        exc = self.assertRaises(_impl_unix.UnixSocketConfigError,
                                self.driver, **overrides)
        message = str(exc)
        self.assertIn(option, message)
        self.assertIn('[%s]' % GROUP, message)
        self.assertIn(repr(value), message)
        self.assertIn(fragment, message)
        self.assertEqual((option, GROUP, value),
                         (exc.option, exc.group, exc.value))

    # -- configuration ------------------------------------------------------

    def test_missing_sock_path(self):
        self.assertConfigError('sock_path', None, 'needs a socket path',
                               sock_path=None)

    def test_relative_sock_path(self):
        self.assertConfigError('sock_path', 'n.sock', 'absolute',
                               sock_path='n.sock')

    def test_sock_path_in_missing_directory(self):
        path = os.path.join(self.tmpdir, 'nope', 'n.sock')
        self.assertConfigError('sock_path', path, 'does not exist',
                               sock_path=path)

    def test_world_accessible_mode(self):
        for mode in ('0666', '0662', '0604', '0661'):
            self.assertConfigError('sock_mode', mode, 'others',
                                   sock_mode=mode)

    def test_mode_not_octal(self):
        self.assertConfigError('sock_mode', 'rw-rw----', 'octal',
                               sock_mode='rw-rw----')

    def test_unknown_group(self):
        self.assertConfigError('sock_group', 'no-such-group-xyz',
                               'no such group',
                               sock_group='no-such-group-xyz')

    def test_bounds_too_small(self):
        # From a configuration file, as a service reads them: the option's
        # own minimum refuses the value, and the load error names it.
        conf_file = os.path.join(self.tmpdir, 'service.conf')
        for option, value in [('sock_max_subscribers', '0'),
                              ('sock_max_subscribers', '-1'),
                              ('sock_buffer_size', '0'),
                              ('sock_buffer_size', '10'),
                              ('sock_buffer_size', '65535')]:
            with open(conf_file, 'w') as f:
                f.write('[%s]\nsock_path = %s\n%s = %s\n'
                        % (GROUP, self.sock_path, option, value))
            self.conf.conf(['--config-file', conf_file], project='unix-unit')
            self.assertConfigError(option, value, 'at least')
        with open(conf_file, 'w') as f:
            f.write('[%s]\nsock_path = %s\nsock_buffer_size = 65536\n'
                    % (GROUP, self.sock_path))
        self.conf.conf(['--config-file', conf_file], project='unix-unit')
        self.driver()

    def test_option_minimums_are_in_the_options(self):
        # So that the configuration reference and oslo-config-validator
        # show them.
        listed = {o.name: o for o in dict(opts.list_opts())[GROUP]}
        self.assertEqual(65536, listed['sock_buffer_size'].type.min)
        self.assertEqual(1, listed['sock_max_subscribers'].type.min)
        self.assertRaises(ValueError, self.conf.config,
                          sock_buffer_size=1024, group=GROUP)

    def test_mode_without_owner_read_write(self):
        for mode in ('0440', '0260', '0060'):
            self.assertConfigError('sock_mode', mode, 'read and write',
                                   sock_mode=mode)

    def test_directory_writable_by_others_and_not_sticky(self):
        os.chmod(self.tmpdir, 0o777)
        self.addCleanup(os.chmod, self.tmpdir, 0o700)
        self.assertConfigError('sock_path', self.sock_path,
                               'writable by others and not sticky')
        os.chmod(self.tmpdir, 0o1777)
        self.driver()

    def test_directory_owned_by_another_user(self):
        if os.geteuid() != 0:
            self.skipTest('changing a directory owner needs root')
        os.chown(self.tmpdir, 65534, -1)
        self.addCleanup(os.chown, self.tmpdir, 0, -1)
        self.assertConfigError('sock_path', self.sock_path,
                               'owned by uid 65534')

    def test_path_bound_by_another_user_is_refused_at_load(self):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(self.sock_path)
        listener.listen(8)
        self.useFixture(fixtures.MockPatch(
            'oslo_messaging_ext.notify._unix_sockfile.peer_uid',
            return_value=os.geteuid() + 1))
        self.assertConfigError('sock_path', self.sock_path,
                               'another user may have bound it')
        # Nothing was sent to it, not even the handshake.
        listener.settimeout(1.0)
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        conn.settimeout(1.0)
        self.assertEqual(b'', conn.recv(4096))

    def test_held_lock_file_never_blocks_fork(self):
        # Another process holding the lock file forever (flock locks are
        # per open file, so a second open here conflicts like one).
        fd = os.open(self.sock_path + '.lock', os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        driver = self.driver()
        relay = driver._relay
        # The relay tries to elect meanwhile; what fork waits for is free.
        for _ in range(20):
            self.assertTrue(relay.fork_lock.acquire(timeout=1.0))
            relay.fork_lock.release()
        self.assertIsNone(driver.subscribers())
        fcntl.flock(fd, fcntl.LOCK_UN)
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))

    def test_path_is_a_regular_file(self):
        open(self.sock_path, 'w').close()
        self.assertConfigError('sock_path', self.sock_path,
                               'not a socket')
        self.assertTrue(stat.S_ISREG(os.lstat(self.sock_path).st_mode))

    def test_path_is_a_symlink_to_a_socket(self):
        target = os.path.join(self.tmpdir, 'target.sock')
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(target)
        os.symlink(target, self.sock_path)
        self.assertConfigError('sock_path', self.sock_path, 'not a socket')
        self.assertTrue(os.path.islink(self.sock_path))
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode),
                         stat.S_IMODE(os.lstat(target).st_mode))

    def test_path_held_by_a_live_foreign_listener(self):
        # Of the service user, but no hub (or a hub paused): not certain
        # enough to refuse the driver for the process's life. It loads at
        # once, and the relay sends nothing to a listener that does not
        # answer as a hub; it lets it go and retries with backoff.
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(self.sock_path)
        listener.listen(1)
        self.useFixture(fixtures.MockPatch(
            'oslo_messaging_ext.notify._unix_upstream.ANSWER_TIMEOUT', 0.3))
        # The records of the relay thread name the file that logged them.
        logger = self.useFixture(test_utils.FakeLogger(
            'oslo_messaging_ext.notify._unix_election',
            format='%(filename)s: %(message)s'))
        started = time.monotonic()
        notifier, driver = self.notifier()
        self.assertLess(time.monotonic() - started, 1.0)
        notifier.info({}, 'image.upload', {'id': 1})
        self.assertTrue(wait_until(lambda: 'has not answered' in
                                   logger.output))
        self.assertIn('_unix_election.py: Unix notification socket',
                      logger.output)
        # The driver's load and its relay connected; each said who it is,
        # and nothing more.
        listener.settimeout(TIMEOUT)
        for _ in range(2):
            conn, _ = listener.accept()
            self.addCleanup(conn.close)
            conn.settimeout(TIMEOUT)
            received = b''.join(iter(lambda: conn.recv(65536), b''))
            self.assertEqual(
                _unix_protocol.ROLE_PUBLISHER,
                _unix_protocol.parse_control(received)[
                    _unix_protocol.PROTOCOL_KEY])
        self.assertIsNone(driver.subscribers())
        self.assertTrue(os.path.exists(self.sock_path))

    def test_path_held_by_a_hub_exiting_does_not_fail_the_load(self):
        # A connection reset, as by a hub that exits while it is probed,
        # is transient: the relay joins the next hub.
        with mock.patch.object(_unix_sockfile, 'peer_uid',
                               side_effect=ConnectionResetError(104, 'x')):
            listener = socket.socket(socket.AF_UNIX)
            self.addCleanup(listener.close)
            listener.bind(self.sock_path)
            listener.listen(1)
            driver = _impl_unix.UnixSocketDriver(self.conf.conf, ['n'],
                                                 self.transport)
            self.addCleanup(driver.close)
        listener.close()
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))

    def test_path_held_by_the_hub_of_another_service(self):
        # Not certain to last (the other service may be stopping): its
        # processes load, and their relays retry with backoff, sending
        # nothing to the other service's hub.
        driver = self.driver()
        self.subscribe(driver)
        logger = self.useFixture(test_utils.FakeLogger(
            'oslo_messaging_ext.notify._unix_election'))
        with mock.patch.object(_impl_unix, 'service_identity',
                               return_value='nova'):
            self.driver(sock_path=self.sock_path)
        other = _unix_relay.Relay(
            self.sock_path, service='nova', mode=0o660, gid=os.getegid(),
            max_subscribers=64, buffer_size=65536)
        other.start()
        self.addCleanup(other.close)
        self.assertTrue(wait_until(lambda: 'hub of another service' in
                                   logger.output))
        self.assertIsNone(other.subscribers)

    def test_lock_file_of_another_user_is_refused_at_load(self):
        if os.geteuid() != 0:
            self.skipTest('creating a file of another user needs root')
        os.chmod(self.tmpdir, 0o1777)
        lock_path = self.sock_path + '.lock'
        open(lock_path, 'w').close()
        os.chown(lock_path, 65534, -1)
        self.assertConfigError('sock_path', self.sock_path,
                               'lock file %s is not a regular file of the '
                               'service user' % lock_path)

    def test_lock_file_symlink_is_refused_at_load(self):
        os.symlink('/nonexistent', self.sock_path + '.lock')
        self.assertConfigError('sock_path', self.sock_path, 'lock file')

    def test_stale_socket_of_another_user_in_a_sticky_directory(self):
        if os.geteuid() != 0:
            self.skipTest('creating a file of another user needs root')
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.sock_path)
        stale.close()
        os.chown(self.sock_path, 65534, -1)
        os.chown(self.tmpdir, 65534, -1)
        self.addCleanup(os.chown, self.tmpdir, 0, -1)
        os.chmod(self.tmpdir, 0o1777)
        with mock.patch.object(_unix_sockfile.os, 'geteuid',
                               return_value=1000):
            problem = _unix_sockfile.squatted(self.sock_path,
                                              self.sock_path + '.lock')
        self.assertIn('socket of uid 65534 in a sticky directory', problem)

    def test_one_info_line_per_configuration(self):
        logger = self.useFixture(test_utils.FakeLogger(_impl_unix.__name__))
        for _ in range(3):
            self.driver(sock_mode='0640')
        loaded = [line for line in logger.output.splitlines()
                  if 'unix notification driver loaded' in line]
        self.assertEqual(1, len(loaded), logger.output)
        self.assertIn('socket {}, mode 0640, group {}'.format(
            self.sock_path, grp.getgrgid(os.getegid()).gr_name), loaded[0])
        self.assertIn('ignores topics', loaded[0])

    def test_options_listed(self):
        # The group is shared: upstream lists its own notification options
        # in it.
        listed = dict(opts.list_opts())[GROUP]
        self.assertEqual(
            set(), {'sock_path', 'sock_mode', 'sock_group',
                    'sock_max_subscribers', 'sock_buffer_size',
                    'sock_include_context'} - {o.name for o in listed})

    # -- the socket file ------------------------------------------------------

    def test_socket_mode_group_and_removal(self):
        driver = self.driver(sock_mode='0640')
        # Elected: the private bind directory is gone too.
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))
        st = os.lstat(self.sock_path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(0o640, stat.S_IMODE(st.st_mode))
        self.assertEqual(os.getegid(), st.st_gid)
        # Nothing else is left beside it but the lock file.
        self.assertEqual(['notifications.sock', 'notifications.sock.lock'],
                         sorted(os.listdir(self.tmpdir)))
        driver.close()
        self.assertFalse(os.path.lexists(self.sock_path))

    def test_bind_never_exposes_a_wider_mode(self):
        seen = []
        real_chmod = os.chmod

        def spy_chmod(path, mode, *args, **kwargs):
            # The socket is still in a private directory when its mode
            # is set, and that directory is not reachable by others.
            parent = os.path.dirname(path)
            seen.append((parent != self.tmpdir,
                         stat.S_IMODE(os.stat(parent).st_mode)))
            return real_chmod(path, mode, *args, **kwargs)

        # The os module the socket-file helpers call.
        with mock.patch.object(_unix_sockfile.os, 'chmod', spy_chmod):
            self.driver()
            self.assertTrue(wait_until(
                lambda: os.path.exists(self.sock_path)))
        self.assertEqual([(True, 0o700)], seen)

    def fake_uwsgi(self, worker_id):
        uwsgi = mock.Mock(spec=['worker_id', 'mule_id', 'i_am_the_spooler'])
        uwsgi.worker_id.return_value = worker_id
        uwsgi.mule_id.return_value = 0
        uwsgi.i_am_the_spooler.return_value = False
        self.useFixture(fixtures.MonkeyPatch('sys.modules',
                                             dict(sys.modules, uwsgi=uwsgi)))
        return uwsgi

    def test_uwsgi_master_never_starts_a_relay_thread(self):
        # uWSGI forks its workers from the master without Python's at-fork
        # hooks: a relay thread running there at fork time left every
        # worker hanging on the GIL. A notification emitted while the
        # application loads used to start it.
        uwsgi = self.fake_uwsgi(worker_id=0)
        notifier, driver = self.notifier()
        serialized = mock.Mock(wraps=driver._encode)
        driver._encode = serialized
        notifier.info({}, 'image.upload', {'id': 1})
        self.assertIsNone(driver._relay._thread)
        self.assertEqual(0, serialized.call_count)
        self.assertIsNone(driver.subscribers())
        self.assertFalse(os.path.lexists(self.sock_path))
        # A mule, forked from the master, relays.
        uwsgi.mule_id.return_value = 1
        notifier.info({}, 'image.upload', {'id': 2})
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))

    def test_uwsgi_worker_joins_at_its_first_notification(self):
        uwsgi = self.fake_uwsgi(worker_id=0)
        notifier, driver = self.notifier()
        uwsgi.worker_id.return_value = 1
        notifier.info({}, 'image.upload', {'id': 1})
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))

    def test_stale_socket_is_replaced(self):
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.sock_path)
        stale.close()
        driver = self.driver()
        self.subscribe(driver)
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.sock_path).st_mode))

    def test_no_leaked_fds_and_named_daemon_threads(self):
        before = set(os.listdir('/proc/self/fd'))
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        notifier.info({}, 'image.upload', {'id': 1})
        sock.settimeout(TIMEOUT)
        self.assertIn(b'image.upload', sock.recv(65536))
        # A green threading.enumerate() leaves out native threads.
        relays = [t for t in _unix_protocol.native('threading').enumerate()
                  if t.name.startswith('oslo.messaging-ext unix relay')]
        self.assertEqual(1, len(relays))
        self.assertTrue(relays[0].daemon)
        sock.close()
        driver.close()
        self.assertFalse(relays[0].is_alive())
        leaked = set(os.listdir('/proc/self/fd')) - before
        self.assertEqual(set(), {os.readlink('/proc/self/fd/' + fd)
                                 for fd in leaked if os.path.exists(
                                     '/proc/self/fd/' + fd)})

    # -- delivery -------------------------------------------------------------

    def test_envelope_on_the_wire(self):
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        envelope = samples.glance_image_notifications()[3]
        notifier.info({}, envelope['event_type'], envelope['payload'])
        [received] = self.read_lines(sock, 1)
        self.assertEqual({'message_id', 'publisher_id', 'event_type',
                          'priority', 'payload', 'timestamp', 'sequence'},
                         set(received))
        self.assertEqual(envelope['payload'], received['payload'])
        self.assertEqual('INFO', received['priority'])
        self.assertEqual('image.host', received['publisher_id'])

    def test_no_subscriber_means_no_serialization(self):
        notifier, driver = self.notifier()
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))
        with mock.patch.object(driver, '_encode') as encode:
            notifier.info({}, 'image.upload', {'id': 1})
        encode.assert_not_called()

    def test_values_json_cannot_hold(self):
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        when = datetime.datetime(2026, 11, 22, 3, 0, 0)
        notifier.info({}, 'image.upload', {'when': when, 'tags': {'a'},
                                           'obj': object()})
        [received] = self.read_lines(sock, 1)
        self.assertEqual(['a'], received['payload']['tags'])
        self.assertIn('2026-11-22', received['payload']['when'])
        self.assertIn('object', received['payload']['obj'])

    def test_values_orjson_refuses_fall_back_to_the_stdlib(self):
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        notifier.info({}, 'image.upload', {'size': 2 ** 70, 3: 'int key'})
        [received] = self.read_lines(sock, 1)
        self.assertEqual({'size': 2 ** 70, '3': 'int key'},
                         received['payload'])

    def test_encoders_agree_on_glance_and_odd_values(self):
        odd = {'when': datetime.datetime(2026, 11, 22, 3, 0, 0),
               'tags': {'a'}, 'name': 'caf\u00e9', 7: None,
               'ratio': 0.1, 'nested': [{'deep': (1, 2)}]}
        envelopes = samples.glance_image_notifications() + [
            dict(samples.glance_image_notifications()[0], payload=odd)]
        if _unix_encoding.orjson is None:
            self.skipTest('orjson (optional: the orjson extra) is not '
                          'installed: no second encoder to compare')
        encode = _unix_encoding.make_encoder()
        with mock.patch.object(_unix_encoding, 'orjson', None):
            stdlib_encode = _unix_encoding.make_encoder()
        for envelope in envelopes:
            line = encode(envelope)
            self.assertNotIn('\n', line)
            self.assertEqual(json.loads(stdlib_encode(envelope)),
                             json.loads(line))

    def test_unserializable_payload_is_logged_not_raised(self):
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        circular = {}
        circular['self'] = circular
        logger = self.useFixture(test_utils.FakeLogger(_impl_unix.__name__))
        driver.notify({}, {'message_id': 'x', 'event_type': 'bad',
                           'payload': circular}, 'INFO', None)
        self.assertIn('Cannot serialize notification x', logger.output)
        notifier.info({}, 'image.upload', {'id': 2})
        [received] = self.read_lines(sock, 1)
        self.assertEqual({'id': 2}, received['payload'])

    def test_context_only_on_request_and_without_secrets(self):
        ctxt = oslo_context.RequestContext(
            user_id='u1', project_id='p1', auth_token='SECRET-TOKEN',
            request_id='req-1')
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        notifier.info(ctxt, 'image.upload', {'id': 1})
        [received] = self.read_lines(sock, 1)
        self.assertNotIn('context', received)
        driver.close()

        notifier, driver = self.notifier(sock_include_context=True)
        sock = self.subscribe(driver)
        notifier.info(ctxt, 'image.upload', {'id': 1})
        raw = sock.recv(65536)
        self.assertNotIn(b'SECRET-TOKEN', raw)
        received = json.loads(raw)
        self.assertEqual('u1', received['context']['user'])
        self.assertEqual('req-1', received['context']['request_id'])
        self.assertNotIn('auth_token', received['context'])

    def test_redact_context_strips_secret_keys(self):
        clean = _unix_encoding.redact_context({
            'user': 'u', 'auth_token': 't', 'service_token': 's',
            'x_secret': 'y', 'password': 'p', 'roles': ['admin']})
        self.assertEqual({'user': 'u', 'roles': ['admin']}, clean)

    def test_every_subscriber_gets_every_notification_in_order(self):
        notifier, driver = self.notifier()
        first = self.subscribe(driver, 1)
        second = self.subscribe(driver, 2)
        for seq in range(200):
            notifier.info({}, 'image.upload', {'seq': seq})
        for sock in (first, second):
            self.assertEqual(list(range(200)), [
                n['payload']['seq'] for n in self.read_lines(sock, 200)])

    def test_stuck_subscriber_drops_are_counted_and_reported(self):
        notifier, driver = self.notifier(sock_buffer_size=65536)
        stuck = self.subscribe(driver)
        payload = samples.glance_upload_payload()
        count = 2000
        for seq in range(count):
            notifier.info({}, 'image.upload', dict(payload, seq=seq))
        # notify() did not block. Now the subscriber catches up while the
        # service goes on: the gap is reported in-band, where it is.
        stop = threading.Event()

        def trickle():
            seq = count
            while not stop.wait(0.005):
                notifier.info({}, 'image.upload', dict(payload, seq=seq))
                seq += 1

        emitter = threading.Thread(target=trickle)
        emitter.start()
        self.addCleanup(emitter.join)
        self.addCleanup(stop.set)
        reader = stuck.makefile('rb')
        self.addCleanup(reader.close)
        stuck.settimeout(TIMEOUT)
        last_seq, gap, missed = -1, 0, 0
        while not missed or last_seq < count:
            notification = json.loads(reader.readline())
            if notification['event_type'] == _unix_protocol.DROPPED_EVENT_TYPE:
                gap += notification['payload']['dropped']
                missed += notification['payload']['dropped']
                continue
            seq = notification['payload']['seq']
            self.assertEqual(last_seq + 1 + gap, seq)
            gap, last_seq = 0, seq
        self.assertGreater(missed, 0)

    def test_drops_of_a_gone_subscriber_are_not_reported_to_a_new_one(self):
        notifier, driver = self.notifier(sock_buffer_size=65536)
        stuck = self.subscribe(driver)
        payload = samples.glance_upload_payload()

        def saturate():
            notifier.info({}, 'image.upload', payload)
            return driver._relay.saturated

        self.assertTrue(wait_until(saturate))
        for _ in range(100):
            notifier.info({}, 'image.upload', payload)
        stuck.close()
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))
        fresh = self.subscribe(driver)
        notifier.info({}, 'image.upload', {'id': 'after'})
        [received] = self.read_lines(fresh, 1)
        self.assertEqual('image.upload', received['event_type'])
        self.assertEqual({'id': 'after'}, received['payload'])

    def test_subscriber_disconnect_is_cleaned_up(self):
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        sock.close()
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))
        notifier.info({}, 'image.upload', {'id': 1})

    def test_max_subscribers(self):
        driver = self.driver(sock_max_subscribers=1)
        self.subscribe(driver)
        extra = unix_subscriber.connect(self.sock_path)
        self.addCleanup(extra.close)
        extra.settimeout(TIMEOUT)
        self.assertEqual(b'', extra.recv(10))
        self.assertEqual(1, driver.subscribers())

    def test_publishers_do_not_count_against_max_subscribers(self):
        driver = self.driver(sock_max_subscribers=1)
        self.subscribe(driver)
        # A worker of the same service joins whatever the subscribers.
        for _ in range(3):
            self.assertEqual(1, self.status_as_a_publisher()['subscribers'])
        self.assertEqual(1, driver.subscribers())

    def test_non_finite_floats_are_null_with_either_encoder(self):
        message = {'payload': {'nan': float('nan'), 'inf': [float('inf')],
                               'big': 2 ** 70, 'x': 1.5}}
        expected = {'payload': {'nan': None, 'inf': [None],
                                'big': 2 ** 70, 'x': 1.5}}
        for orjson in (_unix_encoding.orjson, None):
            with mock.patch.object(_unix_encoding, 'orjson', orjson):
                line = _unix_encoding.make_encoder()(message)
            self.assertEqual(expected, json.loads(line, parse_constant=None))
            self.assertNotIn('NaN', line)
            self.assertNotIn('Infinity', line)

    def test_drops_are_reported_when_no_notification_follows(self):
        notifier, driver = self.notifier(sock_buffer_size=65536)
        stuck = self.subscribe(driver)
        payload = samples.glance_upload_payload()
        for seq in range(2000):
            notifier.info({}, 'image.upload', dict(payload, seq=seq))
        # The stream ends here; reading it all must account for all.
        delivered = dropped = 0
        reader = stuck.makefile('rb')
        self.addCleanup(reader.close)
        stuck.settimeout(TIMEOUT)
        while delivered + dropped < 2000:
            notification = json.loads(reader.readline())
            if notification['event_type'] == _unix_protocol.DROPPED_EVENT_TYPE:
                dropped += notification['payload']['dropped']
            else:
                delivered += 1
        self.assertEqual(2000, delivered + dropped)
        self.assertGreater(dropped, 0)

    def test_one_oversized_notification_reaches_an_idle_subscriber(self):
        notifier, driver = self.notifier(sock_buffer_size=65536)
        sock = self.subscribe(driver)
        notifier.info({}, 'image.upload', {'blob': 'x' * 200000})
        [received] = self.read_lines(sock, 1)
        self.assertEqual('image.upload', received['event_type'])
        self.assertEqual(200000, len(received['payload']['blob']))

    def test_what_is_emitted_before_classification_is_held(self):
        # A connection that has not spoken yet may be one of the service's
        # processes: the hub holds lines for it until it knows.
        self.useFixture(fixtures.MonkeyPatch(
            'oslo_messaging_ext.notify._unix_hub._HANDSHAKE_GRACE',
            TIMEOUT * 3))
        notifier, driver = self.notifier()
        relay = driver._relay
        subscriber = self.connect()
        publisher = self.connect()
        self.assertTrue(wait_until(lambda: relay.connecting == 2))
        self.assertEqual(0, driver.subscribers())
        notifier.info({}, 'image.upload', {'id': 'early'})
        publisher.sendall(_unix_protocol.control_line(
            role=_unix_protocol.ROLE_PUBLISHER, service='unix-unit',
            pid=os.getpid()))
        self.assertTrue(wait_until(lambda: relay.connecting == 1))
        # End of stream: a subscriber (as socat's is when its stdin ends).
        subscriber.shutdown(socket.SHUT_WR)
        [received] = self.read_lines(subscriber, 1)
        self.assertEqual({'id': 'early'}, received['payload'])
        self.assertEqual(1, driver.subscribers())
        self.assertEqual(0, relay.connecting)
        # The publisher was sent status lines only, never the held line.
        publisher.setblocking(False)
        lines = publisher.recv(1 << 20).splitlines()
        self.assertTrue(lines)
        for line in lines:
            self.assertIsNotNone(_unix_protocol.parse_control(line), line)

    def test_half_closed_subscriber_still_receives(self):
        # As socat does when its stdin ends.
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        sock.shutdown(socket.SHUT_WR)
        notifier.info({}, 'image.upload', {'id': 3})
        [received] = self.read_lines(sock, 1)
        self.assertEqual({'id': 3}, received['payload'])

    def test_a_publisher_that_introduces_itself_late_is_heard(self):
        # No grace at all: every publisher's handshake comes after it was
        # taken for a subscriber, as when it is starved of CPU.
        self.useFixture(fixtures.MonkeyPatch(
            'oslo_messaging_ext.notify._unix_hub._HANDSHAKE_GRACE', 0))
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        publisher = self.another_process_publishing()
        self.assertEqual(1, driver.subscribers())
        publisher.publish(_unix_encoding.make_encoder()(
            {'event_type': 'image.upload', 'payload': {'id': 'late'}}))
        [received] = self.read_lines(sock, 1)
        self.assertEqual({'id': 'late'}, received['payload'])

    def test_a_publisher_stopping_while_all_are_full_reports_its_count(self):
        notifier, driver = self.notifier(sock_buffer_size=65536)
        stuck = self.subscribe(driver)
        publisher = self.another_process_publishing()
        encode = _unix_encoding.make_encoder()
        payload = samples.glance_upload_payload()
        published = [0]

        def publish():
            if publisher.wanted():
                publisher.publish(encode({'event_type': 'image.upload',
                                          'payload': payload}))
            published[0] += 1
            return publisher.saturated

        self.assertTrue(wait_until(publish))
        # Counted, not serialized, from now on; then the process stops.
        for _ in range(1000):
            publish()
        publisher.close()
        published = published[0]
        delivered = dropped = 0
        reader = stuck.makefile('rb')
        self.addCleanup(reader.close)
        stuck.settimeout(TIMEOUT)
        while delivered + dropped < published:
            notification = json.loads(reader.readline())
            if notification['event_type'] == _unix_protocol.DROPPED_EVENT_TYPE:
                dropped += notification['payload']['dropped']
            else:
                delivered += 1
        self.assertEqual(published, delivered + dropped)
        self.assertGreater(dropped, 0)
