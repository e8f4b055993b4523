"""SDNS training: builds the encoder and writes a model bundle."""
