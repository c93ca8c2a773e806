"""fusebuild: ahead-of-time builds of fused elementwise kernels (CUDA cubins, CPU shared objects)."""
__version__ = "0.1.0"
