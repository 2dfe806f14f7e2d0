"""Data: the sample format, readers, preprocessing and the synthetic shapes world."""
