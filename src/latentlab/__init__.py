"""latentlab: working in an autoencoder's latent space on MNIST."""
# OpenMP's wait policy is left at its default (an idle worker spins a few milliseconds, then sleeps). PASSIVE,
# set here before, put the worker to sleep after every op, so each of the autoencoder's ops on two threads
# waited for it to wake: its training ran 25-40% slower on 2 cores. Stages on one thread start no worker, so
# nothing spins beside the stage in the other process; tests and sweep trials still ask for PASSIVE.

__version__ = "0.1.0"
