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

"""oslo-messaging-ext-check on configuration files and notifications."""

import io
import json
import os
import subprocess
import sys
import textwrap

import fixtures
from oslotest import base

from oslo_messaging_ext.cmd import check
from oslo_messaging_ext import samples
from oslo_messaging_ext.tests.unit import test_multicast_config
from oslo_messaging_ext.tests.unit import test_unix_subscriber

RULES = """
[DEFAULT]
transport_url = fake:/
control_exchange = glance
[oslo_messaging_notifications]
driver = messaging-multicast
[oslo_messaging_multicast]
rules = glance_replication, region2
[multicast_rule_glance_replication]
selector = event_type in image.upload,image.delete
targets = glance.repl.host1,glance.repl.host2
[multicast_rule_region2]
selector = payload.disk_format exact raw
selector = event_type exact image.activate
targets = notifications
transport_url = fake://repl:s3cret@region2:5672/glance
"""

# onmcast's configuration as it was deployed: the driver line included.
ONMCAST = """
[DEFAULT]
transport_url = fake:/
notification_driver = messaging-multicast
multicast_events = image.upload
multicast_topic_prefix = glance.repl.
image.upload = host1
"""


class CheckTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.useFixture(fixtures.TempDir()).path

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, 'w') as f:
            f.write(textwrap.dedent(text))
        return path

    def check(self, text, notifications=None):
        argv = ['--config-file', self.write('glance-api.conf', text)]
        if notifications is not None:
            argv.append(notifications)
        out = io.StringIO()
        status = check.main(argv, out=out)
        return status, out.getvalue()

    def test_what_would_be_replicated_where(self):
        status, out = self.check(RULES, samples.GLANCE_IMAGE_NOTIFICATIONS)
        self.assertEqual(0, status, out)
        self.assertIn(
            'Rule glance_replication: event_type in image.upload,'
            'image.delete\n'
            '  -> exchange glance (set in [DEFAULT] control_exchange), '
            'routing key '
            'glance.repl.host1.<priority>, format 2.0, on the notification '
            'transport\n', out)
        self.assertIn('on fake://region2:5672/glance', out)
        self.assertNotIn('s3cret', out)
        lines = {line.split()[1]: line for line in out.splitlines()
                 if line.startswith('line ')}
        self.assertEqual(6, len(lines))
        self.assertIn('image.create', lines['1'])
        self.assertTrue(lines['1'].endswith(': not replicated'))
        self.assertTrue(lines['4'].endswith(
            ': glance_replication -> glance/glance.repl.host1.info; '
            'glance_replication -> glance/glance.repl.host2.info'),
            lines['4'])
        self.assertTrue(lines['5'].endswith(
            ': region2 -> glance/notifications.info on '
            'fake://region2:5672/glance'), lines['5'])
        self.assertIn('6 notifications, 2 replicated, 3 replicas.', out)
        self.assertTrue(out.endswith('Problems: 0\n'))

    def test_old_driver_line_alone_is_a_total_loss(self):
        status, out = self.check(ONMCAST, samples.GLANCE_IMAGE_NOTIFICATIONS)
        self.assertEqual(1, status)
        self.assertIn(
            'ERROR: [DEFAULT] notification_driver is not read by '
            'oslo.messaging any more: with [oslo_messaging_notifications] '
            'driver = (unset) the service sends no notification at all. Set '
            '[oslo_messaging_notifications] driver = messaging-multicast',
            out)
        # What it would do once the driver line moves, on glance's
        # exchange (the file is glance-api.conf).
        self.assertIn('[DEFAULT] image.upload -> '
                      'glance/glance.repl.host1.image.upload.info', out)

    def test_moved_driver_line(self):
        status, out = self.check(
            ONMCAST.replace('notification_driver = messaging-multicast\n',
                            '') +
            '[oslo_messaging_notifications]\ndriver = messaging-multicast\n')
        self.assertEqual(0, status, out)
        self.assertIn('Rule [DEFAULT] image.upload: event_type, priority, '
                      "message_id or publisher_id equals 'image.upload'\n"
                      "  -> exchange glance (the default: glance's own "
                      'control_exchange default), routing key '
                      'glance.repl.host1.image.upload.<priority>, format 1.0',
                      out)
        self.assertIn('Service: glance (guessed from the file name '
                      'glance-api.conf).', out)

    def test_driver_not_selected(self):
        status, out = self.check(RULES.replace('driver = messaging-multicast',
                                               'driver = messagingv2'))
        self.assertEqual(1, status)
        self.assertIn('WARNING: [oslo_messaging_multicast] is configured, '
                      'but [oslo_messaging_notifications] driver does not '
                      'list messaging-multicast: its rules do not apply',
                      out)
        self.assertNotIn('ERROR', out)

    def test_invalid_rule_and_typos(self):
        status, out = self.check(RULES.replace(
            'selector = payload.disk_format exact raw',
            'selector = payload.name regex ^(?!x)\nselectors = x'))
        self.assertEqual(1, status)
        self.assertIn("ERROR: [multicast_rule_region2] selector = "
                      "payload.name regex ^(?!x): regex '^(?!x)' is "
                      "refused", out)
        self.assertIn('WARNING: [multicast_rule_region2] selectors is not '
                      'an option', out)
        self.assertIn('Replication would be OFF: the standard notifications '
                      'would still be sent.', out)
        self.assertEqual(1, out.count('ERROR'), out)
        self.assertTrue(out.endswith('Problems: 2\n'))

    def test_lines_that_are_not_notifications(self):
        path = self.write('notifications.jsonl', '\n'.join([
            json.dumps({'event_type': 'image.upload', 'priority': 'INFO',
                        'payload': {}, 'context': {'project_id': 'p'}}),
            '{nope', '[1]', json.dumps({'payload': {}}), '']))
        status, out = self.check(RULES, path)
        self.assertEqual(1, status)
        self.assertIn('line 1 image.upload : glance_replication', out)
        for number in (2, 3, 4):
            self.assertIn('ERROR: line %d is not a notification' % number,
                          out)

    def test_wire_format_lines(self):
        # What a raw AMQP consumer records: the 2.0 envelope.
        message = dict(samples.glance_image_notifications()[3],
                       _context_project_id='p')
        path = self.write('wire.jsonl', json.dumps(
            {'oslo.version': '2.0', 'oslo.message': json.dumps(message)}))
        status, out = self.check(RULES, path)
        self.assertEqual(0, status, out)
        self.assertIn('line 1 image.upload', out)
        self.assertIn('glance_replication -> glance/glance.repl.host1.info',
                      out)

    def test_no_configuration_file(self):
        self.assertEqual(2, check.main([], out=io.StringIO()))

    @test_unix_subscriber.skip_inside_oslo_messaging
    def test_console_run_prints_no_warning_wall(self):
        path = self.write('glance-api.conf', RULES)
        result = subprocess.run(
            [sys.executable, '-m', 'oslo_messaging_ext.cmd.check',
             '--config-file', path, samples.GLANCE_IMAGE_NOTIFICATIONS],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(0, result.returncode, result.stdout)
        self.assertEqual('', result.stderr)
        self.assertIn('Problems: 0', result.stdout)


class NotificationsSectionTestCase(base.BaseTestCase):
    """The tool checks every listed driver, not only multicast."""

    def setUp(self):
        super().setUp()
        self.dir = self.useFixture(fixtures.TempDir()).path

    def check(self, text, name='glance-api.conf', *args):
        path = os.path.join(self.dir, name)
        with open(path, 'w') as f:
            f.write(textwrap.dedent(text))
        out = io.StringIO()
        status = check.main(['--config-file', path] + list(args), out=out)
        return status, out.getvalue()

    def unix(self, **options):
        lines = ''.join('%s = %s\n' % item for item in sorted(options.items()))
        return ('[oslo_messaging_notifications]\ndriver = unix\n'
                'sock_path = %s\n' % os.path.join(self.dir, 'n.sock') + lines)

    def test_valid_unix_only_configuration(self):
        status, out = self.check(self.unix())
        self.assertEqual(0, status, out)
        self.assertIn('Notification drivers: unix.', out)
        self.assertIn('unix: socket %s, mode 0660'
                      % os.path.join(self.dir, 'n.sock'), out)
        self.assertNotIn('messaging-multicast', out)
        self.assertTrue(out.endswith('Problems: 0\n'), out)

    def test_unix_options_checked_by_the_driver(self):
        for options, expected in [
                ({'sock_mode': '0666'}, "Invalid value '0666' for option "
                 'sock_mode in group [oslo_messaging_notifications]: the '
                 'socket must not be accessible to others'),
                ({'sock_buffer_size': '10'}, 'Invalid value 10 for option '
                 'sock_buffer_size in group [oslo_messaging_notifications]: '
                 'it must be at least 65536 bytes'),
                ({'sock_max_subscribers': 'many'},
                 '[oslo_messaging_notifications] sock_max_subscribers = '
                 'many: invalid value'),
                ({'sock_group': 'no$group'},
                 '[oslo_messaging_notifications] sock_group = no$group: '
                 'oslo.config reads "$NAME"')]:
            with self.subTest(options):
                status, out = self.check(self.unix(**options))
                self.assertEqual(1, status, out)
                self.assertIn(expected, out)
        status, out = self.check('[oslo_messaging_notifications]\n'
                                 'driver = unix\nsock_path = relative.sock\n')
        self.assertIn("ERROR: unix driver: Invalid value 'relative.sock' for "
                      'option sock_path', out)

    def test_drivers_listed(self):
        status, out = self.check("""
            [DEFAULT]
            transport_url = fake:/
            notification_driver = messaging
            [oslo_messaging_notifications]
            driver = messagingv2
            driver = messaging-multicast
            driver = messaging-multicast
            driver = log,noop
            """)
        self.assertEqual(1, status)
        self.assertIn('messaging-multicast is listed 2 times; oslo.messaging '
                      'loads it once', out)
        self.assertIn('messaging-multicast and messagingv2 both send the '
                      'standard notification, so every consumer receives it '
                      'twice', out)
        self.assertEqual(1, out.count('both send the standard'), out)
        self.assertIn("there is no notification driver 'log,noop': the "
                      'service logs an error and sends nothing through it '
                      '(driver is a multi-valued option', out)
        self.assertIn('WARNING: [DEFAULT] notification_driver is not read by '
                      'oslo.messaging any more and is ignored', out)

    def test_no_driver_and_messagingv2_only(self):
        status, out = self.check('[DEFAULT]\ntransport_url = fake:/\n')
        self.assertEqual(0, status, out)
        self.assertIn('No notification driver: the service sends no '
                      'notification.', out)
        status, out = self.check('[oslo_messaging_notifications]\n'
                                 'driver = messagingv2\n')
        self.assertEqual(0, status, out)

    def exchange_line(self, name, *args, text=RULES):
        text = text.replace('control_exchange = glance\n', '')
        status, out = self.check(text, name, *args)
        self.assertEqual(0, status, out)
        return [line for line in out.splitlines()
                if line.startswith(('Service:', '  -> exchange'))][:2]

    def test_exchange_as_the_service_uses_it(self):
        self.assertEqual(
            ['Service: nova (guessed from the file name nova.conf).',
             "  -> exchange nova (the default: nova's own control_exchange "
             'default), routing key glance.repl.host1.<priority>, format '
             '2.0, on the notification transport'],
            self.exchange_line('nova.conf'))
        self.assertEqual(
            ['Service: cinder (given with --project).',
             "  -> exchange openstack (the default: cinder's own "
             'control_exchange default), routing key '
             'glance.repl.host1.<priority>, format 2.0, on the notification '
             'transport'],
            self.exchange_line('service.conf', '--project', 'cinder'))
        lines = self.exchange_line('service.conf')
        self.assertEqual('Service: service (guessed from the file name '
                         'service.conf).', lines[0])
        self.assertIn("exchange openstack (the default: oslo.messaging's; "
                      'service may set its own: if so, pass --project or '
                      'set [DEFAULT] control_exchange)', lines[1])
        self.assertIn('exchange glance (set in [DEFAULT] control_exchange)',
                      self.check(RULES, 'nova.conf')[1])


class FuzzedConfigurationsTestCase(base.BaseTestCase):

    def test_the_tool_reads_every_fuzzed_configuration(self):
        # The corpus the driver loads in test_multicast_config: whatever a
        # file holds, the tool says so with status 0 or 1, no traceback.
        corpus = test_multicast_config.FuzzedConfigurationsTestCase.corpus
        directory = self.useFixture(fixtures.TempDir()).path
        crashed, statuses = [], set()
        for number, text in enumerate(corpus()):
            path = os.path.join(directory, 'fuzz%d.conf' % number)
            with open(path, 'w', encoding='utf-8') as f:
                f.write(text)
            out, err = io.StringIO(), io.StringIO()
            with fixtures.MonkeyPatch('sys.stderr', err):
                status = check.main(['--config-file', path], out=out)
            statuses.add(status)
            if status not in (0, 1) or 'Traceback' in (out.getvalue() +
                                                       err.getvalue()):
                crashed.append((status, text))
        self.assertEqual([], crashed)
        # The corpus holds both good and bad configurations.
        self.assertEqual({0, 1}, statuses)
