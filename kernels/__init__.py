"""Pallas kernels with pure-JAX references (installed as lqseg_jax.kernels).

Imported as a bare top-level `kernels` (from the repository root), this folder hands over to the installed
package of that name: see lqseg_jax/_toplevel.py for why.
"""

from lqseg_jax._toplevel import defer_to_installed

defer_to_installed(__name__, __file__)
