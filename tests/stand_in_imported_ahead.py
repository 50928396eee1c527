"""A module whose import leaves a mark (the file named by ``NAVDEPLOY_TEST_IMPORT_MARK``): tests see whether a worker
imported it ahead of its first job."""

import os
from pathlib import Path

Path(os.environ["NAVDEPLOY_TEST_IMPORT_MARK"]).write_text(str(os.getpid()))
