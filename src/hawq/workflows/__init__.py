"""Workflows: the one skeleton shared by compress, zeroq and the channel-wise methods."""
