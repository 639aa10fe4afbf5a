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

"""The plugin where devstack and Zuul put it, and its commands on PATH.

A devstack job of Zuul checks the repository out at
``/opt/stack/oslo.messaging-ext`` and forbids cloning; devstack looks for
a plugin enabled as NAME in ``$DEST/NAME``. These tests run stack.sh's,
unstack.sh's and clean.sh's plugin machinery (stand-ins, see
``oslo_messaging_ext/tests/devstack``) on that layout, with the
``enable_plugin`` lines the documentation gives and the one Zuul writes.
"""

import configparser
import os
import re
import subprocess

import fixtures
from oslotest import base
import yaml

from oslo_messaging_ext.tests import devstack

DOCUMENTS = ('devstack/README.rst', 'doc/source/admin/devstack.rst')
ENABLE_PLUGIN_RE = re.compile(r'^\s*enable_plugin\s.*$', re.M)
COMMAND = 'oslo-notify-tail'


def documented_enable_plugin_lines():
    lines = []
    for name in DOCUMENTS:
        with open(os.path.join(devstack.SOURCE_TREE, name)) as f:
            lines += [(name, m.group(0).strip())
                      for m in ENABLE_PLUGIN_RE.finditer(f.read())]
    return lines


class LayoutTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.root = self.useFixture(fixtures.TempDir()).path
        self.layout = devstack.Layout(self.root)
        self.checkout = os.path.join(self.layout.dest, devstack.PLUGIN_NAME)

    def stack(self, *args, **kwargs):
        return devstack.run_plugin(('stack',) + args, kwargs.pop('env', {}),
                                   self.root, **kwargs)

    def assert_ok(self, result):
        self.assertEqual(0, result.returncode,
                         'stdout:\n%s\nstderr:\n%s'
                         % (result.stdout[-3000:], result.stderr[-3000:]))


class TestPluginName(LayoutTestCase):

    def test_plugin_is_named_after_the_repository(self):
        parser = configparser.ConfigParser()
        parser.read(os.path.join(devstack.SOURCE_TREE, 'setup.cfg'))
        self.assertEqual(devstack.PLUGIN_NAME,
                         parser.get('metadata', 'name'))
        with open(devstack.SETTINGS) as f:
            defined = re.findall(r'^define_plugin\s+(\S+)', f.read(), re.M)
        self.assertEqual([devstack.PLUGIN_NAME], defined)

    def test_zuul_layout_with_cloning_forbidden(self):
        result = self.stack(localrc=devstack.ZUUL_ENABLE_PLUGIN)
        self.assert_ok(result)
        self.assertIn('setup_develop %s orjson,regex' % self.checkout,
                      result.calls)

    def test_every_documented_enable_plugin_line_works_on_zuul_layout(self):
        lines = documented_enable_plugin_lines()
        self.assertEqual(len(DOCUMENTS), len({name for name, _ in lines}),
                         'a document lost its enable_plugin line: %s'
                         % lines)
        for document, line in lines:
            words = line.split()
            self.assertEqual(devstack.PLUGIN_NAME, words[1], document)
            self.assertEqual(devstack.PROJECT_URL, words[2], document)
            # OpenStack's default branch; enable_plugin's default too.
            self.assertIn(words[3:], ([], ['master']), document)
            root = self.useFixture(fixtures.TempDir()).path
            result = devstack.run_plugin(['stack'], {}, root,
                                         localrc=line)
            self.assertEqual(0, result.returncode,
                             '%s: %s\n%s' % (document, line,
                                             result.stdout + result.stderr))

    def test_devstack_job_of_zuul_enables_the_plugin_as_documented(self):
        with open(os.path.join(devstack.SOURCE_TREE, '.zuul.yaml')) as f:
            jobs = [item['job'] for item in yaml.safe_load(f)
                    if 'job' in item]
        variables = [job['vars'] for job in jobs
                     if 'devstack_plugins' in job.get('vars', {})]
        self.assertEqual(1, len(variables), jobs)
        plugins = variables[0]['devstack_plugins']
        self.assertEqual({devstack.PLUGIN_NAME: devstack.PROJECT_URL},
                         plugins)
        # The line devstack's local.conf writer makes of it.
        line = 'enable_plugin %s %s' % next(iter(plugins.items()))
        self.assertEqual(devstack.ZUUL_ENABLE_PLUGIN, line)
        with open(devstack.SETTINGS) as f:
            settings = f.read()
        # The socket the job records is the one the plugin configures.
        self.assertIn('OSLO_MESSAGING_EXT_RUN_DIR:-/run/oslo-messaging-ext}',
                      settings)
        self.assertIn('OSLO_MESSAGING_EXT_SOCK_PATH:-'
                      '$OSLO_MESSAGING_EXT_RUN_DIR/glance-api.sock}',
                      settings)
        self.assertEqual('/run/oslo-messaging-ext/glance-api.sock',
                         variables[0]['glance_notifications_sock_path'])
        for name in variables[0].get('devstack_localrc', {}):
            self.assertIn('\n%s=${%s:-' % (name, name), settings)

    def test_another_name_is_refused_by_devstack_itself(self):
        # What the plugin's former name did in a Zuul job: devstack looks
        # for $DEST/<name>, finds nothing and may not clone.
        result = self.stack(localrc='enable_plugin oslo-messaging-ext %s'
                            % devstack.PROJECT_URL)
        self.assertNotEqual(0, result.returncode)
        self.assertIn('ERROR_ON_CLONE is set to True so cloning not allowed',
                      result.stderr)
        self.assertIn('%s/oslo-messaging-ext project was not found'
                      % self.layout.dest, result.stdout)

    def test_directory_follows_the_checkout_not_dest(self):
        # A checkout enabled under its name in a DEST of its own, as a
        # developer's devstack or another job layout may have it.
        dest = os.path.join(self.root, 'srv', 'devstack-dest')
        layout_env = {'DEST': dest}
        os.makedirs(dest)
        os.symlink(devstack.Layout(self.root).checkout(),
                   os.path.join(dest, devstack.PLUGIN_NAME))
        result = self.stack('install', env=layout_env)
        self.assert_ok(result)
        self.assertIn('setup_develop %s/%s orjson,regex'
                      % (dest, devstack.PLUGIN_NAME), result.calls)

    def test_operator_may_still_name_the_directory(self):
        elsewhere = devstack.Layout(
            os.path.join(self.root, 'elsewhere')).checkout()
        result = self.stack(
            'install', env={'OSLO_MESSAGING_EXT_DIR': elsewhere})
        self.assert_ok(result)
        self.assertIn('setup_develop %s orjson,regex' % elsewhere,
                      result.calls)

    def test_settings_read_in_unstack_and_clean_find_the_checkout(self):
        self.assert_ok(self.stack())
        # clean.sh runs unstack.sh first: each reads the settings.
        for script, reads in (('unstack', 1), ('clean', 2)):
            result = devstack.run_plugin([script], {}, self.root)
            self.assert_ok(result)
            self.assertEqual(['define_plugin %s' % devstack.PLUGIN_NAME] *
                             reads,
                             [c for c in result.calls
                              if c.startswith('define_plugin')], script)


