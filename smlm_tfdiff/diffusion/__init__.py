"""The diffusion model's sampling side: noise schedule and loss weights, the sampler, projection."""
