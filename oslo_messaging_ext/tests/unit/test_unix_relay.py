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

"""The relay's publisher side, driven by hand, and its thread.

No I/O thread runs but in the eventlet test: each test puts a Relay in the
state it needs, with a socket pair for its hub, and calls the step under
test, so that the order of events that a thread would make a matter of
luck is fixed.
"""

import json
import os
import subprocess
import sys
import time
from unittest import mock

import fixtures
from oslotest import base

from oslo_messaging_ext.notify import _unix_fork
from oslo_messaging_ext.notify import _unix_protocol as proto
from oslo_messaging_ext.notify import _unix_relay
from oslo_messaging_ext.tests import utils as test_utils
from oslo_messaging_ext import unix_subscriber

# The relay runs in a native thread and polls natively; driven by hand
# here, it gets the same module in an eventlet-patched run.
select = proto.native('select')

notification = test_utils.notification_line


class RelayTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        tmpdir = self.useFixture(fixtures.TempDir()).path
        self.relay = _unix_relay.Relay(
            os.path.join(tmpdir, 'n.sock'), service='relay-unit',
            mode=0o660, gid=os.getegid(), max_subscribers=8,
            buffer_size=1 << 20)
        self.relay._poller = select.poll()

    def pair(self):
        return test_utils.native_socket_pair(self)

    def publishing(self):
        """The relay as a publisher, and the hub's end of its link."""
        upstream, hub_end = self.pair()
        self.relay._become_publisher(upstream)
        self.relay._upstream.pending = b''
        return hub_end

    def test_lines_the_lost_hub_did_not_take_are_reported(self):
        self.publishing()
        batch = b''.join(notification(seq) for seq in range(10))
        # The hub took 3 lines and half of the fourth.
        cut = len(b''.join(notification(seq) for seq in range(3))) + 5
        self.relay._upstream.pending = memoryview(batch)[cut:]

        self.relay._lose_upstream()

        self.assertEqual(_unix_relay._STARTING, self.relay.state)
        [notice] = self.relay.outbox.take()
        self.assertTrue(notice.encode().startswith(proto.DROPPED_PREFIX))
        self.assertEqual(7, proto.dropped_count(notice))

    def test_hub_gone_with_pollout_and_pollhup_together(self):
        # The relay used to call recv() on the upstream it had just lost,
        # and end up failed for the rest of the process's life.
        hub_end = self.publishing()
        upstream = self.relay._upstream
        self.relay._upstream.pending = b''.join(
            notification(seq) for seq in range(3))
        hub_end.close()

        self.relay._handle(upstream.fileno(), select.POLLOUT | select.POLLHUP)

        self.assertEqual(_unix_relay._STARTING, self.relay.state)
        self.assertIsNone(self.relay._upstream)
        [notice] = self.relay.outbox.take()
        self.assertEqual(3, proto.dropped_count(notice))

    def test_a_connection_refused_at_once_backs_off(self):
        self.relay.state = _unix_relay._PUBLISHER
        delays = []
        for _ in range(4):
            upstream, hub_end = self.pair()
            self.relay._become_publisher(upstream)
            hub_end.close()
            self.relay._read_upstream()
            delays.append(self.relay.retry.at - time.monotonic())
        self.assertEqual(_unix_relay._STARTING, self.relay.state)
        self.assertGreater(delays[0], 0)
        self.assertGreater(delays[-1], delays[0] * 4)

    def test_relay_thread_logs_do_not_hang_eventlet(self):
        script = os.path.join(os.path.dirname(__file__), 'eventlet_logging.py')
        for _ in range(3):
            result = subprocess.run([sys.executable, script], timeout=60,
                                    capture_output=True, text=True)
            self.assertEqual(0, result.returncode, result.stderr[-2000:])
            self.assertIn('relay records logged', result.stdout)

    def test_sockets_stay_native_when_eventlet_patches_after_import(self):
        # monkey_patch() replaces socket.socket in place, in modules
        # imported before it ran too: the relay's thread must still get
        # native sockets, whatever the order of the service's imports.
        code = (
            'import os, sys, tempfile, time\n'
            'from oslo_messaging_ext.notify import _unix_relay\n'
            'import eventlet\n'
            'eventlet.monkey_patch()\n'
            'relay = _unix_relay.Relay(\n'
            '    os.path.join(tempfile.mkdtemp(), "n.sock"), service="late",\n'
            '    mode=0o660, gid=os.getegid(), max_subscribers=4,\n'
            '    buffer_size=65536)\n'
            'relay.start()\n'
            'deadline = time.monotonic() + 10\n'
            'while relay.state != "hub" and time.monotonic() < deadline:\n'
            '    eventlet.sleep(0.01)\n'
            'print(relay.state, type(relay._hub.listener).__module__)\n'
            'relay.close()\n')
        env = dict(os.environ, PYTHONWARNINGS='ignore')
        result = subprocess.run([sys.executable, '-c', code], timeout=60,
                                capture_output=True, text=True, env=env)
        self.assertEqual(0, result.returncode, result.stderr[-2000:])
        self.assertEqual('hub socket', result.stdout.strip())

    def test_notifications_in_a_cut_batch(self):
        batch = (b'image.upload"}}\n' +
                 proto.control_line(role=proto.ROLE_PUBLISHER, service='s',
                                    pid=1) +
                 notification(1) +
                 proto.dropped_envelope(5, 'publisher 1') +
                 notification(2))
        self.assertEqual(1 + 1 + 5 + 1, proto.notifications_in(batch))
        self.assertEqual(0, proto.notifications_in(b''))


class ForkTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.useFixture(fixtures.TempDir()).path,
                                 'n.sock')

    def hub(self):
        relay = _unix_relay.get(self.path, service='park', mode=0o660,
                                gid=os.getegid(), max_subscribers=4,
                                buffer_size=65536)
        self.addCleanup(_unix_relay.release, relay)
        relay.start()
        self.assertTrue(test_utils.wait_until(
            lambda: relay.state == _unix_relay._HUB, 10))
        return relay

    def test_a_fork_without_hooks_is_noticed(self):
        # Default uWSGI forks its workers without Python's at-fork hooks:
        # the relay used to keep the master's pid, so that a worker's
        # close() did nothing and left its socket behind, and log records
        # deferred in the master were logged again by every worker.
        script = os.path.join(os.path.dirname(__file__), 'hookless_fork.py')
        result = subprocess.run([sys.executable, script, self.path],
                                timeout=60, capture_output=True, text=True)
        self.assertEqual(0, result.returncode, result.stderr[-2000:])
        report = json.loads(result.stdout.splitlines()[-1])
        self.assertEqual({'relay_pid_is_ours': True,
                          'received_from': report['pid'],
                          'pid': report['pid'],
                          'socket_left': False,
                          'parent_records': []}, report)

    def test_the_relay_thread_is_parked_while_the_process_forks(self):
        relay = self.hub()
        sock = unix_subscriber.connect(self.path)
        self.addCleanup(sock.close)
        self.assertTrue(test_utils.wait_until(
            lambda: relay.subscribers == 1, 10))
        _unix_fork._before_fork()
        try:
            self.assertTrue(relay.parking.parked())
            # Parked: it takes nothing from the outbox.
            relay.publish(notification(1).decode().rstrip('\n'))
            self.assertFalse(test_utils.wait_until(
                lambda: not relay.outbox, 0.2))
        finally:
            _unix_fork._after_fork_in_parent()
        sock.settimeout(10)
        self.assertEqual(notification(1), sock.makefile('rb').readline())
        self.assertFalse(relay.parking.parked())

    def test_forks_of_a_busy_hub_never_hang(self):
        relay = self.hub()
        for seq in range(20):
            relay.publish(notification(seq).decode().rstrip('\n'))
            pid = os.fork()
            if pid == 0:
                os._exit(0 if relay.pid == os.getpid() else 1)
            deadline = time.monotonic() + 10
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    self.fail('a forked child hung')
                time.sleep(0.01)
            self.assertEqual(0, os.waitstatus_to_exitcode(status))

    def test_uwsgi_post_fork_hook_keeps_the_applications(self):
        # Importing uwsgidecorators replaces uwsgi.post_fork_hook: one the
        # application set itself joins the chain, before the relays'.
        def application_hook():
            pass

        uwsgi = mock.Mock(spec=['post_fork_hook'],
                          post_fork_hook=application_hook)
        chain = []

        def chain_hook():
            pass

        decorators = mock.Mock(spec=['postfork'])
        decorators.postfork.side_effect = chain.append
        real_import = __import__

        def fake_import(name, *args, **kwargs):
            if name == 'uwsgidecorators':
                uwsgi.post_fork_hook = chain_hook
                return decorators
            return real_import(name, *args, **kwargs)

        with mock.patch.dict(sys.modules, {'uwsgi': uwsgi}), \
                mock.patch('builtins.__import__', fake_import):
            _unix_fork._install_uwsgi_post_fork_hook()
        self.assertEqual([application_hook, _unix_fork._after_uwsgi_fork],
                         chain)
