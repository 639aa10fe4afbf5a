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

"""The devstack plugin, run phase by phase as devstack runs it."""

import os
import re
import socket
import stat

import fixtures
from oslotest import base

from oslo_messaging_ext.tests import devstack

NOTIFY = 'oslo_messaging_notifications'
DEFINE_PLUGIN = 'define_plugin %s' % devstack.PLUGIN_NAME
RULE = 'multicast_rule_glance_replication'

# What devstack's configure_glance leaves in glance-api.conf before the
# post-config phase, cut down to the parts the plugin must keep.
DEVSTACK_GLANCE_API_CONF = """\
[DEFAULT]
debug = True
transport_url = rabbit://stackrabbit:secret@10.0.0.5:5672/

[database]
connection = mysql+pymysql://root:secret@127.0.0.1/glance?charset=utf8

[oslo_messaging_notifications]
driver = messagingv2

[glance_store]
default_store = file
"""


class PluginTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.useFixture(fixtures.TempDir()).path
        self.conf = os.path.join(self.dir, 'glance-api.conf')
        self.run_dir = os.path.join(self.dir, 'run', 'oslo-messaging-ext')
        self.tmpfiles = os.path.join(self.dir, 'oslo-messaging-ext.conf')
        self.env = {'GLANCE_API_CONF': self.conf,
                    'ENABLED_SERVICES': 'key,rabbit,g-api,n-api',
                    'OSLO_MESSAGING_EXT_RUN_DIR': self.run_dir,
                    'OSLO_MESSAGING_EXT_TMPFILES_CONF': self.tmpfiles}

    def write_conf(self, text=DEVSTACK_GLANCE_API_CONF):
        with open(self.conf, 'w') as f:
            f.write(text)

    def read_conf_text(self):
        with open(self.conf) as f:
            return f.read()

    def run_phase(self, *args, **env):
        full_env = dict(self.env, **env)
        result = devstack.run_plugin(args, full_env, self.dir)
        self.assertEqual(0, result.returncode,
                         'plugin.sh {} failed:\n{}'.format(
                             ' '.join(args), result.stderr[-3000:]))
        return result

    def post_config(self, **env):
        self.run_phase('stack', 'post-config', **env)
        return devstack.read_ini(self.conf)


class TestPluginFiles(base.BaseTestCase):

    def test_settings_define_the_plugin_and_only_defaulted_variables(self):
        with open(devstack.SETTINGS) as f:
            lines = [line.strip() for line in f
                     if line.strip() and not line.startswith('#')]
        self.assertIn(DEFINE_PLUGIN, lines)
        assignment = re.compile(
            r'^(OSLO_MESSAGING_EXT_\w+)=\$\{(OSLO_MESSAGING_EXT_\w+):-.*\}$')
        for line in lines:
            if line.startswith('define_plugin'):
                continue
            match = assignment.match(line)
            self.assertIsNotNone(
                match, 'not a ${OSLO_MESSAGING_EXT_VAR:-default} tunable: %s'
                % line)
            self.assertEqual(match.group(1), match.group(2), line)

    def test_plugin_never_exits(self):
        with open(devstack.PLUGIN) as f:
            code = [line.split('#', 1)[0] for line in f]
        self.assertEqual([], [line for line in code
                              if re.search(r'\bexit\b', line)])


class TestSourceTime(PluginTestCase):

    def test_settings_do_nothing_but_define_the_plugin(self):
        self.write_conf()
        before = self.read_conf_text()
        # No phase argument: devstack's "source" of settings alone.
        result = devstack.run_plugin(['source'], self.env, self.dir)
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertEqual([DEFINE_PLUGIN], result.calls)
        self.assertEqual(before, self.read_conf_text())
        self.assertFalse(os.path.exists(self.run_dir))


