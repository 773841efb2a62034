"""atspeed-rec: fast LLM-based generative recommendation (AtSpeed) as RecBole models.

Importing the package makes RecBole work on today's numpy/torch (see `compat.py`) and
registers the speculative-decoding metrics, before any RecBole Config is built.
"""

from atspeed_rec import compat as _compat

_compat.apply()

from atspeed_rec.recbole_glue.metrics import register_spec_metrics  # noqa: E402

register_spec_metrics()  # speedup & co. become RecBole metrics, before any Config

__version__ = "0.1.0"
