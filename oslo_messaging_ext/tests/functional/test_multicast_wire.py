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

"""Selectors match what consumers see, and the check tool predicts it.

The recorded glance life cycle is sent through messaging-multicast on the
real RabbitMQ as a service sends it: a RequestContext as the context, a
datetime and a UUID in the payload. What the standard topic delivered is
then given to oslo-messaging-ext-check, whose prediction of every replica
must be exactly what each rule's queue received.
"""

import datetime
import io
import json
import os
import re
import uuid

from oslo_context import context

from oslo_messaging_ext.cmd import check
from oslo_messaging_ext import samples
from oslo_messaging_ext.tests.functional import base
from oslo_messaging_ext.tests.functional import test_multicast

IMAGE_ID = uuid.UUID('ff71c972-b498-413c-bddc-0325a95087fe')
CREATED_AT = datetime.datetime(2026, 11, 22, 2, 40, 11)
RULES = {
    # A datetime, read as the ISO string the wire carries.
    'created': ['payload.created_at prefix 2026-11-22T',
                'event_type in image.create,image.upload,image.delete'],
    # A UUID, read as its string, by a regex on RE2.
    'image': [r'payload.id regex ^ff71c972-[0-9a-f]{4}-'],
    # In the context's to_dict(), not an attribute.
    'user': ['context.user_identity prefix u1 '],
    # An attribute RequestContext.to_dict() leaves out: not on the wire,
    # but for the sentinel's context, whose to_dict() adds it.
    'username': ['context.user_name exact alice'],
    'status': ['payload.status in active,deleted',
               'payload.updated_at !prefix 2025-'],
}


class NovaLikeContext(context.RequestContext):
    """A service's context whose to_dict() adds user_name, as nova's."""

    def to_dict(self):
        return dict(super().to_dict(), user_name=self.user_name)


def _as_the_service_builds_it(payload):
    """The payload with objects where the recording has their strings."""
    return dict(payload, id=IMAGE_ID, created_at=CREATED_AT,
                updated_at=CREATED_AT + datetime.timedelta(seconds=5))


class WireAgreementTestCase(test_multicast.MulticastBrokerTestCase):

    def configure(self):
        standard = base.unique_name('notifications')
        targets = {name: base.unique_name('wire-' + name) for name in RULES}
        # A loaded machine's publish must not count as a broker failure
        # (replica_timeout is not what this test is about).
        rule_groups = ''.join(
            '[multicast_rule_%s]\n%stargets = %s\nreplica_timeout = 60\n'
            % (
                name, ''.join('selector = %s\n' % s for s in selectors),
                targets[name])
            for name, selectors in RULES.items())
        path = self.write_config(
            '[oslo_messaging_notifications]\ndriver = messaging-multicast\n'
            'topics = %s\n[oslo_messaging_multicast]\nrules = %s\n%s'
            % (standard, ','.join(RULES), rule_groups))
        self.conf.conf(['--config-file', path],
                       project='oslo-messaging-ext-functional')
        return path, standard, targets

    def send(self, notifier):
        envelopes = samples.glance_life_cycle()
        for number, envelope in enumerate(envelopes):
            ctxt = context.RequestContext(
                user_id='u%d' % (1 + number % 2), project_id='p1',
                user_name='alice', overwrite=False)
            notifier.info(ctxt, envelope['event_type'],
                          _as_the_service_builds_it(envelope['payload']))
        # Last, and matched by every rule. (oslo.messaging sends a dict
        # context as {}.)
        sentinel_ctxt = NovaLikeContext(user_id='u1', project_id='p1',
                                        user_name='alice', overwrite=False)
        notifier.info(sentinel_ctxt, 'image.upload', base.sentinel_payload(
            id=IMAGE_ID, created_at=CREATED_AT, updated_at=CREATED_AT,
            status='active'))
        return len(envelopes)

    def predict(self, path, received):
        """What the check tool says each notification is replicated to."""
        lines = os.path.join(os.path.dirname(path), 'notifications.jsonl')
        with open(lines, 'w', encoding='utf-8') as f:
            for n in received:
                # As oslo-notify-tail --format json prints what a consumer got.
                f.write(json.dumps({
                    'message_id': n['metadata']['message_id'],
                    'timestamp': n['metadata']['timestamp'],
                    'priority': n['priority'].upper(),
                    'publisher_id': n['publisher_id'],
                    'event_type': n['event_type'],
                    'payload': n['payload'], 'context': n['ctxt']}) + '\n')
        out = io.StringIO()
        status = check.main(['--config-file', path, lines], out=out)
        self.assertEqual(0, status, out.getvalue())
        predicted = {}
        for line in out.getvalue().splitlines():
            found = re.match(r'line \d+ \S+ (\S+): (.*)$', line)
            if found:
                predicted[found.group(1)] = set(
                    re.findall(r'-> [^/]+/(\S+)\.info', found.group(2)))
        self.assertEqual(len(received), len(predicted), out.getvalue())
        return predicted

    def test_check_tool_predicts_what_every_queue_received(self):
        path, standard, targets = self.configure()
        standard_collector = self.start_listener(standard)
        collectors = {name: self.start_listener(topic)
                      for name, topic in targets.items()}
        notifier, _ = self.notifier()
        count = self.send(notifier)

        self.assertIsNotNone(standard_collector.wait_for_sentinels(1))
        received = standard_collector.wait_for(count + 1)
        actual = {n['metadata']['message_id']: set() for n in received}
        for name, collector in collectors.items():
            before = collector.wait_for_sentinels(1)
            self.assertIsNotNone(before, '%s: no sentinel' % name)
            for n in collector.wait_for(len(before) + 1):
                actual.setdefault(n['metadata']['message_id'], set()).add(
                    targets[name])
        predicted = self.predict(path, received)
        mismatches = {message_id: (predicted.get(message_id), topics)
                      for message_id, topics in actual.items()
                      if predicted.get(message_id) != topics}
        self.assertEqual({}, mismatches)
        # What the wire view makes match, counted by rule (the sentinel
        # included): a datetime by prefix, a UUID by regex, user_identity
        # from to_dict(), and user_name only where the wire carries it.
        by_rule = {name: sum(targets[name] in topics
                             for topics in actual.values())
                   for name in RULES}
        self.assertEqual({'created': 4, 'image': count + 1, 'user': 5,
                          'username': 1, 'status': 5}, by_rule)
