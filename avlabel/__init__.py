"""avlabel: fine-tune Cosmos Reason to label dashcam clips, measure it against human labels, publish it on the Hub.

The repository keeps one folder per job (data_builder/, train/, infer/, eval/, hub/, catalog/, recipes/);
they install as `avlabel.<folder>`, so nothing with a generic name lands in site-packages.
"""

from pathlib import Path

__version__ = "0.2.0"

# In a source checkout those folders sit beside this package rather than inside it (the wheel maps them
# in through pyproject's package-dir): look for `avlabel.train` etc. there too. Python's own package
# search does the rest, so a clone works with PYTHONPATH=<clone> and no install.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "train" / "__init__.py").is_file():
    __path__.append(str(_checkout))
