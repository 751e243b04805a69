"""Data: images to a validated dataset and its model inputs (the one decode path, manifest, splits, sites, tf.data).
May use core and storage."""
