"""FastAPI service for the MNIST VAE TorchScript artifacts."""
