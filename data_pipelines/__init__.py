"""Host-side datasets and grain pipelines, device-side degradation (installed as lqseg_jax.data_pipelines).

Imported as a bare top-level `data_pipelines` (from the repository root), this folder hands over to the
installed package of that name: see lqseg_jax/_toplevel.py for why.
"""

from lqseg_jax._toplevel import defer_to_installed

defer_to_installed(__name__, __file__)