class TestInstall(PluginTestCase):

    def test_install_uses_setup_develop_on_the_plugin_dir(self):
        self.write_conf()
        result = self.run_phase('stack', 'install')
        checkout = os.path.join(devstack.Layout(self.dir).dest,
                                devstack.PLUGIN_NAME)
        self.assertIn('setup_develop %s orjson,regex' % checkout, result.calls)
        self.assertEqual(DEVSTACK_GLANCE_API_CONF, self.read_conf_text())

    def test_install_without_orjson_or_regex(self):
        self.write_conf()
        checkout = os.path.join(devstack.Layout(self.dir).dest,
                                devstack.PLUGIN_NAME)
        for settings, extras in [
                ({'OSLO_MESSAGING_EXT_ORJSON': 'False'}, ' regex'),
                ({'OSLO_MESSAGING_EXT_REGEX': 'False'}, ' orjson'),
                ({'OSLO_MESSAGING_EXT_ORJSON': 'False',
                  'OSLO_MESSAGING_EXT_REGEX': 'False'}, '')]:
            result = self.run_phase('stack', 'install', **settings)
            self.assertIn('setup_develop %s%s' % (checkout, extras),
                          result.calls)
            self.assertNotIn('orjson,regex', ' '.join(result.calls))

    def test_other_stack_phases_do_nothing(self):
        self.write_conf()
        for phase in ('pre-install', 'extra', 'test-config'):
            result = self.run_phase('stack', phase)
            self.assertEqual([DEFINE_PLUGIN], result.calls, phase)
        self.assertEqual(DEVSTACK_GLANCE_API_CONF, self.read_conf_text())
        self.assertFalse(os.path.exists(self.run_dir))


class TestPostConfigDefaults(PluginTestCase):

    def setUp(self):
        super().setUp()
        self.write_conf()
        self.ini = self.post_config()

    def test_multicast_replaces_messagingv2_and_unix_is_added(self):
        self.assertEqual(['messaging-multicast', 'unix'],
                         self.ini[NOTIFY]['driver'])

    def test_socket_in_runtime_dir_of_the_service_user(self):
        self.assertEqual([os.path.join(self.run_dir, 'glance-api.sock')],
                         self.ini[NOTIFY]['sock_path'])
        self.assertEqual([devstack.current_group()],
                         self.ini[NOTIFY]['sock_group'])
        self.assertEqual(['0660'], self.ini[NOTIFY]['sock_mode'])
        info = os.stat(self.run_dir)
        self.assertTrue(stat.S_ISDIR(info.st_mode))
        self.assertEqual(0o750, stat.S_IMODE(info.st_mode))
        self.assertEqual(os.getuid(), info.st_uid)
        self.assertEqual(os.getgid(), info.st_gid)

    def test_runtime_dir_is_recreated_at_boot(self):
        with open(self.tmpfiles) as f:
            self.assertEqual('d %s 0750 %s %s -\n'
                             % (self.run_dir, devstack.current_user(),
                                devstack.current_group()), f.read())

    def test_replication_rule_of_the_contract_example(self):
        self.assertEqual(['glance_replication'],
                         self.ini['oslo_messaging_multicast']['rules'])
        self.assertEqual({'selector': ['event_type in image.upload,'
                                       'image.delete'],
                          'targets': ['glance.repl.host1,glance.repl.host2'],
                          'publisher_id': ['GLANCE:MASTER']},
                         self.ini[RULE])

    def test_the_rest_of_the_file_is_kept(self):
        self.assertEqual(['rabbit://stackrabbit:secret@10.0.0.5:5672/'],
                         self.ini['DEFAULT']['transport_url'])
        self.assertEqual(['True'], self.ini['DEFAULT']['debug'])
        self.assertEqual(['file'], self.ini['glance_store']['default_store'])
        self.assertIn('connection', self.ini['database'])

    def test_second_run_leaves_the_same_file(self):
        first = self.read_conf_text()
        self.post_config()
        self.assertEqual(first, self.read_conf_text())


