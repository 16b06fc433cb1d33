"""``ember.numpy``: NumPy's API on Ember arrays, usable eagerly and under every transformation.

Names, arguments, broadcasting and type promotion follow NumPy 2. Deliberate differences
(documented in ``docs/numpy.md``): arrays are immutable values (no views, ``x[i] = v`` rebinds),
functions whose result shape depends on data (``nonzero``, ``unique``, boolean masks) need
concrete inputs, and out-of-range indices under ``jit`` clamp/drop instead of raising.
"""

from ember import dtypes as _dtypes
from ember.core.array import Array as ndarray  # noqa: F401, N813
from ember.numpy import _methods, fft, linalg, special  # noqa: F401
from ember.numpy._core import asarray  # noqa: F401
from ember.numpy._creation import *  # noqa: F403
from ember.numpy._einsum import einsum  # noqa: F401
from ember.numpy._indexing import *  # noqa: F403
from ember.numpy._info import *  # noqa: F403
from ember.numpy._linalg import *  # noqa: F403
from ember.numpy._math import *  # noqa: F403
from ember.numpy._reductions import *  # noqa: F403
from ember.numpy._search import *  # noqa: F403
from ember.numpy._shape import *  # noqa: F403
from ember.numpy._shape_more import *  # noqa: F403

_methods.install()

bool_ = _dtypes.bool_.type
int8, int16, int32, int64 = (d.type for d in (_dtypes.int8, _dtypes.int16, _dtypes.int32,
                                               _dtypes.int64))
uint8, uint16, uint32, uint64 = (d.type for d in (_dtypes.uint8, _dtypes.uint16,
                                                   _dtypes.uint32, _dtypes.uint64))
float16, bfloat16, float32, float64 = (d.type for d in (_dtypes.float16, _dtypes.bfloat16,
                                                         _dtypes.float32, _dtypes.float64))
complex64, complex128 = _dtypes.complex64.type, _dtypes.complex128.type
finfo = _dtypes.finfo
iinfo = _dtypes.iinfo
result_type = _dtypes.result_type
dtype = _dtypes.canonicalize

pi = 3.141592653589793
e = 2.718281828459045
inf = float("inf")
nan = float("nan")
newaxis = None


def promote_types(type1, type2):
    return _dtypes.promote((_dtypes.canonicalize(type1), False),
                           (_dtypes.canonicalize(type2), False))


def can_cast(from_, to, casting="safe"):
    import numpy as _np

    return _np.can_cast(_dtypes.canonicalize(from_) if from_ != _dtypes.bfloat16 else
                        _np.float16, _dtypes.canonicalize(to) if to != _dtypes.bfloat16
                        else _np.float32, casting)


def issubdtype(arg1, arg2):
    import numpy as _np

    return _np.issubdtype(arg1, arg2)


def isdtype(dtype, kind):
    """Array API ``isdtype``: kind is a dtype or 'bool', 'integral', 'real floating'..."""
    dt = _dtypes.canonicalize(dtype)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if isinstance(k, str):
            if (k == "bool" and dt == _dtypes.bool_) or \
                    (k == "signed integer" and dt.kind == "i") or \
                    (k == "unsigned integer" and dt.kind == "u") or \
                    (k == "integral" and _dtypes.is_int(dt)) or \
                    (k == "real floating" and _dtypes.is_float(dt)) or \
                    (k == "complex floating" and _dtypes.is_complex(dt)) or \
                    (k == "numeric" and dt != _dtypes.bool_):
                return True
        elif dt == _dtypes.canonicalize(k):
            return True
    return False
