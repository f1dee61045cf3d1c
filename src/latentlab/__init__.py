"""latentlab: working in an autoencoder's latent space on MNIST."""
import os

# Set before torch starts its thread pool: spinning OpenMP workers slow small models badly on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
