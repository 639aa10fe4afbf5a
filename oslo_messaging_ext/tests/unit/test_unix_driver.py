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

"""The unix notification driver, black-box: a real Notifier, real hub
processes, real subscribers on real sockets."""

import dataclasses
import datetime
import enum
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from unittest import mock

import fixtures
from oslo_config import cfg
from oslo_config import fixture as config_fixture
from oslo_context import context as oslo_context
import oslo_messaging
from oslotest import base

from oslo_messaging_ext.notify import _impl_unix
from oslo_messaging_ext.notify import _unix_protocol
from oslo_messaging_ext import opts
from oslo_messaging_ext import samples
from oslo_messaging_ext.tests import utils as test_utils

GROUP = 'oslo_messaging_notifications'
TIMEOUT = 10.0
DROPPED = _unix_protocol.DROPPED_EVENT_TYPE


def wait_until(predicate):
    return test_utils.wait_until(predicate, TIMEOUT, interval=0.005)


class UnixTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.tmpdir = self.useFixture(fixtures.TempDir()).path
        self.sock_path = os.path.join(self.tmpdir, 'notifications.sock')
        # Last: after every driver of the test closed.
        test_utils.stop_hub_at_cleanup(self, self.sock_path)
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
        return test_utils.subscribe_when_listening(self, self.sock_path,
                                                   TIMEOUT)

    def subscribe(self, driver, count=1):
        sock = self.connect()
        self.assertTrue(wait_until(lambda: driver.subscribers() == count))
        return sock

    def read_lines(self, sock, count):
        reader = sock.makefile('rb')
        self.addCleanup(reader.close)
        sock.settimeout(TIMEOUT)
        return [json.loads(reader.readline()) for _ in range(count)]

    def read_accounting(self, sock, total):
        """(delivered payloads, dropped) until they account for ``total``."""
        reader = sock.makefile('rb')
        self.addCleanup(reader.close)
        sock.settimeout(TIMEOUT)
        delivered, dropped = [], 0
        while len(delivered) + dropped < total:
            notification = json.loads(reader.readline())
            if notification['event_type'] == DROPPED:
                dropped += notification['payload']['dropped']
            else:
                delivered.append(notification['payload'])
        return delivered, dropped


class UnixDriverConfigTestCase(UnixTestCase):

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
        # From a configuration file, as a service reads them: the load
        # error names the value.
        conf_file = os.path.join(self.tmpdir, 'service.conf')
        for option, value in [('sock_max_subscribers', 0),
                              ('sock_max_subscribers', -1),
                              ('sock_buffer_size', 0),
                              ('sock_buffer_size', 10),
                              ('sock_buffer_size', 65535)]:
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

    def test_option_minimums_are_in_their_help(self):
        # So that the configuration reference shows them.
        listed = {o.name: o for o in dict(opts.list_opts())[GROUP]}
        self.assertIn('at least 65536', listed['sock_buffer_size'].help)
        self.assertIn('at least 1', listed['sock_max_subscribers'].help)

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

    def test_directory_owned_by_another_user_as_root(self):
        test_utils.require_root(self, 'changing a directory owner')
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
            'oslo_messaging_ext.notify._unix_protocol.peer_uid',
            return_value=os.geteuid() + 1))
        self.assertConfigError('sock_path', self.sock_path,
                               'another user may have bound it')
        # Nothing was sent to it.
        listener.settimeout(1.0)
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        conn.settimeout(1.0)
        self.assertEqual(b'', conn.recv(4096))

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

    def test_lock_file_of_another_user_is_refused_at_load_as_root(self):
        test_utils.require_root(self, 'creating a file of another user')
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

    def test_stale_socket_of_another_user_in_a_sticky_directory_as_root(self):
        test_utils.require_root(self, 'creating a file of another user')
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.sock_path)
        stale.close()
        os.chown(self.sock_path, 65534, -1)
        os.chown(self.tmpdir, 65534, -1)
        self.addCleanup(os.chown, self.tmpdir, 0, -1)
        os.chmod(self.tmpdir, 0o1777)
        with mock.patch.object(_unix_protocol.os, 'geteuid',
                               return_value=1000):
            problem = _unix_protocol.squatted(self.sock_path)
        self.assertIn('socket of uid 65534 in a sticky directory', problem)

    def test_options_module_loads_no_driver(self):
        # Listing the options registers nothing and loads no driver.
        code = ('import sys, oslo_messaging_ext.opts as o; o.list_opts(); '
                'print(sorted(m for m in sys.modules if "_unix_" in m or '
                '"_impl_" in m))')
        out = subprocess.check_output([sys.executable, '-c', code])
        self.assertEqual(['oslo_messaging_ext.notify._unix_opts'],
                         json.loads(out.decode().replace("'", '"')))

    def test_options_listed(self):
        # The group is shared: upstream lists its own notification options
        # in it.
        listed = dict(opts.list_opts())[GROUP]
        self.assertEqual(
            set(), {'sock_path', 'sock_mode', 'sock_group',
                    'sock_max_subscribers', 'sock_buffer_size',
                    'sock_include_context'} - {o.name for o in listed})