class TestCommandOnPath(LayoutTestCase):
    """oslo-notify-tail is found on the PATH of a devstack user."""

    def user_path(self):
        # A login's PATH: /usr/local/bin and the system's, never the
        # virtualenv's bin.
        return os.pathsep.join([self.layout.system_bin, '/usr/bin', '/bin'])

    def run_command(self, *args):
        return subprocess.run([COMMAND] + list(args), capture_output=True,
                              text=True, timeout=60,
                              env={'PATH': self.user_path(),
                                   'LANG': 'C.UTF-8'})

    def test_global_venv_command_is_linked_onto_path(self):
        self.assert_ok(self.stack())
        link = os.path.join(self.layout.system_bin, COMMAND)
        self.assertEqual(os.path.join(self.layout.venv, 'bin', COMMAND),
                         os.readlink(link))
        proc = self.run_command('--help')
        self.assertEqual(0, proc.returncode, proc.stderr)
        self.assertIn('usage: %s' % COMMAND, proc.stdout)

    def test_without_global_venv_pip_puts_it_on_path_itself(self):
        result = self.stack(env={'GLOBAL_VENV': 'False'})
        self.assert_ok(result)
        path = os.path.join(self.layout.system_bin, COMMAND)
        self.assertFalse(os.path.islink(path))
        self.assertEqual([], [c for c in result.calls if ' ln ' in c])
        self.assertEqual(0, self.run_command('--help').returncode)

    def test_second_stack_keeps_one_working_link(self):
        self.assert_ok(self.stack())
        self.assert_ok(self.stack('install'))
        self.assertEqual([COMMAND], os.listdir(self.layout.system_bin))
        self.assertEqual(0, self.run_command('--help').returncode)

    def test_unstack_keeps_the_command_clean_removes_it(self):
        self.assert_ok(self.stack())
        link = os.path.join(self.layout.system_bin, COMMAND)
        self.assert_ok(devstack.run_plugin(['unstack'], {}, self.root))
        self.assertTrue(os.path.islink(link))
        self.assert_ok(devstack.run_plugin(['clean'], {}, self.root))
        self.assertFalse(os.path.lexists(link))

    def test_clean_leaves_a_command_that_is_not_its_link(self):
        self.assert_ok(self.stack())
        other = os.path.join(self.layout.system_bin, COMMAND)
        os.unlink(other)
        with open(other, 'w') as f:
            f.write('#!/bin/sh\n')
        self.assert_ok(devstack.run_plugin(['clean'], {}, self.root))
        self.assertTrue(os.path.exists(other))

    def test_link_dir_default_is_on_every_users_path(self):
        with open(devstack.SETTINGS) as f:
            self.assertIn('OSLO_MESSAGING_EXT_BIN_LINK_DIR='
                          '${OSLO_MESSAGING_EXT_BIN_LINK_DIR:-/usr/local/bin}',
                          f.read())
