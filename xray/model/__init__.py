"""Model: the network, how it is trained and tuned, and Grad-CAM on it.
May use core, storage and data."""
