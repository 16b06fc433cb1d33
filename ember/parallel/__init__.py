"""Native parallelism: devices, meshes, sharded arrays, communicators and runtimes."""
