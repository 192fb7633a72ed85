"""kinetix: deep learning with a two-tissue kinetic model for dynamic FDG PET (JAX)."""
