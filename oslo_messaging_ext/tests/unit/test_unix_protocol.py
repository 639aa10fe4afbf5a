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

"""What the wire helpers count in a chunk of relayed lines."""

from oslotest import base

from oslo_messaging_ext.notify import _unix_protocol as proto


def line(source, number):
    return (b'{"event_type":"image.update","payload":{},"sequence":'
            b'{"source":"%s","number":%d}}\n' % (source.encode(), number))


class AccountedInTestCase(base.BaseTestCase):

    def test_lines_and_drop_notices_count_per_source(self):
        # What a departing publisher had not relayed: two lines of its
        # own and a notice of three lines of another process it carried.
        notice = proto.dropped_envelope(3, 'test', {'other': 3})
        chunk = line('mine', 4) + notice + line('mine', 5)
        self.assertEqual((5, {'mine': 2, 'other': 3}),
                         proto.accounted_in(chunk))

    def test_a_notice_with_a_bad_count_accounts_for_nothing(self):
        notice = proto.dropped_envelope(3, 'test', {'other': 3})
        forged = notice.replace(b'"dropped":3', b'"dropped":-3')
        self.assertEqual((1, {'mine': 1}),
                         proto.accounted_in(line('mine', 1) + forged))
