"""Data: corpora fetched and normalised, tokenised per level, split and stored as token arrays."""
