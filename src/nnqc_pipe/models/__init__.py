"""Networks of nnQC: the mask autoencoder (stage 1), the Team of Experts and the latent diffusion model (stage 2)."""
