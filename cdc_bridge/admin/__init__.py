"""Admin commands: ``check``, ``setup``, ``teardown``, ``status``, ``tail``, ``config show``.

One module per command, each with one entry function the CLI calls once it has built the
settings. They share two edges: :mod:`.database` (catalog queries on an ordinary
PostgreSQL connection) and :mod:`.jetstream` (stream lookups on a short-lived NATS
connection). Provisioning itself is not repeated here: ``setup`` and ``check`` reuse
:mod:`cdc_bridge.provisioning` and :meth:`cdc_bridge.sink.JetStreamSink.ensure_stream`,
so they can never disagree with what ``run`` does.
"""
