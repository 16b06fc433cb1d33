"""Primitives and the thin functions that bind them (the ``lax`` level).

Every primitive is declared in one of these modules together with all of its rules. The
functions here do no implicit promotion or broadcasting: operands must already agree, exactly
as in the IR. NumPy semantics (broadcasting, type promotion, Python scalars) live one layer up
in :mod:`ember.numpy`.
"""

from ember.ops.decompositions import *  # noqa: F401,F403
from ember.ops.elementwise import *  # noqa: F401,F403
from ember.ops.fft import *  # noqa: F401,F403
from ember.ops.indexing import *  # noqa: F401,F403
from ember.ops.linalg import *  # noqa: F401,F403
from ember.ops.random_bits import *  # noqa: F401,F403
from ember.ops.reduce import *  # noqa: F401,F403
from ember.ops.sort import *  # noqa: F401,F403
from ember.ops.structural import *  # noqa: F401,F403
