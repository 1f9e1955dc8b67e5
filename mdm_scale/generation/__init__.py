"""Decoding (LLaDA-style masked diffusion, greedy ARM), answer extraction and accuracy evaluation."""
