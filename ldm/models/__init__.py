"""Model building blocks: text encoders, VAE, U-Net, freezing and export helpers."""
