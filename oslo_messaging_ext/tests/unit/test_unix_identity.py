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

"""The unix driver's permission checks, whoever runs the suite.

Root passes every permission check, and a user that is not root cannot
make a directory of another owner: each check is run by a service user
for whom it must fail. As root, that user is nobody, in a forked child;
otherwise it is the suite's user, given what it lacks (a group it is not
in, a directory it cannot write) or, where only root could arrange it,
another identity injected in the child.
"""

import grp
import os

import fixtures
from oslo_config import cfg
from oslotest import base

from oslo_messaging_ext.notify import _impl_unix
from oslo_messaging_ext.tests import utils as test_utils

GROUP = 'oslo_messaging_notifications'


def load_driver(sock_path, fake_euid=None, **overrides):
    """Load the unix driver; say what its load refused, if anything.

    Run in a child process: the driver it loads, if any, dies with it.
    """
    if fake_euid is not None:
        os.geteuid = lambda: fake_euid
    conf = cfg.ConfigOpts()
    conf([], project='unix-identity')
    _impl_unix.register_opts(conf)
    conf.set_override('sock_path', sock_path, group=GROUP)
    for name, value in overrides.items():
        conf.set_override(name, value, group=GROUP)
    try:
        _impl_unix.UnixSocketDriver(conf, ['n'], None).close()
    except _impl_unix.UnixSocketConfigError as exc:
        return {'option': exc.option, 'value': exc.value,
                'message': str(exc)}
    return None


def a_group_not_of(uid_is_root):
    """The name of a group the service user is not a member of."""
    if uid_is_root:
        # The child runs as nobody, with no supplementary group.
        return grp.getgrgid(0).gr_name
    ours = set(os.getgroups()) | {os.getegid()}
    for group in grp.getgrall():
        if group.gr_gid not in ours:
            return group.gr_name
    raise AssertionError('the suite user is in every group')


class UnixPermissionChecksTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.tmpdir = self.useFixture(fixtures.TempDir()).path
        self.sock_path = os.path.join(self.tmpdir, 'notifications.sock')
        self.as_root = os.geteuid() == 0
        if self.as_root:
            # Reachable by nobody; mode and owner are each test's.
            test_utils.let_others_reach(self, self.tmpdir)

    def load_as_service_user(self, **kwargs):
        """load_driver() run as the service user; what it returned."""
        outcome = test_utils.call_as_another_user(
            self, load_driver, self.sock_path, **kwargs)
        self.assertNotIn('error', outcome)
        return outcome['result']

    def assertRefused(self, refusal, option, value, fragment):
        self.assertIsNotNone(refusal, 'the driver loaded')
        self.assertEqual(option, refusal['option'], refusal['message'])
        self.assertEqual(value, refusal['value'])
        self.assertIn('[%s]' % GROUP, refusal['message'])
        self.assertIn(fragment, refusal['message'])

    def test_service_user_not_in_the_group(self):
        # The service user's own directory, so that only the group fails.
        os.chmod(self.tmpdir, 0o1777)
        group = a_group_not_of(self.as_root)
        refusal = self.load_as_service_user(sock_group=group)
        uid = test_utils.NOBODY if self.as_root else os.geteuid()
        self.assertRefused(refusal, 'sock_group', group,
                           'the service user (uid %d) is not a member of '
                           'this group' % uid)
        # A group it is in is accepted: the refusal was the group's.
        own_group = grp.getgrgid(test_utils.NOBODY if self.as_root
                                 else os.getegid()).gr_name
        self.assertIsNone(self.load_as_service_user(sock_group=own_group))

    def test_directory_not_writable(self):
        # Owned by root (or the suite's user), which the rule allows;
        # the service user may not create files in it.
        os.chmod(self.tmpdir, 0o755 if self.as_root else 0o555)
        self.addCleanup(os.chmod, self.tmpdir, 0o700)
        refusal = self.load_as_service_user()
        uid = test_utils.NOBODY if self.as_root else os.geteuid()
        self.assertRefused(refusal, 'sock_path', self.sock_path,
                           'the service user (uid %d) cannot create files '
                           'in %s' % (uid, self.tmpdir))
        self.assertFalse(os.path.lexists(self.sock_path))

    def test_directory_owned_by_another_user(self):
        if self.as_root:
            os.chown(self.tmpdir, test_utils.NOBODY, -1)
            self.addCleanup(os.chown, self.tmpdir, 0, -1)
            owner, service_uid = test_utils.NOBODY, 0
            refusal = load_driver(self.sock_path)
        else:
            # Only root gives a directory away: the service user is made
            # another one instead, in a child.
            owner, service_uid = os.geteuid(), os.geteuid() + 1
            refusal = self.load_as_service_user(fake_euid=service_uid)
        self.assertRefused(refusal, 'sock_path', self.sock_path,
                           'its directory %s is owned by uid %d; only root '
                           'or the service user (uid %d) may own it'
                           % (self.tmpdir, owner, service_uid))


class IdentityHelperTestCase(base.BaseTestCase):

    def test_the_child_runs_as_another_user_where_root(self):
        ids = test_utils.call_as_another_user(
            self, lambda: [os.getuid(), os.geteuid(), os.getgid(),
                           os.getegid(), os.getgroups()])
        if os.geteuid() == 0:
            nobody = test_utils.NOBODY
            self.assertEqual({'result': [nobody, nobody, nobody, nobody,
                                         []]}, ids)
        else:
            self.assertEqual(os.geteuid(), ids['result'][1])

    def test_what_the_child_raises_is_reported(self):
        result = test_utils.call_as_another_user(
            self, lambda: 1 / 0)
        self.assertEqual('ZeroDivisionError', result['error'])