class UnixSocketFileTestCase(UnixTestCase):

    def test_sockets_mode_group_and_files(self):
        driver = self.driver(sock_mode='0640')
        # Connected at load: the hub serves before any notification.
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))
        st = os.lstat(self.sock_path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(0o640, stat.S_IMODE(st.st_mode))
        self.assertEqual(os.getegid(), st.st_gid)
        ingest = os.lstat(self.sock_path + '.ingest')
        self.assertEqual(0o600, stat.S_IMODE(ingest.st_mode))
        # Nothing else is left beside them (no private bind directory).
        self.assertEqual(['notifications.sock', 'notifications.sock.ingest',
                          'notifications.sock.lock'],
                         sorted(os.listdir(self.tmpdir)))
        # The last process of the service gone, the hub removes both.
        pid = test_utils.hub_pid(self.sock_path)
        driver.close()
        self.assertTrue(wait_until(lambda: not test_utils.alive(pid)))
        self.assertEqual(['notifications.sock.lock'],
                         os.listdir(self.tmpdir))

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

        with mock.patch.object(_unix_protocol.os, 'chmod', spy_chmod):
            sock, _ = _unix_protocol.bind_listener(self.sock_path, 0o640,
                                                   os.getegid())
        sock.close()
        self.assertEqual([(True, 0o700)], seen)
        self.assertEqual(0o640,
                         stat.S_IMODE(os.lstat(self.sock_path).st_mode))

    def test_stale_socket_is_replaced(self):
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.sock_path)
        stale.close()
        driver = self.driver()
        self.subscribe(driver)
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.sock_path).st_mode))


