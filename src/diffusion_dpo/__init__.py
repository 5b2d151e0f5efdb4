"""diffusion-dpo: Diffusion-DPO training and evaluation for text-to-image diffusion models."""
__version__ = "0.1.0"
