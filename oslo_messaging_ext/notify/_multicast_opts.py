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

"""The configuration options of the ``messaging-multicast`` driver.

The driver registers them when it loads: [oslo_messaging_multicast], one
[multicast_rule_NAME] group per rule it names, and onmcast's options in
[DEFAULT]. oslo_messaging_ext.opts lists them for the sample config and
the docs.
"""

import glob
import math
import os
import threading

from oslo_config import cfg
from oslo_config import types

GROUP = 'oslo_messaging_multicast'
RULE_GROUP_PREFIX = 'multicast_rule_'


class Seconds(types.Float):
    """A duration in seconds: finite, and one threading can wait for.

    nan passes every min/max comparison and inf (or anything beyond
    threading.TIMEOUT_MAX) makes a wait raise OverflowError: both are
    refused when the value is read.
    """

    def __init__(self, min=0, max=threading.TIMEOUT_MAX, **kwargs):
        super().__init__(min=min, max=max, **kwargs)

    def __call__(self, value):
        seconds = super().__call__(value)
        if seconds is None:
            raise ValueError('should be a number of seconds')
        if not math.isfinite(seconds):
            raise ValueError('should be a finite number of seconds')
        return seconds


multicast_opts = [
    cfg.ListOpt('rules',
                default=[],
                help='Names of the replication rules. Each rule NAME is '
                     'configured in its own group [%sNAME]; a notification '
                     'matching several rules reaches each distinct target '
                     'once.' % RULE_GROUP_PREFIX),
    cfg.StrOpt('standard_message_format',
               default='2.0',
               choices=[('2.0', 'the messagingv2 envelope'),
                        ('1.0', 'the messaging driver format, without '
                                'envelope, for legacy consumers')],
               help='Format of the standard notification, sent first on the '
                    'notifier\'s topics. Replicas of rules always use 2.0.'),
    cfg.BoolOpt('async_fanout',
                default=False,
                help='Publish replicas from a background worker, so that the '
                     'service\'s call returns as soon as the standard '
                     'notification is sent. Replicas that do not fit in the '
                     'queue are dropped, counted and logged.'),
    cfg.IntOpt('async_queue_size',
               default=10000,
               min=1,
               help='Maximum number of replicas waiting, per broker, for '
                    'the background workers when async_fanout is enabled.'),
    cfg.Opt('async_flush_timeout',
            type=Seconds(),
            default=10.0,
            help='Seconds to wait, on driver cleanup and at interpreter '
                 'exit, for queued replicas to be published. What is '
                 'still queued then is counted as dropped and logged. A '
                 'process killed by a signal it does not handle (SIGTERM '
                 'with the default handler, SIGKILL) loses its queue '
                 'without a line.'),
    cfg.StrOpt('onmcast_replica_shape',
               default='onmcast',
               choices=[('onmcast', 'what the onmcast driver sent: topic '
                                    'PREFIXTARGET.EVENT_KEY, 1.0 format, '
                                    'event_type set to the matched key and '
                                    'the whole original notification as '
                                    'payload'),
                        ('clean', 'replicas shaped like rule replicas: topic '
                                  'PREFIXTARGET, 2.0 envelope, the original '
                                  'event_type, payload, timestamp and '
                                  'message_id')],
               help='Shape of the replicas configured in [DEFAULT] with the '
                    'onmcast options (multicast_events).'),
]

rule_opts = [
    cfg.MultiStrOpt('selector',
                    default=[],
                    help='A condition the notification must meet, as '
                         '"FIELD [OPERATOR] VALUE". FIELD is event_type, '
                         'priority, publisher_id, message_id, '
                         'payload.<dotted.path> or context.<key>. OPERATOR '
                         'is exact (the default), glob, regex, prefix, '
                         'contains or in (VALUE is then a comma-separated '
                         'set), each negated by a leading "!". "*" alone '
                         'matches every notification. Repeat the option '
                         'for several selectors: all must match. Required: '
                         'a rule without selector is an error. A regex '
                         'only sees values of at most 1024 characters, and '
                         'patterns whose matching time has no bound '
                         '(backreferences, lookarounds, nested '
                         'repetitions) are refused.'),
    cfg.ListOpt('targets',
                default=[],
                help='Where replicas are published: TOPIC or EXCHANGE/TOPIC. '
                     'A replica of priority P is published with routing key '
                     'TOPIC.P, so an oslo.messaging notification listener '
                     'on Target(topic=TOPIC[, exchange=EXCHANGE]) receives '
                     'it. Required.'),
    cfg.StrOpt('transport_url',
               secret=True,
               help='Transport URL of the broker the replicas of this rule '
                    'are published to. Default: the notification '
                    'transport.'),
    cfg.StrOpt('publisher_id',
               help='publisher_id of the replicas. Default: the original '
                    'notification\'s.'),
] + [
    # Delivery options: how long the replicas of this rule may take and
    # how a failing target is handled.
    cfg.Opt('replica_timeout',
            type=Seconds(min=0.001, max=300),
            default=0.5,
            help='Longest time, in seconds, the service\'s notify() call '
                 'waits for the replicas of this rule (with async_fanout, it '
                 'never waits). It bounds the wait, not the publish: a '
                 'replica still being published then is published in the '
                 'background. A notification matching several rules waits '
                 'at most their largest replica_timeout, the brokers being '
                 'published to in parallel.'),
    cfg.IntOpt('replica_retry',
               default=1,
               min=0,
               help='How many times a replica publish is retried after a '
                    'connection failure (oslo.messaging\'s retry, for the '
                    'replicas only: the standard notification keeps the '
                    'notifier\'s retry). notify() waits at most '
                    'replica_timeout whatever its value.'),
    cfg.Opt('failure_backoff',
            type=Seconds(min=0.001, max=3600),
            default=10.0,
            help='Seconds during which a target whose publish failed (or '
                 'a broker whose publish made no progress for 5 s) is '
                 'skipped without any network attempt, its replicas counted '
                 'as dropped. A slow broker is never skipped. Doubles at '
                 'each consecutive failure, up to 16 times this value; a '
                 'successful publish resets it.'),
]

