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

"""The ``messaging-multicast`` notification driver.

A drop-in for ``messagingv2`` that also replicates selected notifications
to other topics, exchanges and brokers.

Delivery semantics:

* The standard notification is always sent first, exactly as the
  ``messagingv2`` driver (or ``messaging``, for the 1.0 format) sends it,
  on the notifier's transport and topics, at most once.
* Then every replica is published, at most once, to each distinct target
  of the rules the notification matches, in order, by the publisher
  thread of its broker (one per broker and process, shared by the driver
  instances). notify() waits for them at most the largest
  ``replica_timeout`` of the matched rules, and not at all for a broker
  whose current publish is already late. The timeout bounds the wait,
  never the publish: a replica still being published then goes on in the
  background and counts as published if it lands.
* Replicas to the notification transport's own broker are published on
  the service's thread, with their rule's ``replica_retry``, while that
  broker's lane is idle and healthy: a thread could not protect the
  service from the broker its standard notification was just sent to.
* A broker is skipped only after it failed: a target whose publish
  raised is skipped without any network attempt for ``failure_backoff``
  (doubling while it keeps failing); a broker whose publish, connecting
  included, made no progress for 5 s is skipped likewise, with what was
  queued for it. Skipped replicas count as dropped. A slow broker is
  never skipped. Replicas use their rule's ``replica_retry``; the
  standard notification keeps the notifier's ``retry``.
* With ``async_fanout``, notify() does not wait: the service's call
  returns once the original is sent, and a dead or slow broker only fills
  its own queue (``async_queue_size``). Replicas that do not fit are
  dropped. The queues are flushed, within ``async_flush_timeout``, on
  driver cleanup and at interpreter exit (not when a signal kills the
  process).
* Every drop is counted per target and cause and logged at ERROR with the
  true count per cause since the previous line, at most once a minute per
  target, at most a minute after it happened, and at once on cleanup()
  and at exit. Per-broker counters are logged at INFO at most every 10
  minutes while they change, and returned by ``stats()``.

Configuration is validated completely when the driver is loaded; an error
names the group, the option and the value, and no half-configured driver
is ever returned. An invalid replication configuration turns replication
off, never the standard notifications: they keep flowing as messagingv2
sends them, and the driver logs the error at ERROR at load and again at
most once a minute while it stays off.
"""

import collections
import logging
import os

from oslo_messaging.notify import messaging
from oslo_messaging.notify import notifier

from oslo_messaging_ext.notify import _multicast_config
from oslo_messaging_ext.notify import _multicast_delivery
from oslo_messaging_ext.notify import _multicast_lanes
from oslo_messaging_ext.notify import _multicast_opts
from oslo_messaging_ext.notify import _multicast_rules

LOG = logging.getLogger(__name__)

# (pid, summary) of the configurations already reported at INFO.
_LOADED = set()
# The defaults of async_queue_size and async_flush_timeout.
_QUEUE_SIZE, _FLUSH_TIMEOUT = (
    {opt.name: opt.default
     for opt in _multicast_opts.multicast_opts}[name]
    for name in ('async_queue_size', 'async_flush_timeout'))