class UnixDeliveryTestCase(UnixTestCase):

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
        if _impl_unix.orjson is None:
            self.skipTest('orjson (optional: the orjson extra) is not '
                          'installed: no second encoder to compare')
        encode = _impl_unix.make_encoder()
        with mock.patch.object(_impl_unix, 'orjson', None):
            stdlib_encode = _impl_unix.make_encoder()
        for envelope in envelopes:
            line = encode(envelope)
            self.assertNotIn(b'\n', line)
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
        self.assertIn('Cannot send notification x', logger.output)
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
        sock.shutdown(socket.SHUT_RDWR)
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
        clean = _impl_unix.redact_context({
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
            if notification['event_type'] == DROPPED:
                gap += notification['payload']['dropped']
                missed += notification['payload']['dropped']
                continue
            seq = notification['payload']['seq']
            self.assertEqual(last_seq + 1 + gap, seq)
            gap, last_seq = 0, seq
        self.assertGreater(missed, 0)

    def test_subscriber_disconnect_is_cleaned_up(self):
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        sock.close()
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))
        notifier.info({}, 'image.upload', {'id': 1})

    def test_max_subscribers(self):
        driver = self.driver(sock_max_subscribers=1)
        self.subscribe(driver)
        extra = test_utils.connect(self.sock_path)
        self.addCleanup(extra.close)
        extra.settimeout(TIMEOUT)
        self.assertEqual(b'', extra.recv(10))
        self.assertEqual(1, driver.subscribers())

    def test_non_finite_floats_are_null_with_either_encoder(self):
        message = {'payload': {'nan': float('nan'), 'inf': [float('inf')],
                               'big': 2 ** 70, 'x': 1.5}}
        expected = {'payload': {'nan': None, 'inf': [None],
                                'big': 2 ** 70, 'x': 1.5}}
        for orjson in (_impl_unix.orjson, None):
            with mock.patch.object(_impl_unix, 'orjson', orjson):
                line = _impl_unix.make_encoder()(message)
            self.assertEqual(expected, json.loads(line, parse_constant=None))
            self.assertNotIn(b'NaN', line)
            self.assertNotIn(b'Infinity', line)

    def test_drops_of_a_process_that_exits_at_once_are_reported(self):
        # Its last notifications could not be handed over (the hub is
        # stopped), and it exits before it sends another: the hub reads
        # its tally when it leaves.
        notifier, driver = self.notifier(sock_buffer_size=65536)
        sock = self.subscribe(driver)
        hub = test_utils.hub_pid(self.sock_path)
        os.kill(hub, signal.SIGSTOP)
        self.addCleanup(os.kill, hub, signal.SIGCONT)
        total = 3000
        pid = os.fork()
        if pid == 0:
            try:
                payload = samples.glance_upload_payload()
                for seq in range(total):
                    notifier.info({}, 'image.upload', dict(payload, seq=seq))
            finally:
                os._exit(0)
        self.assertEqual(0, os.waitpid(pid, 0)[1])
        os.kill(hub, signal.SIGCONT)
        delivered, dropped = self.read_accounting(sock, total)
        self.assertGreater(dropped, 0)
        self.assertEqual(total, len(delivered) + dropped)

    def test_one_oversized_notification_reaches_an_idle_subscriber(self):
        notifier, driver = self.notifier(sock_buffer_size=65536)
        sock = self.subscribe(driver)
        # Larger than sock_buffer_size, within the send buffer (its
        # double, as Linux gives).
        notifier.info({}, 'image.upload', {'blob': 'x' * 100000})
        [received] = self.read_lines(sock, 1)
        self.assertEqual('image.upload', received['event_type'])
        self.assertEqual(100000, len(received['payload']['blob']))

    def test_too_large_for_the_send_buffer_is_counted_and_logged(self):
        logger = self.useFixture(test_utils.FakeLogger(_impl_unix.__name__))
        notifier, driver = self.notifier(sock_buffer_size=65536)
        sock = self.subscribe(driver)
        notifier.info({}, 'image.upload', {'blob': 'x' * 300000})
        notifier.info({}, 'image.upload', {'id': 'next'})
        notice, received = self.read_lines(sock, 2)
        self.assertEqual(DROPPED, notice['event_type'])
        self.assertEqual((1, 'too large'), (notice['payload']['dropped'],
                                            notice['payload']['where']))
        self.assertEqual({'id': 'next'}, received['payload'])
        self.assertEqual(2, received['sequence']['number'])
        self.assertIn('more than the send buffer to the hub', logger.output)

    def test_half_closed_subscriber_still_receives(self):
        # As socat does when its stdin ends.
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        sock.shutdown(socket.SHUT_WR)
        notifier.info({}, 'image.upload', {'id': 3})
        [received] = self.read_lines(sock, 1)
        self.assertEqual({'id': 3}, received['payload'])

    def test_values_are_primitives_before_masking(self):
        # Objects, dataclasses, __slots__ objects and Enum values become
        # JSON values in the service; the hub masks those (issue 23).
        class Plain:
            def __init__(self):
                self.password = 'plain-secret'

        @dataclasses.dataclass
        class Data:
            password: str = 'dataclass-secret'

        class Slotted:
            __slots__ = ('password',)

            def __init__(self):
                self.password = 'slots-secret'

            def __repr__(self):
                return "Slotted(password='slots-secret')"

        class Kind(str, enum.Enum):
            SECRET = 'password=enum-str-secret'

        class Other(enum.Enum):
            SECRET = 'password=enum-secret'

        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        notifier.info({}, 'image.upload', {
            'plain': Plain(), 'data': Data(), 'slotted': Slotted(),
            'kind': Kind.SECRET, 'other': Other.SECRET,
            'admin_password': 'direct-secret', 'id': 1})
        reader = sock.makefile('rb')
        self.addCleanup(reader.close)
        sock.settimeout(TIMEOUT)
        raw = reader.readline()
        self.assertNotIn(b'secret', raw.replace(b'"secret', b''))
        payload = json.loads(raw)['payload']
        self.assertEqual(1, payload['id'])
        self.assertEqual('***', payload['admin_password'])