# onmcast's options, kept in [DEFAULT] unchanged so that its configuration
# files keep working. One ListOpt per event key is registered at load.
onmcast_opts = [
    cfg.ListOpt('multicast_events',
                default=[],
                help='(onmcast compatibility; prefer rules in '
                     '[%s]) Event keys to multicast. Each key is also the '
                     'name of a [DEFAULT] option listing its targets, e.g. '
                     '"image.upload = host1,host2". A key matches a '
                     'notification whose event_type, priority, message_id '
                     'or publisher_id equals it, ignoring case.' % GROUP),
    cfg.StrOpt('multicast_topic_prefix',
               default='',
               help='(onmcast compatibility) Prefix of the replica topics '
                    'of multicast_events.'),
    cfg.StrOpt('publisher_id',
               help='(onmcast compatibility) publisher_id of the replicas '
                    'of multicast_events. Default: "<hostname>-MULTICAST".'),
]

# How the sample config and the docs show the dynamic rule groups: one
# example group, as oslo.config does for its own config source groups.
rule_group = cfg.OptGroup(
    RULE_GROUP_PREFIX + 'example',
    help='Example of a rule group. Each rule NAME listed in [%s] rules is '
         'configured in its own group [%sNAME]; this one would configure '
         'the rule "example".' % (GROUP, RULE_GROUP_PREFIX),
    dynamic_group_owner='rules')


def register_opts(conf):
    """Register the [oslo_messaging_multicast] options; return the group."""
    conf.register_opts(multicast_opts, group=GROUP)
    return conf[GROUP]


DELIVERY_OPTS = ('async_fanout', 'async_queue_size', 'async_flush_timeout')
RULE_DELIVERY_OPTS = {'replica_timeout': 'timeout',
                      'replica_retry': 'retry',
                      'failure_backoff': 'backoff'}


def _read(conf, group_name, names):
    """Read the options ``names`` of ``group_name``, all of them.

    :raises ValueError: naming the group, option and value of every
        invalid one, whether or not the feature it belongs to is on
    """
    values, problems = {}, []
    for name in names:
        try:
            values[name] = conf[group_name][name]
        except (cfg.ConfigFileValueError, ValueError) as exc:
            raw = _raw_value(conf, group_name, name)
            reason = str(exc).rpartition(' is not valid: ')[2]
            problems.append(f'[{group_name}] {name} = {raw}: {reason}')
    if problems:
        raise ValueError('; '.join(problems))
    return values


def _raw_value(conf, group_name, name):
    values = file_sections(conf).get(group_name, {}).get(name)
    return values[-1] if values else '?'


def config_files(conf):
    """The configuration files ``conf`` was loaded from, in order.

    Those of --config-file (or the service's default files), then those
    of each --config-dir, as oslo.config reads them.
    """
    files = []
    for name in ('config_file', 'config_dir'):
        try:
            value = conf[name]
        except cfg.NoSuchOptError:
            # A ConfigOpts that was never called has no file.
            continue
        if name == 'config_file':
            files += list(value or ())
            continue
        for directory in [value] if isinstance(value, str) else value or ():
            files += sorted(glob.glob(os.path.join(directory, '*.conf')))
    return files


def file_sections(conf):
    """{section: {key: [text, ...]}} as the configuration files hold them.

    The text before oslo.config's interpolation of "$", for options
    registered or not. Group names are normalized as oslo.config does.
    A file that cannot be read is left out: oslo.config reported it
    when it loaded the configuration.
    """
    merged = {}
    for path in config_files(conf):
        sections = {}
        try:
            cfg.ConfigParser(path, sections).parse()
        except Exception:  # nosec B112 - oslo.config reported it at load
            continue
        for section, keys in sections.items():
            if section != 'DEFAULT':
                section = section.lower()
            target = merged.setdefault(section, {})
            for key, values in keys.items():
                # A later file overrides the earlier ones.
                target[key] = list(values)
    return merged


def option(conf, group, name):
    """The value of another library's option; None if not registered."""
    try:
        return conf[group][name]
    except cfg.Error:
        return None


def read_delivery_opts(conf):
    """The async options of [oslo_messaging_multicast], validated."""
    return _read(conf, GROUP, DELIVERY_OPTS)


def register_rule_opts(conf, name):
    """Register the options of rule ``name``; return its group's name."""
    group_name = RULE_GROUP_PREFIX + name
    conf.register_opts(rule_opts, group=group_name)
    return group_name


def register_compatible(conf, opts):
    """Register ``opts`` in [DEFAULT], accepting a compatible existing one.

    onmcast's options may already be registered by the service (or by
    another instance of this driver): identical definitions are accepted
    by oslo.config, and a different list option of the same name is read
    as it is. Anything else is a configuration error.

    :returns: the (opt, value) pairs of the options already registered
        with another type, whose value cannot be read as onmcast's
    """
    conflicts = []
    for opt in opts:
        try:
            conf.register_opt(opt)
        except cfg.DuplicateOptError:
            value = conf[opt.dest]
            if isinstance(opt, cfg.ListOpt):
                expected = list
            else:
                expected = (str, type(None))
            if not isinstance(value, expected):
                conflicts.append((opt, value))
    return conflicts