class TestPostConfigCustom(PluginTestCase):

    CUSTOM = {
        'OSLO_MESSAGING_EXT_SOCK_PATH': None,   # set in setUp
        'OSLO_MESSAGING_EXT_SOCK_GROUP': devstack.current_group(),
        'OSLO_MESSAGING_EXT_SOCK_MODE': '0600',
        'OSLO_MESSAGING_EXT_MULTICAST_RULE': 'to_dr_sites',
        'OSLO_MESSAGING_EXT_MULTICAST_EVENTS': 'image.activate',
        'OSLO_MESSAGING_EXT_MULTICAST_HOSTS': 'dr1,dr2,dr3',
        'OSLO_MESSAGING_EXT_MULTICAST_PREFIX': 'dr/image.',
        'OSLO_MESSAGING_EXT_MULTICAST_PUBLISHER_ID': 'GLANCE:SITE-A',
    }

    def setUp(self):
        super().setUp()
        self.env.update(self.CUSTOM)
        self.sock = os.path.join(self.run_dir, 'images.sock')
        self.env['OSLO_MESSAGING_EXT_SOCK_PATH'] = self.sock

    def test_custom_settings(self):
        self.write_conf(DEVSTACK_GLANCE_API_CONF.replace(
            'driver = messagingv2', 'driver = log\ndriver = messagingv2'))
        ini = self.post_config()
        self.assertEqual(['log', 'messaging-multicast', 'unix'],
                         ini[NOTIFY]['driver'])
        self.assertEqual([self.sock], ini[NOTIFY]['sock_path'])
        self.assertEqual(['0600'], ini[NOTIFY]['sock_mode'])
        self.assertEqual(['to_dr_sites'],
                         ini['oslo_messaging_multicast']['rules'])
        self.assertEqual({'selector': ['event_type in image.activate'],
                          'targets': ['dr/image.dr1,dr/image.dr2,'
                                      'dr/image.dr3'],
                          'publisher_id': ['GLANCE:SITE-A']},
                         ini['multicast_rule_to_dr_sites'])
        self.assertNotIn(RULE, ini)

    def test_second_run_with_custom_settings_leaves_the_same_file(self):
        self.write_conf()
        self.post_config()
        first = self.read_conf_text()
        self.post_config()
        self.assertEqual(first, self.read_conf_text())

    def test_drivers_already_listed_are_not_repeated(self):
        self.write_conf(DEVSTACK_GLANCE_API_CONF.replace(
            'driver = messagingv2',
            'driver = messagingv2\ndriver = unix\ndriver = messaging-multicast'
            '\ndriver = noop'))
        ini = self.post_config()
        self.assertEqual(['messaging-multicast', 'unix', 'noop'],
                         ini[NOTIFY]['driver'])

    def test_unix_only_keeps_messagingv2(self):
        self.write_conf()
        ini = self.post_config(OSLO_MESSAGING_EXT_DRIVERS='unix')
        self.assertEqual(['messagingv2', 'unix'], ini[NOTIFY]['driver'])
        self.assertNotIn('oslo_messaging_multicast', ini)
        self.assertNotIn(RULE, ini)

    def test_multicast_only_creates_no_socket_dir(self):
        self.write_conf()
        ini = self.post_config(
            OSLO_MESSAGING_EXT_DRIVERS='messaging-multicast')
        self.assertEqual(['messaging-multicast'], ini[NOTIFY]['driver'])
        self.assertNotIn('sock_path', ini[NOTIFY])
        self.assertFalse(os.path.exists(self.run_dir))
        self.assertFalse(os.path.exists(self.tmpfiles))

    def test_notifications_section_missing(self):
        self.write_conf('[DEFAULT]\ndebug = True\n')
        ini = self.post_config()
        self.assertEqual(['messaging-multicast', 'unix'],
                         ini[NOTIFY]['driver'])
        self.assertEqual([self.sock], ini[NOTIFY]['sock_path'])

    def assert_refused(self, message, **env):
        self.write_conf()
        result = devstack.run_plugin(['stack', 'post-config'],
                                     dict(self.env, **env), self.dir)
        self.assertNotEqual(0, result.returncode)
        self.assertIn(message, result.stderr)
        self.assertEqual(DEVSTACK_GLANCE_API_CONF, self.read_conf_text())

    def test_unknown_driver_is_refused_by_name(self):
        self.assert_refused(
            "OSLO_MESSAGING_EXT_DRIVERS: unknown driver 'multicast'",
            OSLO_MESSAGING_EXT_DRIVERS='unix multicast')

    def test_shallow_runtime_dir_is_refused(self):
        for run_dir in ('/', '/run', 'run/omx', '/run/../etc'):
            self.assert_refused(
                'OSLO_MESSAGING_EXT_RUN_DIR (%s) must be an absolute path at '
                'least two levels deep' % run_dir,
                OSLO_MESSAGING_EXT_RUN_DIR=run_dir,
                OSLO_MESSAGING_EXT_SOCK_PATH=run_dir + '/x.sock')

    def test_socket_outside_the_runtime_dir_is_refused(self):
        self.assert_refused(
            'OSLO_MESSAGING_EXT_SOCK_PATH (/tmp/glance.sock) must be '
            'directly in OSLO_MESSAGING_EXT_RUN_DIR',
            OSLO_MESSAGING_EXT_SOCK_PATH='/tmp/glance.sock')


