"""The diffusion erasers, one file each; the registry (erasers.registry) finds every module here."""
