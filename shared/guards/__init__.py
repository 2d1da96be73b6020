"""Guards: forbidden words and patterns on what the model reads (input) and writes (output), leak protection, and the text normalisation they match on."""
