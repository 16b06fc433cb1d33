"""The compiled CPU backend: graphs become one C translation unit with BLAS calls.

``toolchain`` finds the C compiler and caches built libraries; ``program`` renders a planned
graph as C; ``backend`` is the :class:`~ember.backends.base.Backend` named ``"cpu"``. Nothing
is imported here, so loading the toolchain does not load the compiler layers.
"""
