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

"""Who tools/export-upstream-series signs the series off with.

The tool's functions are loaded from its file; nothing here exports a
series, downloads or runs git.
"""

import importlib.machinery
import importlib.util
import io
import os
import subprocess
import sys
from unittest import mock

import fixtures
from oslotest import base

SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))))
TOOL = os.path.join(SOURCE_TREE, 'tools', 'export-upstream-series')

# The address this checkout's git config held when the exporter still
# read it: a role's noreply address on a .example domain.
CONFIGURED = 'maintainers@users.noreply.r-seed-78051078.example'

REFUSED = [
    CONFIGURED,
    'jane@example', 'jane@lab.example', 'jane@foo.invalid',
    'jane@host.test', 'jane@localhost', 'jane@box.localhost',
    'jane@example.com', 'jane@lists.example.org', 'jane@EXAMPLE.NET',
    'jane@example.com.',
    'noreply@github.com', '1234+jane@users.noreply.github.com',
    'no-reply@openstack.org', 'do_not_reply@corp.com',
    'jane', 'jane@nodot', 'jane@@openstack.org', '',
]
ACCEPTED = [
    'jane.doe@openstack.org', 'jdoe@redhat.com', 'sam@example-corp.com',
    'kim@examples.org', 'lee@testing.io', 'ray@contest.com',
]


