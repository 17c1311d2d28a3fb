"""Training program for the MNIST VAE: data, models, loop, evaluation, pictures, export."""