# A process that emits as soon as told, then ends at once (os._exit, as
# a recycled worker may): it says when its driver is loaded.
_EARLY_PROCESS = """import os, sys
from oslo_config import cfg
import oslo_messaging
from oslo_messaging_ext.notify import _impl_unix
conf = cfg.ConfigOpts()
conf([])
_impl_unix.register_opts(conf)
conf.set_override('sock_path', sys.argv[1], %r)
notifier = oslo_messaging.Notifier(oslo_messaging.get_notification_transport(
    conf, url='fake:/'), driver='unix', publisher_id='image.early')
print('loaded', flush=True)
sys.stdin.read(1)
for seq in range(100):
    notifier.info({}, 'image.upload', {'seq': seq})
os._exit(0)
""" % GROUP


class UnixProcessTestCase(UnixTestCase):

    def test_what_is_sent_while_the_hub_starts_waits_for_it(self):
        # The process starts the hub, and its 100 notifications go before
        # the hub can run, from a process that is gone when it does: a
        # subscriber connected meanwhile gets all of them, in order.
        proc = subprocess.Popen(
            [sys.executable, '-c', _EARLY_PROCESS, self.sock_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.stdin.close)
        self.addCleanup(proc.stdout.close)
        self.assertEqual(b'loaded\n', proc.stdout.readline())
        # Bound by the process before its driver was loaded: no wait.
        sock = test_utils.connect(self.sock_path)
        self.addCleanup(lambda: sock.close())
        proc.stdin.write(b'x')
        proc.stdin.flush()
        self.assertEqual(0, proc.wait(TIMEOUT))
        self.assertEqual(list(range(100)), [
            line['payload']['seq'] for line in self.read_lines(sock, 100)])

    def test_no_thread_no_leaked_fd(self):
        threads = threading.active_count()
        tasks = len(os.listdir('/proc/self/task'))
        before = set(os.listdir('/proc/self/fd'))
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        for seq in range(100):
            notifier.info({}, 'image.upload', {'seq': seq})
        sock.settimeout(TIMEOUT)
        with sock.makefile('rb') as reader:
            for _ in range(100):
                self.assertIn(b'image.upload', reader.readline())
        self.assertEqual(threads, threading.active_count())
        self.assertEqual(tasks, len(os.listdir('/proc/self/task')))
        sock.close()
        driver.close()
        leaked = set(os.listdir('/proc/self/fd')) - before
        self.assertEqual(set(), {os.readlink('/proc/self/fd/' + fd)
                                 for fd in leaked if os.path.exists(
                                     '/proc/self/fd/' + fd)})

    def test_hub_process_is_detached_and_imports_no_messaging(self):
        driver = self.driver()
        self.assertTrue(wait_until(lambda: driver.subscribers() == 0))
        pid = test_utils.hub_pid(self.sock_path)
        self.assertNotEqual(os.getpid(), pid)
        self.assertEqual(pid, os.getsid(pid))
        for fd in (0, 1):
            self.assertEqual('/dev/null',
                             os.readlink('/proc/%d/fd/%d' % (pid, fd)))
        self.assertEqual(os.readlink('/proc/self/fd/2'),
                         os.readlink('/proc/%d/fd/2' % pid))
        # Beyond what importing its package imports, the hub imports
        # neither oslo.messaging nor eventlet; inside oslo.messaging, the
        # package itself imports both (not patched).
        package = _impl_unix.__name__.split('.')[0]
        if package != 'oslo_messaging':
            # Whose __init__ imports nothing.
            package = 'json'
        code = ('import importlib, json, sys; importlib.import_module(%r); '
                'before = set(sys.modules); importlib.import_module(%r); '
                'print(json.dumps(sorted(m for m in set(sys.modules) - before '
                'if m.split(".")[0] in ("oslo_messaging", "eventlet") and '
                '"._unix_" not in m)))' % (package, _impl_unix.HUB_MODULE))
        out = subprocess.check_output([sys.executable, '-c', code])
        self.assertEqual([], json.loads(out))

    def test_real_interpreter_under_uwsgi(self):
        # Under uWSGI sys.executable is the uwsgi binary.
        with mock.patch.object(sys, 'executable', '/usr/bin/uwsgi'):
            interpreter = _impl_unix.hub_interpreter()
        self.assertNotIn('uwsgi', interpreter)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in sys.path if p))
        subprocess.check_call(
            [interpreter, '-c', 'import ' + _impl_unix.HUB_MODULE],
            env=env)

    def test_hub_killed_is_replaced_at_the_next_notify(self):
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        notifier.info({}, 'image.upload', {'seq': 0})
        self.assertEqual(1, len(self.read_lines(sock, 1)))
        pid = test_utils.hub_pid(self.sock_path)
        os.kill(pid, signal.SIGKILL)
        self.assertTrue(wait_until(lambda: not test_utils.alive(pid)))
        self.assertEqual(b'', sock.recv(10))
        # The next notify() notices the hub is gone (a drop), the one
        # after starts a hub (reaping the dead), which it binds first: a
        # subscriber connects as soon as it returns.
        seq, socks = [1], []

        def emit():
            notifier.info({}, 'image.upload', {'seq': seq[0]})
            seq[0] += 1
            try:
                socks.append(test_utils.connect(self.sock_path))
            except OSError:
                return False
            return True

        self.assertTrue(wait_until(emit))
        fresh = socks[0]
        self.addCleanup(lambda: fresh.close())
        notifier.info({}, 'image.upload', {'seq': 'after'})
        # What this process counted while no hub was there comes first,
        # then the line of the notify() that started the hub: the hub
        # admits who waits before it relays.
        notice, started, received = self.read_lines(fresh, 3)
        self.assertEqual(DROPPED, notice['event_type'])
        self.assertEqual('hub absent', notice['payload']['where'])
        self.assertEqual({'seq': seq[0] - 1}, started['payload'])
        dropped = notice['payload']['dropped']
        self.assertEqual(seq[0] - 2, dropped)
        self.assertEqual({received['sequence']['source']: dropped},
                         notice['payload']['sources'])
        self.assertEqual({'seq': 'after'}, received['payload'])
        self.assertEqual(seq[0] + 1, received['sequence']['number'])
        # Reaped by the process that started it.
        self.assertFalse(os.path.exists('/proc/%d' % pid))

    def test_hub_stopped_and_continued_loses_nothing_silently(self):
        notifier, driver = self.notifier(sock_buffer_size=65536)
        sock = self.subscribe(driver)
        pid = test_utils.hub_pid(self.sock_path)
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)
        payload = samples.glance_upload_payload()
        total = 3000
        for seq in range(total):
            notifier.info({}, 'image.upload', dict(payload, seq=seq))
        os.kill(pid, signal.SIGCONT)
        # The hub reads the process's tally once it has read what was
        # queued: no notification needs to follow.
        delivered, dropped = self.read_accounting(sock, total)
        self.assertGreater(dropped, 0)
        self.assertEqual(total, len(delivered) + dropped)

    def test_forked_child_uses_its_own_connection(self):
        notifier, driver = self.notifier()
        sock = self.subscribe(driver)
        notifier.info({}, 'image.upload', {'who': 'parent'})
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(reader)
                notifier.info({}, 'image.upload', {'who': 'child'})
                os.write(writer, b'x')
                status = 0
            finally:
                os._exit(status)
        os.close(writer)
        self.assertEqual(b'x', os.read(reader, 1))
        os.close(reader)
        self.assertEqual(0, os.waitpid(pid, 0)[1])
        notifier.info({}, 'image.upload', {'who': 'parent'})
        # Two connections: the hub may read either first.
        lines = self.read_lines(sock, 3)
        parent = [n['sequence'] for n in lines
                  if n['payload']['who'] == 'parent']
        [child] = [n['sequence'] for n in lines
                   if n['payload']['who'] == 'child']
        self.assertEqual([1, 2], [s['number'] for s in parent])
        self.assertEqual(parent[0]['source'], parent[1]['source'])
        self.assertEqual(1, child['number'])
        self.assertNotEqual(parent[0]['source'], child['source'])
        self.assertTrue(child['source'].startswith('%d-' % pid))
