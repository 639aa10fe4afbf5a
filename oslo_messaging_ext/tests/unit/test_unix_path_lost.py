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

"""A hub whose socket file is removed while it serves binds it again."""

import json
import os
import shutil
import stat

from oslo_config import cfg
from oslo_config import fixture as config_fixture
import oslo_messaging
from oslotest import base

import fixtures

from oslo_messaging_ext.notify import _impl_unix
from oslo_messaging_ext.notify import _unix_hub_path
from oslo_messaging_ext.notify import _unix_log
from oslo_messaging_ext.notify import _unix_relay
from oslo_messaging_ext.tests import utils as test_utils
from oslo_messaging_ext import unix_subscriber

GROUP = 'oslo_messaging_notifications'
# The hub checks its path once a second; allow for a loaded machine.
BOUND = 10.0


class PathLostTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.directory = os.path.join(
            self.useFixture(fixtures.TempDir()).path, 'run')
        os.mkdir(self.directory, 0o750)
        self.sock_path = os.path.join(self.directory, 'notifications.sock')
        conf = self.useFixture(config_fixture.Config(cfg.ConfigOpts()))
        conf.conf([], project='unix-path-lost-unit')
        _impl_unix.register_opts(conf.conf)
        conf.config(sock_path=self.sock_path, sock_mode='0640',
                    group=GROUP)
        transport = oslo_messaging.get_notification_transport(
            conf.conf, url='fake:/')
        self.addCleanup(transport.cleanup)
        self.logger = self.useFixture(
            test_utils.FakeLogger(_unix_hub_path.__name__))
        self.relay_logger = self.useFixture(
            test_utils.FakeLogger(_unix_relay.__name__))
        self.driver = _impl_unix.UnixSocketDriver(conf.conf, ['n'],
                                                  transport)
        self.addCleanup(self.driver.close)
        # Serving: this process is the hub.
        self.assertTrue(self.wait(lambda: self.driver.subscribers() == 0))

    def wait(self, predicate):
        return test_utils.wait_until(predicate, BOUND, interval=0.01)

    def subscribe_and_receive(self):
        """A subscriber connects, is counted, and gets a notification."""
        sockets = []

        def connected():
            try:
                sockets.append(unix_subscriber.connect(self.sock_path))
            except unix_subscriber.SubscriberError:
                return False
            return True

        self.assertTrue(self.wait(connected))
        sock = sockets[0]
        self.addCleanup(lambda: sock.close())
        self.assertTrue(self.wait(
            lambda: (self.driver.subscribers() or 0) >= 1))
        self.driver.notify({}, {'event_type': 'image.upload',
                                'payload': {'id': 'back'}}, 'INFO', None)
        sock.settimeout(BOUND)
        reader = sock.makefile('rb')
        self.addCleanup(reader.close)
        self.assertEqual({'id': 'back'},
                         json.loads(reader.readline())['payload'])
        return reader

    def logged(self):
        _unix_log.emit_deferred_records()
        return self.logger.output

    def assertBoundAgainSafely(self):
        self.assertTrue(self.wait(lambda: os.path.exists(self.sock_path)))
        st = os.lstat(self.sock_path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(0o640, stat.S_IMODE(st.st_mode))
        self.subscribe_and_receive()
        self.assertEqual(1, self.logged().count('no longer names'))
        # Bound again by the hub that lost it, not by a relay that failed
        # and was elected anew.
        self.assertNotIn('relay error', self.relay_logger.output)

    def test_a_removed_socket_is_bound_again(self):
        first = self.subscribe_and_receive()
        os.unlink(self.sock_path)
        self.assertBoundAgainSafely()
        # The subscriber connected before is still served.
        self.driver.notify({}, {'event_type': 'image.upload',
                                'payload': {'id': 'still'}}, 'INFO', None)
        payloads = [json.loads(first.readline())['payload']
                    for _ in range(2)]
        self.assertEqual([{'id': 'back'}, {'id': 'still'}], payloads)

    def test_a_recreated_directory_gets_the_socket_again(self):
        shutil.rmtree(self.directory)
        os.mkdir(self.directory, 0o750)
        self.assertBoundAgainSafely()

    def test_an_unsafe_recreated_directory_is_not_used(self):
        shutil.rmtree(self.directory)
        os.mkdir(self.directory)
        os.chmod(self.directory, 0o777)
        self.assertTrue(self.wait(lambda: 'cannot bind it again' in
                                  self.logged()))
        self.assertFalse(os.path.lexists(self.sock_path))
        os.chmod(self.directory, 0o750)
        self.assertBoundAgainSafely()

    def test_a_symlink_at_the_path_is_left_alone(self):
        os.unlink(self.sock_path)
        target = os.path.join(self.directory, 'elsewhere')
        os.symlink(target, self.sock_path)
        self.assertTrue(self.wait(lambda: 'no longer names' in
                                  self.logged()))
        self.assertTrue(os.path.islink(self.sock_path))
        self.assertFalse(os.path.lexists(target))
