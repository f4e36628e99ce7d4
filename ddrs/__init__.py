"""ddrs: the application built on the ddrs_ext library: the ``ddrs`` command line.

- :mod:`ddrs.cli`: ``main``, the parser assembled from the commands' modules, the dispatch;
- :mod:`ddrs.commands`: one module per command (demo, certify, optimize-sigma, predict, analyze,
  train) with its options and its work;
- what the commands share: :mod:`ddrs.options` and :mod:`ddrs.sigma_options` (options, argument
  types), :mod:`ddrs.job` (a run over the selected inputs of a dataset), :mod:`ddrs.distributed_run`
  (torchrun);
- formats: :mod:`ddrs.results` (result files; :mod:`ddrs.analyze` tables and plots of them),
  :mod:`ddrs.loading` and :mod:`ddrs.weights` (models and weights files), :mod:`ddrs.datasets` (data),
  :mod:`ddrs.checkpoints` (the checkpoints of ``ddrs train``);
- training on the embedded digits: :mod:`ddrs.digits_training` (classifiers), :mod:`ddrs.selector`
  (sigma selectors); ``python -m ddrs.train_digits`` is ``ddrs train``.

``import ddrs`` and building the command line's parser import neither torch nor ddrs_ext; the
library itself is ``import ddrs_ext``.
"""
