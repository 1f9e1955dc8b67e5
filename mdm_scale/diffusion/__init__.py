"""The diffusion objective: keyed noise, t-samplers, mask generators and the weighted MDM / ARM losses."""
