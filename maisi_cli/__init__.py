"""maisi: a command-line tool around NVIDIA MAISI, a 3D latent diffusion model for CT with segmentation masks."""

__version__ = "0.1.0"
