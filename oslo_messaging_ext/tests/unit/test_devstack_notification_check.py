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

"""The gate's notification check judges a run as it should.

The check itself runs against a real broker in ``tox -e functional-glance``
and in the devstack job; here each rule it applies is shown to fail on the
run it must reject, and its reading of glance-api.conf is run on the file
the devstack plugin writes.
"""

import copy
import json
import os

import fixtures
from oslotest import base

from oslo_messaging_ext.tests import devstack
from oslo_messaging_ext.tests.functional_glance import notification_check

RULE = notification_check.Rule(
    'glance_replication', frozenset({'image.upload', 'image.delete'}),
    (('glance', 'glance.repl.host1.info'),
     ('glance', 'glance.repl.host2.info')),
    'GLANCE:MASTER')


def notification(event_type, image, publisher_id='image.localhost',
                 **extra):
    return dict(event_type=event_type, payload={'id': image},
                publisher_id=publisher_id, priority='INFO', **extra)


def life(image, *events):
    return [notification(e, image) for e in
            ('image.create',) + events]


def replicas_of(recording, images=None):
    copies = [notification(n['event_type'], n['payload']['id'],
                           publisher_id='GLANCE:MASTER')
              for n in recording if n['event_type'] in RULE.events and
              (images is None or n['payload']['id'] in images)]
    return {queue: copy.deepcopy(copies) for queue in RULE.queues}


class TestCheck(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.recording = (
            # devstack's cirros, uploaded before the recorder connected.
            [notification('image.activate', 'cirros'),
             notification('image.delete', 'cirros')] +
            life('a', 'image.upload', 'image.activate', 'image.delete') +
            life('b', 'image.delete'))

    def check(self, recording=None, replicas=None):
        recording = self.recording if recording is None else recording
        if replicas is None:
            replicas = replicas_of(recording)
        return notification_check.check(recording, [RULE], replicas)

    def test_a_good_run_passes(self):
        self.assertEqual([], self.check())

    def test_replicas_of_images_seen_before_the_recording_are_ignored(self):
        replicas = replicas_of(self.recording)
        for got in replicas.values():
            got.append(notification('image.upload', 'cirros',
                                    publisher_id='GLANCE:MASTER'))
        self.assertEqual([], self.check(replicas=replicas))

    def test_drop_notice_fails(self):
        recording = self.recording + [dict(
            event_type=notification_check.DROPPED_EVENT_TYPE,
            payload={'dropped': 3}, publisher_id='oslo_messaging_ext')]
        problems = self.check(recording)
        self.assertEqual(1, len(problems), problems)
        self.assertIn('reported drops', problems[0])

    def test_sequence_gap_fails(self):
        recording = [dict(n, sequence={'source': 's1', 'number': i})
                     for i, n in enumerate(self.recording, 1)]
        self.assertEqual([], self.check(recording))
        # The creation of b, missed: b no longer counts as recorded from
        # birth, only the gap tells.
        del recording[6]
        problems = self.check(recording)
        self.assertEqual(['sequence of s1 jumps from 6 to 8'], problems)

    def test_missing_expected_event_fails(self):
        recording = [n for n in self.recording
                     if n['event_type'] != 'image.activate']
        problems = self.check(recording)
        self.assertEqual(1, len(problems), problems)
        self.assertIn('never recorded on the unix socket: image.activate',
                      problems[0])

    def test_missing_replica_fails(self):
        replicas = replicas_of(self.recording)
        replicas[RULE.queues[1]].pop()
        problems = self.check(replicas=replicas)
        self.assertEqual(1, len(problems), problems)
        self.assertIn('glance.repl.host2.info', problems[0])
        self.assertIn("missing {('b', 'image.delete'): 1}", problems[0])

    def test_duplicate_replica_fails(self):
        replicas = replicas_of(self.recording)
        replicas[RULE.queues[0]].append(notification(
            'image.upload', 'a', publisher_id='GLANCE:MASTER'))
        problems = self.check(replicas=replicas)
        self.assertEqual(1, len(problems), problems)
        self.assertIn("extra {('a', 'image.upload'): 1}", problems[0])

    def test_event_the_rule_does_not_select_fails(self):
        replicas = replicas_of(self.recording)
        replicas[RULE.queues[0]].append(notification(
            'image.create', 'a', publisher_id='GLANCE:MASTER'))
        problems = self.check(replicas=replicas)
        self.assertEqual(1, len(problems), problems)
        self.assertIn("does not select: {'image.create': 1}", problems[0])

    def test_wrong_publisher_id_fails(self):
        replicas = replicas_of(self.recording)
        replicas[RULE.queues[0]][0]['publisher_id'] = 'image.localhost'
        problems = self.check(replicas=replicas)
        self.assertEqual(1, len(problems), problems)
        self.assertIn('publisher_id', problems[0])

    def test_bad_recording_line_is_reported(self):
        path = os.path.join(self.useFixture(fixtures.TempDir()).path, 'r')
        with open(path, 'w') as f:
            f.write(json.dumps(self.recording[0]) + '\n{"trunc\n')
        recording, problems = notification_check.read_recording(path)
        self.assertEqual([self.recording[0]], recording)
        self.assertEqual(1, len(problems), problems)
        self.assertIn('line 2 is not a notification', problems[0])


class TestConfigOfThePlugin(base.BaseTestCase):

    def test_rules_read_from_the_conf_the_plugin_writes(self):
        root = self.useFixture(fixtures.TempDir()).path
        conf = os.path.join(root, 'glance-api.conf')
        with open(conf, 'w') as f:
            f.write('[DEFAULT]\ntransport_url = rabbit://u:p@h:5672/\n\n'
                    '[oslo_messaging_notifications]\ndriver = messagingv2\n')
        result = devstack.run_plugin(
            ['stack', 'post-config'],
            {'GLANCE_API_CONF': conf, 'ENABLED_SERVICES': 'g-api',
             'OSLO_MESSAGING_EXT_RUN_DIR': os.path.join(root, 'run', 'o'),
             'OSLO_MESSAGING_EXT_TMPFILES_CONF': os.path.join(root, 't')},
            root)
        self.assertEqual(0, result.returncode, result.stderr)
        url, rules = notification_check.load_config(conf)
        self.assertEqual('rabbit://u:p@h:5672/', url)
        self.assertEqual([RULE], rules)

    def test_selector_it_cannot_check_is_refused_by_rule(self):
        conf = os.path.join(self.useFixture(fixtures.TempDir()).path, 'c')
        with open(conf, 'w') as f:
            f.write('[DEFAULT]\ntransport_url = rabbit://h/\n'
                    '[oslo_messaging_multicast]\nrules = r\n'
                    '[multicast_rule_r]\nselector = event_type glob image.*\n'
                    'targets = t\n')
        exc = self.assertRaises(notification_check.ConfigError,
                                notification_check.load_config, conf)
        self.assertIn('[multicast_rule_r] selector = event_type glob image.*',
                      str(exc))
