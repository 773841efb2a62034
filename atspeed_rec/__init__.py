"""atspeed-rec: fast LLM-based generative recommendation (AtSpeed) as RecBole models.

Importing the package makes RecBole work on today's numpy/torch (see `compat.py`) before any
RecBole Config is built.
"""

from atspeed_rec import compat as _compat

_compat.apply()

__version__ = "0.1.0"
