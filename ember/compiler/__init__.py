"""The backend-neutral compiler: passes over the IR that every compiled backend shares.

``fusion`` groups elementwise, movement and reduction equations into ``fused`` equations;
``loops`` describes one fused equation as a loop nest with affine index expressions, which a
code generator (C for the CPU backend, later a GPU one) renders; memory planning lays out the
buffers. Submodules are imported by name: this package imports none of them, so using one pass
costs no other.
"""
