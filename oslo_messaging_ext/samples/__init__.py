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

"""Real glance notifications, recorded to be replayed as sample data.

glance-image-notifications.jsonl holds the envelopes a real glance-api
emitted for one image's life cycle (create, update, prepare, upload,
activate, update), one JSON object a line, exactly as oslo.messaging built
them.
"""

import json
import os

GLANCE_IMAGE_NOTIFICATIONS = os.path.join(
    os.path.dirname(__file__), 'glance-image-notifications.jsonl')


def glance_image_notifications():
    """Return the recorded glance envelopes as a list of dicts, in order."""
    with open(GLANCE_IMAGE_NOTIFICATIONS, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def glance_life_cycle():
    """The recorded envelopes, then the image's deletion.

    The recording ends before the image is deleted; the image.delete
    envelope is the last one with its event_type and status changed.
    """
    envelopes = glance_image_notifications()
    deleted = dict(envelopes[-1], event_type='image.delete',
                   payload=dict(envelopes[-1]['payload'], status='deleted'))
    return envelopes + [deleted]


def glance_upload_payload():
    """Return the payload of the recorded image.upload notification.

    It is the largest payload of the life cycle, so it is the honest one
    to measure drivers with.
    """
    for envelope in glance_image_notifications():
        if envelope['event_type'] == 'image.upload':
            return envelope['payload']
    raise LookupError('no image.upload in %s' % GLANCE_IMAGE_NOTIFICATIONS)
