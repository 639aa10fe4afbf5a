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

"""tox -e zuul's check of .zuul.yaml rejects what Zuul would.

The playbook half (ansible-playbook, ansible-lint) runs in tox -e zuul
only; these tests cover the schema half, which needs PyYAML alone.
"""

import importlib.util
import os

from oslotest import base

from oslo_messaging_ext.tests import devstack

_spec = importlib.util.spec_from_file_location(
    'check_zuul_config',
    os.path.join(devstack.SOURCE_TREE, 'tools', 'check_zuul_config.py'))
check_zuul_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_zuul_config)

JOB = {'name': 'oslo.messaging-ext-x', 'parent': 'openstack-tox',
       'run': 'playbooks/functional/pre.yaml', 'timeout': 3600,
       'irrelevant-files': ['^doc/.*$'],
       'vars': {'tox_envlist': 'functional', 'bindep_profile': 'functional'}}


class TestSchema(base.BaseTestCase):

    def job_problems(self, **changes):
        job = dict(JOB, **changes)
        problems = []
        check_zuul_config.check_job(job, problems)
        check_zuul_config.check_vars(job, problems)
        return problems

    def project_problems(self, project):
        problems = []
        check_zuul_config.check_project(project, {JOB['name']: JOB},
                                        problems)
        return problems

    def test_the_tree_passes(self):
        problems = []
        playbooks = check_zuul_config.check_zuul_yaml(problems)
        self.assertEqual([], problems)
        self.assertIn('playbooks/devstack-glance/post.yaml', playbooks)

    def test_a_good_job_passes(self):
        self.assertEqual([], self.job_problems())

    def test_unknown_attribute(self):
        self.assertEqual(["job oslo.messaging-ext-x: unknown attribute "
                          "'pre_run'"], self.job_problems(pre_run='x'))

    def test_wrong_type(self):
        self.assertEqual(['job oslo.messaging-ext-x: timeout is a str, '
                          'expected int'], self.job_problems(timeout='1h'))

    def test_missing_playbook(self):
        self.assertEqual(['job oslo.messaging-ext-x: playbook '
                          'playbooks/nothing.yaml does not exist'],
                         self.job_problems(**{'post-run':
                                              ['playbooks/nothing.yaml']}))

    def test_bad_file_regex(self):
        problems = self.job_problems(files=['^doc/(.*$'])
        self.assertEqual(1, len(problems), problems)
        self.assertIn("bad file regex '^doc/(.*$'", problems[0])

    def test_variables_must_match_the_tree(self):
        problems = self.job_problems(vars={
            'tox_envlist': 'functionl', 'bindep_profile': 'test rabbit',
            'devstack_plugins': {'oslo-messaging-ext': 'x'}})
        self.assertEqual([
            "job oslo.messaging-ext-x: tox_envlist names 'functionl', not "
            "in tox.ini",
            "job oslo.messaging-ext-x: bindep_profile 'rabbit' is in no "
            "selector of bindep.txt",
            "job oslo.messaging-ext-x: devstack_plugins enables "
            "'oslo-messaging-ext', devstack/settings defines "
            "['oslo.messaging-ext']"], problems)

    def test_project_pipelines_templates_and_jobs(self):
        self.assertEqual([], self.project_problems(
            {'templates': ['openstack-python3-jobs'],
             'check': {'jobs': [JOB['name'], {JOB['name']: {
                 'voting': False}}]}}))
        self.assertEqual([
            "project: unknown attribute 'chek'",
            "project: unknown project template 'openstack-python-jobs'",
            "project pipeline gate: job 'oslo.messaging-ext-y' is defined "
            "nowhere",
        ], self.project_problems(
            {'templates': ['openstack-python-jobs'], 'chek': {'jobs': []},
             'gate': {'jobs': ['oslo.messaging-ext-y']}}))

    def test_pipeline_without_jobs(self):
        self.assertEqual(['project pipeline check: no jobs'],
                         self.project_problems({'check': {'debug': True}}))
