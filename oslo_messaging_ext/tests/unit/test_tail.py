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

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import fixtures
from oslotest import base

from oslo_messaging_ext.cmd import _tail_format
from oslo_messaging_ext.cmd import _tail_stats
from oslo_messaging_ext.cmd import tail
from oslo_messaging_ext.tests.unit import test_unix_subscriber as subscriber
from oslo_messaging_ext.tests import utils as test_utils
from oslo_messaging_ext import unix_subscriber

NOTIFICATIONS = subscriber.NOTIFICATIONS
FakeService = subscriber.FakeService
encoded = subscriber.encoded

GLANCE = {
    'message_id': 'g1', 'publisher_id': 'image.localhost',
    'event_type': 'image.upload', 'priority': 'INFO',
    'timestamp': '2026-11-22 02:40:11.144634',
    'payload': {'checksum': None, 'container_format': 'bare',
                'created_at': '2026-11-22T02:40:11Z', 'status': 'active',
                'name': 'cirros 0.6', 'id': 'ff71c972', 'tags': ['a']}}
ANSI = re.compile('\x1b\\[[0-9;]*m')


def _env():
    # The CLI as an operator runs it: no monkey-patching of the tests.
    return dict(os.environ, OSLO_MESSAGING_EXT_EVENTLET='0')


class TailTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.tmpdir = self.useFixture(fixtures.TempDir()).path
        self.path = os.path.join(self.tmpdir, 's.sock')
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.useFixture(fixtures.MonkeyPatch('sys.stdout', self.stdout))
        self.useFixture(fixtures.MonkeyPatch('sys.stderr', self.stderr))

    def serve(self, notifications=NOTIFICATIONS, path=None):
        service = FakeService(path or self.path, encoded(notifications))
        self.addCleanup(service.close)
        return service

    def run_tail(self, *args, notifications=NOTIFICATIONS):
        self.serve(notifications)
        return tail.main(list(args) + [self.path])

    def printed_ids(self):
        return [json.loads(x)['message_id']
                for x in self.stdout.getvalue().splitlines()]

    def test_ndjson_when_piped_with_filters(self):
        self.assertEqual(0, self.run_tail('-e', 'image.*', '-p', 'info'))
        # Drop notices always pass the filters.
        self.assertEqual(['m1', 'm3'], self.printed_ids())

    def test_publisher_filter_and_count(self):
        self.assertEqual(0, self.run_tail('-P', 'image.*', '-n', '2'))
        self.assertEqual(['m1', 'm3', 'm4'], self.printed_ids())

    def test_usual_priority_spellings(self):
        for spellings, expected in [(['warning'], ['m2', 'm3']),
                                    (['WARN'], ['m2', 'm3']),
                                    (['Warning'], ['m2', 'm3']),
                                    (['err', 'crit'], ['m3', 'm4'])]:
            self.stdout.seek(0)
            self.stdout.truncate()
            args = [a for s in spellings for a in ('-p', s)]
            self.assertEqual(0, self.run_tail(*args))
            self.assertEqual(expected, self.printed_ids(), spellings)
            os.unlink(self.path)

    def test_unknown_priority_is_refused(self):
        exc = self.assertRaises(SystemExit, tail.main,
                                ['-p', 'bogus', self.path])
        self.assertEqual(2, exc.code)
        self.assertIn("unknown priority 'bogus'", self.stderr.getvalue())
        self.assertIn('warn (warning)', self.stderr.getvalue())

    def test_match_uses_the_multicast_selectors_all_must_match(self):
        self.assertEqual(0, self.run_tail(
            '--match', 'payload.id exact i1',
            '--match', 'event_type !exact image.delete'))
        self.assertEqual(['m1', 'm3'], self.printed_ids())

    def test_match_on_context_and_priority(self):
        self.assertEqual(0, self.run_tail('-m', 'context.user exact u2',
                                          '-m', 'priority in warn,error'))
        self.assertEqual(['m2', 'm3'], self.printed_ids())

    def test_match_regex_runs_on_re2_as_the_driver(self):
        self.assertEqual(0, self.run_tail(
            '--match', 'payload.id regex ^i[2-9]$',
            '--match', 'context.user regex ^(u1|u2|u3)$'))
        # m3 is a drop notice: those always pass.
        self.assertEqual(['m2', 'm3'], self.printed_ids())

    def test_lookaround_refused_with_the_driver_reason(self):
        exc = self.assertRaises(SystemExit, tail.main,
                                ['--match', 'payload.id regex ^(?!i1)',
                                 self.path])
        self.assertEqual(2, exc.code)
        self.assertIn('lookaround', self.stderr.getvalue())
        self.assertIn('!prefix', self.stderr.getvalue())

    def test_regex_without_google_re2_names_the_extra(self):
        # A None entry makes "import re2" raise ImportError.
        with mock.patch.dict(sys.modules, {'re2': None}):
            exc = self.assertRaises(SystemExit, tail.main,
                                    ['--match', 'payload.id regex ^i',
                                     self.path])
        self.assertEqual(2, exc.code)
        self.assertIn('oslo.messaging-ext[regex]', self.stderr.getvalue())

    def test_invalid_selector_is_refused(self):
        exc = self.assertRaises(SystemExit, tail.main,
                                ['--match', 'payload.x nope y', self.path])
        self.assertEqual(2, exc.code)
        self.assertIn("unknown operator 'nope'", self.stderr.getvalue())

    def test_readable_lines(self):
        self.assertEqual(0, self.run_tail('--format', 'line', '--utc',
                                          '-n', '1', notifications=[GLANCE]))
        self.assertEqual(
            '2026-11-22 02:40:11.144 UTC INFO  image.upload image.localhost '
            'id=ff71c972 name="cirros 0.6" status=active checksum=null '
            'container_format=bare created_at=2026-11-22T02:40:11Z '
            'tags=["a"]\n', self.stdout.getvalue())

    def test_no_colour_when_not_a_terminal(self):
        self.assertEqual(0, self.run_tail('--format', 'line', '-n', '3'))
        self.assertNotIn('\x1b', self.stdout.getvalue())

    def test_stream_ends_before_count(self):
        self.assertEqual(tail.EXIT_INCOMPLETE, self.run_tail('-n', '10'))
        self.assertIn('after 3 of 10', self.stderr.getvalue())

    def test_drops_are_summed_up_at_the_end(self):
        self.assertEqual(0, self.run_tail())
        self.assertIn('missed 7 notifications (7 reported dropped',
                      self.stderr.getvalue())

    def test_missing_socket(self):
        self.assertEqual(tail.EXIT_MISSING, tail.main([self.path]))
        self.assertIn('no such socket', self.stderr.getvalue())

    def test_not_listening(self):
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()
        self.assertEqual(tail.EXIT_NOT_LISTENING, tail.main([self.path]))

    def test_not_a_socket(self):
        open(self.path, 'w').close()
        self.assertEqual(tail.EXIT_NOT_A_SOCKET, tail.main([self.path]))

    def test_permission_denied(self):
        with mock.patch('socket.socket.connect',
                        side_effect=PermissionError(13, 'Permission '
                                                        'denied')):
            self.assertEqual(tail.EXIT_PERMISSION, tail.main([self.path]))
        self.assertIn('sock_mode', self.stderr.getvalue())

    def start_follow(self, *args):
        result = {}
        thread = threading.Thread(
            target=lambda: result.setdefault(
                'status', tail.main(['--follow'] + list(args) +
                                    [self.path])), daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        return thread, result

    def test_follow_says_once_what_it_waits_for(self):
        thread, result = self.start_follow('-n', '1')
        self.assertTrue(test_utils.wait_until(
            lambda: 'waiting for' in self.stderr.getvalue(), 10))
        self.serve()
        test_utils.join(thread, 10)
        self.assertEqual(0, result['status'])
        err = self.stderr.getvalue().splitlines()
        self.assertEqual(1, sum('waiting for %s (no such socket' % self.path
                                in line for line in err), err)
        self.assertIn('connected to %s' % self.path, err[-1])

    def test_follow_marks_reconnections_and_says_what_was_missed(self):
        first = self.serve(subscriber.sequenced('a', [1, 2]))
        thread, result = self.start_follow('-n', '4')
        test_utils.join(first.thread, 10)
        self.assertTrue(test_utils.wait_until(
            lambda: 'closed the stream' in self.stderr.getvalue(), 10))
        os.unlink(self.path)
        self.serve(subscriber.sequenced('a', [5]) +
                   subscriber.sequenced('b', [3]))
        test_utils.join(thread, 10)
        self.assertEqual(0, result['status'])
        err = self.stderr.getvalue()
        self.assertRegex(err, r'reconnected to %s after [0-9.]+ s '
                              r'\(connection 2\)' % re.escape(self.path))
        self.assertIn('missed 2 notifications of image.host1 (process a) '
                      'while disconnected (#3 to #4)', err)
        self.assertIn('image.host1 (process b): first heard of after '
                      'reconnecting, at #3; its 2 notifications before '
                      'were not received', err)
        self.assertIn('missed 2 notifications (0 reported dropped by the '
                      'service, 2 in sequence gaps', err)


class LineFormatTestCase(base.BaseTestCase):

    def test_identifying_keys_first_then_the_service_order(self):
        self.assertEqual(
            'id=ff71c972 name="cirros 0.6" status=active checksum=null '
            'container_format=bare created_at=2026-11-22T02:40:11Z '
            'tags=["a"]', _tail_format.format_payload(GLANCE['payload']))

    def test_versioned_payload_shows_the_object_fields(self):
        payload = {'nova_object.name': 'InstanceActionPayload',
                   'nova_object.data': {'host': 'c1', 'uuid': 'u1',
                                        'state': 'active'}}
        self.assertEqual('uuid=u1 state=active host=c1',
                         _tail_format.format_payload(payload))

    def test_time_zone_is_marked(self):
        self.assertEqual('2026-11-22 02:40:11.144 UTC',
                         _tail_format.format_time(GLANCE['timestamp'],
                                                  utc=True))
        # Cleanups run last first: tzset() once TZ is back as it was.
        self.addCleanup(time.tzset)
        self.useFixture(fixtures.EnvironmentVariable('TZ', 'Asia/Kolkata'))
        time.tzset()
        self.assertEqual('2026-11-22 08:10:11.144 IST',
                         _tail_format.format_time(GLANCE['timestamp']))
        self.assertEqual('soon', _tail_format.format_time('soon'))

    def test_cut_to_width_keeps_what_identifies(self):
        line = _tail_format.LineFormatter(width=110, utc=True).format(GLANCE)
        self.assertEqual(110, len(line))
        self.assertTrue(line.endswith('...'))
        self.assertIn('id=ff71c972 name="cirros 0.6" status=active', line)

    def test_colour_of_the_priority(self):
        formatter = _tail_format.LineFormatter(colour=True, utc=True)
        error = formatter.format(dict(GLANCE, priority='ERROR'))
        self.assertIn(' \x1b[31mERROR\x1b[0m image.upload', error)
        self.assertNotIn('\x1b', formatter.format(GLANCE))
        cut = _tail_format.LineFormatter(width=40, colour=True, utc=True)
        self.assertEqual(40, len(ANSI.sub('', cut.format(
            dict(GLANCE, priority='WARN')))))

    def test_canonical_priority(self):
        for spelling, expected in [('WARNING', 'warn'), ('warn', 'warn'),
                                   ('Err', 'error'), ('CRIT', 'critical'),
                                   ('sample', 'sample'), ('nope', None),
                                   (None, None)]:
            self.assertEqual(expected,
                             _tail_format.canonical_priority(spelling))


class ColourChoiceTestCase(base.BaseTestCase):

    def wanted(self, colour, tty, no_color=None):
        self.useFixture(fixtures.EnvironmentVariable('NO_COLOR', no_color))
        self.useFixture(fixtures.EnvironmentVariable('TERM', 'xterm'))
        args = tail._parser().parse_args(['--color', colour, 'x'])
        out = mock.Mock(isatty=mock.Mock(return_value=tty))
        return tail._colour_wanted(args, out)

    def test_auto_on_a_terminal_only(self):
        self.assertTrue(self.wanted('auto', tty=True))
        self.assertFalse(self.wanted('auto', tty=False))

    def test_no_color_is_honoured(self):
        self.assertFalse(self.wanted('auto', tty=True, no_color='1'))
        # An explicit choice wins, as no-color.org asks.
        self.assertTrue(self.wanted('always', tty=False, no_color='1'))
        self.assertFalse(self.wanted('never', tty=True))


class StatsTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.subscription = unix_subscriber.Subscription('/x.sock')
        self.stats = _tail_stats.Stats(self.subscription)

    def test_counts_per_event_type_and_priority_and_losses(self):
        for notification in NOTIFICATIONS + [NOTIFICATIONS[0]]:
            self.stats.add(notification)
        self.subscription.gap_counter.observe(NOTIFICATIONS[2])  # 7
        self.stats.set_status('connected')
        lines = self.stats.table(1.0)
        self.assertIn('connected', lines[0])
        rows = [line.split() for line in lines[1:]]
        self.assertIn(['image.upload', 'INFO', '2', '2'], rows)
        self.assertIn(['compute.instance.create.end', 'WARN', '1', '1'],
                      rows)
        self.assertIn(['all', 'notifications', '5', '5'], rows)
        self.assertIn(['dropped', '(reported)', '7', '7'], rows)
        self.assertIn(['in', 'sequence', 'gaps', '0', '0'], rows)
        self.assertIn(['missed', '(total)', '7', '7'], rows)
        # The next interval starts empty; totals remain.
        lines = self.stats.table(2.0)
        self.assertIn(['image.upload', 'INFO', '2', '0'],
                      [line.split() for line in lines])
        self.assertIn(['dropped', '(reported)', '7', '0'],
                      [line.split() for line in lines])

    def test_rows_beyond_the_terminal_are_summed(self):
        for number in range(30):
            self.stats.add({'event_type': 'e%02d' % number,
                            'priority': 'INFO'})
        lines = self.stats.table(1.0, max_rows=5, width=30)
        self.assertEqual(1 + 1 + 5 + 4, len(lines))
        self.assertIn('(26 more)', lines[6])
        self.assertTrue(all(len(line) <= 30 for line in lines))

    def test_a_terminal_without_a_size_is_not_limited(self):
        # Some ptys report 0x0: the table is then drawn whole.
        self.assertEqual(0, _tail_stats.max_rows(0))
        self.assertEqual(40, _tail_stats.max_rows(50))
        for number in range(30):
            self.stats.add({'event_type': 'e%02d' % number})
        self.assertEqual(2 + 30 + 4, len(self.stats.table(
            1.0, max_rows=_tail_stats.max_rows(0) or None)))

    def test_in_place_redraw(self):
        out = io.StringIO()
        drawer = _tail_stats.InPlaceDrawer(out)
        drawer.draw(['a', 'b'])
        drawer.draw(['c'])
        self.assertEqual('a\nb\n\x1b[2F\x1b[Jc\n', out.getvalue())

    def test_stats_mode_counts_what_passes_the_filters(self):
        tmpdir = self.useFixture(fixtures.TempDir()).path
        path = os.path.join(tmpdir, 's.sock')
        service = FakeService(path, encoded(NOTIFICATIONS))
        self.addCleanup(service.close)
        out = io.StringIO()
        self.useFixture(fixtures.MonkeyPatch('sys.stdout', out))
        self.assertEqual(0, tail.main(['--stats', '--interval', '0.05',
                                       '-p', 'info', path]))
        last = out.getvalue().strip().split('\n\n')[-1].splitlines()
        totals = [line.split()[:-1] for line in last]
        self.assertIn(['image.upload', 'INFO', '1'], totals)
        self.assertIn(['all', 'notifications', '1'], totals)
        self.assertIn(['dropped', '(reported)', '7'], totals)
        self.assertIn(['missed', '(total)', '7'], totals)
        self.assertEqual(3, len(last) - 4, last)


class CommandLineTestCase(base.BaseTestCase):
    """oslo-notify-tail as a process, as an operator runs it."""

    def setUp(self):
        super().setUp()
        self.tmpdir = self.useFixture(fixtures.TempDir()).path
        self.path = os.path.join(self.tmpdir, 's.sock')

    def run_cli(self, *args, shell_suffix=''):
        command = [sys.executable, '-m', 'oslo_messaging_ext.cmd.tail']
        if shell_suffix:
            line = ' '.join(command + list(args)) + ' ' + shell_suffix
            return subprocess.run(['sh', '-c', line], capture_output=True,
                                  text=True, timeout=60, env=_env())
        return subprocess.run(command + list(args), capture_output=True,
                              text=True, timeout=60, env=_env())

    @subscriber.skip_inside_oslo_messaging
    def test_help_and_a_normal_run_say_nothing_on_stderr(self):
        result = self.run_cli('--help')
        self.assertEqual((0, ''), (result.returncode, result.stderr))
        self.assertIn('--match', result.stdout)
        service = FakeService(self.path, encoded(NOTIFICATIONS))
        self.addCleanup(service.close)
        result = self.run_cli('-n', '2', self.path)
        self.assertEqual((0, ''), (result.returncode, result.stderr))
        self.assertEqual(['m1', 'm2'],
                         [json.loads(line)['message_id']
                          for line in result.stdout.splitlines()])

    @subscriber.skip_inside_oslo_messaging
    def test_oslo_messaging_is_not_imported(self):
        code = ('import sys; from oslo_messaging_ext.cmd import tail;'
                'tail.main(["--help"])')
        result = subprocess.run(
            [sys.executable, '-X', 'importtime', '-c', code],
            capture_output=True, text=True, timeout=60, env=_env())
        imported = [line.rsplit('|', 1)[-1].strip()
                    for line in result.stderr.splitlines()
                    if line.startswith('import time:')]
        self.assertIn('oslo_messaging_ext.notify._multicast_rules',
                      imported)
        self.assertEqual([], [m for m in imported
                              if m.split('.')[0] in ('oslo_messaging',
                                                     'eventlet')])

    @subscriber.skip_inside_oslo_messaging
    def test_closed_stdout_is_no_traceback(self):
        service = FakeService(self.path, encoded(NOTIFICATIONS))
        self.addCleanup(service.close)
        result = self.run_cli(self.path, shell_suffix='>&-')
        self.assertEqual(tail.EXIT_INCOMPLETE, result.returncode)
        self.assertEqual('oslo-notify-tail: standard output is closed\n',
                         result.stderr)

    @subscriber.skip_inside_oslo_messaging
    def test_closed_pipe_is_no_traceback(self):
        many = NOTIFICATIONS[:1] * 20000
        service = FakeService(self.path, encoded(many))
        self.addCleanup(service.close)
        result = self.run_cli(self.path, shell_suffix='| head -1')
        self.assertEqual('', result.stderr)
        self.assertEqual('m1', json.loads(result.stdout)['message_id'])
