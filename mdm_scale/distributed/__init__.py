"""Distributed set-up: process groups on GPU or CPU, and small collectives."""
