"""ddrs: the application built on the ddrs_ext library: the ``ddrs`` command line (ddrs.cli), its
demo (ddrs.demo), the data and model formats it reads (ddrs.datasets, ddrs.loading), its result
files (ddrs.results, ddrs.analyze) and the digits training script (ddrs.train_digits).

``import ddrs`` and building the command line's parser import neither torch nor ddrs_ext; the
library itself is ``import ddrs_ext``.
"""