class TestPostConfigSkipped(PluginTestCase):

    def test_g_api_disabled_leaves_the_file_untouched(self):
        self.write_conf()
        before = os.stat(self.conf)
        result = self.run_phase('stack', 'post-config',
                                ENABLED_SERVICES='key,rabbit,n-api,g-reg')
        self.assertEqual(DEVSTACK_GLANCE_API_CONF, self.read_conf_text())
        self.assertEqual(before.st_mtime_ns, os.stat(self.conf).st_mtime_ns)
        self.assertEqual([DEFINE_PLUGIN], result.calls)
        self.assertFalse(os.path.exists(self.run_dir))
        self.assertFalse(os.path.exists(self.tmpfiles))

    def test_missing_glance_api_conf_is_not_created(self):
        self.run_phase('stack', 'post-config')
        self.assertFalse(os.path.exists(self.conf))
        self.assertFalse(os.path.exists(self.run_dir))


class TestCleanup(PluginTestCase):
    """unstack leaves a running glance-api alone, clean removes our files.

    As in devstack, unstack.sh runs the unstack phase before it stops the
    services, and clean.sh runs unstack.sh before the clean phase.
    """

    def bound_socket(self, listen=False):
        self.write_conf()
        ini = self.post_config()
        path = ini[NOTIFY]['sock_path'][0]
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The lambda keeps the socket itself alive until cleanup: eventlet's
        # green socket hands out its inner socket's close, and would be
        # collected (and closed) as soon as this method returns.
        self.addCleanup(lambda: server.close())
        server.bind(path)
        if listen:
            server.listen()
        return path

    def touch(self, path):
        with open(path, 'w'):
            pass
        return path

    def test_unstack_leaves_a_running_services_socket_alone(self):
        path = self.bound_socket(listen=True)
        lock = self.touch(path + '.lock')
        self.run_phase('unstack')
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.settimeout(10)
        client.connect(path)
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))
        self.assertTrue(os.path.exists(lock))
        self.assertTrue(os.path.isdir(self.run_dir))
        self.assertTrue(os.path.exists(self.tmpfiles))

    def test_unstack_runs_before_the_service_stops(self):
        # The socket is still in place when unstack.sh stops the services.
        path = self.bound_socket(listen=True)
        result = self.run_phase(
            'unstack', STANDIN_STOP_SERVICES='test -S "%s" && echo BOUND'
            % path)
        self.assertIn('BOUND', result.stdout.splitlines())

    def test_clean_removes_socket_and_runtime_dir(self):
        path = self.bound_socket()
        self.run_phase('clean')
        self.assertFalse(os.path.exists(path))
        self.assertFalse(os.path.exists(self.run_dir))
        self.assertFalse(os.path.exists(self.tmpfiles))
        # Nothing left to remove: a second run is harmless.
        self.run_phase('clean')

    def test_clean_removes_every_file_named_after_the_socket(self):
        path = self.bound_socket()
        self.touch(path + '.lock')
        # Another socket a driver version binds beside sock_path.
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(other.close)
        other.bind(path + '.ingest')
        self.run_phase('clean')
        self.assertFalse(os.path.exists(self.run_dir))

    def test_files_not_ours_are_kept_with_their_directory(self):
        path = self.bound_socket()
        foreign = os.path.join(self.run_dir, 'other-service.pid')
        with open(foreign, 'w') as f:
            f.write('42\n')
        # A link named like ours, and a directory, are not the driver's.
        link = path + '.link'
        os.symlink(foreign, link)
        subdir = os.path.join(self.run_dir, os.path.basename(path) + '.d')
        os.mkdir(subdir)
        result = self.run_phase('clean')
        self.assertFalse(os.path.exists(path))
        self.assertEqual(
            sorted(['other-service.pid', os.path.basename(link),
                    os.path.basename(subdir)]),
            sorted(os.listdir(self.run_dir)))
        self.assertIn('is not empty; left in place', result.stdout)
