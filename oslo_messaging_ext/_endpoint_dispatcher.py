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

"""oslo.messaging endpoints fed from a unix driver subscription (private).

Public as :class:`oslo_messaging_ext.unix_subscriber.EndpointDispatcher`.
It lives apart because it subclasses oslo.messaging's dispatcher: importing
oslo.messaging costs a reader such as ``oslo-notify-tail`` start-up time
and, through oslo.service, a deprecation warning, so unix_subscriber loads
this module only when the class is asked for.
"""

import logging
import threading

from oslo_messaging.notify import dispatcher as notify_dispatcher

LOG = logging.getLogger('oslo_messaging_ext.unix_subscriber')


class _Incoming:
    """A decoded notification, as NotificationDispatcher reads a message."""

    __slots__ = ('ctxt', 'message')

    def __init__(self, notification):
        self.ctxt = notification.get('context') or {}
        self.message = notification


class EndpointDispatcher(notify_dispatcher.NotificationDispatcher):
    """Call oslo.messaging notification endpoints, as a listener would.

    An endpoint has a method per priority it handles (``info``, ``warn``,
    ``error``...) taking ``(ctxt, publisher_id, event_type, payload,
    metadata)``, and optionally a ``filter_rule``
    (:class:`oslo_messaging.NotificationFilter`): this is oslo.messaging's
    own NotificationDispatcher, the one its notification listeners use, so
    endpoint code works unchanged. ``ctxt`` is the context sent with the
    notification (with ``sock_include_context``) or an empty dict;
    ``metadata`` holds ``message_id`` and ``timestamp``.

    There is no requeue on a local socket: an endpoint that raises is
    logged and the next one is called, and an endpoint's return value
    (``NotificationResult.REQUEUE`` included) is ignored.
    """

    __module__ = 'oslo_messaging_ext.unix_subscriber'

    def __init__(self, endpoints):
        super().__init__(endpoints, None)
        self._called = threading.local()

    def dispatch(self, notification):
        """Hand one decoded notification to the matching endpoints.

        :returns: how many endpoint methods were called
        """
        if not isinstance(notification.get('priority', ''), str):
            return 0
        self._called.count = 0
        super().dispatch(_Incoming(notification))
        return self._called.count

    def _exec_callback(self, callback, message):
        self._called.count += 1
        try:
            callback(message['ctxt'], message['publisher_id'],
                     message['event_type'], message['payload'],
                     message['metadata'])
        except Exception:
            LOG.exception('Notification endpoint %s raised on %s',
                          callback, message['event_type'])
        # Never NotificationResult.REQUEUE, which would stop the dispatch.
        return None

    def run(self, subscription):
        """Dispatch every notification of ``subscription`` until it ends."""
        for notification in subscription:
            self.dispatch(notification)
