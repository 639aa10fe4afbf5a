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

"""The unix driver with real processes: services, subscribers, socat.

No broker is involved. Services and subscribers are separate processes
(oslo_messaging_ext.tests.functional.unix_helper, oslo-notify-tail, socat);
each test has its own socket in its own temporary directory.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import fixtures
from oslotest import base

from oslo_messaging_ext import samples
from oslo_messaging_ext.tests.functional import base as functional_base
from oslo_messaging_ext.tests import utils as test_utils
from oslo_messaging_ext import unix_subscriber

HELPER = 'oslo_messaging_ext.tests.functional.unix_helper'
TIMEOUT = 60.0
# A subscriber that receives nothing for this long has stalled.
IDLE_TIMEOUT = 30.0
# Only against a hang: tests bounded by progress, not by their duration,
# may run past OS_TEST_TIMEOUT on a slow machine.
LONG_RUN_SAFETY = 1800


class UnixProcessesTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.tmpdir = self.useFixture(fixtures.TempDir()).path
        self.sock_path = os.path.join(self.tmpdir, 'notifications.sock')

    def spawn(self, *argv, **kwargs):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, **kwargs)
        self.addCleanup(self._reap, proc)
        return proc

    @staticmethod
    def _reap(proc):
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

    def helper(self, *args):
        return self.spawn(sys.executable, '-m', HELPER, *args)

    def publisher(self, *args):
        return self.helper('publish', self.sock_path, *args)

    def subscriber(self, count, timeout=TIMEOUT, *options):
        return self.helper('subscribe', self.sock_path, '--count',
                           str(count), '--timeout', str(timeout), *options)

    def finish(self, proc, timeout=TIMEOUT):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            self.fail('%s did not finish in %ss; stderr: %s'
                      % (proc.args, timeout, err.decode()[-2000:]))
        self.assertEqual(0, proc.returncode,
                         'stderr of {}: {}'.format(
                             proc.args, err.decode()[-2000:]))
        return out.decode()

    def summary(self, proc, timeout=TIMEOUT):
        # Longer than the subscriber's own deadline, so that a subscriber
        # that misses notifications reports what it got.
        out = self.finish(proc, timeout + 15)
        return json.loads(out.splitlines()[-1])

    def wait_for_socket(self):
        self.assertTrue(test_utils.wait_until(
            lambda: os.path.exists(self.sock_path),
            functional_base.DELIVERY_TIMEOUT),
            '%s never appeared' % self.sock_path)

    def assertComplete(self, summary, workers, count):
        self.assertEqual({w: count for w in workers}, summary['workers'],
                         summary)
        self.assertEqual(0, summary['dropped'])
        self.assertEqual(0, summary['gaps'])

    def test_forked_workers_reach_every_subscriber(self):
        # The driver is created before os.fork(), as in a pre-forking
        # server; the parent and its three workers all publish.
        subscribers = [self.subscriber(4 * 500) for _ in range(2)]
        service = self.publisher('--fork', '3', '--count', '500',
                                 '--wait-subscribers', '2')
        for sub in subscribers:
            self.assertComplete(self.summary(sub),
                                ['parent', 'fork0', 'fork1', 'fork2'], 500)
        self.finish(service)
        self.assertFalse(os.path.lexists(self.sock_path))

    def test_multiprocessing_workers_reach_the_subscriber(self):
        sub = self.subscriber(3 * 500)
        service = self.publisher('--multiprocessing', '2', '--count', '500',
                                 '--wait-subscribers', '1')
        self.assertComplete(self.summary(sub), ['parent', 'mp0', 'mp1'], 500)
        self.finish(service)

    def test_eventlet_monkey_patched_publisher(self):
        sub = self.subscriber(4 * 1000)
        service = self.publisher('--eventlet', '--green-threads', '4',
                                 '--count', '1000', '--wait-subscribers',
                                 '1')
        self.assertComplete(self.summary(sub),
                            ['green%d' % n for n in range(4)], 1000)
        self.finish(service)

    def test_stuck_subscriber_does_not_slow_the_others(self):
        count = 20000
        healthy = self.subscriber(count)
        # A burst, then a slow trickle. The burst (26 MB) is paced as the
        # hub keeps up: at full speed, a process with orjson outruns the
        # hub on this machine, and drops at the ingest (counted and
        # reported: 494 to 1,243 in 5 runs of 8) are not what this test
        # is about.
        service = self.publisher('--count', str(count), '--interval',
                                 '0.0001', '--then-interval', '0.01',
                                 '--wait-subscribers', '2')
        self.wait_for_socket()
        stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(stuck.close)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(self.sock_path)
        # The service keeps its pace: the subscriber that reads gets the
        # whole burst while this one reads nothing.
        self.assertComplete(self.summary(healthy), ['main'], count)
        # When it catches up, what it missed is counted and reported
        # in-band, exactly where the gap is.
        stuck.settimeout(TIMEOUT)
        reader = stuck.makefile('rb')
        self.addCleanup(reader.close)
        missed, gap, last_seq = 0, 0, -1
        while not missed or last_seq < count:
            notification = json.loads(reader.readline())
            if (notification['event_type'] ==
                    unix_subscriber.DROPPED_EVENT_TYPE):
                gap += notification['payload']['dropped']
                missed += gap
                continue
            seq = notification['payload']['seq']
            self.assertEqual(last_seq + 1 + gap, seq)
            gap, last_seq = 0, seq
        self.assertIsNone(service.poll(), 'the service stopped')

    def test_eight_subscribers_hundred_thousand_notifications_as_root(self):
        # The burst waits in the publisher's send buffer while the hub,
        # sharing 2 cores with 8 subscribers, catches up: 64 MiB, which
        # only root gets past net.core.wmem_max (SO_SNDBUFFORCE). With
        # the 4 MiB other users got here, one of four runs (tox -e
        # unprivileged) dropped 3,947 at the ingest, counted and reported.
        test_utils.require_root(self, 'a send buffer past '
                                'net.core.wmem_max')
        count = 100000
        # The promise is about counts: every subscriber gets every one. A
        # subscriber gives up only after IDLE_TIMEOUT without a line, so
        # that a slow run (coverage tracing, a loaded machine) still
        # passes and a stalled one fails in bounded time.
        self.useFixture(fixtures.Timeout(LONG_RUN_SAFETY, gentle=True))
        subscribers = [self.subscriber(count, 0, '--idle-timeout',
                                       str(IDLE_TIMEOUT))
                       for _ in range(8)]
        # A buffer that absorbs scheduling hiccups of a shared 2-core
        # machine: this test is about subscribers that keep up.
        service = self.publisher('--count', str(count),
                                 '--wait-subscribers', '8',
                                 '--buffer-size', str(64 * 1024 * 1024),
                                 '--timeout', '60')
        for sub in subscribers:
            self.assertComplete(self.summary(sub, timeout=LONG_RUN_SAFETY),
                                ['main'], count)
        self.finish(service, LONG_RUN_SAFETY)

    def test_subscriber_killed_mid_stream(self):
        victim = self.helper('subscribe', self.sock_path, '--count',
                             '1000000')
        survivor = self.subscriber(3000)
        service = self.publisher('--count', '3000', '--interval', '0.001',
                                 '--wait-subscribers', '3')
        self.wait_for_socket()
        # A third subscriber tells when the stream is flowing.
        with unix_subscriber.Subscription(self.sock_path) as monitor:
            for received, _ in enumerate(monitor, 1):
                if received == 100:
                    break
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        self.assertComplete(self.summary(survivor), ['main'], 3000)
        self.finish(service)

    def test_service_restart_with_tail_follow(self):
        tail = self.spawn(sys.executable, '-m',
                          'oslo_messaging_ext.cmd.tail', '--follow',
                          '--count', '10', self.sock_path)
        for tag in ('first', 'second'):
            service = self.publisher('--count', '5', '--tag', tag,
                                     '--wait-subscribers', '1')
            self.finish(service)
            # A clean shutdown removes the socket.
            self.assertFalse(os.path.lexists(self.sock_path))
        lines = [json.loads(line) for line in
                 self.finish(tail).splitlines()]
        self.assertEqual(['first'] * 5 + ['second'] * 5,
                         [n['payload']['tag'] for n in lines])

    def test_stale_socket_of_a_killed_service(self):
        service = self.publisher('--forever', '--interval', '0.01')
        self.wait_for_socket()
        service.kill()
        service.wait()
        self.assertTrue(os.path.exists(self.sock_path))
        sub = self.subscriber(50)
        restarted = self.publisher('--count', '50', '--wait-subscribers',
                                   '1')
        self.assertComplete(self.summary(sub), ['main'], 50)
        self.finish(restarted)

    def test_hub_process_killed_a_publisher_takes_over(self):
        hub = self.publisher('--forever', '--interval', '0.01', '--tag',
                             'first')
        self.wait_for_socket()
        survivor = self.publisher('--forever', '--interval', '0.01', '--tag',
                                  'second')
        # Counted once the survivor has joined (its lines arrive), however
        # long its start takes.
        early = self.subscriber(100, TIMEOUT, '--until-tags', 'first,second')
        summary = self.summary(early)
        self.assertEqual(['first', 'second'], sorted(summary['tags']))
        hub.kill()
        hub.wait()
        # The publisher binds the path again; a new subscriber hears it.
        late = self.subscriber(50)
        summary = self.summary(late)
        self.assertEqual(['second'], summary['tags'])
        self.assertEqual(0, summary['gaps'])
        self.assertIsNone(survivor.poll())

    def test_socat_client(self):
        socat = test_utils.require_tool(self, 'socat', 'socat')
        service = self.helper('publish', self.sock_path, '--count', '6',
                              '--wait-subscribers', '1')
        self.wait_for_socket()
        client = self.spawn(socat, '-u', 'UNIX-CONNECT:%s' % self.sock_path,
                            '-')
        self.finish(service)
        lines = self.finish(client).splitlines()
        self.assertEqual(6, len(lines))
        expected = set(samples.glance_image_notifications()[0]) | {
            'sequence'}
        for line in lines:
            notification = json.loads(line)
            self.assertEqual(expected, set(notification))
            self.assertEqual('image.upload', notification['event_type'])
