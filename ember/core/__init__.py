"""The core: arrays, tracers, the trace stack, primitive binding and graph tracing."""
