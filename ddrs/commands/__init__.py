"""The ``ddrs`` commands, one module each: its options, the checks of its arguments that need no
torch, and its work (``run``).

=================  ==========================================================================
``demo``           :mod:`ddrs.commands.demo` (work: ``demo_run``, report: ``demo_report``)
``certify``        :mod:`ddrs.commands.certify` (work: ``certify_run``)
``optimize-sigma`` :mod:`ddrs.commands.optimize_sigma`
``predict``        :mod:`ddrs.commands.predict`
``analyze``        :mod:`ddrs.commands.analyze`
``train``          :mod:`ddrs.commands.train`
=================  ==========================================================================

A command module's top level imports neither torch nor ddrs_ext, so that ``ddrs --help`` and
argument errors answer at once: each adds its parser with ``add_parser(subparsers)`` (called by
:func:`ddrs.cli.build_parser`, which lists the commands) and names its work as
``"module:function"``, which :func:`ddrs.cli.main` imports only when the command runs.
What certify, predict and optimize-sigma share is in :mod:`ddrs.options`,
:mod:`ddrs.sigma_options` and :mod:`ddrs.noise_options` (options; ``--noise`` also for train) and
:mod:`ddrs.job` and :mod:`ddrs.noise_settings` (work).
"""
