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

"""The functional harness itself, on oslo.messaging's in-tree driver.

If these fail, the broker or the harness is broken, not our drivers; they
are the reference the driver tests are compared with.
"""

import oslo_messaging

from oslo_messaging_ext import samples
from oslo_messaging_ext.tests.functional import base


class MessagingV2BaselineTestCase(base.BrokerTestCase):

    def test_each_notification_arrives_once(self):
        topic = base.unique_name('baseline')
        collector = self.start_listener(topic)
        notifier = oslo_messaging.Notifier(
            self.transport, publisher_id='image.localhost',
            driver='messagingv2', topics=[topic])
        envelopes = samples.glance_image_notifications()
        for envelope in envelopes:
            notifier.info({}, envelope['event_type'], envelope['payload'])

        received = collector.wait_for(len(envelopes))
        self.assertEqual([e['event_type'] for e in envelopes],
                         [r['event_type'] for r in received])
        self.assertEqual({'image.localhost'},
                         {r['publisher_id'] for r in received})
        # Nothing beyond what was sent: wait briefly for a duplicate.
        self.assertEqual(len(envelopes),
                         len(collector.wait_for(len(envelopes) + 1,
                                                timeout=0.5)))
