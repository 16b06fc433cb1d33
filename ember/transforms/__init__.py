"""Function transformations: jvp, linearize, vjp/grad, vmap, jit, checkpoint, custom_vjp."""
