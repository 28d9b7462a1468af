"""systemd integration: notify protocol, socket activation, shipped unit files, launchers.

- :mod:`.notify`: ``READY=1``/``STATUS=``/``STOPPING=1``/``WATCHDOG=1`` over ``NOTIFY_SOCKET``.
- :mod:`.activation`: ``--listen systemd:...`` with or without ``FileDescriptorName=``.
- :mod:`.units`: the unit files in ``units/`` and ``tvmrpc systemd-units`` that writes them.
- :mod:`.launch`: the ``tvm-tracker``/``tvm-proxy``/``tvm-server`` commands units run.

Invariants:
- Importing this package imports nothing (the worker processes import
  ``tvmrpc`` and must stay free of Twisted); each submodule is imported on use.
"""