class MulticastDriver(notifier.Driver):
    """Send notifications like messagingv2, and replicas selected by rules.

    See the module docstring for the delivery semantics and
    doc/source/admin/multicast.rst for the configuration.
    """

    def __init__(self, conf, topics, transport):
        super().__init__(conf, topics, transport)
        group = _multicast_opts.register_opts(conf)
        self._transports = _multicast_delivery.RuleTransports(conf, transport)
        self.config_error = self._replication_off = None
        try:
            loaded = _multicast_config.load(conf, group, self.topics,
                                            self._transports)
            self._rules, warnings = loaded
        except _multicast_config.MulticastConfigError as exc:
            # A typo in a replication rule must not cost the service its
            # standard notifications (billing, search indexers).
            self._transports.release()
            self._rules, warnings = [], exc.warnings
            self.config_error = exc
            self._replication_off = _multicast_config.replication_off(exc)
        except BaseException:
            self._transports.release()
            raise
        self._index_rules()
        try:
            standard_1_0 = group.standard_message_format == '1.0'
        except Exception:
            # Unreadable (a wrong value, a "$" oslo.config cannot
            # interpolate): reported in config_error; send what
            # messagingv2 sends.
            standard_1_0 = False
        async_fanout = self.config_error is None and group.async_fanout
        if standard_1_0:
            self._standard = messaging.MessagingDriver(
                conf, topics=topics, transport=transport, version=1.0)
        else:
            self._standard = messaging.MessagingV2Driver(
                conf, topics=topics, transport=transport)
        queue_size, flush_timeout = _QUEUE_SIZE, _FLUSH_TIMEOUT
        if self.config_error is None:
            # load() has validated every option of the group already.
            delivery = _multicast_opts.read_delivery_opts(conf)
            queue_size = delivery['async_queue_size']
            flush_timeout = delivery['async_flush_timeout']
        self._fanout = _multicast_delivery.Fanout(
            [d for rule in self._rules for d in rule.destinations],
            queue_size, flush_timeout, async_fanout, standard=transport,
            labels=self._transports.labels)
        summary = {'rules': len(self._rules),
                   'targets': len({d.key for r in self._rules
                                   for d in r.destinations}),
                   'async': async_fanout}
        # Services build many Notifiers (glance about 14 a process), each
        # loading its own driver: say it once per configuration.
        key = (os.getpid(), tuple(sorted(summary.items())),
               tuple(warnings), str(self.config_error))
        first = key not in _LOADED
        _LOADED.add(key)
        for warning in warnings:
            (LOG.warning if first else LOG.debug)(
                'messaging-multicast: %s', warning)
        if self.config_error is not None:
            (LOG.error if first else LOG.debug)(
                '%s. The standard notifications are sent as %s sends them; '
                'no replica is sent until the configuration is fixed.',
                self.config_error,
                'messaging' if standard_1_0 else 'messagingv2')
            return
        (LOG.info if first else LOG.debug)(
            'messaging-multicast loaded: %(rules)d rules, '
            '%(targets)d distinct targets, async_fanout=%(async)s', summary)

    def _index_rules(self):
        # A notification is matched against the rules that can select its
        # event_type, not against every rule.
        self._by_event_type = collections.defaultdict(list)
        self._unindexed = []
        self._onmcast_keys = {}
        for rule in self._rules:
            if rule.event_key is not None:
                self._onmcast_keys[rule.event_key] = rule
                continue
            event_types = None
            for selector in rule.selectors:
                indexable = selector.indexable_event_types
                if indexable is not None:
                    event_types = (indexable if event_types is None
                                   else event_types & indexable)
            if event_types is None:
                self._unindexed.append(rule)
            elif not event_types:
                LOG.warning('messaging-multicast rule %s can never match: '
                            'its event_type selectors exclude each other',
                            rule.name)
            for event_type in event_types or ():
                self._by_event_type[event_type].append(rule)

    # Sending.

    def matching_rules(self, message, ctxt):
        """The rules ``message`` matches, in configuration order."""
        candidates = self._by_event_type.get(message.get('event_type'))
        if self._unindexed:
            candidates = (self._unindexed if not candidates else
                          sorted(candidates + self._unindexed,
                                 key=lambda rule: rule.ordinal))
        matched = []
        if candidates:
            # Selectors read what the standard topic carries (to_dict() of
            # the context, JSON-encoded values), converted once if read.
            notification = _multicast_rules.Notification(message, ctxt)
            matched = [rule for rule in candidates
                       if rule.matches(notification)]
        if self._onmcast_keys:
            for field in ('event_type', 'priority', 'message_id',
                          'publisher_id'):
                value = message.get(field)
                rule = self._onmcast_keys.get(
                    value.lower() if isinstance(value, str) else None)
                if rule is not None and rule not in matched:
                    matched.append(rule)
        return matched

    def notify(self, ctxt, message, priority, retry):
        self._standard.notify(ctxt, message, priority, retry)
        if self._replication_off is not None:
            self._replication_off.skip()
            return
        # Selectors only address the notification's fields, never the
        # underscore keys transports add, so the message is matched as is.
        try:
            rules = self.matching_rules(message, ctxt)
        except Exception:
            LOG.exception('messaging-multicast could not evaluate rules for '
                          'event_type %s', message.get('event_type'))
            return
        if not rules:
            return
        # The AMQP drivers add their own keys (_unique_id, _context_*) to the
        # message they send, as the standard send just did: replicas get
        # the notification's fields only. Copied only when a rule matched,
        # since most notifications match none.
        original = {key: value for key, value in message.items()
                    if not key.startswith('_')}
        jobs = []
        seen = set()
        for rule in rules:
            for destination in rule.destinations:
                if destination.key in seen:
                    continue
                seen.add(destination.key)
                jobs.append(_multicast_lanes.Job(
                    destination, ctxt, original, rule.event_key, priority))
        self._fanout.publish(jobs)

    @property
    def dropped(self):
        """Replicas of this driver's targets dropped in the process."""
        return self._fanout.dropped

    def stats(self):
        """The counters of this driver's brokers in the process.

        One dict per broker: ``broker``, ``published``, ``dropped``,
        ``dropped_by_cause``, ``pending`` and ``breaker``. The driver also
        logs them at INFO, at most every 10 minutes while they change, and
        on cleanup() and at exit.
        """
        return self._fanout.stats()

    def flush(self):
        """Wait, within async_flush_timeout, for queued replicas.

        :returns: how many replicas are still waiting or in flight
        """
        return self._fanout.flush()

    def cleanup(self):
        """Flush pending replicas, log what is left, release transports.

        What is still pending after async_flush_timeout is dropped and
        logged at once with its count by cause, as are the drops not
        logged yet.

        The brokers' publisher threads and transports shared with other
        instances of this driver in the process end with the last of them.
        """
        self._fanout.close()
        self._transports.release()
