"""Networks of nnQC: mask autoencoder (stage 1), Team of Experts, latent diffusion model (stage 2)."""
