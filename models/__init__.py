"""Pure-PyTorch Stable Diffusion models (UNet, VAE, CLIP text encoders) and their loaders."""