def load_tool():
    loader = importlib.machinery.SourceFileLoader('export_upstream_series',
                                                  TOOL)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class TestAddresses(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.tool = load_tool()

    def test_reserved_noreply_and_malformed_addresses_are_refused(self):
        self.assertEqual(
            [], [a for a in REFUSED if self.tool.address_problem(a) is None])

    def test_real_domains_are_accepted(self):
        self.assertEqual(
            {a: None for a in ACCEPTED},
            {a: self.tool.address_problem(a) for a in ACCEPTED})

    def test_reasons(self):
        self.assertIn('noreply', self.tool.address_problem(CONFIGURED))
        self.assertIn('reserved',
                      self.tool.address_problem('jane@foo.invalid'))

    def test_test_identity_is_refused_on_the_real_path(self):
        self.assertIsNotNone(
            self.tool.address_problem(self.tool.TEST_IDENTITY[1]))


class TestCallerIdentity(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.tool = load_tool()
        # git config is never read: any git or other command fails the test.
        self.useFixture(fixtures.MockPatchObject(
            self.tool, 'run', side_effect=AssertionError('ran a command')))

    def identity(self, *args, **environ):
        return self.tool.caller_identity(*args, environ=environ)

    def assert_refused(self, *args, **environ):
        error = self.assertRaises(self.tool.ExportError, self.identity,
                                  *args, **environ)
        # The error says what to pass.
        for what in ('--author', 'GIT_AUTHOR_NAME', 'GIT_AUTHOR_EMAIL',
                     'git config is not read', '--test-identity'):
            self.assertIn(what, str(error))
        return str(error)

    def test_from_author_option(self):
        self.assertEqual(('Jane Doe', 'jane.doe@openstack.org'),
                         self.identity(' Jane Doe <jane.doe@openstack.org> '))

    def test_from_name_and_email_options(self):
        self.assertEqual(('Jane Doe', 'jane.doe@openstack.org'),
                         self.identity(None, 'Jane Doe',
                                       'jane.doe@openstack.org'))

    def test_from_environment(self):
        self.assertEqual(
            ('Jane Doe', 'jane.doe@openstack.org'),
            self.identity(GIT_AUTHOR_NAME='Jane Doe',
                          GIT_AUTHOR_EMAIL='jane.doe@openstack.org'))

    def test_options_win_over_environment(self):
        self.assertEqual(
            ('Jane Doe', 'jane.doe@openstack.org'),
            self.identity('Jane Doe <jane.doe@openstack.org>',
                          GIT_AUTHOR_NAME='Other',
                          GIT_AUTHOR_EMAIL=CONFIGURED))

    def test_nothing_passed_is_refused(self):
        message = self.assert_refused()
        self.assertIn('no identity', message)

    def test_half_an_identity_is_refused(self):
        self.assert_refused(GIT_AUTHOR_EMAIL='jane.doe@openstack.org')
        self.assert_refused(None, 'Jane Doe')

    def test_configured_noreply_example_address_is_refused(self):
        message = self.assert_refused(GIT_AUTHOR_NAME='Seed maintainers',
                                      GIT_AUTHOR_EMAIL=CONFIGURED)
        self.assertIn(CONFIGURED, message)
        self.assertIn('GIT_AUTHOR_NAME/GIT_AUTHOR_EMAIL', message)

    def test_reserved_domain_in_author_option_is_refused(self):
        message = self.assert_refused('Jane Doe <jane@example.com>')
        self.assertIn('from --author', message)

    def test_malformed_author_option_is_refused(self):
        self.assert_refused('jane.doe@openstack.org')
        self.assert_refused('Jane <Doe> <jane.doe@openstack.org>')

    def test_author_and_name_options_together_are_refused(self):
        self.assertRaises(self.tool.ExportError, self.identity,
                          'Jane Doe <jane.doe@openstack.org>', 'Jane Doe')


class TestPatchIdentities(base.BaseTestCase):

    PATCH = ('From 0123abcd Mon Sep 17 00:00:00 2001\n'
             'From: {name} <{email}>\n'
             'Subject: [PATCH 1/2] Add a driver\n\n'
             'Body.\n\n'
             'Signed-off-by: {name} <{email}>\n'
             '---\n')

    def setUp(self):
        super().setUp()
        self.tool = load_tool()

    def patch_text(self, name, email):
        return self.PATCH.format(name=name, email=email)

    def test_real_series_with_a_real_address_passes(self):
        self.tool.check_patch_identities(
            'p', self.patch_text('Jane Doe', 'jane.doe@openstack.org'), False)

    def test_real_series_with_the_test_identity_is_refused(self):
        self.assertRaises(
            self.tool.ExportError, self.tool.check_patch_identities,
            'p', self.patch_text(*self.tool.TEST_IDENTITY), False)

    def test_real_series_with_a_refused_sign_off_is_refused(self):
        text = self.patch_text('Jane Doe', 'jane.doe@openstack.org')
        text += 'Signed-off-by: Bot <bot@ci.example.org>\n'
        self.assertRaises(self.tool.ExportError,
                          self.tool.check_patch_identities, 'p', text, False)

    def fold(self, text):
        # format-patch folds a long From: before the address (the first
        # " <" of these patches).
        return text.replace(' <', '\n <', 1)

    def test_folded_from_header_is_read_whole(self):
        good = self.patch_text('Jane Doe', 'jane.doe@openstack.org')
        self.tool.check_patch_identities('p', self.fold(good), False)
        bad_from = good.replace('From: Jane Doe <jane.doe@openstack.org>',
                                'From: Jane Doe <jane@lab.example>')
        self.assertRaises(self.tool.ExportError,
                          self.tool.check_patch_identities, 'p',
                          self.fold(bad_from), False)
        test = self.patch_text(*self.tool.TEST_IDENTITY)
        self.tool.check_patch_identities('p', self.fold(test), True)

    def test_test_series_carries_only_the_test_identity(self):
        self.tool.check_patch_identities(
            'p', self.patch_text(*self.tool.TEST_IDENTITY), True)
        self.assertRaises(
            self.tool.ExportError, self.tool.check_patch_identities,
            'p', self.patch_text('Jane Doe', 'jane.doe@openstack.org'), True)


class TestCommandLine(base.BaseTestCase):

    def run_tool(self, *args):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith('GIT_AUTHOR_')}
        return subprocess.run([sys.executable, TOOL] + list(args),
                              capture_output=True, text=True, timeout=60,
                              env=env)

    def test_help_names_both_paths(self):
        proc = self.run_tool('--help')
        self.assertEqual(0, proc.returncode, proc.stderr)
        self.assertIn('--author', proc.stdout)
        self.assertIn('--test-identity', proc.stdout)
        # argparse wraps the help, at spaces and hyphens.
        self.assertIn('upstream-series-TEST-ONLY-DO-NOT-SUBMIT',
                      ''.join(proc.stdout.split()))

    def test_test_identity_takes_no_author(self):
        for args in (['--author', 'Jane Doe <jane.doe@openstack.org>'],
                     ['--author-email', 'jane.doe@openstack.org']):
            proc = self.run_tool('--test-identity', *args)
            self.assertEqual(2, proc.returncode, proc.stdout)
            self.assertIn('--test-identity', proc.stderr)

    def test_no_identity_stops_before_any_export(self):
        tool = load_tool()
        self.useFixture(fixtures.EnvironmentVariable('GIT_AUTHOR_NAME'))
        self.useFixture(fixtures.EnvironmentVariable('GIT_AUTHOR_EMAIL'))
        fetch = self.useFixture(fixtures.MockPatchObject(
            tool, 'fetch_base')).mock
        with mock.patch('sys.stdout', new_callable=io.StringIO) as out:
            self.assertEqual(1, tool.main(['--no-tests']))
        fetch.assert_not_called()
        self.assertIn('git config is not read', out.getvalue())
